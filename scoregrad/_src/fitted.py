r"""Per-coordinate fitted coefficients by cross-fitting, and a runner for index-aware estimators.

Estimators with ``Plan.fitted`` terms (the optimal per-coordinate baseline, control variates
with an optimal coefficient) combine their terms with weights fitted **per parameter coordinate**:

.. math::
   \hat g_j = \sum_{k \notin T} w_k\, \bar g_{kj} + \sum_{t \in T} c_{tj}\, \bar g_{tj},
   \qquad c_{\cdot j} = -\Sigma_{TT,j}^{-1}\, \Sigma_{T a,j},

where :math:`T` are the fitted terms (each with zero-mean gradient, :math:`E[g_t] = 0`),
:math:`a = \sum_{k\notin T} w_k g_k` the base estimator and :math:`\Sigma` the per-coordinate
covariance of the per-unit term gradients: the coefficients minimize the variance of each
coordinate. Estimated on the same draws they would bias the estimate (by :math:`O(1/N)`), so the
units are split into ``num_folds`` contiguous folds and fold ``a`` uses coefficients fitted on the
other folds only (cross-fitting): since they are independent of fold ``a``'s draws and
:math:`E[g_t] = 0`, every fold's estimate is unbiased.

The folds are accumulated in the engine's one chunk loop (``engine.run(..., folds=...)``): per
unit a fold index, per fold masked moments on a leading axis. So cross-fitted estimators honour
``devices`` and ``nan_policy`` like every other (with ``"drop"``, a fold's share is its kept
units over all kept units).

References:
  Chernozhukov et al., "Double/debiased machine learning", 2018 (cross-fitting).
  Mohamed et al., "Monte Carlo Gradient Estimation in Machine Learning", JMLR 2020, §7.4.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src import engine, stats
from scoregrad._src.base import FStats
from scoregrad._src.binding import Bound as Estimator

PyTree = Any


def routed(est: Estimator) -> bool:
    """True if ``est`` has cross-fitted terms (its estimate is combined here)."""
    return bool(est.fitted)


def bounds(num_units: int, folds: int) -> tuple:
    """Unit bounds of ``folds`` contiguous folds."""
    return tuple(a * num_units // folds for a in range(folds + 1))


def _fold(mom: stats.Moments, a: int) -> stats.Moments:
    return jax.tree_util.tree_map(lambda x: x[a], mom)


def _merge_fstats(fss: list) -> FStats:
    acc = fss[0]
    for f in fss[1:]:
        acc = stats.merge_fstats(acc, f)
    return acc


def _merge_folds(moms: list) -> stats.Moments:
    acc = moms[0]
    for m in moms[1:]:
        acc = stats.merge_moments(acc, m)
    return acc


def coefficients(est: Estimator, base_w: jax.Array, comoment: jax.Array, floor=0.0) -> jax.Array:
    """Per-coordinate weights ``(*leaf, K)`` minimizing the variance, from a ``(K, K, *leaf)``
    co-moment: base weights on the unfitted terms, optimal coefficients on the fitted ones.

    ``floor`` (a ridge added to every fitted term's variance) keeps coordinates whose fitted
    terms are structurally zero up to rounding (e.g. the odd part of an antithetic pair) from
    getting huge coefficients fitted to rounding noise."""
    k = est.num_terms
    t_idx = list(est.fitted)
    mask = jnp.zeros((k,), base_w.dtype).at[jnp.asarray(t_idx)].set(1.0)
    wr = base_w * (1.0 - mask)
    cm = jnp.moveaxis(comoment, (0, 1), (-2, -1))
    stt = cm[..., t_idx, :][..., :, t_idx]
    sta = jnp.einsum("...tk,k->...t", cm[..., t_idx, :], wr.astype(cm.dtype))
    eye = jnp.broadcast_to(jnp.eye(len(t_idx), dtype=cm.dtype), stt.shape)
    # A ridge relative to each fitted term's own variance (terms differ in scale by orders of
    # magnitude: a baseline's score and a control variate's h times the score): 1e-10, or a few
    # ulps where that is below the dtype's resolution (float32: collinear fitted terms, e.g. a
    # control variate affine in the baseline's feature, would otherwise be solved to rounding).
    rel = max(1e-10, float(np.sqrt(np.finfo(cm.dtype).eps)))
    ridge = stt + eye * (rel * jnp.diagonal(stt, axis1=-2, axis2=-1)[..., None, :] + floor
                         + jnp.finfo(cm.dtype).tiny)
    coef = -jnp.linalg.solve(ridge, sta[..., None])[..., 0]
    coef = jnp.where(jnp.isfinite(coef), coef, 0.0)
    w = jnp.broadcast_to(wr.astype(cm.dtype), cm.shape[:-1])
    return w.at[..., jnp.asarray(t_idx)].set(coef)


def _plus_last(w, v):
    """``w`` (``(*leaf, K)``) plus ``v`` (``(K,)``) on its last axis."""
    return w + v.astype(w.dtype).reshape((1,) * (w.ndim - 1) + v.shape)


def _batch_weights(est, fs: FStats, state):
    """The unfitted terms' batch weights (leave-one-out, batch mean) from ``fs``'s units."""
    return jax.lax.stop_gradient(est.weights(fs, state, jnp.maximum(fs.units, 1.0)))


def _combine(est, fs_all: FStats, mom, fold_fs: FStats, state):
    """Cross-fitted grad and variance per leaf, and the moments merged over folds.

    ``mom`` and ``fold_fs`` have a leading fold axis. Fold ``a`` uses coefficients fitted on the
    other folds with the other folds' own batch weights (a leave-one-out baseline's mean of f)
    for the fit's target: with the whole batch's weights the fit would see fold ``a``'s f values
    through them, and the estimate would not be unbiased (a control variate h = f over
    leave-one-out gave N/(N-1) times the gradient, with zero variance). The unfitted terms keep
    the whole batch's weights: summed over folds they are the inner estimator itself.
    """
    folds = [_fold(mom, a) for a in range(est.num_folds)]
    ffs = [jax.tree_util.tree_map(lambda x, a=a: x[a], fold_fs) for a in range(est.num_folds)]
    kept = sum(m.count for m in folds)  # all units, or the finite ones under nan_policy="drop"
    grads, var_sums = None, None
    t_idx = list(est.fitted)
    unfitted = jnp.ones((est.num_terms,)).at[jnp.asarray(t_idx)].set(0.0)
    base_w = _batch_weights(est, fs_all, state)
    for a, fm in enumerate(folds):
        others = _merge_folds([m for b, m in enumerate(folds) if b != a])
        w_others = _batch_weights(
            est, _merge_fstats([f for b, f in enumerate(ffs) if b != a]), state)
        shift = (base_w - w_others) * unfitted.astype(w_others.dtype)
        # A ridge relative to the largest term variance over all coordinates: fitted terms
        # that are zero up to rounding (a control variate centred on its exact mean where it
        # is constant) must not get coefficients fitted to rounding noise.
        floor = 1e-12 * jnp.max(jnp.stack([
            jnp.max(jnp.diagonal(c, axis1=0, axis2=1))
            for c in jax.tree_util.tree_leaves(others.comoment)
        ]))
        w_a = jax.tree_util.tree_map(  # the fit on the others, this fold's batch weights
            lambda c: jax.lax.stop_gradient(_plus_last(coefficients(est, w_others, c, floor),
                                                       shift)), others.comoment
        )
        frac = fm.count / jnp.maximum(kept, 1)
        n_a = jnp.maximum(fm.count, 1)

        def leaf_grad(w, m, frac=frac):
            return frac.astype(m.dtype) * jnp.sum(w * jnp.moveaxis(m, 0, -1), axis=-1)

        def leaf_var(w, c, frac=frac, n_a=n_a):
            v = jnp.einsum("...k,kl...,...l->...", w, c, w) / jnp.maximum(n_a - 1, 1)
            return frac.astype(c.dtype) ** 2 * jnp.maximum(v, 0.0) / n_a

        g = jax.tree_util.tree_map(leaf_grad, w_a, fm.mean)
        v = jax.tree_util.tree_map(leaf_var, w_a, fm.comoment)
        grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
        var_sums = v if var_sums is None else jax.tree_util.tree_map(jnp.add, var_sums, v)
    return grads, var_sums, _merge_folds(folds)


def check_units(est: Estimator, num_units: int) -> None:
    if est.fitted and num_units < 2 * est.num_folds:
        raise ValueError(
            f"{est.name} fits its coefficients by {est.num_folds}-fold cross-fitting and needs at "
            f"least {2 * est.num_folds} units; got {num_units}. Increase num_samples."
        )


def _run(prep, params, state, key, samples, wrt):
    check_units(prep.est, prep.num_units)
    return engine.run_problem(prep, params, state, "diag", key=key, samples=samples,
                              folds=bounds(prep.num_units, prep.est.num_folds), wrt=wrt)


def estimate(prep, state, samples=None):
    """``(grad, variance per unit, stderr, FStats, moments merged over folds)`` for
    :func:`scoregrad.estimate_grad` with a cross-fitted estimator."""
    out = _run(prep, prep.params, state, prep.key, samples, "theta")
    assert out.moments is not None  # mode "diag"
    grad, est_var, mom = _combine(prep.est, out.fstats, out.moments, out.fold_fstats, state)
    u = mom.count
    var = jax.tree_util.tree_map(lambda v: v * u.astype(v.dtype), est_var)
    stderr = jax.tree_util.tree_map(jnp.sqrt, est_var)
    return grad, var, stderr, out.fstats, mom


def jvp(prep, params, key, state, dparams):
    """``(FStats, <gradient, dparams>)`` for the custom JVP of :func:`scoregrad.expectation`."""
    out = _run(prep, params, state, key, None, "params")
    assert out.moments is not None  # mode "diag"
    grads, _, _ = _combine(prep.est, out.fstats, out.moments, out.fold_fstats, state)
    flat = jax.tree_util.tree_leaves(params)
    tangents = jax.tree_util.tree_leaves(dparams)
    idx = [i for i, leaf in enumerate(flat) if stats.is_float(leaf)]
    dtype = out.fstats.mean.dtype
    total = jnp.zeros((), dtype)
    for g, i in zip(grads, idx):
        total = total + jnp.vdot(g, tangents[i]).astype(dtype)
    return out.fstats, total
