r"""Adaptive sample size: draw chunks inside a compiled ``lax.while_loop`` until the standard
error meets a target or a sample cap is reached.

The stopping rule looks at the running standard error only. Because it depends on the draws,
the final estimate carries a small sequential-sampling bias (of the order of the correlation
between the estimate and its variance estimate divided by the number of units); with a
``min_samples`` of a few hundred it is far below the standard error.

References:
  Chow and Robbins, "On the asymptotic theory of fixed-width sequential confidence intervals for
  the mean", Annals of Mathematical Statistics, 1965.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src import engine, policy, problem, stats
from scoregrad._src.results import per_unit_variance, summarize

PyTree = Any


class AdaptiveEstimate(NamedTuple):
    """Result of :func:`estimate_grad_adaptive`.

    Attributes:
      estimate: a :class:`scoregrad.GradEstimate` over all draws (its ``num_samples`` is a traced
        count).
      reached_target: True if every coordinate's standard error met ``target_stderr``.
      hit_cap: True if the loop stopped at ``max_samples`` without reaching the target.
      num_chunks: chunks drawn.
    """

    estimate: Any
    reached_target: jax.Array
    hit_cap: jax.Array
    num_chunks: jax.Array


def _stats(est, fs, mom, state, target):
    """Per-leaf (grad, variance per unit, stderr) and whether every stderr meets the target."""
    u = mom.count
    w = jax.lax.stop_gradient(est.weights(fs, state, u))
    grad = jax.tree_util.tree_map(lambda m: jnp.tensordot(w.astype(m.dtype), m, axes=1), mom.mean)
    var = jax.tree_util.tree_map(
        lambda c: jnp.maximum(jnp.tensordot(w.astype(c.dtype), jnp.tensordot(
            w.astype(c.dtype), c, axes=([0], [1])), axes=([0], [0])), 0)
        / jnp.maximum(u - 1, 1),
        mom.comoment,
    )
    se = jax.tree_util.tree_map(lambda v: jnp.sqrt(v / u), var)
    ok = jax.tree_util.tree_map(lambda s, t: jnp.all(s <= t), se, target)
    return grad, var, se, jnp.all(jnp.stack(jax.tree_util.tree_leaves(ok)))


def estimate_grad_adaptive(
    f: Callable, family, theta: PyTree, key: jax.Array, *, target_stderr, max_samples: int,
    min_samples: int | None = None, estimator=None, state=None, chunk_size: int | None = None,
    nan_policy: str = "raise",
) -> AdaptiveEstimate:
    r"""Like :func:`scoregrad.estimate_grad`, drawing chunks until ``stderr <= target_stderr``.

    Chunks of ``chunk_size`` units (sample i from ``fold_in(key, i)``, as everywhere) are drawn
    inside a ``lax.while_loop`` — one compiled program, usable under ``jit`` and ``vmap`` — until
    every coordinate's standard error is at most ``target_stderr`` (and at least ``min_samples``
    were drawn) or ``max_samples`` is reached; the result says which. The draws are those of
    :func:`scoregrad.estimate_grad` with the same key, so stopping after k chunks gives exactly
    its estimate at ``k * chunk`` samples.

    The stopping time depends on the draws (through their standard error), so the estimate is
    not exactly unbiased: draws that happen to have a small spread stop early. The bias is a
    small fraction of the standard error. On the test problem (normal, f = sum x^2), 200 seeds
    of 64 replicates gave a mean z of +0.14, where +0 would be unbiased
    (``benchmarks/README.md``, seed sweep). Use :func:`scoregrad.estimate_grad` with a fixed
    ``num_samples`` where exact unbiasedness matters.

    Args:
      target_stderr: a float, or a pytree like theta of per-coordinate targets.
      max_samples: the cap (static); rounded down to a whole number of chunks.
      min_samples: draw at least this many before testing (default: one chunk, at least 32).
      estimator, state, chunk_size: as in :func:`scoregrad.estimate_grad`. Estimators with
        cross-fitted coefficients (``sg.baselines.optimal()``, control variates) are refused.
        An estimator's learning step (RELAX's control variate) runs, as in
        :func:`scoregrad.estimate_grad`, on exactly the units drawn: one compiled learning pass
        per possible number of chunks, so at most 16 stopping points are allowed between
        ``min_samples`` and ``max_samples`` for such estimators.
      nan_policy: as in :func:`scoregrad.estimate_grad`. With ``"raise"`` (default) the loop
        stops at the first chunk with a NaN or infinite f (or surrogate term) and the call
        raises; ``"drop"`` leaves those units out (the stopping rule sees the kept units);
        ``"propagate"`` keeps them and counts them in ``num_nonfinite``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> theta = {"loc": jnp.zeros(2), "scale": jnp.ones(2)}
      >>> a = sg.estimate_grad_adaptive(lambda x: jnp.sum(x), sg.families.normal(), theta,
      ...                               jax.random.key(0), target_stderr=0.1,
      ...                               max_samples=100_000, chunk_size=100)
      >>> bool(a.reached_target), int(a.estimate.num_samples) < 100_000
      (True, True)
    """
    where = "estimate_grad_adaptive"
    _check_count(max_samples, "max_samples", minimum=1)
    if min_samples is not None:
        _check_count(min_samples, "min_samples", minimum=1)
    run_policy = policy.make_policy(where, nan_policy, None, chunk_size)
    prep = problem.prepare(f, family, theta, key, max_samples, estimator, where,
                           policy=run_policy, num_samples_name="max_samples")
    est = prep.est
    if est.fitted:
        raise TypeError(
            f"estimate_grad_adaptive: {est.name} fits coefficients by cross-fitting over a fixed "
            "number of samples; use sg.estimate_grad, or a baseline such as leave_one_out()."
        )
    target = _target(target_stderr, theta)
    state = problem.init_state(est, theta, state)
    c = prep.chunk
    max_chunks = max(1, prep.num_units // c)
    if min_samples is None:
        min_samples = max(32, est.min_units * est.draws_per_unit)
    min_chunks = min(max_chunks, max(1, -(-min_samples // (c * est.draws_per_unit))))
    if est.learn is not None and max_chunks - min_chunks + 1 > _MAX_LEARN_BRANCHES:
        raise TypeError(
            f"estimate_grad_adaptive: {est.name} has a learning step that runs on exactly the "
            f"units drawn, compiled once per possible stopping point; min_samples={min_samples}, "
            f"max_samples={max_samples} and chunk_size={c} allow {max_chunks - min_chunks + 1} "
            f"(at most {_MAX_LEARN_BRANCHES}). Raise min_samples or chunk_size, or use "
            "sg.estimate_grad with a fixed num_samples."
        )
    raising = prep.nan_policy == "raise"
    unit_key = prep.key
    assert unit_key is not None  # drawn from a key (no given samples here)
    chunk = engine.make_chunk(prep.model, est, prep.params, state, "diag", prep.dtype,
                              drop=prep.nan_policy == "drop")

    def step(k):
        return chunk(engine.unit_keys(unit_key, (k * c).astype(jnp.uint32), c), None,
                     (k * c).astype(jnp.int32))

    def cond(carry):
        k, fs, mom = carry
        met = _stats(est, fs, mom, state, target)[3]
        go = (k < max_chunks) & ((k < min_chunks) | ~met)
        # Under "raise" the call fails anyway: stop drawing at the first non-finite chunk.
        return go & (fs.nonfinite == 0) if raising else go

    def body(carry):
        k, fs, mom = carry
        fs, mom = engine.merge("diag", (fs, mom), step(k))
        return k + 1, fs, mom

    fs, mom = step(jnp.asarray(0, jnp.uint32))
    k, fs, mom = jax.lax.while_loop(cond, body, (jnp.asarray(1, jnp.uint32), fs, mom))
    fs = policy.check_nonfinite(prep.policy, fs, where)
    grad, var, se, met = _stats(est, fs, mom, state, target)
    plain = jax.tree_util.tree_map(
        lambda cm: per_unit_variance(stats.term0_comoment(cm, 0.0, None), mom.count),
        mom.comoment)
    new_state = _learn(prep, est.update(state, fs), k, min_chunks, max_chunks)
    result = summarize(
        fs=fs._replace(mean=policy.guard(fs.mean, fs)), grad=policy.guard_tree(grad, fs),
        variance=var, n_units=mom.count, stderr=se, plain_variance=plain,
        num_samples=(k * c * est.draws_per_unit).astype(jnp.int32), state=new_state,
    )
    return AdaptiveEstimate(result, met, ~met, k)


# Estimators with a learning step compile one learning pass per possible stopping point.
_MAX_LEARN_BRANCHES = 16


def _learn(prep, state, k, min_chunks: int, max_chunks: int):
    """The estimator's learning step (as ``problem.learn``) on the ``k * chunk`` units drawn.

    ``learn`` takes a static number of units, and ``k`` is traced: one branch per possible
    ``k`` in ``[min_chunks, max_chunks]`` (the loop cannot stop outside it, except early under
    nan_policy="raise", where the call raises anyway).
    """
    est = prep.est
    if est.learn is None:
        return state
    params = jax.lax.stop_gradient(prep.params)
    c = prep.chunk

    def branch(j):
        return lambda st: est.learn(prep.model, params, prep.key, st, j * c, c)

    branches = [branch(j) for j in range(min_chunks, max_chunks + 1)]
    if len(branches) == 1:
        return branches[0](state)
    idx = jnp.clip(k.astype(jnp.int32) - min_chunks, 0, len(branches) - 1)
    return jax.lax.switch(idx, branches, state)


def _check_count(value, name: str, minimum: int) -> int:
    """A static Python int >= minimum, by name (``max_samples``, ``min_samples``)."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"estimate_grad_adaptive: `{name}` is traced, but it fixes the loop's bounds and must "
            f"be a static Python int; mark it static under jax.jit."
        )
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"estimate_grad_adaptive: `{name}` must be a Python int; got "
            f"{type(value).__name__} ({value!r}). Write e.g. `{name}=1000`."
        )
    if value < minimum:
        raise ValueError(f"estimate_grad_adaptive: `{name}` must be at least {minimum}; got {value}.")
    return int(value)


def _target(target_stderr, theta):
    """A positive float, or a pytree like theta of positive per-coordinate targets."""

    def bad(got):
        return TypeError(
            "estimate_grad_adaptive: `target_stderr` must be a positive float or a pytree like "
            f"theta (structure {jax.tree_util.tree_structure(theta)}) of per-coordinate targets; "
            f"got {got}."
        )

    def leaf(t, like):
        if isinstance(t, bool) or isinstance(t, (str, bytes)):
            raise bad(f"{type(t).__name__} {t!r:.40}")
        if isinstance(t, (int, float, np.floating, np.integer)):
            if not t > 0:
                raise ValueError(f"target_stderr must be > 0; got {target_stderr!r}.")
            return jnp.asarray(t)
        if not hasattr(t, "dtype") or not jnp.issubdtype(t.dtype, jnp.floating):
            raise bad(f"{type(t).__name__} {t!r:.40}")
        if jnp.ndim(t) and jnp.shape(t) != jnp.shape(like):
            raise ValueError(
                f"estimate_grad_adaptive: a `target_stderr` leaf has shape {jnp.shape(t)}, but "
                f"the matching theta leaf has shape {jnp.shape(like)}; pass a scalar or that shape."
            )
        if not isinstance(t, jax.core.Tracer) and not np.all(np.asarray(t) > 0):
            raise ValueError(f"target_stderr must be > 0; got {target_stderr!r}.")
        return t

    if isinstance(target_stderr, (int, float, np.floating, np.integer)) and not isinstance(
            target_stderr, bool):
        return jax.tree_util.tree_map(lambda a: leaf(target_stderr, a), theta)
    got: Any = jax.tree_util.tree_structure(target_stderr)
    want: Any = jax.tree_util.tree_structure(theta)
    if got != want:
        if got.num_leaves == 1 and got == jax.tree_util.tree_structure(0.0) \
                and hasattr(target_stderr, "dtype") and jnp.ndim(target_stderr) == 0:
            return jax.tree_util.tree_map(lambda a: leaf(target_stderr, a), theta)
        raise bad(f"{type(target_stderr).__name__} of structure {got} ({target_stderr!r:.60})")
    return jax.tree_util.tree_map(leaf, target_stderr, theta)
