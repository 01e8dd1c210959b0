"""Causal credit vs whole-program credit on the iterated prisoner's dilemma (scoregrad.programs).

For each length T, 1,024 games between two memory-one agents (theta fixed, drawn once from
key 0): the per-game variance of each coordinate of dV1/dtheta under causal credit
(``program.estimator()``, reward-to-go) and under whole-program REINFORCE
(``sg.score_function()``) on the SAME games (one key, common random numbers), their ratio, and
causal credit with per-step leave-one-out baselines beside them, and the time per estimate of
``jax.grad`` of ``sg.expectation`` and of ``sg.estimate_grad`` (jit, warmed up,
``block_until_ready``, median of 7 interleaved calls). Writes
benchmarks/results/programs_variance.md.

    python benchmarks/programs_variance.py            # T = 10, 50, 150, 500 (about 1 minute)
    python benchmarks/programs_variance.py --T 150    # the headline case only
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import jax
import numpy as np
from _meta import commit  # benchmarks/ is sys.path[0] when run as a script

import scoregrad as sg
import scoregrad.programs as sp

N = 1024
OUT = os.path.join(os.path.dirname(__file__), "results", "programs_variance.md")


def _theta():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"agent1": 0.5 * jax.random.normal(k1, (5,)),
            "agent2": 0.5 * jax.random.normal(k2, (5,))}


def _interleaved_medians(fns: dict, *args, reps=7) -> dict:
    """Median seconds per call of each jitted function, calls interleaved so that machine noise
    hits all alike (compile and warm-up first)."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v)) for name, v in times.items()}


ESTIMATORS = ("causal", "causal + leave-one-out", "whole")


def run(t: int, discount: float):
    """Per estimator: (per-game variance per coordinate, seconds per jax.grad of expectation,
    seconds per estimate_grad, V1)."""
    p1, _ = sp.iterated_prisoners_dilemma(t, discount=discount)
    theta, key = _theta(), jax.random.key(1)
    ests = dict(zip(ESTIMATORS, (p1.estimator(), p1.estimator(sp.leave_one_out()),
                                 sg.score_function())))
    fns, results = {}, {}
    for label, est in ests.items():
        est_fn = jax.jit(lambda th, k, est=est: sg.estimate_grad(
            p1.f, p1.family, th, k, num_samples=N, estimator=est))
        results[label] = est_fn(theta, key)
        fns[("est", label)] = est_fn
        fns[("grad", label)] = jax.jit(jax.grad(lambda th, k, est=est: sg.expectation(
            p1.f, p1.family, th, k, num_samples=N, estimator=est)))
    med = _interleaved_medians(fns, theta, key)
    rows = {}
    for label, r in results.items():
        var = np.concatenate([np.asarray(r.variance["agent1"]), np.asarray(r.variance["agent2"])])
        rows[label] = (var, med[("grad", label)], med[("est", label)], float(r.value))
    return rows


def _machine() -> str:
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.system()} {cpu}, {os.cpu_count()} cores, jax {jax.__version__}, "
            f"device {dev.platform} ({dev.device_kind}), load average at the end {load} "
            "(times are noisy when it exceeds the core count)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="*", default=[10, 50, 150, 500])
    ap.add_argument("--discount", type=float, default=0.96)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    names = [f"{a}[{i}]" for a in ("agent1", "agent2") for i in range(5)]
    lines = [
        "# Causal vs whole-program credit: iterated prisoner's dilemma",
        "",
        f"`python benchmarks/programs_variance.py` on {datetime.date.today().isoformat()}, "
        f"commit {commit()}, {_machine()}.",
        "",
        f"{N} games per estimate, discount {args.discount}, theta fixed (key 0, scale 0.5). "
        "Variance: per game, of each coordinate of dV1/dtheta (agent 1's expected discounted "
        "cost; coordinates: each agent's five memory-one logits, state 0 = first step), both "
        "estimators on the same games. Time: jitted `jax.grad` of `sg.expectation` and "
        "`sg.estimate_grad`, median of 7 interleaved calls after warm-up.",
        "",
    ]
    for t in args.T:
        rows = run(t, args.discount)
        vw, tw, ew, value = rows["whole"]
        print(f"T={t}: value {value:.3f}; " + "; ".join(
            f"{lab}: variance whole/this {np.min(vw / rows[lab][0]):.1f}-"
            f"{np.max(vw / rows[lab][0]):.1f}, grad {rows[lab][1] * 1e3:.1f} ms "
            f"({rows[lab][1] / tw:.2f}x), estimate_grad {rows[lab][2] * 1e3:.1f} ms "
            f"({rows[lab][2] / ew:.2f}x)" for lab in ESTIMATORS))
        lines += [f"## T = {t}", "", f"V1 = {value:.3f}.", "",
                  "| estimator | time per `jax.grad` of `expectation` | × whole | time per "
                  "`estimate_grad` | × whole |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {lab} | {rows[lab][1] * 1e3:.1f} ms | {rows[lab][1] / tw:.2f} | "
                  f"{rows[lab][2] * 1e3:.1f} ms | {rows[lab][2] / ew:.2f} |" for lab in ESTIMATORS]
        lines += ["", "| coordinate | " + " | ".join(f"var {lab}" for lab in ESTIMATORS)
                  + " | whole / causal | whole / causal + LOO |",
                  "|---|" + "---:|" * (len(ESTIMATORS) + 2)]
        vc, vl = rows["causal"][0], rows["causal + leave-one-out"][0]
        lines += [f"| {n} | {a:.4g} | {b:.4g} | {c:.4g} | {c / a:.1f} | {c / b:.1f} |"
                  for n, a, b, c in zip(names, vc, vl, vw)]
        lines.append("")
    if not args.no_write:
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as fh:
            fh.write("\n".join(lines))
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
