"""Measuring one (problem, estimator, sample budget) cell, and running a suite of cells."""

from __future__ import annotations

import statistics
import time
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple, SupportsFloat

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import scoregrad as sg
from scoregrad.bench import problems as _problems
from scoregrad.bench import registry as _registry

#: The literal root seed of every benchmark key.
ROOT_SEED = 20240611
#: |bias| / SE above which a cell is flagged as biased.
BIAS_Z = 5.0
#: Ulps (of the gradient's scale, in the estimates' dtype) allowed for rounding in the bias check.
BIAS_ROUNDING = 64


class Suite(NamedTuple):
    """A named benchmark configuration."""

    problems: tuple
    samples: tuple
    replicates: int


SUITES = {
    "quick": Suite(("gauss_square_d1", "bernoulli_t0.45", "categorical_k10"), (16, 64), 16),
    "default": Suite(
        ("gauss_square_d10", "gauss_exp_d10", "gauss_cos_d10", "bernoulli_t0.499",
         "categorical_k10", "bs_call", "bs_digital", "blr_elbo", "bandit_k10"),
        (10, 100, 1000),
        100,
    ),
    "full": Suite(("*",), (10, 100, 1000, 10000), 200),
}


def stable_id(name: str) -> int:
    """A process-independent 31-bit id of a name (CRC-32; never Python's randomized ``hash``)."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def cell_key(problem: str, num_samples: int, seed: int = ROOT_SEED) -> jax.Array:
    """The key of a cell. It does not depend on the estimator: common random numbers."""
    key = jax.random.fold_in(jax.random.key(seed), stable_id(problem))
    return jax.random.fold_in(key, num_samples)


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


def _num_batches(replicates: int) -> int:
    return max(b for b in (1, 2, 3, 4) if replicates % b == 0)


def _program(problem, est, theta, n):
    """One compiled program: ``(state, keys) -> (grads, stderrs, new states)`` over a batch."""

    def one(k, state):
        r = sg.estimate_grad(problem.f, problem.family, theta, k, num_samples=n, estimator=est,
                             state=state)
        return ravel_pytree(r.grad)[0], ravel_pytree(r.stderr)[0], r.state

    return jax.jit(lambda state, ks: jax.lax.map(lambda k: one(k, state), ks))


def _warm_state(fn, est, theta, warmup: int, keys):
    """The state after ``warmup`` estimates threaded in sequence (stateful estimators only)."""
    state = est.init(theta)
    if est.stateful:
        for b in range(warmup):
            _, _, new = fn(state, keys[b])
            state = jax.tree_util.tree_map(lambda a: a[0], new)
    return state


def _replicates(problem, est, theta, n, keys, warmup_key, warmup: int):
    """Runs the replicates in equal batches of one compiled program; returns (g, s, seconds).

    A stateful estimator is first warmed up; every replicate starts from the warmed state.
    """
    batches = _num_batches(keys.shape[0])
    kb = keys.reshape((batches, -1))
    fn = _program(problem, est, theta, n)
    wk = jax.random.split(warmup_key, max(warmup, 1) * kb.shape[1]).reshape(-1, kb.shape[1])
    state = _warm_state(fn, est, theta, warmup, wk)
    jax.block_until_ready(fn(state, kb[0]))  # compile + warm-up
    gs, ss, secs = [], [], []
    for b in range(batches):
        t0 = time.perf_counter()
        g, s, _ = jax.block_until_ready(fn(state, kb[b]))
        secs.append((time.perf_counter() - t0) / kb.shape[1])
        gs.append(np.asarray(g, np.float64))
        ss.append(np.asarray(s, np.float64))
    return np.concatenate(gs), np.concatenate(ss), secs


def _finite(x: SupportsFloat) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def bias_atol(exact: np.ndarray, eps: float) -> float:
    """Rounding allowance of a bias check: ``BIAS_ROUNDING`` ulps of the gradient's scale.

    A zero-variance estimator (DisARM on a symmetric Bernoulli toy, enumeration) has SE 0, and
    float32 arithmetic alone moves its mean by a few ulps; that is not bias.
    """
    return BIAS_ROUNDING * eps * (float(np.abs(exact).max()) + 1.0)


def summarize(g: np.ndarray, s: np.ndarray, exact: np.ndarray, seconds: float,
              eps: float = float(np.finfo(np.float32).eps)) -> dict:
    """Cell statistics from replicate estimates ``g`` (R, P) and reported stderrs ``s`` (R, P).

    A cell is ``biased`` when some coordinate has ``|bias| > BIAS_Z * SE + atol``
    (:func:`bias_atol`, from the machine epsilon ``eps`` of the dtype the estimates were made in);
    ``bias_z_max`` reports ``max |bias| / SE`` (``None`` when a coordinate has zero SE).
    """
    r = g.shape[0]
    mean = g.mean(0)
    var = g.var(0, ddof=1)
    bias = mean - exact
    bias_se = np.sqrt(var / r)
    atol = bias_atol(exact, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(bias) / bias_se
    total_var = float(var.sum())
    claimed = float(np.mean(s**2, axis=0).sum())
    return {
        "bias_norm": _finite(np.linalg.norm(bias)),
        "bias_se_norm": _finite(np.sqrt(np.sum(bias_se**2))),
        "bias_z_max": _finite(z.max()),
        "bias_atol": atol,
        "biased": bool(np.any(np.abs(bias) > BIAS_Z * bias_se + atol)),
        "variance": _finite(total_var),
        "stderr_ratio": _finite(np.sqrt(claimed / total_var)) if total_var > 0 else None,
        "seconds": _finite(seconds),
        "work_normalized_variance": _finite(total_var * seconds),
        "num_params": int(g.shape[1]),
    }


def run_cell(problem, entry, num_samples: int, replicates: int, dtype) -> dict:
    """Measures one cell; returns a dict with ``status`` "ok", "skipped" or "error"."""
    cell = {"problem": problem.name, "estimator": entry.name, "num_samples": int(num_samples),
            "replicates": int(replicates)}
    try:
        est = entry.factory(problem)
        need = est.min_units * est.draws_per_unit
        if num_samples < need or num_samples % est.draws_per_unit:
            why = f"needs num_samples >= {need} and a multiple of {est.draws_per_unit}"
            return {**cell, "status": "skipped", "reason": why}
        theta = _cast(problem.theta, dtype)
        key = cell_key(problem.name, num_samples)
        keys = jax.random.split(key, replicates)
        warmup_key = jax.random.fold_in(key, 1_000_000)
        g, s, secs = _replicates(problem, est, theta, num_samples, keys, warmup_key,
                                 entry.warmup_batches)
        stats = summarize(g, s, _problems.flat(problem.exact_grad), statistics.median(secs),
                          float(jnp.finfo(dtype).eps))
        return {**cell, "status": "ok", **stats}
    except Exception as err:  # noqa: BLE001 - a failing cell must not stop the suite
        return {**cell, "status": "error", "reason": f"{type(err).__name__}: {err}"}


def plan(problem_names, estimator_names, samples) -> tuple[list, list]:
    """The cells to run and the (problem, estimator) pairs skipped as not applicable."""
    cells: list[tuple[Any, Any, int]] = []
    skipped: list[dict[str, Any]] = []
    for pname in problem_names:
        problem = _problems.get_problem(pname)
        for ename in estimator_names:
            entry = _registry.get_estimator(ename)
            if not _registry.applies(entry, problem):
                skipped.append({"problem": pname, "estimator": ename, "status": "not_applicable",
                                "reason": f"needs {sorted(entry.requires)}"
                                          + (f", not {sorted(entry.excludes)}" if entry.excludes else "")})
                continue
            cells.extend((problem, entry, n) for n in samples)
    return cells, skipped


def rank(results: list[dict]) -> None:
    """Adds ``rank`` (1 = lowest work-normalized variance) within each (problem, num_samples)."""
    groups: dict[Any, list] = {}
    for c in results:
        if c["status"] == "ok" and c["work_normalized_variance"] is not None:
            groups.setdefault((c["problem"], c["num_samples"]), []).append(c)
    for group in groups.values():
        for i, c in enumerate(sorted(group, key=lambda c: c["work_normalized_variance"])):
            c["rank"] = i + 1


def run_suite(cells, replicates: int, dtype, progress: Callable = lambda it, **kw: it) -> list:
    """Runs the planned ``cells`` (from :func:`plan`), returns one dict per cell, ranked."""
    results = []
    bar = progress(cells, total=len(cells), unit="cell")
    for problem, entry, n in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{problem.name} | {entry.name} | N={n}")
        results.append(run_cell(problem, entry, n, replicates, dtype))
    rank(results)
    return results
