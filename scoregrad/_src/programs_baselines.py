r"""Per-step baselines for causal credit in sequential programs (:func:`~scoregrad.programs.causal`).

A per-step baseline :math:`b_t` enters the causal surrogate as Mao et al.'s term
:math:`\big(\boxdot(L_{t-1}) - \boxdot(L_t)\big)\, b_t` (value 0): its first derivative is
:math:`-\nabla \log p_t\, b_t`, and its expectation vanishes in every derivative order when
:math:`b_t` does not depend on the draw at step t or later (other programs, past batches, a
value function of the earlier draws). The estimator keeps the baseline's terms and combines them
with weights from statistics of the whole batch (:attr:`StepBaseline.weights`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from scoregrad._src.baselines import LearnedState, MovingAverageState, check_decay

PyTree = Any
__all__ = ["StepBaseline", "cost_to_go", "group_leave_one_out", "leave_one_out", "moving_average", "none",
           "value_function"]


class StepBaseline(NamedTuple):
    r"""A per-step baseline: surrogate terms, their batch weights, and a state.

    Attributes:
      name: a label.
      terms: ``terms(d, g, x, state) -> (k,)``: the baseline's surrogate terms of one program
        from ``d`` :math:`= \boxdot(L_{t-1}) - \boxdot(L_t)` (shape (T,)), the program's own
        cost-to-go ``g`` (stop-gradient, (T,)), its trajectory ``x`` and the state.
      weights: ``weights(gbar, state, num_units) -> (k,)`` from the batch mean cost-to-go per
        step ``gbar`` (``None`` unless ``per_step_stats``); ``None``: ones.
      init: ``init(num_steps, dtype) -> state``.
      update: ``update(state, gbar) -> state`` after an estimate.
      min_units: the smallest batch of programs it is defined for.
      stateful: the state must be threaded through calls.
      per_step_stats: it needs the batch's per-step statistics (weights or update read ``gbar``).
      group: programs per unit (``> 1``: the unit draws a group and ``terms`` is unused; the
        baseline of each program is the mean cost-to-go of the others in its group).
    """

    name: str
    terms: Callable[..., jax.Array]
    weights: Optional[Callable[..., jax.Array]]
    init: Callable[[int, Any], Any]
    update: Callable[[Any, Optional[jax.Array]], Any]
    min_units: int = 1
    stateful: bool = False
    per_step_stats: bool = False
    group: int = 1


def cost_to_go(c: jax.Array) -> jax.Array:
    r""":math:`G_t = \sum_{s \ge t} c_s` along the last axis."""
    return jnp.flip(jnp.cumsum(jnp.flip(c, -1), -1), -1)


def _no_update(state, gbar):
    del gbar
    return state


def none() -> StepBaseline:
    """No baseline: plain causal credit (reward-to-go)."""
    return StepBaseline("none", lambda d, g, x, state: jnp.zeros((0,), d.dtype), None,
                        lambda t, dtype: (), _no_update)


def leave_one_out() -> StepBaseline:
    r"""Per step, the mean cost-to-go of the other N − 1 programs of the batch.

    .. math::
       b_{t,i} = \frac{1}{N-1} \sum_{j \ne i} G_{t,j}
               = \frac{N \bar G_t - G_{t,i}}{N - 1}.

    Independent of program i, so unbiased at every derivative order. Written as T + 1 terms
    whose weights come from the batch means :math:`\bar G_t` (the engine's per-step statistics
    of f), so the batch is the whole ``num_samples`` in one chunked pass; the engine then takes
    T + 2 reverse passes per chunk (one per term). Needs ``num_samples >= 2``.

    References:
      Kool, van Hoof and Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", 2019.
    """
    def terms(d, g, x, state):
        return jnp.concatenate([d, jnp.sum(d * g.astype(d.dtype))[None]])

    def weights(gbar, state, n):
        n = jnp.asarray(n, gbar.dtype)
        return jnp.concatenate([n / (n - 1) * gbar, (-1.0 / (n - 1))[None]])

    return StepBaseline("leave_one_out", terms, weights, lambda t, dtype: (), _no_update,
                        min_units=2, per_step_stats=True)


def group_leave_one_out(k: int) -> StepBaseline:
    r"""Per step, the mean cost-to-go of the other k − 1 programs of the same group (RLOO).

    The estimator's unit draws k programs at once and uses, for program i of the group,
    :math:`b_{t,i} = \frac{1}{k-1}\sum_{j \ne i} G_{t,j}`: independent of program i, so
    unbiased at every order. Unlike the batch-wide :func:`leave_one_out` it adds no term (one
    reverse pass per chunk whatever T) and the reported value's standard error is that of the
    total cost; the baseline sees k − 1 programs rather than N − 1. ``num_samples`` counts
    programs and must be a multiple of k.

    Args:
      k: programs per group, ``>= 2``.

    References:
      Kool, van Hoof and Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", 2019.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"group_leave_one_out(k=...) must be an int >= 2; got {k!r}.")
    return StepBaseline(f"group_leave_one_out({k})", lambda d, g, x, state: jnp.zeros((0,)),
                        None, lambda t, dtype: (), _no_update, group=k)


def moving_average(decay: float = 0.9) -> StepBaseline:
    r"""Per step, an exponential moving average of past batches' mean cost-to-go.

    Built only from past batches (bias-corrected as in Adam; none on the first call), so the
    estimator is unbiased at every order. Stateful: thread the state through
    :func:`scoregrad.estimate_grad` (``state=``, ``result.state``) or
    :func:`scoregrad.expectation_with_state`. A batch whose mean is not finite at a step leaves
    that step's average unchanged. One extra term (two reverse passes per chunk).

    Args:
      decay: weight of the past in ``[0, 1)``.
    """
    decay = check_decay(decay)

    def init(t, dtype):
        return MovingAverageState(jnp.zeros((t,), dtype), jnp.zeros((t,), jnp.int32))

    def current(state):
        avg = state.average
        corr = 1.0 - jnp.asarray(decay, avg.dtype) ** state.steps.astype(avg.dtype)
        return jnp.where(state.steps > 0, avg / jnp.where(corr > 0, corr, 1.0), 0.0)

    def terms(d, g, x, state):
        b = jax.lax.stop_gradient(current(state)).astype(d.dtype)
        return jnp.sum(d * b)[None]

    def update(state, gbar):
        gbar = gbar.astype(state.average.dtype)
        ok = jnp.isfinite(gbar)
        avg = decay * state.average + (1.0 - decay) * gbar
        return MovingAverageState(jnp.where(ok, avg, state.average),
                                  jnp.where(ok, state.steps + 1, state.steps))

    return StepBaseline(f"moving_average({decay})", terms, None, init, update, stateful=True,
                        per_step_stats=True)


def value_function(fn: Callable, params: PyTree, optimizer: Any) -> tuple[StepBaseline, Callable]:
    r"""A learned value function :math:`b_t = V_\phi(x_{<t})` per step (Loaded DiCE's critic).

    ``fn(phi, x) -> (T,)``: entry t may read only the draws before step t (the states the agent
    has seen when it draws at step t); then the estimator is unbiased at every order for any
    :math:`\phi` (if entry t reads the draw at step t or later it is biased: the caller's
    contract). :math:`\phi` is trained between estimates with the returned
    ``fit(state, xs, costs, weights=None) -> (state, loss)``: one optax step on
    :math:`\mathrm{mean}_{i,t}\, w_{it} (G_{it} - V_\phi(x_i)_t)^2` for stacked trajectories
    ``xs`` and their per-step costs ``costs`` (N, T). Stateful (a :class:`LearnedState`).

    Args:
      fn: ``fn(phi, x) -> (T,)``.
      params: initial :math:`\phi`.
      optimizer: an ``optax.GradientTransformation``.

    Returns:
      ``(baseline, fit)``.

    References:
      Farquhar et al., "Loaded DiCE", NeurIPS 2019. Mao et al., ICML 2019.
    """
    if not callable(fn):
        raise TypeError(f"value_function(fn=...) must be callable fn(phi, x) -> (T,); got {fn!r}.")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError("value_function(optimizer=...) must be an optax.GradientTransformation, "
                        "e.g. optax.adam(1e-2).")

    def values(phi, x, t):
        v = jnp.asarray(fn(phi, x))
        if v.shape != (t,):
            raise ValueError(f"sg.programs.value_function: fn(phi, x) must return one value per "
                             f"step, shape ({t},); got {v.shape}.")
        return v

    def terms(d, g, x, state):
        v = values(jax.lax.stop_gradient(state.params), x, d.shape[0])
        return jnp.sum(d * jax.lax.stop_gradient(v).astype(d.dtype))[None]

    def fit(state: LearnedState, xs, costs, weights=None):
        g = jax.lax.stop_gradient(cost_to_go(jnp.asarray(costs)))
        w = jnp.ones_like(g) if weights is None else jnp.asarray(weights, g.dtype)

        def loss(phi):
            v = jax.vmap(lambda x: values(phi, x, g.shape[-1]))(xs)
            return jnp.mean(w * jnp.square(g - v))

        value, grads = jax.value_and_grad(loss)(state.params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 count with floats
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return LearnedState(jax.tree_util.tree_map(jnp.add, state.params, updates),
                            opt_state), value

    def init(t, dtype):
        del t, dtype
        return LearnedState(params, optimizer.init(params))

    return StepBaseline("value_function", terms, None, init, _no_update, stateful=True), fit
