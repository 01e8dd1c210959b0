r"""Sequential programs: draws made in steps, a cost per step, causal credit (DiCE).

A sequential program draws :math:`x = (x_1, \dots, x_T)` step by step (an RL episode, a game
between agents, an autoregressive sampler) and pays a cost :math:`c_t(x_{\le t})` per step.
:func:`program` states one from three user functions; the result is an ordinary
:class:`~scoregrad.Family` and integrand ``f`` (the total cost), so every entry point
(:func:`scoregrad.estimate_grad`, :func:`scoregrad.expectation`, ...) and every single-site
estimator work on it unchanged: :func:`scoregrad.score_function` on it is whole-program
REINFORCE. :func:`causal` is the estimator that credits each cost only to the draws at or before
its step.

How the per-step structure reaches the estimator: the program's draw is a :class:`Steps` pair
``(x, weights)`` whose ``weights`` are ones, and the family's ``log_prob`` and ``f`` are the
weighted sums :math:`\sum_t w_t \log p_t` and :math:`\sum_t w_t c_t`. Both are linear in the
weights, so the estimator recovers the per-step log-probabilities and costs as their gradients in
``weights`` (one reverse pass each), inside the engine's closure-converted user functions: what
``log_prob``, ``sample`` or ``cost`` close over still receives derivatives, at every order.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from scoregrad._src.base import Estimator, FStats, Plan, Target, UnitOut, magic_box
from scoregrad._src.family import Family
from scoregrad._src.programs_baselines import StepBaseline, cost_to_go, none

PyTree = Any
__all__ = ["Program", "Steps", "causal", "program"]


class Steps(NamedTuple):
    """One draw of a sequential program: the user's trajectory ``x`` and per-step ``weights``.

    ``weights`` has shape ``(T,)`` and is ones in every draw (the estimator differentiates the
    family's ``log_prob`` and ``f`` in it to read their per-step values). Given trajectories
    (``estimate_grad_from_samples``) are wrapped with :meth:`Program.steps`.
    """

    x: PyTree
    weights: jax.Array


class Program(NamedTuple):
    """A sequential program as the entry points take it (built by :func:`program`).

    Attributes:
      family: a :class:`~scoregrad.Family` over :class:`Steps` draws; its ``log_prob`` is the
        sum of the per-step log-probabilities (scalar).
      f: the total cost ``f(steps) -> scalar`` (the sum of the per-step costs).
      num_steps: T.
    """

    family: Family
    f: Callable[[Steps], jax.Array]
    num_steps: int

    def steps(self, xs: PyTree) -> Steps:
        """Stacked trajectories (leading axis N) as the family's draws, for given samples."""
        leaves = jax.tree_util.tree_leaves(xs)
        if not leaves:
            raise ValueError("Program.steps(xs): `xs` has no arrays; pass stacked trajectories.")
        n = jnp.shape(leaves[0])[0]
        dtype = _float_dtype(leaves)
        return Steps(xs, jnp.ones((n, self.num_steps), dtype))

    def estimator(self, baseline: Optional[StepBaseline] = None) -> Estimator:
        """:func:`causal` for this program (the number of steps filled in)."""
        return causal(baseline, num_steps=self.num_steps)


def _float_dtype(leaves) -> Any:
    dts = [jnp.result_type(a) for a in leaves if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
    return jnp.result_type(*dts) if dts else jnp.result_type(float)


def _check_steps(value, what: str, num_steps: int) -> None:
    shape = tuple(jnp.shape(value))
    if shape != (num_steps,):
        raise ValueError(
            f"sg.programs.program: `{what}` must return one value per step, shape "
            f"({num_steps},) for num_steps={num_steps}; got shape {shape}. Return the "
            "per-step values (do not sum them), e.g. a lax.scan's stacked outputs."
        )
    if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
        raise TypeError(f"sg.programs.program: `{what}` must return floating-point values; got "
                        f"{jnp.result_type(value)}.")


def program(
    log_prob: Callable[[PyTree, PyTree], jax.Array],
    sample: Callable[[PyTree, jax.Array], PyTree],
    cost: Callable[[PyTree], jax.Array],
    *,
    num_steps: int,
) -> Program:
    r"""A sequential program from per-step functions.

    Args:
      log_prob: ``log_prob(theta, x) -> (T,)``: entry t is :math:`\log p_t(x_t \mid x_{<t};
        \theta)`, the log-probability of what step t draws given the earlier steps (for
        several agents acting at step t, the sum of their log-probabilities).
      sample: ``sample(theta, key) -> x``: one trajectory (e.g. a ``lax.scan`` over steps).
      cost: ``cost(x) -> (T,)``: entry t is the cost paid at step t, a function of the draws at
        steps ``<= t`` only (the caller's contract, as in RL: a cost that reads later draws
        makes causal credit biased). It may close over theta (its pathwise derivative flows
        in :func:`scoregrad.expectation`).
      num_steps: T, checked at trace time against both functions' outputs.

    Returns:
      A :class:`Program` ``(family, f, num_steps)``; pass ``program.f`` and
      ``program.family`` to any entry point, with ``estimator=program.estimator(...)`` (or
      :func:`causal`) for causal credit.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> import scoregrad.programs as sp
      >>> def sample(theta, key):  # T = 2 coin flips with P(heads) = sigmoid(theta)
      ...     return jax.random.bernoulli(key, jax.nn.sigmoid(theta), (2,)).astype(jnp.float32)
      >>> def log_prob(theta, x):
      ...     return x * jax.nn.log_sigmoid(theta) + (1 - x) * jax.nn.log_sigmoid(-theta)
      >>> prog = sp.program(log_prob, sample, lambda x: x, num_steps=2)
      >>> r = sg.estimate_grad(prog.f, prog.family, jnp.float32(0.0), jax.random.key(0),
      ...                      num_samples=4096, estimator=prog.estimator())
      >>> bool(abs(r.grad - 0.5) < 5 * r.stderr)  # d/dtheta E[x_1 + x_2] = 2 * 1/4
      True
    """
    for name, fn in (("log_prob", log_prob), ("sample", sample), ("cost", cost)):
        if not callable(fn):
            raise TypeError(f"sg.programs.program: `{name}` must be callable; got {fn!r}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"sg.programs.program: `num_steps` must be a positive int; got "
                         f"{num_steps!r}.")

    def family_log_prob(theta, s: Steps):
        lp = log_prob(theta, s.x)
        _check_steps(lp, "log_prob(theta, x)", num_steps)
        return jnp.sum(s.weights * lp)

    def family_sample(theta, key):
        x = sample(theta, key)
        lp = jax.eval_shape(log_prob, theta, x)
        _check_steps(lp, "log_prob(theta, x)", num_steps)
        return Steps(x, jnp.ones((num_steps,), lp.dtype))

    def f(s: Steps):
        c = cost(s.x)
        _check_steps(c, "cost(x)", num_steps)
        return jnp.sum(s.weights.astype(jnp.result_type(c)) * c)

    return Program(Family(log_prob=family_log_prob, sample=family_sample, name="program"), f,
                   num_steps)


def per_step(model, params, s: Steps) -> tuple[jax.Array, jax.Array]:
    """The per-step log-probabilities and costs of a draw, differentiable in ``params``: the
    gradients in the step weights of the family's ``log_prob`` and of ``f`` (both linear)."""
    w = jax.lax.stop_gradient(s.weights)
    lp = jax.grad(lambda v: model.eval_log_prob(params, s._replace(weights=v)))(w)
    total, c = jax.value_and_grad(lambda v: model.eval_f(params, s._replace(weights=v)))(w)
    return lp, _checked_costs(total, c)


def _checked_costs(total: jax.Array, c: jax.Array) -> jax.Array:
    """The per-step costs, NaN where they do not sum to f's value: an f that is not linear in
    the step weights (``program.f(s) ** 2``, ``program.f(s) - 1``) has no per-step costs, and
    reading them off its gradient would be a silent wrong answer. NaN costs are counted as
    non-finite, so ``nan_policy="raise"`` (the default) raises."""
    total = jax.lax.stop_gradient(total).astype(c.dtype)
    c_sg = jax.lax.stop_gradient(c)
    tol = jnp.sqrt(jnp.finfo(c.dtype).eps) * (jnp.abs(total) + jnp.sum(jnp.abs(c_sg)))
    ok = jnp.abs(total - jnp.sum(c_sg)) <= tol
    return jnp.where(ok, c, jnp.nan)


def causal_boxes(lp: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""DiCE boxes :math:`\boxdot(L_t)` of the cumulative log-probability up to step t and
    :math:`\boxdot(L_{t-1})` up to the step before (``L_{-1} = 0``, a box of a constant)."""
    cum = jnp.cumsum(lp)
    before = jnp.concatenate([jnp.zeros((1,), cum.dtype), cum[:-1]])
    return magic_box(cum), magic_box(before)


_NOT_UNBIASED = (
    "causal credit reads the per-step costs from f's dependence on the step weights "
    "(Steps.weights); another integrand h of the whole draw has no per-step costs, so the unit "
    "applied to h does not estimate grad E[h]")


def _steps_of(target: Target, name: str) -> int:
    xs = target.x_struct
    if not isinstance(xs, Steps):
        raise TypeError(
            f"{name} needs a sequential program's draws (sg.programs.Steps); the family draws "
            f"{type(xs).__name__}. Build the family and f with sg.programs.program(log_prob, "
            "sample, cost, num_steps=T) and pass program.family and program.f."
        )
    return int(xs.weights.shape[0])


def causal(baseline: Optional[StepBaseline] = None, *,
           num_steps: Optional[int] = None) -> Estimator:
    r"""Causal credit: each step's cost scored only by the draws at or before its step (DiCE).

    Per program (unit) the surrogate is

    .. math::
       S = \sum_t \boxdot(L_t)\, c_t + \sum_t \big(\boxdot(L_{t-1}) - \boxdot(L_t)\big)\, b_t,
       \qquad L_t = \sum_{s \le t} \log p_s,

    with DiCE's magic box :math:`\boxdot` (value 1). Its value is the total cost
    :math:`\sum_t c_t`; its gradient is the reward-to-go estimator
    :math:`\sum_t \nabla \log p_t\, (G_t - b_t) + \sum_t \nabla c_t` with the cost-to-go
    :math:`G_t = \sum_{s \ge t} c_s`. The baseline terms are Mao et al.'s (as in Loaded DiCE):
    each has expectation zero in every derivative order when :math:`b_t` is built from other
    programs, past batches, or draws before step t, so ``jax.grad``, ``jax.hessian`` and
    higher derivatives of :func:`scoregrad.expectation` are unbiased, cross-derivatives between
    parameter sets included (LOLA's :math:`\partial^2 V_1 / \partial\theta_1 \partial\theta_2`).

    * **Bias**: unbiased when each cost depends only on the draws at or before its step.
    * **Needs from f**: nothing (a black box per step); the family is a :func:`program`'s.
    * **Derivative order**: all orders.
    * **Cost**: terms per program: one for the causal term alone or with
      :func:`~scoregrad.programs.group_leave_one_out`, two with
      :func:`~scoregrad.programs.moving_average` or :func:`~scoregrad.programs.value_function`,
      T + 2 with the batch-wide :func:`~scoregrad.programs.leave_one_out`. The engine takes
      one reverse pass per term, except from 8 weighted terms up, where a value pass over the
      same draws fixes the batch weights and one reverse pass differentiates their sum: on a
      500-step prisoner's dilemma, causal credit with leave-one-out costs about 1.4x
      whole-program REINFORCE per gradient (benchmarks/README.md).

    Args:
      baseline: a per-step baseline (:func:`~scoregrad.programs.leave_one_out`,
        :func:`~scoregrad.programs.group_leave_one_out`,
        :func:`~scoregrad.programs.moving_average`, :func:`~scoregrad.programs.value_function`)
        or ``None``.
      num_steps: T; required by stateful baselines (their state is per step), checked against
        the program otherwise. :meth:`Program.estimator` fills it in.

    Returns:
      An :class:`~scoregrad.Estimator`.

    Raises:
      TypeError: at trace time, for a family that is not a :func:`program`'s.

    References:
      Foerster et al., "DiCE: The Infinitely Differentiable Monte Carlo Estimator", ICML 2018.
      Mao et al., "A Baseline for Any Order Gradient Estimation in Stochastic Computation
      Graphs", ICML 2019. Farquhar et al., "Loaded DiCE: Trading off Bias and Variance in
      Any-Order Score Function Estimators for Reinforcement Learning", NeurIPS 2019.
    """
    if baseline is None:
        baseline = none()
    if not isinstance(baseline, StepBaseline):
        raise TypeError(
            "causal(baseline=...) must be a per-step baseline such as "
            "sg.programs.leave_one_out(), sg.programs.moving_average(0.9) or "
            f"sg.programs.value_function(...), or None; got {type(baseline).__name__}.")
    name = "causal" if baseline.name == "none" else f"causal[{baseline.name}]"
    steps: int = 0 if num_steps is None else num_steps
    if baseline.stateful and num_steps is None:
        raise ValueError(
            f"causal(baseline={baseline.name}) keeps a state per step: pass num_steps=T, or "
            "use program.estimator(baseline) which fills it in.")

    def bind(target: Target) -> Plan:
        t = _steps_of(target, f"{name}()")
        if num_steps is not None and num_steps != t:
            raise ValueError(f"{name}(num_steps={num_steps}) but the program has {t} steps.")

        def unit(model, params, draws, state):
            s = draws.sample()
            lp, c = per_step(model, params, s)
            box, before = causal_boxes(lp)
            c_sg = jax.lax.stop_gradient(c)
            extra = baseline.terms(before - box, cost_to_go(c_sg), s.x, state)
            terms = jnp.concatenate([jnp.sum(box * c)[None], extra.astype(box.dtype)])
            # With per-step statistics, f values are T * c_t: their mean over steps and units
            # is the mean total cost (the value), their per-step means T * mean c_t.
            fvals = t * c_sg if baseline.per_step_stats else jnp.sum(c_sg)[None]
            return UnitOut(terms, fvals)

        base_weights = baseline.weights

        def weights(fstats: FStats, state, n):
            assert base_weights is not None  # only used when the baseline has weights
            g = _mean_cost_to_go(fstats, t) if baseline.per_step_stats else None
            w = base_weights(g, state, n)
            return jnp.concatenate([jnp.ones((1,), fstats.mean.dtype),
                                    w.astype(fstats.mean.dtype)])

        if baseline.group > 1:
            return Plan(_group_unit(baseline.group), draws_per_unit=baseline.group,
                        not_unbiased=_NOT_UNBIASED)
        return Plan(unit, weights=None if base_weights is None else weights,
                    min_units=baseline.min_units, not_unbiased=_NOT_UNBIASED)

    def init(theta):
        if not baseline.stateful:
            return ()
        return baseline.init(steps, _float_dtype(jax.tree_util.tree_leaves(theta)))

    def update(state, fstats: FStats):
        if not baseline.stateful:
            return state
        g = _mean_cost_to_go(fstats, steps) if baseline.per_step_stats else None
        return baseline.update(state, g)

    return Estimator(name, init, bind, update)


def _group_unit(k: int):
    """A unit of k programs, each with the mean cost-to-go of the other k - 1 as baseline."""
    def unit(model, params, draws, state):
        s = draws.sample(num=k)
        lp, c = jax.vmap(lambda si: per_step(model, params, si))(s)  # (k, T) each
        box, before = jax.vmap(causal_boxes)(lp)
        c_sg = jax.lax.stop_gradient(c)
        g = cost_to_go(c_sg)
        b = (jnp.sum(g, axis=0, keepdims=True) - g) / (k - 1)
        per_program = jnp.sum(box * c, axis=1) + jnp.sum((before - box) * b.astype(box.dtype),
                                                        axis=1)
        return UnitOut(jnp.mean(per_program)[None], jnp.sum(c_sg, axis=1))

    return unit


def _mean_cost_to_go(fstats: FStats, t: int) -> jax.Array:
    """The batch mean of the cost-to-go per step, from the per-step means of ``T * c_t``."""
    if fstats.per is None:
        raise ValueError("the engine passed no per-step statistics (FStats.per)")
    return cost_to_go(jnp.asarray(fstats.per) / t)
