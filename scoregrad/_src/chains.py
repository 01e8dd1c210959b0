r"""Standard errors for draws from Markov chains: batch means over contiguous batches of units.

Draws from an MCMC chain (variational Monte Carlo, MCMC-based learning) are correlated: the
i.i.d. standard error :math:`\sqrt{\hat\sigma^2/N}` is too small by the square root of the
integrated autocorrelation time (0.30× the truth on an AR(1) chain with :math:`\rho = 0.9`).
With ``correlation=`` in :func:`scoregrad.estimate_grad_from_samples` the engine accumulates
per-batch moments of the per-unit gradients in its one chunk loop (the cross-fitting ``folds``),
and the standard error is that of the mean of B batch means,

.. math::
   \widehat{\mathrm{SE}}^2 = \frac{1}{B(B-1)} \sum_{b=1}^{B} (\hat g_b - \hat g)^2,

where the batches are the chains (``"chains"``: independent chains, the honest choice) or B
contiguous batches of one chain (``"batch_means"``, consistent when a batch is much longer than
the autocorrelation time; B defaults to :math:`\lfloor\sqrt N\rfloor`). The value's standard
error uses the batch means of f the same way. The estimate itself is the plain mean (unbiased
only if the chain starts in, or has reached, :math:`p(x;\theta)`: discard burn-in first).

References:
  Flegal and Jones, "Batch means and spectral variance estimators in Markov chain Monte Carlo",
  Annals of Statistics 2010. Geyer, "Practical Markov chain Monte Carlo", Statistical Science
  1992.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from scoregrad._src import engine, fitted, stats

PyTree = Any
MODES = ("chains", "batch_means")


def _default_batches(n: int) -> int:
    """The divisor of ``n`` in [2, n/2] closest to sqrt(n) (equal batches); raises if none."""
    divisors = [d for d in range(2, n // 2 + 1) if n % d == 0]
    if not divisors:
        raise ValueError(
            f"correlation='batch_means': N = {n} draws do not split into equal batches (no "
            "divisor in [2, N/2]); drop a few draws (burn-in) so that N has one, or pass "
            "num_batches= with N a multiple of it."
        )
    return min(divisors, key=lambda d: (abs(d - math.sqrt(n)), d))


def check(correlation, num_batches, samples) -> Optional[tuple]:
    """``(samples flattened to one axis of draws, number of batches)``, or None (i.i.d.)."""
    if correlation is None:
        if num_batches is not None:
            raise ValueError("`num_batches` needs correlation='batch_means'.")
        return None
    if correlation not in MODES:
        raise ValueError(f"`correlation` must be None, 'chains' or 'batch_means'; got {correlation!r}.")
    leaves = jax.tree_util.tree_leaves(samples)
    if correlation == "chains":
        if num_batches is not None:
            raise ValueError("`num_batches` is the number of chains with correlation='chains'.")
        if any(jnp.ndim(a) < 2 for a in leaves) or len({a.shape[:2] for a in leaves}) != 1:
            raise ValueError(
                "correlation='chains': every leaf of `samples` needs leading axes (chains, steps); "
                f"got shapes {[tuple(jnp.shape(a)) for a in leaves]}."
            )
        c, t = leaves[0].shape[:2]
        if c < 2:
            raise ValueError(f"correlation='chains' needs at least 2 chains; got {c}.")
        flat = jax.tree_util.tree_map(lambda a: a.reshape((c * t,) + a.shape[2:]), samples)
        return flat, int(c)
    n = int(leaves[0].shape[0])
    b = _default_batches(n) if num_batches is None else num_batches
    if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= n // 2:
        raise ValueError(f"`num_batches` must be an int in [2, N/2] = [2, {n // 2}]; got {b!r}.")
    return samples, int(b)


def estimate(prob, state, samples, num_batches: int):
    """``(grad, variance per unit, stderr, FStats, merged moments, value stderr)``."""
    est = prob.est
    if est.fitted:
        raise ValueError(
            f"correlation=...: {est.name} fits coefficients by cross-fitting, which assumes "
            "independent draws; use a baseline that does not (leave_one_out, batch_mean)."
        )
    if prob.num_units % num_batches:
        raise ValueError(
            f"correlation=...: {prob.num_units} units ({est.name} uses "
            f"{est.samples_per_unit} sample(s) per unit) do not split into {num_batches} equal "
            "batches: pass num_batches= dividing the number of units (chains of equal length)."
        )
    bounds = fitted.bounds(prob.num_units, num_batches)
    out = engine.run_problem(prob, prob.params, state, "diag", samples=samples, folds=bounds)
    mom, fs = out.moments, out.fstats
    assert mom is not None  # mode "diag"
    w = jax.lax.stop_gradient(est.weights(fs, state, prob.num_units))
    b = jnp.asarray(num_batches, fs.mean.dtype)

    def per_batch(m):  # (B, K, *leaf) -> (B, *leaf)
        return jnp.tensordot(m, w.astype(m.dtype), axes=([1], [0]))

    gb = jax.tree_util.tree_map(per_batch, mom.mean)
    grad = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), gb)
    stderr = jax.tree_util.tree_map(
        lambda g: jnp.sqrt(jnp.sum(jnp.square(g - jnp.mean(g, axis=0)), axis=0)
                           / (b * (b - 1)).astype(g.dtype)), gb)
    n = jnp.asarray(prob.num_units, fs.mean.dtype)
    var = jax.tree_util.tree_map(lambda s: jnp.square(s) * n.astype(s.dtype), stderr)
    merged = jax.tree_util.tree_map(lambda x: x[0], mom)
    for a in range(1, num_batches):
        merged = stats.merge_moments(merged, jax.tree_util.tree_map(lambda x, a=a: x[a], mom))
    return grad, var, stderr, fs, merged, _value_stderr(prob, samples, num_batches)


def _value_stderr(prob, samples, num_batches):
    """Batch-means standard error of the mean of f (one more evaluation of f per draw)."""
    params = jax.lax.stop_gradient(prob.params)
    batched = jax.tree_util.tree_map(
        lambda a: a.reshape((num_batches, -1) + a.shape[1:]), samples)

    def batch_mean(xs):
        f = jax.lax.map(lambda x: prob.model.eval_f(params, x).astype(prob.dtype), xs)
        return jnp.mean(f)

    means = jax.lax.map(batch_mean, batched)
    b = jnp.asarray(num_batches, prob.dtype)
    return jnp.sqrt(jnp.sum(jnp.square(means - jnp.mean(means))) / (b * (b - 1)))
