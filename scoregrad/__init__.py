"""scoregrad: Monte Carlo gradient estimation in JAX."""

from scoregrad import baselines, families
from scoregrad._src.api import (
    GradEstimate,
    estimate_grad,
    estimate_grad_from_samples,
    expectation,
    expectation_with_state,
)
from scoregrad._src.base import Baseline, Estimator, FStats, UnitOut, magic_box
from scoregrad._src.estimators.pathwise import pathwise
from scoregrad._src.estimators.score import score_function
from scoregrad._src.family import Family

__version__ = "0.1.0"

__all__ = [
    "Baseline",
    "Estimator",
    "FStats",
    "Family",
    "GradEstimate",
    "UnitOut",
    "__version__",
    "baselines",
    "estimate_grad",
    "estimate_grad_from_samples",
    "expectation",
    "expectation_with_state",
    "families",
    "magic_box",
    "pathwise",
    "score_function",
]
