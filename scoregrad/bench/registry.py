"""The estimator registry of ``scoregrad bench``: name -> factory + which problems it applies to.

Adding an estimator to the benchmark is ONE entry in :data:`ESTIMATORS` (insert it just above the
marker comment at the end of the list)::

    EstimatorEntry(
        name="disarm",                                  # unique, shown in tables and plots
        factory=lambda problem: sg.disarm(),            # -> a scoregrad Estimator
        requires=frozenset({"kind:bernoulli"}),         # capabilities the problem must have
        description="DisARM (Dong et al. 2020), coupled antithetic pairs",
    ),

``factory`` receives the :class:`~scoregrad.bench.problems.Problem` (its family, theta, f and
capabilities) so that an estimator needing problem-specific configuration can read it; most
ignore it. An entry applies to a problem when every capability in ``requires`` is in
``problem.capabilities`` and none in ``excludes`` is. Capabilities are the strings in
:data:`scoregrad.bench.problems.CAPABILITIES`: ``"discrete"``, ``"continuous"``,
``"reparameterizable"`` (the family's sampler is differentiable in theta),
``"differentiable_f"`` (f is differentiable in x with an informative derivative),
``"enumerable"`` (small finite support: ``family.capabilities["support"]``), and the built-in
family kind, ``"kind:normal"``, ``"kind:bernoulli"``, ``"kind:categorical"``; ``"relaxable"``:
f also accepts the relaxed draw (Bernoulli: a float in [0, 1]; categorical: a point of the
simplex, one-hot for an exact draw) and is differentiable in it; ``"program"``: a sequential
program of :func:`scoregrad.programs.program` (draws ``Steps``, f the total of per-step costs),
which the causal-credit entries need.

Stateful estimators (``Estimator.stateful``) are warmed up on ``warmup_batches`` batches (their
state threaded through :func:`scoregrad.estimate_grad`) before they are measured; every replicate
then starts from that warmed state. A sample budget the estimator cannot use
(``num_samples < min_units * draws_per_unit`` or not a multiple of ``draws_per_unit``) is
run at the nearest usable budget (see :func:`scoregrad.bench.runner.usable_budget`), and the
report shows the number of samples used. Names must be unique; per-cell PRNG keys do not depend on the
estimator (common random numbers across estimators), so adding an entry changes no other result.

Examples:
  >>> from scoregrad.bench import problems, registry
  >>> p = problems.get_problem("bernoulli_t0.45")
  >>> [e.name for e in registry.applicable(p)][:3]
  ['score_function', 'score_function+loo', 'score_function+ema']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

import scoregrad as sg
import scoregrad.programs as sp
from scoregrad.bench.problems import CAPABILITIES, Problem


class EstimatorEntry(NamedTuple):
    """One benchmarked estimator.

    Attributes:
      name: unique label (tables, JSON, plots, ``--estimators``).
      factory: ``factory(problem) -> scoregrad.Estimator``.
      requires: capabilities the problem must have (see the module docstring).
      excludes: capabilities the problem must not have.
      warmup_batches: batches used to warm up a stateful estimator's state.
      description: one line for reports.
      unbiased: False for estimators biased by design (relaxations, straight-through): the
        report never recommends them, whatever the bias test says.
    """

    name: str
    factory: Callable[[Problem], sg.Estimator]
    requires: frozenset = frozenset()
    excludes: frozenset = frozenset()
    warmup_batches: int = 5
    description: str = ""
    unbiased: bool = True


def _specialized(est: sg.Estimator, problem: Problem) -> sg.Estimator:
    """``est`` for the problem: estimators bind to the family and theta themselves
    (``Estimator.bind``); kept so entries read as before."""
    del problem
    return est


ESTIMATORS: list[EstimatorEntry] = [
    EstimatorEntry(
        name="score_function",
        factory=lambda problem: sg.score_function(),
        description="REINFORCE / likelihood ratio, no baseline",
    ),
    EstimatorEntry(
        name="score_function+loo",
        factory=lambda problem: sg.score_function(baseline=sg.baselines.leave_one_out()),
        description="score function with the leave-one-out baseline (RLOO)",
    ),
    EstimatorEntry(
        name="score_function+ema",
        factory=lambda problem: sg.score_function(baseline=sg.baselines.moving_average(0.9)),
        description="score function with an EMA baseline of past batches (decay 0.9, stateful)",
    ),
    EstimatorEntry(
        name="pathwise",
        factory=lambda problem: sg.pathwise(),
        requires=frozenset({"reparameterizable", "differentiable_f"}),
        description="reparameterization gradient through the sampler",
    ),
    EstimatorEntry(
        name="arm",
        factory=lambda problem: sg.arm(),
        requires=frozenset({"kind:bernoulli"}),
        description="ARM (Yin & Zhou 2019), antithetic pairs: num_samples/2 pairs",
    ),
    EstimatorEntry(
        name="disarm",
        factory=lambda problem: sg.disarm(),
        requires=frozenset({"kind:bernoulli"}),
        description="DisARM (Dong, Mnih & Tucker 2020), antithetic pairs, Rao-Blackwellized ARM",
    ),
    EstimatorEntry(
        name="gumbel_softmax(0.5)",
        factory=lambda problem: sg.gumbel_softmax(0.5),
        requires=frozenset({"relaxable"}),
        description="Concrete / Gumbel-softmax relaxation, temperature 0.5 (biased)",
        unbiased=False,
    ),
    EstimatorEntry(
        name="straight_through",
        factory=lambda problem: sg.straight_through(),
        requires=frozenset({"relaxable"}),
        description="straight-through: hard draw forward, probabilities' gradient back (biased)",
        unbiased=False,
    ),
    EstimatorEntry(
        name="straight_through_gumbel(0.5)",
        factory=lambda problem: sg.straight_through_gumbel(0.5),
        requires=frozenset({"relaxable"}),
        description="straight-through Gumbel-softmax, temperature 0.5 (biased)",
        unbiased=False,
    ),
    EstimatorEntry(
        name="rebar",
        factory=lambda problem: sg.rebar(temperature=0.5, eta=1.0),
        requires=frozenset({"kind:bernoulli"}),
        description="REBAR (Tucker et al. 2017), eta and temperature learned (stateful)",
    ),
    EstimatorEntry(
        name="relax",
        factory=lambda problem: sg.relax(),
        requires=frozenset({"kind:bernoulli"}),
        description="RELAX (Grathwohl et al. 2018), REBAR + MLP control variate learned (stateful)",
    ),
    EstimatorEntry(
        name="measure_valued",
        # specialized: draws_per_unit (1 + 3d f evaluations per unit) depends on theta's shape
        factory=lambda problem: _specialized(sg.measure_valued(), problem),
        requires=frozenset({"kind:normal"}),
        description="measure-valued (weak derivative), coupled Rayleigh/Maxwell parts",
    ),
    EstimatorEntry(
        name="measure_valued[bernoulli]",
        factory=lambda problem: _specialized(sg.measure_valued(), problem),
        requires=frozenset({"kind:bernoulli"}),
        description="measure-valued (weak derivative): f(x with x_j=1) - f(x with x_j=0)",
    ),
    EstimatorEntry(
        name="rloo(4)",
        factory=lambda problem: sg.rloo(4),
        description="REINFORCE leave-one-out within groups of 4 draws (RLOO-K)",
    ),
    EstimatorEntry(
        name="enumerate",
        factory=lambda problem: _specialized(sg.enumerate(), problem),
        requires=frozenset({"enumerable"}),
        description="exact sum over the finite support (zero variance reference)",
    ),
    EstimatorEntry(
        name="indecater",
        factory=lambda problem: _specialized(sg.indecater(), problem),
        requires=frozenset({"kind:categorical"}),
        description="IndeCateR (De Smet et al. 2023): each coordinate summed out exactly",
    ),
    EstimatorEntry(
        name="indecater[bernoulli]",
        factory=lambda problem: _specialized(sg.indecater(), problem),
        requires=frozenset({"kind:bernoulli"}),
        description="IndeCateR for Bernoulli latents (K = 2)",
    ),
    EstimatorEntry(
        name="score_function+optimal",
        factory=lambda problem: sg.score_function(baseline=sg.baselines.optimal()),
        description="score function with the per-coordinate optimal baseline (cross-fitted)",
    ),
    EstimatorEntry(
        name="score_function+delta_cv",
        factory=lambda problem: sg.control_variates.with_control_variates(
            sg.score_function(baseline=sg.baselines.optimal()),
            sg.control_variates.delta_method(problem.f, order=2)),
        requires=frozenset({"kind:normal", "differentiable_f"}),
        description="score function + optimal baseline + 2nd-order delta-method control variate",
    ),
    EstimatorEntry(
        name="antithetic[score_function+optimal]",
        factory=lambda problem: sg.sampling.antithetic(
            sg.score_function(baseline=sg.baselines.optimal())),
        requires=frozenset({"kind:normal"}),
        description="antithetic pairs (eps, -eps) with the optimal baseline",
    ),
    EstimatorEntry(
        name="antithetic[score_function+optimal][bernoulli]",
        factory=lambda problem: sg.sampling.antithetic(
            sg.score_function(baseline=sg.baselines.optimal())),
        requires=frozenset({"kind:bernoulli"}),
        description="antithetic uniforms (u, 1 - u) with the optimal baseline",
    ),
    EstimatorEntry(
        name="antithetic[pathwise]",
        factory=lambda problem: sg.sampling.antithetic(sg.pathwise()),
        requires=frozenset({"kind:normal", "differentiable_f"}),
        description="pathwise with antithetic pairs (eps, -eps)",
    ),
    EstimatorEntry(
        name="qmc64[pathwise]",
        factory=lambda problem: sg.sampling.qmc(sg.pathwise(), block_size=64),
        requires=frozenset({"kind:normal", "differentiable_f"}),
        description="pathwise over randomized (scrambled Halton) QMC blocks of 64 points",
    ),
    EstimatorEntry(
        name="qmc64[score_function]",
        factory=lambda problem: sg.sampling.qmc(sg.score_function(), block_size=64),
        requires=frozenset({"kind:normal"}),
        description="score function over randomized (scrambled Halton) QMC blocks of 64 points",
    ),
    EstimatorEntry(
        name="arsm",
        factory=lambda problem: sg.arsm(),
        requires=frozenset({"kind:categorical"}),
        description="ARSM (Yin, Yue & Zhou 2019): swaps of one Dirichlet draw, C(C-1)/2 + 1 "
                    "evaluations per unit",
    ),
    EstimatorEntry(
        name="unordered_set(4)",
        factory=lambda problem: sg.unordered_set(4),
        requires=frozenset({"kind:categorical"}),
        description="unordered-set estimator (Kool et al. 2020): 4 draws without replacement, "
                    "built-in baseline",
    ),
    EstimatorEntry(
        name="categorical_rebar(0.5,1)",
        factory=lambda problem: sg.categorical_rebar(0.5, 1.0),
        requires=frozenset({"kind:categorical", "relaxable"}),
        description="categorical REBAR (Tucker et al. 2017), conditional Gumbel, fixed "
                    "temperature and eta",
    ),
    EstimatorEntry(
        name="categorical_relax",
        factory=lambda problem: sg.categorical_relax(),
        requires=frozenset({"kind:categorical", "relaxable"}),
        description="categorical RELAX (Grathwohl et al. 2018), learned control variate (stateful)",
    ),
    EstimatorEntry(
        name="causal",
        factory=lambda problem: sp.causal(),
        requires=frozenset({"program"}),
        description="causal credit (DiCE, reward-to-go): each step's cost scored only by the "
                    "draws at or before its step",
    ),
    EstimatorEntry(
        name="causal+loo",
        factory=lambda problem: sp.causal(sp.leave_one_out()),
        requires=frozenset({"program"}),
        description="causal credit with the per-step leave-one-out baseline (the mean "
                    "cost-to-go of the other N-1 programs)",
    ),
    # ^ add new EstimatorEntry(...) items above this line (one entry per estimator).
]


def _check_entries(entries) -> None:
    seen = set()
    for e in entries:
        if not isinstance(e, EstimatorEntry):
            raise TypeError(f"registry.ESTIMATORS holds a {type(e).__name__}; use EstimatorEntry.")
        if e.name in seen:
            raise ValueError(f"registry.ESTIMATORS: duplicate estimator name {e.name!r}.")
        unknown = (set(e.requires) | set(e.excludes)) - CAPABILITIES
        if unknown:
            raise ValueError(
                f"registry entry {e.name!r}: unknown capabilities {sorted(unknown)}; "
                f"known: {sorted(CAPABILITIES)}."
            )
        seen.add(e.name)


def estimator_names() -> list[str]:
    """Names of all registered estimators, in registry order."""
    _check_entries(ESTIMATORS)
    return [e.name for e in ESTIMATORS]


def get_estimator(name: str) -> EstimatorEntry:
    """The entry called ``name``; ``KeyError`` listing the known names otherwise."""
    for e in ESTIMATORS:
        if e.name == name:
            return e
    raise KeyError(f"unknown estimator {name!r}; known: {', '.join(estimator_names())}")


def applies(entry: EstimatorEntry, problem: Problem) -> bool:
    """Whether ``entry`` applies to ``problem`` (by capability)."""
    caps = problem.capabilities
    return set(entry.requires) <= caps and not (set(entry.excludes) & caps)


def applicable(problem: Problem) -> list[EstimatorEntry]:
    """The registered entries that apply to ``problem``, in registry order."""
    _check_entries(ESTIMATORS)
    return [e for e in ESTIMATORS if applies(e, problem)]


class WrapperEntry(NamedTuple):
    """One composition of an estimator (a sampling design or control variates), for the
    composition matrix of the tests (every wrapper x every estimator: right or refused).

    Attributes:
      name: unique label.
      wrap: ``wrap(estimator, problem) -> scoregrad.Estimator``; may raise ``TypeError`` or
        ``ValueError`` (naming the estimator or the missing capability) for an estimator it
        cannot wrap, at construction or at trace time.
      description: one line.
    """

    name: str
    wrap: Callable[[sg.Estimator, Problem], sg.Estimator]
    description: str = ""


def tracking_control_variate(problem: Problem) -> sg.control_variates.ControlVariate:
    """A control variate that tracks ``problem.f``: ``h = f`` itself, with its mean computed by
    summing over the support where the family has one (``"enumerable"``); the second-order
    delta method otherwise (``"kind:normal"`` with ``"differentiable_f"``; equal to f when f is
    quadratic). ``ValueError`` for other problems."""
    if "enumerable" in problem.capabilities:
        support = problem.family.capabilities["support"]

        def mean(theta):
            xs = support(theta)
            logp = jax.vmap(lambda x: problem.family.log_prob(theta, x))(xs)
            return jnp.sum(jnp.exp(logp) * jax.vmap(problem.f)(xs))

        return sg.control_variates.control_variate(
            lambda x, theta: problem.f(x), mean, name="f_enumerated")
    if {"kind:normal", "differentiable_f"} <= problem.capabilities:
        return sg.control_variates.delta_method(problem.f, order=2)
    raise ValueError(f"no tracking control variate is known for problem {problem.name!r}: it "
                     "needs the capability 'enumerable', or 'kind:normal' with "
                     "'differentiable_f'.")


WRAPPERS: list[WrapperEntry] = [
    WrapperEntry(
        "control_variates",
        lambda est, problem: sg.control_variates.with_control_variates(
            est, tracking_control_variate(problem)),
        "a control variate tracking f, cross-fitted optimal coefficient",
    ),
    WrapperEntry(
        "control_variates(c=1)",
        lambda est, problem: sg.control_variates.with_control_variates(
            est, tracking_control_variate(problem), coefficient=1.0),
        "a control variate tracking f, fixed coefficient 1",
    ),
    WrapperEntry("antithetic", lambda est, problem: sg.sampling.antithetic(est),
                 "antithetic pairs (u, 1 - u)"),
    WrapperEntry("stratified2", lambda est, problem: sg.sampling.stratified(est, num_strata=2),
                 "Latin-hypercube strata of 2 draws"),
    WrapperEntry("qmc4", lambda est, problem: sg.sampling.qmc(est, block_size=4),
                 "randomized QMC blocks of 4 scrambled Halton points"),
]

# Every baseline with a default configuration, for ``score_function(baseline=...)``
# (``sg.baselines.learned`` needs a value function and an optimizer: not listed).
BASELINES: dict[str, Callable[[], sg.Baseline]] = {
    "none": sg.baselines.none,
    "leave_one_out": sg.baselines.leave_one_out,
    "batch_mean": sg.baselines.batch_mean,
    "moving_average": lambda: sg.baselines.moving_average(0.9),
    "optimal": sg.baselines.optimal,
}
