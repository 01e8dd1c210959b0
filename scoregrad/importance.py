"""Importance-weighted score-function estimators (off-policy, sample reuse) with effective sample size."""

from scoregrad._src.importance import (
    ImportanceEstimate,
    estimate_grad_importance,
    importance_weighted,
)

__all__ = ["ImportanceEstimate", "estimate_grad_importance", "importance_weighted"]
