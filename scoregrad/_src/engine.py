"""The one engine: per-unit keys, chunks under ``lax.scan``, streaming statistics.

Unit ``i`` draws with ``jax.random.fold_in(key, i)``, so results depend only on ``(key, i)`` and
not on the chunk size. Memory is bounded by ``chunk × (size of a draw + number of parameters)``,
never by ``num_samples``. Three modes:

* ``"value"``: f statistics only (the primal of :func:`scoregrad.expectation`).
* ``"grad"``: f statistics and, per term k, the sum over units of the gradient of the term; one
  reverse pass per chunk (no per-sample Jacobians).
* ``"diag"``: per-unit gradients of the terms (chunk × K × P), reduced to means and centered
  co-moments across chunks, for standard errors.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src.base import Draws, FStats, Model, Params
from scoregrad._src.stats import (
    Moments,
    fold_fstats,
    fold_moments,
    fstats_of,
    is_float,
    masked_moments,
    merge_fstats,
    merge_moments,
)

PyTree = Any

# Target number of draw elements per chunk (~2 MiB in float32). Measured on a 2-core CPU (AMD EPYC,
# 1 MiB L2 per core), d = 1000 normal draws: ~500-draw chunks are ~5x cheaper than all at once, and
# both the sampling floor and the engine are fastest there (250: +20%, 1000: +15-40%).
_CHUNK_ELEMENTS = 2**19
# Cap on the per-unit gradient buffer (chunk x terms x parameters) that standard errors need.
_CHUNK_GRAD_ELEMENTS = 2**22
_MAX_AUTO_CHUNK = 4096


def auto_chunk_size(num_units: int, draw_elements: int, grad_elements: int = 0) -> int:
    """Units per chunk: cache-sized draws, and a bounded per-unit gradient buffer."""
    c = min(num_units, _MAX_AUTO_CHUNK, _CHUNK_ELEMENTS // max(1, int(draw_elements)))
    if grad_elements:
        c = min(c, _CHUNK_GRAD_ELEMENTS // int(grad_elements))
    return int(max(1, c))


def _size(tree: PyTree) -> int:
    return sum(int(jnp.size(leaf)) if not hasattr(leaf, "size") else int(leaf.size)
               for leaf in jax.tree_util.tree_leaves(tree))


def elements_per_unit(x_struct: PyTree, theta: PyTree, est) -> tuple:
    """``(draw elements, per-unit gradient elements)`` of one unit."""
    return est.draws_per_unit * max(_size(x_struct), 1), est.num_terms * max(_size(theta), 1)


class EngineOut(NamedTuple):
    fstats: FStats
    grad_sums: Optional[PyTree]  # "grad": leaves (K, *leaf) summed over units
    moments: Optional[Moments]  # "diag"
    fold_fstats: Optional[FStats] = None  # "diag" with folds: f's statistics per fold


def counter_key(key: jax.Array) -> jax.Array:
    """``key`` as a threefry key (unchanged if it is one).

    Unit ``i`` draws from ``fold_in(key, i)`` inside a ``vmap`` over the chunk. The ``rbg`` and
    ``unsafe_rbg`` implementations do not promise the same bits under ``vmap`` as without it, so
    their draws changed with the chunk size; their key data is folded into a threefry key first
    (deterministically, every word), which keeps the result a function of ``(key, i)`` alone.
    Entry points apply it to typed keys when they prepare (a legacy uint32 key keeps the default
    implementation, whose raw data the user's sampler receives).
    """
    if "threefry" in str(jax.random.key_impl(key)):
        return key
    out = jax.random.key(0, impl="threefry2x32")
    for word in jnp.reshape(jax.random.key_data(key), (-1,)):
        out = jax.random.fold_in(out, word)
    return out


def unit_keys(key: jax.Array, start: jax.Array, size: int) -> jax.Array:
    idx = start + jnp.arange(size, dtype=jnp.uint32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, idx)


def _rows_of_jacobian(vjp_fn, k: int, dtype) -> PyTree:
    # ``dtype`` must be the dtype of the differentiated output (the terms), not f's.
    """The k rows of a Jacobian from k separate reverse passes, stacked on a leading axis.

    Separate passes fuse into the chunk's elementwise work; ``vmap`` over the cotangent basis
    measured ~2.5x slower on CPU.
    """
    basis = jnp.eye(k, dtype=dtype)
    rows = [vjp_fn(basis[i])[0] for i in range(k)]
    return jax.tree_util.tree_map(lambda *r: jnp.stack(r), *rows)


class Chunk:
    """One chunk's computation: ``chunk(keys, xs) -> (FStats, grads-or-moments-or-None)``.

    For estimators with ``presample``, ``draw(keys)`` makes the chunk's draws and
    ``on_draws(xs)`` computes from them; :func:`_run_range` then double-buffers: iteration ``i``
    of its scan computes on chunk ``i``'s draws (carried in from the iteration before) while it
    draws chunk ``i + 1``. A loop carry is a fusion boundary XLA cannot remove, so the draws
    (threefry and the inverse CDF) are computed once and read by every consumer, rather than
    re-derived inside each fusion that uses them.
    """

    def __init__(self, inner, draw=None):
        self.inner = inner
        self.draw = draw

    def on_draws(self, xs, start):
        return self.inner(None, xs, start)

    def __call__(self, keys, xs, start):
        if keys is not None and self.draw is not None:
            return self.inner(None, self.draw(keys), start)
        return self.inner(keys, xs, start)


def make_chunk(
    model: Model, est, params: Params, state, mode: str, dtype, drop: bool = False,
    folds: Optional[tuple] = None, wrt: str = "theta",
) -> Chunk:
    """The :class:`Chunk` of ``est`` in ``mode``.

    With ``drop``, units whose f evaluations or terms are not finite are left out of every
    statistic (``FStats.count`` counts the kept evaluations; ``nonfinite`` all bad ones).
    ``folds`` (mode ``"diag"``): the unit bounds ``(0, b1, ..., num_units)`` of contiguous folds;
    the moments then have a leading fold axis (cross-fitting, :mod:`scoregrad._src.fitted`).
    ``wrt`` (mode ``"diag"``): ``"theta"``, or ``"params"`` for the per-unit gradients in every
    floating-point leaf of the parameters (a list of leaves), as the custom JVP of
    :func:`scoregrad.expectation` needs when f closes over what is differentiated.
    """
    inner = _make_chunk(model, est, params, state, mode, dtype, drop, folds, wrt)
    if not est.presample:
        return Chunk(inner)

    def draw(keys):  # what the unit's Draws.sample() would draw from each unit key
        return jax.vmap(lambda k: Draws(model, params, key=k).sample())(keys)

    return Chunk(inner, draw)


def _unit_ok(out, grads=None) -> jax.Array:
    """Per unit: all f evaluations, surrogate terms (and, given, their gradients) finite.

    The gradients matter: a score-function term is ``magic_box(log_prob) * f``, finite (the box
    is exactly 1) even where ``log_prob``'s derivative is not.
    """
    ok = jnp.all(jnp.isfinite(out.fvals)) & jnp.all(jnp.isfinite(out.terms))
    if grads is not None:
        for g in jax.tree_util.tree_leaves(grads):
            ok = ok & jnp.all(jnp.isfinite(g))
    return ok


def _count_bad_sums(fs: FStats, sums) -> FStats:
    """Gradients reduced over a chunk: a non-finite reduction whose f values and terms were all
    finite (a score at a zero-density draw) counts once, as one unit at least."""
    bad = ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(sums)]))
    return fs._replace(nonfinite=fs.nonfinite + (bad & (fs.nonfinite == 0)).astype(jnp.int32))


def _make_chunk(model: Model, est, params: Params, state, mode: str, dtype, drop,
                folds=None, wrt="theta"):
    def unit(p: Params, key, x):
        return est.unit(model, p, Draws(model, p, key=key, x=x), state)

    def per_unit_grads(p: Params, key, x):
        """Per-unit rows of the Jacobian of the terms w.r.t. ``p``, and the unit's output."""

        def terms(p):
            out = unit(p, key, x)
            return out.terms, out

        t, vjp_fn, out = jax.vjp(terms, p, has_aux=True)
        return _rows_of_jacobian(vjp_fn, est.num_terms, t.dtype), out

    if mode == "value":

        def chunk(keys, xs, start):
            out = jax.vmap(unit, in_axes=(None, 0, 0))(params, keys, xs)
            return fstats_of(out.fvals, dtype, jax.vmap(_unit_ok)(out), drop), None

        return chunk

    if mode == "grad" and not drop:

        def chunk(keys, xs, start):
            def summed(p):
                out = jax.vmap(unit, in_axes=(None, 0, 0))(p, keys, xs)
                return jnp.sum(out.terms, axis=0), out

            total, vjp_fn, out = jax.vjp(summed, params, has_aux=True)
            rows = _rows_of_jacobian(vjp_fn, est.num_terms, total.dtype)
            return _count_bad_sums(fstats_of(out.fvals, dtype, jax.vmap(_unit_ok)(out)), rows), rows

        return chunk

    if mode == "grad":  # drop: per-unit gradients, masked (a NaN never meets a zero cotangent)

        def chunk(keys, xs, start):
            grads, out = jax.vmap(per_unit_grads, in_axes=(None, 0, 0))(params, keys, xs)
            ok = jax.vmap(_unit_ok)(out, grads)

            def masked_sum(g):
                return jnp.sum(jnp.where(ok.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0), axis=0)

            return fstats_of(out.fvals, dtype, ok, True), jax.tree_util.tree_map(masked_sum, grads)

        return chunk

    flat, treedef = jax.tree_util.tree_flatten(params)
    float_idx = [i for i, leaf in enumerate(flat) if is_float(leaf)]

    def with_leaves(diff):
        full = list(flat)
        for i, leaf in zip(float_idx, diff):
            full[i] = leaf
        return jax.tree_util.tree_unflatten(treedef, full)

    def unit_grads(key, x):
        def terms(v):
            p = params._replace(theta=v) if wrt == "theta" else with_leaves(v)
            out = unit(p, key, x)
            return out.terms, out

        v0 = params.theta if wrt == "theta" else [flat[i] for i in float_idx]
        t, vjp_fn, out = jax.vjp(terms, v0, has_aux=True)
        return _rows_of_jacobian(vjp_fn, est.num_terms, t.dtype), out

    def diag_chunk(keys, xs, start):
        grads, out = jax.vmap(unit_grads)(keys, xs)  # leaves (c, K, *leaf)
        # drop: per unit, a unit with a non-finite gradient is left out and counted
        ok = jax.vmap(_unit_ok)(out, grads) if drop else jnp.ones(out.fvals.shape[:1], bool)
        mom = (masked_moments(grads, ok, dtype) if folds is None
               else (fold_moments(grads, ok, dtype, folds, start),
                     fold_fstats(out.fvals, ok, dtype, folds, start)))
        if drop:
            return fstats_of(out.fvals, dtype, ok, True), mom
        # Kept units all count: a non-finite gradient makes the chunk's moments non-finite, which
        # counts once (as "grad" mode does) without a per-unit pass over the gradients.
        fs = fstats_of(out.fvals, dtype, jax.vmap(_unit_ok)(out))
        return _count_bad_sums(fs, mom if folds is None else mom[0]), mom

    return diag_chunk


def merge(mode: str, acc, new, folds: Optional[tuple] = None):
    """Merges two chunk results ``(FStats, extra)`` of the given mode."""
    fs_a, extra_a = acc
    fs_b, extra_b = new
    fs = merge_fstats(fs_a, fs_b)
    if mode == "grad":
        extra = jax.tree_util.tree_map(jnp.add, extra_a, extra_b)
    elif mode == "diag" and folds is not None:
        extra = (jax.vmap(merge_moments)(extra_a[0], extra_b[0]),
                 jax.vmap(merge_fstats)(extra_a[1], extra_b[1]))
    elif mode == "diag":
        extra = merge_moments(extra_a, extra_b)
    else:
        extra = None
    return fs, extra


def _run_range(chunk, combine, *, offset, num_units, c, key, samples):
    """Units ``offset .. offset + num_units`` in chunks of ``c`` (``offset`` may be traced)."""
    c = min(c, num_units)
    n_full, rem = divmod(num_units, c)

    def inputs(start, size):
        if samples is not None:
            xs = jax.tree_util.tree_map(
                lambda a: jax.lax.dynamic_slice_in_dim(a, start, size), samples
            )
            return None, xs
        return unit_keys(key, jnp.asarray(start, jnp.uint32), size), None

    draw = getattr(chunk, "draw", None)  # a Chunk that presamples, or a plain function
    if samples is None and draw is not None and n_full >= 2:
        # Double-buffered: chunk i's draws arrive through the carry while chunk i + 1 is drawn.
        def body(carry, i):
            acc, xs = carry
            nxt = chunk.draw(inputs(offset + (i + 1) * c, c)[0])
            return (combine(acc, chunk.on_draws(xs, offset + i * c)), nxt), None

        xs0 = chunk.draw(inputs(offset, c)[0])
        zeros = jax.tree_util.tree_map(
            lambda a: jnp.zeros(a.shape, a.dtype),
            jax.eval_shape(lambda x: chunk.on_draws(x, offset), xs0),
        )
        (acc, last), _ = jax.lax.scan(
            body, (zeros, xs0), jnp.arange(n_full - 1, dtype=jnp.int32)
        )
        acc = combine(acc, chunk.on_draws(last, offset + (n_full - 1) * c))
    elif n_full == 1:
        acc = chunk(*inputs(offset, c), offset)
    else:

        def body(carry, i):
            return combine(carry, chunk(*inputs(offset + i * c, c), offset + i * c)), None

        zeros = jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, s.dtype),
            jax.eval_shape(lambda: chunk(*inputs(offset, c), offset)),
        )
        acc, _ = jax.lax.scan(body, zeros, jnp.arange(n_full, dtype=jnp.int32))
    if rem:
        acc = combine(acc, chunk(*inputs(offset + n_full * c, rem), offset + n_full * c))
    return acc


def _run_sharded(chunk, combine, *, devices, num_units, c, key):
    """Splits units into contiguous per-device ranges under ``shard_map``; merges in order."""
    n_dev = len(devices)
    per = num_units // n_dev
    mesh = jax.sharding.Mesh(np.asarray(devices), ("units",))
    impl = jax.random.key_impl(key)

    def body(key_data):
        k = jax.random.wrap_key_data(key_data, impl=impl)
        offset = jax.lax.axis_index("units").astype(jnp.int32) * per
        acc = _run_range(chunk, combine, offset=offset, num_units=per, c=c, key=k, samples=None)
        return jax.tree_util.tree_map(lambda a: a[None], acc)

    stacked = jax.shard_map(
        body, mesh=mesh, in_specs=jax.P(), out_specs=jax.P("units"), check_vma=False
    )(jax.random.key_data(key))
    acc = jax.tree_util.tree_map(lambda a: a[0], stacked)
    for d in range(1, n_dev):
        acc = combine(acc, jax.tree_util.tree_map(lambda a, d=d: a[d], stacked))
    if num_units > per * n_dev:
        rest = _run_range(
            chunk, combine, offset=per * n_dev, num_units=num_units - per * n_dev, c=c, key=key,
            samples=None,
        )
        acc = combine(acc, rest)
    return acc


def run_chunks(chunk, combine, *, num_units: int, chunk_units: int, key=None, samples=None,
               devices: Optional[tuple] = None):
    """The one chunk loop: ``chunk(keys, xs, start) -> acc`` over ``num_units`` units in chunks
    of ``chunk_units`` under ``lax.scan``, merged by ``combine(acc, acc)``; sharded across
    ``devices`` (two or more) with ``shard_map`` when drawing from a key. Unit ``i`` draws from
    ``fold_in(key, i)`` (or reads ``samples[i]``), so the result does not depend on the chunking
    or the device count. Every runner (estimators, importance sampling, finite differences,
    cross-fitting) goes through it."""
    if devices is not None and samples is None and num_units >= len(devices):
        return _run_sharded(chunk, combine, devices=devices, num_units=num_units,
                            c=chunk_units, key=key)
    return _run_range(chunk, combine, offset=0, num_units=num_units, c=chunk_units, key=key,
                      samples=samples)


def run(
    model: Model,
    est,
    params: Params,
    state,
    *,
    num_units: int,
    chunk_units: int,
    mode: str,
    dtype,
    key: Optional[jax.Array] = None,
    samples: Optional[PyTree] = None,
    nan_policy: str = "propagate",
    devices: Optional[tuple] = None,
    folds: Optional[tuple] = None,
    wrt: str = "theta",
) -> EngineOut:
    """Runs ``num_units`` units of ``est`` in mode ``mode`` through :func:`run_chunks`.

    With ``devices`` (two or more, from :func:`policy.resolve_devices`) and a key, unit ranges are
    sharded across devices with ``shard_map``; unit ``i`` still draws from ``fold_in(key, i)``,
    so the result equals the one-device result up to floating-point summation order.
    ``folds`` and ``wrt``: see :func:`make_chunk`.
    """
    chunk = make_chunk(model, est, params, state, mode, dtype, drop=nan_policy == "drop",
                       folds=folds, wrt=wrt)
    k = est.samples_per_unit
    if samples is not None and k > 1:  # a group's given draws: k consecutive samples
        samples = jax.tree_util.tree_map(lambda a: a.reshape((-1, k) + a.shape[1:]), samples)
    fstats, extra = run_chunks(
        chunk, functools.partial(merge, mode, folds=folds), num_units=num_units,
        chunk_units=chunk_units, key=key, samples=samples, devices=devices,
    )
    if mode == "grad":
        return EngineOut(fstats, extra, None)
    if mode == "diag" and folds is not None:
        return EngineOut(fstats, None, *extra)
    if mode == "diag":
        return EngineOut(fstats, None, extra)
    return EngineOut(fstats, None, None)


def run_problem(prob, params, state, mode: str, *, key=None, samples=None,
                folds: Optional[tuple] = None, wrt: str = "theta") -> EngineOut:
    """:func:`run` with a prepared problem's model, estimator, unit count, chunk, statistics
    dtype and policy (``nan_policy``, ``devices``); ``"raise"`` runs as ``"propagate"``, the
    entry point checks the count."""
    return run(prob.model, prob.est, params, state, num_units=prob.num_units,
               chunk_units=prob.chunk, mode=mode, dtype=prob.dtype, key=key, samples=samples,
               nan_policy="drop" if prob.nan_policy == "drop" else "propagate",
               devices=prob.devices, folds=folds, wrt=wrt)
