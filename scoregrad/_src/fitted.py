r"""Per-coordinate fitted coefficients by cross-fitting, and a runner for index-aware estimators.

Estimators with ``Estimator.fitted`` terms (the optimal per-coordinate baseline, control variates
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

The runner here is the engine's chunk loop (``engine.make_chunk``/``engine.merge``/
``engine.unit_keys``) with a unit offset: it leaves the engine's fast paths untouched.

References:
  Chernozhukov et al., "Double/debiased machine learning", 2018 (cross-fitting).
  Mohamed et al., "Monte Carlo Gradient Estimation in Machine Learning", JMLR 2020, §7.4.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from scoregrad._src import engine
from scoregrad._src.base import Estimator, FStats

PyTree = Any


def routed(est: Estimator) -> bool:
    """True if ``est`` needs this module's runner instead of ``engine.run``."""
    return bool(est.fitted)


def unit_inputs(key, samples, start):
    """``inputs(offset, size) -> (keys, xs)`` for units ``start + offset + arange(size)``."""

    def inputs(offset, size):
        s = jnp.asarray(start, jnp.uint32) + jnp.asarray(offset, jnp.uint32)
        if samples is not None:
            xs = jax.tree_util.tree_map(
                lambda a: jax.lax.dynamic_slice_in_dim(a, s.astype(jnp.int32), size), samples
            )
            return None, xs
        return engine.unit_keys(key, s, size), None

    return inputs


def loop(chunk, combine, inputs, num_units: int, chunk_units: int):
    """``chunk(*inputs(offset, size))`` over ``num_units`` units in chunks, merged by ``combine``."""
    c = max(1, min(chunk_units, num_units))
    n_full, rem = divmod(num_units, c)
    acc = chunk(*inputs(0, c))
    if n_full > 1:

        def body(carry, i):
            return combine(carry, chunk(*inputs(i * c, c))), None

        acc, _ = jax.lax.scan(body, acc, jnp.arange(1, n_full, dtype=jnp.uint32))
    if rem:
        acc = combine(acc, chunk(*inputs(n_full * c, rem)))
    return acc


def run(model, est, params, state, *, num_units, chunk_units, mode, dtype, key=None,
        samples=None, start=0) -> engine.EngineOut:
    """``engine.run`` with a unit offset ``start``."""
    chunk = engine.make_chunk(model, est, params, state, mode, dtype)
    inputs = unit_inputs(key, samples, start)
    fs, extra = loop(chunk, functools.partial(engine.merge, mode), inputs, num_units, chunk_units)
    return engine.EngineOut(fs, extra if mode == "grad" else None, extra if mode == "diag" else None)


def _fstats(fvals, dtype, ok=None) -> FStats:
    """Chunk statistics of f (leading axis: units); ``ok``: per-unit finiteness of the rest."""
    return engine.fstats_of(fvals, dtype, ok)


def moments_of(rows: PyTree, dtype) -> engine.Moments:
    """Mean and centered co-moments over the leading (unit) axis of leaves ``(c, K, *leaf)``."""
    treedef: Any  # jaxlib ships no stubs: mypy cannot type PyTreeDef's methods
    leaves, treedef = jax.tree_util.tree_flatten(rows)
    count = jnp.asarray(leaves[0].shape[0], dtype)
    means, coms = [], []
    for g in leaves:
        m = jnp.mean(g, axis=0)
        d = g - m
        means.append(m)
        coms.append(jnp.sum(d[:, :, None] * d[:, None, :], axis=0))
    return engine.Moments(count, treedef.unflatten(means), treedef.unflatten(coms))


def _is_diff(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _full_diag_chunk(model, est: Estimator, params, state, dtype):
    """Per-unit gradients of the terms w.r.t. every differentiable leaf of ``params``."""
    treedef: Any  # jaxlib ships no stubs: mypy cannot type PyTreeDef's methods
    flat, treedef = jax.tree_util.tree_flatten(params)
    idx = [i for i, leaf in enumerate(flat) if _is_diff(leaf)]
    basis = jnp.eye(est.num_terms, dtype=dtype)

    def per_unit(key, x):
        def terms(diff):
            full = list(flat)
            for i, leaf in zip(idx, diff, strict=False):
                full[i] = leaf
            out = est.unit(model, treedef.unflatten(full), key, x, state)
            return out.terms.astype(dtype), out.fvals

        _, vjp_fn, fvals = jax.vjp(terms, [flat[i] for i in idx], has_aux=True)
        rows = [vjp_fn(basis[k])[0] for k in range(est.num_terms)]
        return [jnp.stack(r) for r in zip(*rows, strict=False)], fvals

    def chunk(keys, xs):
        rows, fvals = jax.vmap(per_unit)(keys, xs)
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(r.reshape(r.shape[0], -1)), axis=1)
                                for r in rows]), axis=0)
        return _fstats(fvals, dtype, ok), moments_of(rows, dtype)

    return chunk, idx


def _bounds(num_units: int, folds: int):
    return [a * num_units // folds for a in range(folds + 1)]


def _fold_runs(prep, params, state, key, samples, full: bool):
    est = prep.est
    if full:
        chunk, idx = _full_diag_chunk(prep.model, est, params, state, prep.dtype)
    else:
        chunk, idx = engine.make_chunk(prep.model, est, params, state, "diag", prep.dtype), None
    combine = functools.partial(engine.merge, "diag")
    b = _bounds(prep.num_units, est.num_folds)
    outs = []
    for a in range(est.num_folds):
        inputs = unit_inputs(key, samples, b[a])
        outs.append(loop(chunk, combine, inputs, b[a + 1] - b[a], prep.chunk))
    return outs, idx


def _merge_all(outs):
    acc = outs[0]
    for o in outs[1:]:
        acc = engine.merge("diag", acc, o)
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
    scale = jnp.trace(stt, axis1=-2, axis2=-1)[..., None, None] / len(t_idx)
    eye = jnp.eye(len(t_idx), dtype=cm.dtype)
    ridge = stt + (1e-10 * scale + floor + jnp.finfo(cm.dtype).tiny) * eye
    coef = -jnp.linalg.solve(ridge, sta[..., None])[..., 0]
    coef = jnp.where(jnp.isfinite(coef), coef, 0.0)
    w = jnp.broadcast_to(wr.astype(cm.dtype), cm.shape[:-1])
    return w.at[..., jnp.asarray(t_idx)].set(coef)


def _combine(est, outs, state, num_units):
    """Cross-fitted grad and variance per leaf, plus the merged (FStats, Moments)."""
    fs_all, mom_all = _merge_all(outs)
    base_w = jax.lax.stop_gradient(est.weights(fs_all, state, num_units))
    grads, var_sums = None, None
    t_idx = list(est.fitted)
    for a, (_, mom) in enumerate(outs):
        others = _merge_all([o for b, o in enumerate(outs) if b != a])[1]
        # A ridge relative to the largest fitted-term variance over all coordinates.
        floor = 1e-12 * jnp.max(jnp.stack([
            jnp.max(jnp.stack([c[t, t] for t in t_idx]))
            for c in jax.tree_util.tree_leaves(others.comoment)
        ]))
        w_a = jax.tree_util.tree_map(
            lambda c: jax.lax.stop_gradient(coefficients(est, base_w, c, floor)), others.comoment
        )
        frac = mom.count / num_units

        def leaf_grad(w, m):
            return frac.astype(m.dtype) * jnp.sum(w * jnp.moveaxis(m, 0, -1), axis=-1)

        def leaf_var(w, c):
            v = jnp.einsum("...k,kl...,...l->...", w, c, w) / jnp.maximum(mom.count - 1, 1)
            return frac.astype(c.dtype) ** 2 * jnp.maximum(v, 0.0) / mom.count

        g = jax.tree_util.tree_map(leaf_grad, w_a, mom.mean)
        v = jax.tree_util.tree_map(leaf_var, w_a, mom.comoment)
        grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
        var_sums = v if var_sums is None else jax.tree_util.tree_map(jnp.add, var_sums, v)
    return grads, var_sums, fs_all, mom_all


def check_units(est: Estimator, num_units: int) -> None:
    if est.fitted and num_units < 2 * est.num_folds:
        raise ValueError(
            f"{est.name} fits its coefficients by {est.num_folds}-fold cross-fitting and needs at "
            f"least {2 * est.num_folds} units; got {num_units}. Increase num_samples."
        )


def estimate(prep, state, samples=None, ref=0.0):
    """:func:`scoregrad.estimate_grad` for routed estimators: a :class:`GradEstimate`."""
    from scoregrad._src.api import GradEstimate  # the api imports this module

    est, u = prep.est, prep.num_units
    check_units(est, u)
    outs, _ = _fold_runs(prep, prep.params, state, prep.key, samples, full=False)
    grad, est_var, fs, mom = _combine(est, outs, state, u)
    var = jax.tree_util.tree_map(lambda v: v * u, est_var)
    stderr = jax.tree_util.tree_map(jnp.sqrt, est_var)
    plain = jax.tree_util.tree_map(lambda c: engine.term0_comoment(c, ref, est.shift_term) / (u - 1), mom.comoment)
    fvar = fs.m2 / jnp.maximum(fs.count - 1, 1)
    return GradEstimate(
        value=fs.mean,
        value_stderr=jnp.sqrt(fvar / fs.count),
        grad=grad,
        stderr=stderr,
        variance=var,
        snr=jax.tree_util.tree_map(lambda g, s: jnp.abs(g) / s, grad, stderr),
        num_samples=u * est.draws_per_unit,
        num_nonfinite=fs.nonfinite,
        state=est.update(state, fs),
        variance_reduction=jax.tree_util.tree_map(lambda p, v: p / v, plain, var),
    )


def jvp(prep, params, key, state, dparams):
    """``(FStats, <gradient, dparams>)`` for the custom JVP of :func:`scoregrad.expectation`."""
    est, u = prep.est, prep.num_units
    check_units(est, u)
    outs, idx = _fold_runs(prep, params, state, key, None, full=True)
    grads, _, fs, _ = _combine(est, outs, state, u)
    tangents = jax.tree_util.tree_leaves(dparams)
    return fs, _dot(grads, [tangents[i] for i in idx], fs.mean.dtype)


def _dot(grads, tangents, dtype):
    total = jnp.zeros((), dtype)
    for g, t in zip(grads, tangents, strict=False):
        total = total + jnp.vdot(g, t).astype(dtype)
    return total
