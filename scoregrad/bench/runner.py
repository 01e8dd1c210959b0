"""Measuring one (problem, estimator, sample budget) cell, and running a suite of cells."""

from __future__ import annotations

import concurrent.futures
import math
import os
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


#: Wall seconds of the last :func:`run_suite`'s two phases, and its compile threads.
PHASES: dict = {}


class Suite(NamedTuple):
    """A named benchmark configuration."""

    problems: tuple
    samples: tuple
    replicates: int


SUITES = {
    "quick": Suite(("gauss_square_d1", "bernoulli_t0.45", "categorical_k10"), (16, 64), 16),
    # The default run (the README's command) fits in 3 minutes on 2 CPU cores. Nearly all of a
    # suite's time is XLA compiling one program per cell (1-5 s each; 15 s for the QMC ones), so
    # the default has one problem per application, at a small and a large budget: a VI ELBO
    # (normal family: pathwise, measure-valued, QMC, antithetic, delta method), a Bernoulli and a
    # categorical toy (ARM, DisARM, REBAR, RELAX, relaxations, IndeCateR, enumeration), an
    # option with and one without a pathwise derivative, a bandit, and a sequential program
    # (causal credit against whole-program credit; its 14 cells compile faster than the
    # bandit's). Every registered estimator runs in at least one of its cells.
    "default": Suite(
        ("blr_elbo", "bernoulli_t0.499", "categorical_k10", "bs_call", "bs_digital",
         "bandit_k10", "barrier_t6"),
        (10, 1000),
        100,
    ),
    # The former default: adds the three d = 10 Gaussian closed forms and N = 100 (270 cells,
    # 2.5 times the default's).
    "extended": Suite(
        ("gauss_square_d10", "gauss_exp_d10", "gauss_cos_d10", "bernoulli_t0.499",
         "categorical_k10", "bs_call", "bs_digital", "blr_elbo", "bandit_k10", "barrier_t6"),
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
    """One jitted program: ``(state, keys) -> (grads, stderrs, new states)`` over a batch of
    replicate keys (``lax.map``: one estimate after another, so a batch's time is R estimates'
    time, and R never multiplies the compile time)."""

    def one(k, state):
        r = sg.estimate_grad(problem.f, problem.family, theta, k, num_samples=n, estimator=est,
                             state=state)
        return ravel_pytree(r.grad)[0], ravel_pytree(r.stderr)[0], r.state

    return jax.jit(lambda state, ks: jax.lax.map(lambda k: one(k, state), ks))


def _strong(tree):
    """``tree`` with every leaf a strongly typed array (the warmed-up state an estimate returns
    is strongly typed; the initial state must lower to the same program)."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.asarray(a).dtype), tree)


def _units(est, problem) -> tuple[int, int]:
    """``(draws_per_unit, min_units)`` of ``est`` on ``problem``."""
    bind = getattr(sg, "bind", None)  # estimators bind to the family and theta themselves
    bound = bind(est, problem.family, problem.theta) if bind is not None else est
    return int(bound.draws_per_unit), int(bound.min_units)


class _Job(NamedTuple):
    """A cell ready to compile and measure (see :func:`_prepare`)."""

    cell: dict
    problem: Any
    lowered: Any  # jax.stages.Lowered of :func:`_program`
    state: Any  # initial estimator state, strongly typed
    keys: jax.Array  # (batches, R / batches) replicate keys
    warmup_keys: jax.Array  # (warmup batches, R / batches)
    warmup: int
    eps: float
    seconds_lower: float


def _prepare(problem, entry, num_samples: int, replicates: int, dtype) -> tuple[dict, _Job | None]:
    """The cell's record and, unless building it failed, its lowered (traced) program.

    ``budget`` is the requested number of evaluations of f; ``num_samples`` the number used,
    :func:`usable_budget` (an estimator that draws in units of several samples runs at the
    nearest multiple). The key depends on the problem and the budget only (common random
    numbers across estimators). Tracing uses the calling thread's JAX configuration (x64,
    default device), so it runs in the caller; only XLA compilation goes to worker threads.
    """
    cell = {"problem": problem.name, "estimator": entry.name, "budget": int(num_samples),
            "num_samples": int(num_samples), "replicates": int(replicates),
            "unbiased_by_design": entry.unbiased}
    t0 = time.perf_counter()
    try:
        est = entry.factory(problem)
        n = usable_budget(num_samples, *_units(est, problem))
        cell["num_samples"] = n
        theta = _cast(problem.theta, dtype)
        key = cell_key(problem.name, num_samples)
        keys = jax.random.split(key, replicates)
        batches = _num_batches(replicates)
        kb = keys.reshape((batches, -1))
        warmup = entry.warmup_batches
        wk = jax.random.split(jax.random.fold_in(key, 1_000_000),
                              max(warmup, 1) * kb.shape[1]).reshape(-1, kb.shape[1])
        state = _strong(est.init(theta))
        lowered = _program(problem, est, theta, n).lower(state, kb[0])
    except Exception as err:  # noqa: BLE001 - a failing cell must not stop the suite
        return {**cell, "status": "error", "reason": f"{type(err).__name__}: {err}"}, None
    job = _Job(cell, problem, lowered, state, kb, wk, warmup, float(jnp.finfo(dtype).eps),
               time.perf_counter() - t0)
    return cell, job


def _compile(lowered) -> tuple[Any, float]:
    """XLA compilation of a lowered program (releases the GIL: runs in a worker thread)."""
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def _like(tree, ref):
    """``tree`` cast leaf by leaf to the dtypes of ``ref`` (the compiled program's inputs)."""
    return jax.tree_util.tree_map(lambda a, r: jnp.asarray(a, r.dtype), tree, ref)


def _replicates(fn, job: _Job):
    """Runs the replicates in equal batches of the compiled program ``fn``; returns
    ``(g, s, seconds)``.

    A stateful estimator is first warmed up on ``job.warmup`` batches (its state threaded in
    sequence); every replicate starts from the warmed state. ``seconds`` holds one time per
    estimate for each batch (and for re-runs of the first batch when there are fewer than
    :data:`MIN_TIMINGS` batches), so the spread of timings is known.
    """
    kb, state = job.keys, job.state
    if jax.tree_util.tree_leaves(state):  # stateful
        for b in range(job.warmup):
            _, _, new = fn(state, job.warmup_keys[b])
            state = _like(jax.tree_util.tree_map(lambda a: a[0], new), job.state)
    jax.block_until_ready(fn(state, kb[0]))  # warm-up
    batches = kb.shape[0]
    gs, ss, secs = [], [], []
    for b in range(max(batches, MIN_TIMINGS)):
        t0 = time.perf_counter()
        g, s, _ = jax.block_until_ready(fn(state, kb[b % batches]))
        secs.append((time.perf_counter() - t0) / kb.shape[1])
        if b < batches:
            gs.append(np.asarray(g, np.float64))
            ss.append(np.asarray(s, np.float64))
    return np.concatenate(gs), np.concatenate(ss), secs


def _measure(job: _Job, compiled: Callable, seconds_compile: float) -> dict:
    """Runs a compiled cell and summarizes it; a cell that raises is recorded as an error."""
    cell = {**job.cell, "seconds_compile": _finite(job.seconds_lower + seconds_compile)}
    try:
        g, s, secs = _replicates(compiled, job)
        stats = summarize(g, s, _problems.flat(job.problem.exact_grad), secs, job.eps,
                          cell["num_samples"])
    except Exception as err:  # noqa: BLE001 - a failing cell must not stop the suite
        return {**cell, "status": "error", "reason": f"{type(err).__name__}: {err}"}
    return {**cell, "status": "ok", **stats}


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
    :func:`usable_budget`. ``seconds_compile`` is the time to trace and compile the cell's
    program once (what an un-jitted call of ``estimate_grad`` pays on every call).
    """
    cell, job = _prepare(problem, entry, num_samples, replicates, dtype)
    if job is None:
        return cell
    try:
        compiled, seconds = _compile(job.lowered)
    except Exception as err:  # noqa: BLE001 - a failing cell must not stop the suite
        return {**cell, "status": "error", "reason": f"{type(err).__name__}: {err}"}
    return _measure(job, compiled, seconds)


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


def compile_summary(results: list[dict]) -> dict:
    """Median seconds to trace and compile one cell's program and median seconds per jitted
    estimate, over the measured cells: the first is what an un-jitted ``estimate_grad`` call
    pays every time (it traces and compiles), the second what a jitted one pays."""
    comp = [c["seconds_compile"] for c in results
            if c["status"] == "ok" and c.get("seconds_compile") is not None]
    run = [c["seconds"] for c in results if c["status"] == "ok" and c.get("seconds") is not None]
    if not comp or not run:
        return {}
    return {"compile_seconds_median": _finite(np.median(comp)),
            "compile_seconds_total": _finite(np.sum(comp)),
            "estimate_seconds_median": _finite(np.median(run))}


def rank(results: list[dict]) -> None:
    """Ranks within each (problem, budget) by variance × evaluations of f, ties shared
    (:func:`scoregrad.bench.stats.rank`); never by timings."""
    _stats.rank(results)


def workers() -> int:
    """Threads that compile cells in parallel: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


#: Cells compiled before they are measured: bounds the compiled programs held at once (a few MB
#: each) while keeping both phases apart.
CHUNK = 48


def _compile_chunk(pool, chunk, replicates, dtype, threads: int):
    """Traces the chunk's cells in order here and compiles them in ``pool`` (at most
    ``2 * threads`` waiting, so that progress follows the compiles); yields each cell as it is
    submitted (as ``("compile", cell)``) and returns ``[(cell, job, future)]`` once every compile is done."""
    prepared: list[tuple[dict, _Job | None, Any]] = []
    for problem, entry, n in chunk:
        cell, job = _prepare(problem, entry, n, replicates, dtype)
        future = pool.submit(_compile, job.lowered) if job is not None else None
        prepared.append((cell, job._replace(lowered=None) if job else None, future))
        waiting = [f for _, _, f in prepared if f is not None and not f.done()]
        if len(waiting) > 2 * threads:
            concurrent.futures.wait(waiting[:len(waiting) - 2 * threads])
        yield "compile", cell
    concurrent.futures.wait([f for _, _, f in prepared if f is not None])
    return prepared


def _measure_prepared(cell, job, future) -> dict:
    if job is None:
        return cell
    try:
        compiled, seconds = future.result()
    except Exception as err:  # noqa: BLE001 - a failing cell must not stop the suite
        return {**cell, "status": "error", "reason": f"{type(err).__name__}: {err}"}
    return _measure(job, compiled, seconds)


def run_suite(cells, replicates: int, dtype, progress: Callable = lambda it, **kw: it,
              threads: int | None = None) -> list:
    """Runs the planned ``cells`` (from :func:`plan`), returns one dict per cell, ranked.

    Nearly all the time of a suite is XLA compiling one program per cell (seconds; running it
    takes milliseconds). So, for each chunk of :data:`CHUNK` cells, two phases. **Compile**: each
    cell's program is traced here, in order, and compiled by XLA in ``threads`` worker threads
    (default :func:`workers`; XLA releases the GIL). **Measure**: the compiled cells run one
    after another with nothing compiling beside them, so compilation never overlaps a timing.
    The progress bar counts both steps of every cell.
    """
    threads = threads or workers()
    results: list[dict] = []
    spent = {"compile": 0.0, "measure": 0.0}

    def steps():
        with concurrent.futures.ThreadPoolExecutor(threads,
                                                   thread_name_prefix="bench-compile") as pool:
            for start in range(0, len(cells), CHUNK):
                t0 = time.perf_counter()
                prepared = yield from _compile_chunk(pool, cells[start:start + CHUNK],
                                                     replicates, dtype, threads)
                t1 = time.perf_counter()
                spent["compile"] += t1 - t0
                for i, (cell, job, future) in enumerate(prepared):
                    prepared[i] = (cell, None, None)  # freed once measured
                    results.append(_measure_prepared(cell, job, future))
                    yield "measure", cell
                spent["measure"] += time.perf_counter() - t1

    bar = progress(steps(), total=2 * len(cells), unit="step")
    for phase, cell in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{phase} {cell['problem']} | {cell['estimator']} | "
                                f"N={cell['budget']}")
    PHASES.update(threads=threads, **spent)
    rank(results)
    return results
