"""Speed and memory of scoregrad against the sampling floor, a hand-fused kernel and naive JAX.

Every figure is a ratio to a baseline measured in the same run (median of repeats after a
warm-up, ``block_until_ready``). Usage::

    python benchmarks/speed.py                 # d = 1000, N = 1e5 (the issue's target problem)
    python benchmarks/speed.py --d 10 --n 1000 --repeats 20
    python benchmarks/speed.py --memory        # N = 1e8, d = 100: peak RSS of each method
    python benchmarks/speed.py --out benchmarks/results/speed.json

Rows:
  floor        drawing the same samples alone, the fastest way: per-sample keys
               (fold_in(key, i)), chunks under lax.scan, summed. Measured at chunk sizes 250,
               500 (``--chunk``) and 1000; the floor is the fastest of the three.
  hand_fused   a hand-written analytic-score kernel for the normal family (same draws).
  naive        vmap(grad(log_prob)) over all N samples at once (what a plain JAX user writes).
  grad         jax.grad of sg.expectation (score function).
  estimate     sg.estimate_grad (score function) with standard errors.
  pathwise     jax.grad of sg.expectation with sg.pathwise().
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from _procmem import peak_rss_mib  # benchmarks/ is sys.path[0] when run as a script

import scoregrad as sg


def floor_fn(n, d, chunk):
    def run(theta, key):
        def body(acc, c):
            idx = c * chunk + jnp.arange(chunk, dtype=jnp.uint32)
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, idx)
            x = jax.vmap(lambda k: jax.random.normal(k, (d,)))(keys)
            return acc + jnp.sum(theta["loc"] + theta["scale"] * x, axis=0), None

        return jax.lax.scan(body, jnp.zeros(d), jnp.arange(n // chunk))[0]

    return run


def hand_fn(n, d, chunk, f):
    """Score-function gradient with the normal's score written out by hand."""

    def run(theta, key):
        mu, sig = theta["loc"], theta["scale"]
        inv = 1.0 / sig

        def body(acc, c):
            idx = c * chunk + jnp.arange(chunk, dtype=jnp.uint32)
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, idx)
            eps = jax.vmap(lambda k: jax.random.normal(k, (d,)))(keys)
            fx = jax.vmap(f)(mu + sig * eps)[:, None]
            return (acc[0] + jnp.sum(fx * eps, 0), acc[1] + jnp.sum(fx * (eps * eps - 1), 0)), None

        (gl, gs), _ = jax.lax.scan(body, (jnp.zeros(d), jnp.zeros(d)), jnp.arange(n // chunk))
        return {"loc": gl * inv / n, "scale": gs * inv / n}

    return run


def naive_fn(n, d, f):
    fam = sg.families.normal()

    def run(theta, key):
        keys = jax.random.split(key, n)
        x = jax.vmap(fam.sample, in_axes=(None, 0))(theta, keys)
        scores = jax.vmap(jax.grad(fam.log_prob), in_axes=(None, 0))(theta, x)
        fx = jax.vmap(f)(x)
        return jax.tree_util.tree_map(lambda s: jnp.mean(fx[:, None] * s, axis=0), scores)

    return run


def methods(n, d, chunk):
    fam = sg.families.normal()
    f = lambda x: jnp.sum(x * x)  # noqa: E731
    sf, pw = sg.score_function(), sg.pathwise()
    return {
        "floor": floor_fn(n, d, chunk),
        "floor@half": floor_fn(n, d, max(1, chunk // 2)),
        "floor@double": floor_fn(n, d, 2 * chunk),
        "hand_fused": hand_fn(n, d, chunk, f),
        "grad": jax.grad(lambda th, k: sg.expectation(f, fam, th, k, num_samples=n, estimator=sf)),
        "estimate": lambda th, k: sg.estimate_grad(f, fam, th, k, num_samples=n, estimator=sf),
        "pathwise": jax.grad(lambda th, k: sg.expectation(f, fam, th, k, num_samples=n, estimator=pw)),
        "naive": naive_fn(n, d, f),
    }


def time_all(fns, args, repeats):
    """Seconds of every call, ``{name: [seconds, ...]}``, interleaving methods so that machine
    noise hits all alike."""
    compiled = {name: jax.jit(fn) for name, fn in fns.items()}
    for fn in compiled.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return times


def machine():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "jax": jax.__version__, "scoregrad": sg.__version__,
        "device": str(jax.devices()[0]), "commit": commit,
    }


def memory_one(name, n, d, chunk):
    """Peak RSS (MiB) of one method in this process (run each in a fresh process)."""
    theta = {"loc": jnp.zeros(d), "scale": jnp.ones(d)}
    fn = jax.jit(methods(n, d, chunk)[name])
    t0 = time.perf_counter()
    jax.block_until_ready(fn(theta, jax.random.key(0)))
    return {"peak_rss_mib": peak_rss_mib(),
            "seconds": time.perf_counter() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=1000)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--chunk", type=int, default=500, help="the floor's chunk size")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--skip", nargs="*", default=[], help="methods to leave out")
    p.add_argument("--memory", action="store_true", help="N = 1e8, d = 100 peak-RSS mode")
    p.add_argument("--memory-one", help=argparse.SUPPRESS)
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.memory_one:
        print(json.dumps(memory_one(a.memory_one, a.n, a.d, a.chunk)))
        return 0
    if a.memory:
        n, d = (a.n if a.n != 100_000 else 100_000_000), (a.d if a.d != 1000 else 100)
        res = {"machine": machine(), "n": n, "d": d, "memory": {}}
        for name in ("floor", "grad", "estimate"):
            out = subprocess.run([sys.executable, __file__, "--memory-one", name, "--n", str(n),
                                  "--d", str(d)], capture_output=True, text=True, check=True)
            res["memory"][name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(name, res["memory"][name], flush=True)
    else:
        theta = {"loc": jnp.zeros(a.d), "scale": jnp.ones(a.d)}
        fns = {k: v for k, v in methods(a.n, a.d, a.chunk).items() if k not in a.skip}
        res = {"machine": machine(), "n": a.n, "d": a.d, "repeats": a.repeats}
        raw = time_all(fns, (theta, jax.random.key(0)), a.repeats)
        for stat, pick in (("median", lambda ts: sorted(ts)[len(ts) // 2]), ("min", min)):
            t = {k: pick(v) for k, v in raw.items()}
            floor = min(v for k, v in t.items() if k.startswith("floor"))
            res[stat] = {"seconds": t, "floor_seconds": floor,
                         "ratio_to_floor": {k: v / floor for k, v in t.items()},
                         "ratio_to_hand_fused": {k: v / t["hand_fused"] for k, v in t.items()
                                                 if "hand_fused" in t}}
            print(f"-- {stat} of {a.repeats} interleaved repeats; floor = fastest floor variant")
            for k in t:
                print(f"{k:>12}: {t[k]*1e3:9.1f} ms   x floor {t[k] / floor:6.2f}")
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        tmp = a.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(res, fh, indent=2)
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
