"""Baselines for the score-function estimator."""

from scoregrad._src.baselines import (
    LearnedState,
    MovingAverageState,
    batch_mean,
    learned,
    leave_one_out,
    moving_average,
    none,
    optimal,
)

__all__ = [
    "LearnedState",
    "MovingAverageState",
    "batch_mean",
    "learned",
    "leave_one_out",
    "moving_average",
    "none",
    "optimal",
]
