"""Baselines for the score-function estimator."""

from __future__ import annotations

from typing import NamedTuple

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
    )


class MovingAverageState(NamedTuple):
    """State of :func:`moving_average`: the running average of past batch means of f."""

    average: jax.Array
    steps: jax.Array


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
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"moving_average(decay=...) must be a float in [0, 1); got {decay!r}.")
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"moving_average(decay=...) must be in [0, 1); got {decay}.")
    decay = float(decay)

    def init(dtype):
        return MovingAverageState(jnp.zeros((), dtype), jnp.zeros((), jnp.int32))

    def current(state: MovingAverageState):
        corr = 1.0 - jnp.asarray(decay, state.average.dtype) ** state.steps
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
