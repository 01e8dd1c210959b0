"""Causal credit vs whole-program credit on the iterated prisoner's dilemma (scoregrad.programs).

For each length T, 1,024 games between two memory-one agents (theta fixed, drawn once from
key 0): the per-game variance of each coordinate of dV1/dtheta under causal credit
(``program.estimator()``, reward-to-go) and under whole-program REINFORCE
(``sg.score_function()``) on the SAME games (one key, common random numbers), their ratio, and
the time per estimate of ``jax.grad`` of ``sg.expectation`` (jit, warmed up,
``block_until_ready``, median of 3). Writes benchmarks/results/programs_variance.md.

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


def _median_time(fn, *args, reps=3):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(t: int, discount: float):
    p1, _ = sp.iterated_prisoners_dilemma(t, discount=discount)
    theta, key = _theta(), jax.random.key(1)
    rows = {}
    for label, est in (("causal", p1.estimator()), ("whole", sg.score_function())):
        est_fn = jax.jit(lambda th, k, est=est: sg.estimate_grad(
            p1.f, p1.family, th, k, num_samples=N, estimator=est))
        r = est_fn(theta, key)
        var = np.concatenate([np.asarray(r.variance["agent1"]),
                              np.asarray(r.variance["agent2"])])
        grad_fn = jax.jit(jax.grad(lambda th, k, est=est: sg.expectation(
            p1.f, p1.family, th, k, num_samples=N, estimator=est)))
        rows[label] = (var, _median_time(grad_fn, theta, key), float(r.value))
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
        "estimators on the same games. Time: jitted `jax.grad` of `sg.expectation`, median of "
        "3 after warm-up.",
        "",
    ]
    for t in args.T:
        rows = run(t, args.discount)
        vc, tc, value = rows["causal"]
        vw, tw, _ = rows["whole"]
        ratio = vw / vc
        print(f"T={t}: value {value:.3f}; variance ratio whole/causal per coordinate "
              + " ".join(f"{r:.1f}" for r in ratio)
              + f"; time causal {tc * 1e3:.1f} ms, whole {tw * 1e3:.1f} ms ({tc / tw:.2f}x)")
        lines += [f"## T = {t}", "",
                  f"V1 = {value:.3f}; time per gradient: causal {tc * 1e3:.1f} ms, whole "
                  f"program {tw * 1e3:.1f} ms ({tc / tw:.2f}x).", "",
                  "| coordinate | var causal | var whole | whole / causal |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {n} | {a:.4g} | {b:.4g} | {r:.1f} |"
                  for n, a, b, r in zip(names, vc, vw, ratio)]
        lines.append("")
    if not args.no_write:
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as fh:
            fh.write("\n".join(lines))
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
