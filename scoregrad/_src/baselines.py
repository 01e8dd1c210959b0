"""Baselines for the score-function estimator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from scoregrad._src.base import Baseline, FStats, no_update


def none() -> Baseline:
    """No baseline: the plain score-function (REINFORCE) estimator."""
    return Baseline(
        name="none",
        num_features=0,
        min_samples=1,
        init=lambda dtype: (),
        features=lambda f, state: jnp.zeros((0,), f.dtype),
        weights=lambda fstats, state, n: jnp.zeros((0,), fstats.mean.dtype),
        update=no_update,
    )


def leave_one_out() -> Baseline:
    r"""Leave-one-out baseline: draw i uses the mean of f over the other N − 1 draws.

    .. math::
       \hat g = \frac{1}{N}\sum_i \Big(f(x_i) - \frac{1}{N-1}\sum_{j\ne i} f(x_j)\Big)
                \nabla_\theta \log p(x_i;\theta)
              = \frac{1}{N-1}\sum_i \big(f(x_i) - \bar f\big)\nabla_\theta \log p(x_i;\theta).

    Unbiased, because each baseline is independent of the draw it multiplies. The batch is the
    whole ``num_samples`` (not a chunk): the identity above lets the engine accumulate
    :math:`\sum_i f_i s_i`, :math:`\sum_i s_i` in one chunked pass and combine them at the end.
    Needs ``num_samples >= 2``. ``jax.hessian`` of :func:`scoregrad.expectation` stays unbiased
    (the baseline enters the DiCE surrogate as ``(1 - box_i) b_i``).

    References:
      Kool, van Hoof and Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", 2019.
    """

    def weights(fstats: FStats, state, n):
        del state
        n = jnp.asarray(n, fstats.mean.dtype)
        return jnp.stack([n / (n - 1) * fstats.mean, -1.0 / (n - 1)]).astype(fstats.mean.dtype)

    return Baseline(
        name="leave_one_out",
        num_features=2,
        min_samples=2,
        init=lambda dtype: (),
        features=lambda f, state: jnp.stack([jnp.ones_like(f), f]),
        weights=weights,
        update=no_update,
        shift_invariant=True,
    )


class MovingAverageState(NamedTuple):
    """State of :func:`moving_average`: the running average of past batch means of f."""

    average: jax.Array
    steps: jax.Array


def check_decay(decay: float, who: str = "moving_average") -> float:
    """A moving average's ``decay`` as a float in ``[0, 1)``; ``TypeError``/``ValueError``
    naming ``who(decay=...)`` otherwise."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"{who}(decay=...) must be a float in [0, 1); got {decay!r}.")
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"{who}(decay=...) must be in [0, 1); got {decay}.")
    return float(decay)


def moving_average(decay: float = 0.9) -> Baseline:
    r"""Exponential moving average of past batch means of f, bias-corrected as in Adam.

    The baseline for the current batch is built **only from past batches**, so the estimator is
    unbiased. (Updating the average with the current draws before using it, as the removed
    ``optax.monte_carlo`` did, biases the gradient by the factor :math:`1 - 1/N`.) The first call
    (no history) uses no baseline. Stateful: thread ``state`` through
    :func:`scoregrad.estimate_grad` or :func:`scoregrad.expectation_with_state`. A batch whose
    mean of f is not finite leaves the state unchanged.

    Args:
      decay: weight of the past in ``[0, 1)``.
    """
    decay = check_decay(decay)

    def init(dtype):
        return MovingAverageState(jnp.zeros((), dtype), jnp.zeros((), jnp.int32))

    def current(state: MovingAverageState):
        corr = 1.0 - jnp.asarray(decay, state.average.dtype) ** state.steps.astype(
            state.average.dtype)
        return jnp.where(state.steps > 0, state.average / jnp.where(corr > 0, corr, 1.0), 0.0)

    def update(state: MovingAverageState, fstats: FStats):
        mean = fstats.mean.astype(state.average.dtype)
        ok = jnp.isfinite(mean)
        avg = decay * state.average + (1.0 - decay) * mean
        return MovingAverageState(
            jnp.where(ok, avg, state.average), jnp.where(ok, state.steps + 1, state.steps)
        )

    return Baseline(
        name=f"moving_average({decay})",
        num_features=1,
        min_samples=1,
        init=init,
        features=lambda f, state: jnp.ones((1,), f.dtype),
        weights=lambda fstats, state, n: current(state)[None].astype(fstats.mean.dtype),
        update=update,
        stateful=True,
    )


def optimal() -> Baseline:
    r"""The variance-optimal baseline, one per parameter coordinate, fitted on other draws.

    For coordinate :math:`j` of theta the score-function variance
    :math:`\mathrm{Var}[(f - b_j)\, s_j]`, :math:`s = \nabla_\theta \log p(x;\theta)`, is
    smallest at

    .. math::
       b_j^\star = \frac{\mathbb{E}[f\, s_j^2]}{\mathbb{E}[s_j^2]}
                 = \frac{\mathrm{Cov}(f s_j, s_j)}{\mathrm{Var}(s_j)} \quad (\text{as } E[s_j]=0),

    a different baseline for every coordinate (a scalar baseline is a compromise between them).
    It is estimated by regression on the per-draw score terms and applied by **cross-fitting**:
    the draws are split into two contiguous halves and each half uses the baseline fitted on the
    other half, so every baseline is independent of the draws it multiplies and the estimator is
    **unbiased** (fitting on the same draws would bias it by :math:`O(1/N)`).

    * **Needs**: per-draw score vectors, so ``jax.grad`` of :func:`scoregrad.expectation` costs one
      reverse pass per draw (like :func:`scoregrad.estimate_grad`), not one per chunk.
      ``num_samples >= 4``.
    * **Derivative order**: ``jax.hessian`` of :func:`scoregrad.expectation` is unbiased: the
      fitted baselines enter as stop-gradient coefficients of :math:`\nabla(1 - \boxdot)` whose
      expectation vanishes identically in theta.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> est = sg.score_function(baseline=sg.baselines.optimal())
      >>> theta = {"loc": jnp.zeros(2), "scale": jnp.ones(2)}
      >>> r = sg.estimate_grad(lambda x: jnp.sum((x - 3.0) ** 2), sg.families.normal(), theta,
      ...                      jax.random.key(0), num_samples=2048, estimator=est)
      >>> bool(jnp.all(r.variance_reduction["loc"] > 2.0))
      True

    References:
      Weaver and Tao, "The Optimal Reward Baseline for Gradient-Based Reinforcement Learning",
      UAI 2001. Greensmith, Bartlett and Baxter, "Variance Reduction Techniques for Gradient
      Estimates in Reinforcement Learning", JMLR 2004. Mohamed et al., JMLR 2020, §7.4.
    """
    return Baseline(
        name="optimal",
        num_features=1,
        min_samples=4,
        init=lambda dtype: (),
        features=lambda f, state: jnp.ones((1,), f.dtype),
        weights=lambda fstats, state, n: jnp.zeros((1,), fstats.mean.dtype),
        update=no_update,
        fitted=(0,),
        shift_invariant=True,
    )


def batch_mean() -> Baseline:
    r"""The batch mean of f as baseline, with the unbiasing factor :math:`N/(N-1)`.

    Subtracting the batch mean :math:`\bar f` (which includes draw i itself) gives
    :math:`\frac1N\sum_i (f_i - \bar f) s_i`, whose expectation is :math:`(1 - 1/N)` times the
    gradient; rescaling by :math:`N/(N-1)` removes the bias exactly:

    .. math::
       \hat g = \frac{1}{N-1}\sum_i (f_i - \bar f)\, \nabla_\theta \log p(x_i;\theta),

    which is algebraically the same estimator as :func:`leave_one_out` (same numbers, same
    unbiasedness); both names are kept because both derivations are in common use.
    ``num_samples >= 2``; ``jax.hessian`` of :func:`scoregrad.expectation` stays unbiased.

    Examples:
      >>> import jax.numpy as jnp
      >>> import scoregrad as sg
      >>> xs = jnp.array([[0.0], [1.0], [1.0], [0.0]])
      >>> est = sg.score_function(baseline=sg.baselines.batch_mean())
      >>> r = sg.estimate_grad_from_samples(lambda x: jnp.sum(x), sg.families.bernoulli(),
      ...                                   jnp.zeros(1), xs, estimator=est)
      >>> round(float(r.grad[0]), 6)  # (1/3) * sum_i (x_i - 1/2) (x_i - 1/2)
      0.333333

    References:
      Kool, van Hoof and Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", 2019.
    """
    return leave_one_out()._replace(name="batch_mean")


class LearnedState(NamedTuple):
    """State of :func:`learned`: the baseline function's parameters and their optimizer state."""

    params: Any
    opt_state: Any


def learned(fn: Callable, params: Any, optimizer: Any) -> tuple[Baseline, Callable]:
    r"""A learned baseline :math:`b_\phi(x)` of a context, with its own parameters (for RL).

    ``fn(phi, x) -> scalar`` is a value function of the part of the draw that the score does not
    depend on (in policy gradients: the state ``s`` of a draw ``x = (s, a)`` whose ``log_prob`` is
    :math:`\log\pi_\theta(a \mid s)`). Then :math:`E[b_\phi(s)\,\nabla\log\pi(a\mid s)] = 0` and
    the estimator stays **unbiased** for any :math:`\phi`. (If ``fn`` reads the scored part of
    the draw it is biased: that is the caller's contract.)

    :math:`\phi` is trained between estimates, on draws whose gradient was already estimated,
    with the returned ``fit(state, xs, fvals, weights=None) -> (state, loss)``, one optax step on
    :math:`\mathrm{mean}_i\, w_i (f_i - b_\phi(x_i))^2`. With ``weights=None`` it is the usual
    value regression; ``weights`` :math:`= \lVert\nabla_\theta\log p(x_i)\rVert^2` makes the loss
    exactly the trace of the gradient variance that :math:`\phi` controls.
    Stateful: thread ``state`` (a :class:`LearnedState`) like an optax state.
    ``jax.hessian`` of :func:`scoregrad.expectation_with_state` stays unbiased.

    Args:
      fn: ``fn(phi, x) -> scalar``.
      params: initial :math:`\phi`.
      optimizer: an ``optax.GradientTransformation`` for :math:`\phi`.

    Returns:
      ``(baseline, fit)``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import scoregrad as sg
      >>> base, fit = sg.baselines.learned(lambda phi, x: phi, jnp.zeros(()), optax.sgd(0.5))
      >>> est = sg.score_function(baseline=base)
      >>> state = est.init(jnp.zeros(2))
      >>> xs = jnp.array([[1.0, 0.0], [1.0, 1.0]])
      >>> fvals = xs.sum(-1)
      >>> r = sg.estimate_grad_from_samples(lambda x: x.sum(), sg.families.bernoulli(),
      ...                                   jnp.zeros(2), xs, estimator=est, state=state)
      >>> state, loss = fit(r.state, xs, fvals)
      >>> float(state.params)  # one step of the value regression towards mean f = 1.5
      1.5

    References:
      Williams, 1992 (reinforcement baselines); Sutton et al., "Policy Gradient Methods for
      Reinforcement Learning with Function Approximation", NeurIPS 2000.
    """
    if not callable(fn):
        raise TypeError(f"learned(fn=...) must be callable fn(phi, x) -> scalar; got {fn!r}.")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            "learned(optimizer=...) must be an optax.GradientTransformation, e.g. optax.adam(1e-2)."
        )

    def init(dtype):
        del dtype
        return LearnedState(params, optimizer.init(params))

    def features(f, state, x):
        b = jnp.asarray(fn(jax.lax.stop_gradient(state.params), x))
        if b.size != 1:  # static at trace time: a vector baseline has no meaning per draw
            raise ValueError(
                "sg.baselines.learned(fn=...): the baseline `fn(phi, x)` must return a scalar "
                f"(one value per draw); got shape {b.shape}. Reduce it, e.g. jnp.sum(...), "
                "or index the context part of x."
            )
        return jnp.reshape(b.astype(f.dtype), (1,))

    def fit(state: LearnedState, xs, fvals, weights=None):
        fvals = jax.lax.stop_gradient(jnp.asarray(fvals))
        w = jnp.ones_like(fvals) if weights is None else jnp.asarray(weights, fvals.dtype)

        def loss(phi):
            b = jax.vmap(lambda x: fn(phi, x))(xs).reshape(fvals.shape)
            return jnp.mean(w * jnp.square(fvals - b))

        value, grads = jax.value_and_grad(loss)(state.params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 count with floats
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = jax.tree_util.tree_map(jnp.add, state.params, updates)
        return LearnedState(new_params, opt_state), value

    base = Baseline(
        name="learned",
        num_features=1,
        min_samples=1,
        init=init,
        features=features,
        weights=lambda fstats, state, n: jnp.ones((1,), fstats.mean.dtype),
        update=no_update,
        stateful=True,
        uses_draw=True,
    )
    return base, fit
