"""scoregrad side by side with its peers: optax.monte_carlo (optax 0.2.6) and PyTorch REINFORCE.

The peers need their own environment (optax.monte_carlo was removed in optax 0.2.7)::

    bash benchmarks/peers_env.sh /tmp/peers-venv      # optax==0.2.6, torch==2.13.0 (CPU), scoregrad
    /tmp/peers-venv/bin/python benchmarks/peers.py --out benchmarks/results/peers.json

Each (problem, method) cell runs in a fresh process so that its peak RSS is its own. Time per
estimate is the median of repeats after a warm-up (``block_until_ready`` / synchronous torch);
every figure is also reported as a ratio to scoregrad's ``jax.grad`` of ``sg.expectation`` on
the same problem in the same run.

Problems: diagonal normal d in {10, 1000} x N in {1e3, 1e5}, f(x) = sum(x^2) (score function;
pathwise and measure-valued for optax too at d = 10); 100 Bernoullis, N = 1e4.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _procmem import peak_rss_mib  # benchmarks/ is sys.path[0] when run as a script

PROBLEMS = [("normal", 10, 1_000), ("normal", 10, 100_000), ("normal", 1000, 1_000),
            ("normal", 1000, 100_000), ("bernoulli", 100, 10_000)]


def _timed(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def _scoregrad(kind, d, n, estimator):
    import jax
    import jax.numpy as jnp

    import scoregrad as sg

    est = {"score_function": sg.score_function(), "pathwise": sg.pathwise()}[estimator]
    if kind == "normal":
        fam, theta = sg.families.normal(), {"loc": jnp.zeros(d), "scale": jnp.ones(d)}
        f = lambda x: jnp.sum(x * x)  # noqa: E731
    else:
        fam, theta = sg.families.bernoulli(), jnp.zeros(d)
        f = lambda x: jnp.sum((x - 0.45) ** 2)  # noqa: E731
    g = jax.jit(jax.grad(lambda th, k: sg.expectation(f, fam, th, k, num_samples=n, estimator=est)))
    key = jax.random.key(0)
    return lambda: jax.block_until_ready(g(theta, key))


def _optax(d, n, estimator):
    import jax
    import jax.numpy as jnp
    import optax
    from optax import monte_carlo as mc

    fn = {"score_function": mc.score_function_jacobians, "pathwise": mc.pathwise_jacobians,
          "measure_valued": mc.measure_valued_jacobians}[estimator]
    params = [jnp.zeros(d), jnp.zeros(d)]  # loc, log_scale
    f = lambda x: jnp.sum(x * x)  # noqa: E731

    @jax.jit
    def grad(params, key):
        jacs = fn(f, params, optax.multi_normal, key, n)
        return [jnp.mean(j, axis=0) for j in jacs]

    key = jax.random.PRNGKey(0)
    return lambda: jax.block_until_ready(grad(params, key))


def _torch(kind, d, n):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    if kind == "normal":
        loc = torch.zeros(d, requires_grad=True)
        scale = torch.ones(d, requires_grad=True)

        def step():
            loc.grad = scale.grad = None
            with torch.no_grad():
                x = loc + scale * torch.randn(n, d)
                fx = (x * x).sum(1)
            logp = torch.distributions.Normal(loc, scale).log_prob(x).sum(1)
            (fx * logp).mean().backward()
            return loc.grad, scale.grad
    else:
        logits = torch.zeros(d, requires_grad=True)

        def step():
            logits.grad = None
            dist = torch.distributions.Bernoulli(logits=logits)
            with torch.no_grad():
                x = dist.sample((n,))
                fx = ((x - 0.45) ** 2).sum(1)
            (fx * dist.log_prob(x).sum(1)).mean().backward()
            return logits.grad

    return step


def cell(kind, d, n, method, repeats):
    """Runs one cell in this process: seconds per estimate and peak RSS."""
    if method.startswith("scoregrad:"):
        fn = _scoregrad(kind, d, n, method.split(":")[1])
    elif method.startswith("optax:"):
        fn = _optax(d, n, method.split(":")[1])
    else:
        fn = _torch(kind, d, n)
    sec = _timed(fn, repeats)
    return {"seconds": sec, "peak_rss_mib": peak_rss_mib()}


def methods_for(kind, d):
    out = ["scoregrad:score_function", "torch:reinforce"]
    if kind == "normal":
        out.insert(1, "optax:score_function")
        if d == 10:
            out += ["scoregrad:pathwise", "optax:pathwise", "optax:measure_valued"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("--out")
    p.add_argument("--cell", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.cell:
        kind, d, n, method = a.cell
        print(json.dumps(cell(kind, int(d), int(n), method, a.repeats)))
        return 0
    import jax
    import optax
    import torch

    res = {"machine": {"cpus": os.cpu_count(), "jax": jax.__version__, "optax": optax.__version__,
                       "torch": torch.__version__}, "cells": []}
    try:
        res["machine"]["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    for kind, d, n in PROBLEMS:
        base = None
        for method in methods_for(kind, d):
            cmd = [sys.executable, __file__, "--repeats", str(a.repeats), "--cell", kind, str(d),
                   str(n), method]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                r = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
                    "error": out.stderr.strip().splitlines()[-1][:300]}
            except subprocess.TimeoutExpired:
                r = {"error": f"timed out after {a.timeout} s"}
            if method == "scoregrad:score_function" and "seconds" in r:
                base = r
            if base and "seconds" in r:
                r["time_vs_scoregrad"] = r["seconds"] / base["seconds"]
                r["memory_vs_scoregrad"] = r["peak_rss_mib"] / base["peak_rss_mib"]
            row = {"problem": kind, "d": d, "n": n, "method": method, **r}
            res["cells"].append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".tmp", "w") as fh:
            json.dump(res, fh, indent=2)
        os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
