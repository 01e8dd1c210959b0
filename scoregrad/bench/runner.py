"""Measuring one (problem, estimator, sample budget) cell, and running a suite of cells."""

from __future__ import annotations

import math
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
from scoregrad.bench import stats as _stats

#: The literal root seed of every benchmark key.
ROOT_SEED = 20240611
#: Timing repeats per cell at least (batches of replicates, re-run when there are fewer).
MIN_TIMINGS = 3


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
    ``seconds`` holds one time per estimate for each batch (and for re-runs of the first batch
    when there are fewer than :data:`MIN_TIMINGS` batches), so the spread of timings is known.
    """
    batches = _num_batches(keys.shape[0])
    kb = keys.reshape((batches, -1))
    fn = _program(problem, est, theta, n)
    wk = jax.random.split(warmup_key, max(warmup, 1) * kb.shape[1]).reshape(-1, kb.shape[1])
    state = _warm_state(fn, est, theta, warmup, wk)
    jax.block_until_ready(fn(state, kb[0]))  # compile + warm-up
    gs, ss, secs = [], [], []
    for b in range(max(batches, MIN_TIMINGS)):
        t0 = time.perf_counter()
        g, s, _ = jax.block_until_ready(fn(state, kb[b % batches]))
        secs.append((time.perf_counter() - t0) / kb.shape[1])
        if b < batches:
            gs.append(np.asarray(g, np.float64))
            ss.append(np.asarray(s, np.float64))
    return np.concatenate(gs), np.concatenate(ss), secs


def _finite(x: SupportsFloat) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def timing(seconds: list[float]) -> dict:
    """Median and interquartile range of the per-estimate timings of a cell."""
    q25, med, q75 = np.percentile(np.asarray(seconds, np.float64), [25, 50, 75])
    return {"seconds": _finite(med), "seconds_q25": _finite(q25), "seconds_q75": _finite(q75),
            "timings": len(seconds)}


def summarize(g: np.ndarray, s: np.ndarray, exact: np.ndarray, seconds: list[float],
              eps: float = float(np.finfo(np.float32).eps), num_samples: int | None = None) -> dict:
    """Cell statistics from replicate estimates ``g`` (R, P) and reported stderrs ``s`` (R, P).

    Bias: the largest per-coordinate |t| = |bias| / SE with its Bonferroni p-value and the
    flag of :func:`scoregrad.bench.stats.bias_test` (Student t with R − 1 dof, Bonferroni over
    the P coordinates; ``eps`` is the machine epsilon of the dtype the estimates were made in,
    for the rounding allowance). SE honesty: :func:`scoregrad.bench.stats.stderr_check`.
    ``var_x_n`` = variance × ``num_samples`` (evaluations of f; the ranking key, deterministic);
    ``work_normalized_variance`` = variance × median seconds (measured, for information).
    """
    r = g.shape[0]
    total_var = float(g.var(0, ddof=1).sum())
    t = timing(seconds)
    n = num_samples
    return {
        **_stats.bias_test(g, exact, eps),
        "variance": _finite(total_var),
        **_stats.stderr_check(s, total_var, r),
        **t,
        "var_x_n": _finite(total_var * n) if n is not None else None,
        "work_normalized_variance": (_finite(total_var * t["seconds"])
                                     if t["seconds"] is not None else None),
        "num_params": int(g.shape[1]),
    }


def usable_budget(budget: int, draws_per_unit: int, min_units: int) -> int:
    """The sample budget an estimator runs at: ``budget`` rounded to the nearest multiple of
    ``draws_per_unit`` (halves up), at least ``min_units * draws_per_unit``.

    Examples:
      >>> usable_budget(100, 64, 1), usable_budget(10, 31, 1), usable_budget(1000, 4, 1)
      (128, 31, 1000)
    """
    units = max(min_units, int(math.floor(budget / draws_per_unit + 0.5)))
    return units * draws_per_unit


def run_cell(problem, entry, num_samples: int, replicates: int, dtype) -> dict:
    """Measures one cell; returns a dict with ``status`` "ok" or "error".

    ``budget`` is the requested number of evaluations of f; ``num_samples`` the number used,
    :func:`usable_budget` (an estimator that draws in units of several samples runs at the
    nearest multiple). The key depends on the problem and the budget only (common random
    numbers across estimators).
    """
    cell = {"problem": problem.name, "estimator": entry.name, "budget": int(num_samples),
            "num_samples": int(num_samples), "replicates": int(replicates),
            "unbiased_by_design": entry.unbiased}
    try:
        est = entry.factory(problem)
        n = usable_budget(num_samples, est.draws_per_unit, est.min_units)
        cell["num_samples"] = n
        theta = _cast(problem.theta, dtype)
        key = cell_key(problem.name, num_samples)
        keys = jax.random.split(key, replicates)
        warmup_key = jax.random.fold_in(key, 1_000_000)
        g, s, secs = _replicates(problem, est, theta, n, keys, warmup_key, entry.warmup_batches)
        stats = summarize(g, s, _problems.flat(problem.exact_grad), secs,
                          float(jnp.finfo(dtype).eps), n)
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
    """Ranks within each (problem, budget) by variance × evaluations of f, ties shared
    (:func:`scoregrad.bench.stats.rank`); never by timings."""
    _stats.rank(results)


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
