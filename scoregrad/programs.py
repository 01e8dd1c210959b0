"""Sequential programs with causal credit (DiCE): draws in steps, a cost per step.

``import scoregrad.programs as sp``; see docs/programs.md.
"""

from scoregrad._src.baselines import LearnedState, MovingAverageState
from scoregrad._src.programs import Program, Steps, causal, program
from scoregrad._src.programs_baselines import (
    StepBaseline,
    cost_to_go,
    group_leave_one_out,
    leave_one_out,
    moving_average,
    none,
    value_function,
)
from scoregrad._src.programs_ipd import IPD_COSTS, iterated_prisoners_dilemma

__all__ = [
    "IPD_COSTS",
    "LearnedState",
    "MovingAverageState",
    "Program",
    "StepBaseline",
    "Steps",
    "causal",
    "cost_to_go",
    "group_leave_one_out",
    "iterated_prisoners_dilemma",
    "leave_one_out",
    "moving_average",
    "none",
    "program",
    "value_function",
]
