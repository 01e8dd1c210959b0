"""scoregrad: Monte Carlo gradient estimation in JAX."""

from scoregrad import (
    baselines,
    control_variates,
    families,
    importance,
    lm_rl,
    numpyro_sites,
    programs,
    sampling,
)
from scoregrad._src.adaptive import AdaptiveEstimate, estimate_grad_adaptive
from scoregrad._src.api import (
    GradEstimate,
    estimate_grad,
    estimate_grad_from_samples,
    expectation,
    expectation_with_state,
)
from scoregrad._src.auto import AutoReport, auto
from scoregrad._src.base import Baseline, Draws, Estimator, FStats, Plan, Target, UnitOut, magic_box
from scoregrad._src.binding import Bound
from scoregrad._src.binding import bind_public as bind
from scoregrad._src.diagnostics import Diagnostics, diagnostics, timed_estimate
from scoregrad._src.estimators.arm import arm, disarm
from scoregrad._src.estimators.categorical import arsm, gumbel_top_k, unordered_set
from scoregrad._src.estimators.categorical_rebar import categorical_rebar, categorical_relax
from scoregrad._src.estimators.exact import enumerate, indecater
from scoregrad._src.estimators.measure_valued import measure_valued
from scoregrad._src.estimators.multisample import rloo, vimco
from scoregrad._src.estimators.pathwise import pathwise
from scoregrad._src.estimators.rebar_relax import RelaxState, rebar, relax
from scoregrad._src.estimators.relaxed import (
    gumbel_softmax,
    straight_through,
    straight_through_gumbel,
)
from scoregrad._src.estimators.score import score_function
from scoregrad._src.family import Capabilities, Family

__version__ = "0.1.0"

__all__ = [
    "AdaptiveEstimate",
    "AutoReport",
    "Baseline",
    "Bound",
    "Draws",
    "Capabilities",
    "Diagnostics",
    "Estimator",
    "FStats",
    "Family",
    "GradEstimate",
    "Plan",
    "RelaxState",
    "Target",
    "UnitOut",
    "__version__",
    "arm",
    "arsm",
    "auto",
    "baselines",
    "bind",
    "categorical_rebar",
    "categorical_relax",
    "control_variates",
    "diagnostics",
    "disarm",
    "enumerate",
    "estimate_grad",
    "estimate_grad_adaptive",
    "estimate_grad_from_samples",
    "expectation",
    "expectation_with_state",
    "families",
    "gumbel_softmax",
    "gumbel_top_k",
    "importance",
    "indecater",
    "lm_rl",
    "magic_box",
    "measure_valued",
    "pathwise",
    "numpyro_sites",
    "programs",
    "rebar",
    "relax",
    "rloo",
    "sampling",
    "score_function",
    "straight_through",
    "straight_through_gumbel",
    "unordered_set",
    "timed_estimate",
    "vimco",
]
