"""Streaming statistics the engine accumulates: f statistics (Chan et al. merges, centred per
chunk, counted in at least float32) and the mean and centred co-moments of per-unit gradients."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from scoregrad._src.base import FStats

PyTree = Any


class Moments(NamedTuple):
    """Streaming mean and centered co-moments of per-unit term gradients (leading axes K, K)."""

    # The field shadows tuple.count (a public name, kept): mypy flags the override.
    count: jax.Array  # type: ignore[assignment]
    mean: PyTree  # leaves (K, *leaf)
    comoment: PyTree  # leaves (K, K, *leaf)


def stats_dtype(f_dtype) -> Any:
    """The dtype statistics accumulate in: f's, but at least float32 (float16/bfloat16 counts
    and sums overflow or round away past a few thousand draws)."""
    # Not jnp.promote_types: under jax_numpy_dtype_promotion="strict" it refuses (f64, f32).
    dt = jnp.dtype(f_dtype)
    if not jnp.issubdtype(dt, jnp.floating) or jnp.finfo(dt).bits < 32:
        return jnp.dtype(jnp.float32)
    return dt


def fstats_of(
    fvals: jax.Array, dtype, ok: Optional[jax.Array] = None, drop: bool = False
) -> FStats:
    """Chunk statistics of f (leading axis: units).

    ``ok`` (per unit) says whether the unit's surrogate terms and gradients were finite.
    ``nonfinite`` counts the non-finite f evaluations plus each unit whose f evaluations were
    finite but whose terms or gradients were not. With ``drop``, units that are not ok (or have
    a non-finite f) are left out of the statistics and of ``units``.
    """
    fvals = fvals.astype(dtype)
    per_unit = fvals.reshape(fvals.shape[0], -1)
    f_ok = jnp.all(jnp.isfinite(per_unit), axis=1)
    nonfinite = jnp.sum(~jnp.isfinite(per_unit)).astype(jnp.int32)
    if ok is not None:
        nonfinite = nonfinite + jnp.sum(~ok & f_ok).astype(jnp.int32)
    # Centred on the chunk's first f value: a large constant in f does not cost the mean and
    # the second moment their precision (sum of f - c, not of f).
    flat_f = per_unit.reshape(-1)
    finite = jnp.isfinite(flat_f)
    c = (jnp.where(jnp.any(finite), flat_f[jnp.argmax(finite)], 0) if per_unit.size
         else jnp.zeros((), dtype))  # the chunk's first finite f value
    d = per_unit - c
    kept = jnp.ones_like(f_ok) if not drop else (f_ok if ok is None else ok & f_ok)
    keep = jnp.broadcast_to(kept[:, None], per_unit.shape)
    n = jnp.sum(keep).astype(dtype)
    dm = jnp.sum(jnp.where(keep, d, 0)) / jnp.maximum(n, 1)
    m2 = jnp.sum(jnp.where(keep, jnp.square(d - dm), 0))
    units = jnp.sum(kept).astype(dtype)
    per = c + jnp.sum(jnp.where(keep, d, 0), axis=0) / jnp.maximum(units, 1)
    unit_m2 = jnp.sum(jnp.where(kept, jnp.square(jnp.mean(d, axis=1) - dm), 0))
    return FStats(n, c + dm, m2, nonfinite, units, per, unit_m2)


def merge_fstats(a: FStats, b: FStats) -> FStats:
    n = a.count + b.count
    delta = b.mean - a.mean
    safe_n = jnp.where(n > 0, n, 1)
    mean = a.mean + delta * b.count / safe_n
    m2 = a.m2 + b.m2 + delta**2 * a.count * b.count / safe_n
    units = a.units + b.units
    safe_u = jnp.where(units > 0, units, 1)
    per = a.per + (b.per - a.per) * b.units / safe_u
    # every kept unit has the same number of f values: the mean of unit means is the mean
    unit_m2 = a.unit_m2 + b.unit_m2 + delta**2 * a.units * b.units / safe_u
    return FStats(n, mean, m2, a.nonfinite + b.nonfinite, units, per, unit_m2)


def merge_moments(a: Moments, b: Moments) -> Moments:
    n = a.count + b.count
    safe_n = jnp.where(n > 0, n, 1)
    frac = b.count / safe_n
    w = a.count * b.count / safe_n

    def merge_mean(ma, mb):
        return ma + (mb - ma) * frac.astype(ma.dtype)

    def merge_co(ca, cb, ma, mb):
        d = mb - ma
        outer = d[:, None] * d[None, :]
        return ca + cb + outer * w.astype(ca.dtype)

    mean = jax.tree_util.tree_map(merge_mean, a.mean, b.mean)
    co = jax.tree_util.tree_map(merge_co, a.comoment, b.comoment, a.mean, b.mean)
    return Moments(n, mean, co)


def term0_comoment(comoment: jax.Array, ref, shift_term: Optional[int]) -> jax.Array:
    """The co-moment of term 0's per-unit gradient on f itself, from that on ``f - ref``.

    Shift-invariant estimators run on f centred on ``ref`` (``Model.f_shift``). Where term 0
    alone depends on the shift (the score term ``box * (f - ref)``), term ``j = shift_term`` is
    the baseline's constant feature ``(1 - box) * 1`` and term 0 on f is ``g0 - ref * gj``.
    """
    if shift_term is None:
        return comoment[0, 0]
    r, j = jnp.asarray(ref, comoment.dtype), shift_term
    return comoment[0, 0] - 2 * r * comoment[0, j] + r * r * comoment[j, j]


def masked_moments(grads, ok, dtype) -> Moments:
    """Chunk mean and centered co-moments of per-unit gradients (leaves (c, K, *leaf))."""
    count = jnp.sum(ok).astype(dtype)

    def co(g):
        mask = ok.reshape((-1,) + (1,) * (g.ndim - 1))
        g = jnp.where(mask, g, 0)
        m = jnp.sum(g, axis=0) / jnp.maximum(count, 1).astype(g.dtype)
        c = jnp.where(mask, g - m[None], 0)
        return m, jnp.sum(c[:, :, None] * c[:, None, :], axis=0)

    # Two maps over the leaves, not pairs picked apart with is_leaf=tuple: theta may itself be a
    # tuple (or NamedTuple), which such an is_leaf would take for a pair.
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    pairs = [co(g) for g in leaves]
    mean = jax.tree_util.tree_unflatten(treedef, [p[0] for p in pairs])
    com = jax.tree_util.tree_unflatten(treedef, [p[1] for p in pairs])
    return Moments(count, mean, com)


def is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def fold_moments(grads, ok, dtype, folds, start) -> Moments:
    """Per-fold masked moments, stacked on a leading fold axis."""
    size = ok.shape[0]
    idx = jnp.asarray(start, jnp.int32) + jnp.arange(size, dtype=jnp.int32)
    fold = sum((idx >= b).astype(jnp.int32) for b in folds[1:-1])
    per = [masked_moments(grads, ok & (fold == a), dtype) for a in range(len(folds) - 1)]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per)


def fold_fstats(fvals, ok, dtype, folds, start) -> FStats:
    """Per-fold statistics of f over each fold's (ok) units, stacked on a leading fold axis:
    a fold's own batch weights (cross-fitting, :mod:`scoregrad._src.fitted`)."""
    idx = jnp.asarray(start, jnp.int32) + jnp.arange(ok.shape[0], dtype=jnp.int32)
    fold = sum((idx >= b).astype(jnp.int32) for b in folds[1:-1])
    per = [fstats_of(fvals, dtype, ok & (fold == a), True) for a in range(len(folds) - 1)]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per)


def moments_of(rows: PyTree, dtype, ok: Optional[jax.Array] = None) -> Moments:
    """Mean and centred co-moments over the leading (unit) axis of leaves ``(c, K, *leaf)``;
    with ``ok``, of those units only."""
    keep = jnp.ones(jax.tree_util.tree_leaves(rows)[0].shape[:1], bool) if ok is None else ok
    return masked_moments(rows, keep, dtype)
