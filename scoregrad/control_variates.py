"""Control variates and Rao-Blackwellization for score-function and pathwise estimators."""

from scoregrad._src.control_variates import (
    ControlVariate,
    control_variate,
    delta_method,
    rao_blackwell,
    with_control_variates,
)

__all__ = [
    "ControlVariate",
    "control_variate",
    "delta_method",
    "rao_blackwell",
    "with_control_variates",
]
