"""Sampling designs: antithetic, stratified, randomized quasi-Monte Carlo, common random numbers."""

from scoregrad._src.sampling import (
    antithetic,
    builtin_transform,
    finite_difference,
    halton,
    open_uniform,
    qmc,
    stratified,
)

__all__ = ["antithetic", "builtin_transform", "finite_difference", "halton", "open_uniform", "qmc", "stratified"]
