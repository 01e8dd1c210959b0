"""Results: :class:`GradEstimate` and the one function that builds it from run statistics."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from scoregrad._src.base import FStats

PyTree = Any


class GradEstimate(NamedTuple):
    """The result of :func:`estimate_grad`.

    Attributes:
      value: the Monte Carlo mean of f.
      value_stderr: its standard error, from the spread of the units' mean f values (a unit's
        f values, e.g. an antithetic pair, an RLOO group or a program's per-step costs, are
        not independent draws of f).
      grad: pytree like theta: the gradient estimate.
      stderr: pytree like theta: the standard error of each gradient coordinate,
        ``sqrt(variance / num_units)``.
      variance: pytree like theta: the per-unit variance of each gradient coordinate (the variance
        of one draw's contribution; a unit is one draw, or a coupled pair/group for estimators
        that draw several at once).
      snr: pytree like theta: signal-to-noise ratio ``|grad| / stderr``.
      num_samples: evaluations of f spent.
      num_nonfinite: how many evaluations of f were NaN or infinite (their contributions make
        ``grad`` non-finite: check this before an optimizer step), plus the units whose f was
        finite but whose surrogate terms or gradients (e.g. the score) were not: each such unit
        under ``nan_policy="drop"``; otherwise a chunk of units whose gradients reduce to a
        non-finite value counts at least once (the check runs on the chunk's sums, not per unit).
        A sequential program under a per-step baseline counts each of its T per-step costs.
      state: the estimator's new state (``()`` for stateless estimators).
      variance_reduction: pytree like theta: the variance of the estimator's term 0 alone on the
        same draws divided by ``variance`` (for score-function estimators term 0 is the plain
        REINFORCE estimator, so this is the factor its baselines/control variates gain; 1 for
        estimators without auxiliary terms). See :func:`scoregrad.diagnostics`.
    """

    value: jax.Array
    value_stderr: jax.Array
    grad: PyTree
    stderr: PyTree
    variance: PyTree
    snr: PyTree
    num_samples: int
    num_nonfinite: jax.Array
    state: Any
    variance_reduction: PyTree = None




def per_unit_variance(comoment_sum: jax.Array, n: jax.Array) -> jax.Array:
    """An unbiased per-unit variance from a centred co-moment sum over ``n`` units (NaN below 2)."""
    nn = jnp.asarray(n).astype(comoment_sum.dtype)
    return jnp.where(nn > 1, jnp.maximum(comoment_sum, 0.0) / jnp.maximum(nn - 1, 1), jnp.nan)


def summarize(*, fs: FStats, grad: PyTree, variance: PyTree, n_units: Any, num_samples: Any,
              state: Any, plain_variance: PyTree = None, stderr: PyTree = None) -> GradEstimate:
    """The :class:`GradEstimate` of a run: standard errors ``sqrt(variance / n_units)`` (unless
    given), signal-to-noise ratios, the value's standard error from the f statistics, and the
    variance-reduction factor ``plain_variance / variance`` (1 where not given)."""
    n = jnp.asarray(n_units)
    if stderr is None:
        stderr = jax.tree_util.tree_map(lambda v: jnp.sqrt(v / n.astype(v.dtype)), variance)
    snr = jax.tree_util.tree_map(lambda g, s: jnp.abs(g) / s, grad, stderr)
    if fs.unit_m2 is None:  # statistics built by hand: one f value per unit
        fvar, n_f = jnp.where(fs.count > 1, fs.m2 / jnp.maximum(fs.count - 1, 1), jnp.nan), fs.count
    else:  # over the units' mean f values (a unit's f values are not independent draws)
        fvar = jnp.where(fs.units > 1, fs.unit_m2 / jnp.maximum(fs.units - 1, 1), jnp.nan)
        n_f = fs.units
    if plain_variance is None:
        reduction = jax.tree_util.tree_map(jnp.ones_like, variance)
    else:
        reduction = jax.tree_util.tree_map(lambda p, v: p / v, plain_variance, variance)
    return GradEstimate(
        value=fs.mean,
        value_stderr=jnp.sqrt(fvar / n_f),
        grad=grad,
        stderr=stderr,
        variance=variance,
        snr=snr,
        num_samples=num_samples,
        num_nonfinite=fs.nonfinite,
        state=state,
        variance_reduction=reduction,
    )
