"""Baselines for the score-function estimator."""

from scoregrad._src.baselines import MovingAverageState, leave_one_out, moving_average, none

__all__ = ["MovingAverageState", "leave_one_out", "moving_average", "none"]
