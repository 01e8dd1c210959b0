"""Array-valued f: one pass for the whole Jacobian against one pass per output.

For f(x) = tanh(W x) with m outputs on a d = 32 normal family (N = 20,000 draws), the time per
jitted Jacobian estimate (``jax.jacrev`` of the vector ``sg.expectation``; pathwise and the
leave-one-out score function) against m separate scalar estimates (one per output, each jitted,
the way one would do it without array support) and against one scalar estimate (the cost of a
single output). Then the peak memory of a fresh process for N = 1e5 and 1e6 at m = 32 (memory flat
in N). Writes benchmarks/results/vector_f.md.

    python benchmarks/vector_f.py        # about 2 minutes on 2 cores
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _meta import commit as git_commit  # benchmarks/ is sys.path[0] as a script

import scoregrad as sg

D, N = 32, 20_000
OUT = os.path.join(os.path.dirname(__file__), "results", "vector_f.md")
FAM = sg.families.normal()


def _theta():
    return {"loc": 0.1 * jnp.ones(D), "scale": jnp.ones(D)}


def _f(m):
    w = jax.random.normal(jax.random.key(1), (m, D)) / np.sqrt(D)
    return lambda x: jnp.tanh(w @ x)


def _median(fn, *args, reps=5):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _timings(m, est, n=N):
    f, theta, key = _f(m), _theta(), jax.random.key(0)
    vec = jax.jit(jax.jacrev(lambda th: sg.expectation(f, FAM, th, key, num_samples=n,
                                                       estimator=est)))
    t_vec = _median(vec, theta)
    scalars = [jax.jit(jax.grad(lambda th, j=j: sg.expectation(lambda x: f(x)[j], FAM, th, key,
                                                                num_samples=n, estimator=est)))
               for j in range(m)]
    t_one = _median(scalars[0], theta)

    def all_scalars(th):
        return [s(th) for s in scalars]

    t_sep = _median(all_scalars, theta, reps=3)
    # the vector result equals the separate scalar ones (same key): a check, not a timing
    jv = vec(theta)
    for j in (0, m - 1):
        np.testing.assert_allclose(jv["loc"][j], scalars[j](theta)["loc"], rtol=2e-4, atol=5e-5)  # float32 sums
    return t_vec, t_sep, t_one


def _memory(n):
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import jax, jax.numpy as jnp;"
        "import vector_f as v, scoregrad as sg; from _procmem import peak_rss_mib;"
        f"g = jax.jit(jax.jacrev(lambda th: sg.expectation(v._f(32), v.FAM, th, jax.random.key(0),"
        f" num_samples={n}, estimator=sg.pathwise())))(v._theta());"
        "jax.block_until_ready(g); print(peak_rss_mib())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = []
    for name, est in [("pathwise", sg.pathwise()),
                      ("score_function + leave-one-out",
                       sg.score_function(sg.baselines.leave_one_out()))]:
        for m in (1, 8, 32):
            t_vec, t_sep, t_one = _timings(m, est)
            rows.append((name, m, t_vec, t_sep, t_one))
            print(f"{name} m={m}: vector {t_vec * 1e3:.1f} ms, {m} scalar calls "
                  f"{t_sep * 1e3:.1f} ms, one scalar {t_one * 1e3:.1f} ms", flush=True)
    mem = {n: _memory(n) for n in (100_000, 1_000_000)}
    commit = git_commit()
    lines = [
        "# Array-valued f: the Jacobian in one pass",
        "",
        f"`python benchmarks/vector_f.py` on {datetime.date.today()}, commit `{commit}`, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"1-minute load average {load:.1f} at the start; {time.perf_counter() - t0:.0f} s in all.",
        "",
        f"f(x) = tanh(W x), W (m x {D}), on a {D}-d normal family, N = {N:,} draws; median time per "
        "jitted estimate (warmed up). *vector*: `jax.jacrev` of the vector `sg.expectation` (one "
        "pass); *m scalar calls*: one `jax.grad` of a scalar `sg.expectation` per output; "
        "*one scalar*: a single output's gradient. The vector Jacobian equals the scalar ones "
        "(same key), checked in the script.",
        "",
        "| estimator | m | vector (ms) | m scalar calls (ms) | one scalar (ms) | vector / one scalar | "
        "m scalar calls / vector |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m, tv, ts, to in rows:
        lines.append(f"| {name} | {m} | {tv * 1e3:.1f} | {ts * 1e3:.1f} | {to * 1e3:.1f} | "
                     f"{tv / to:.2f} | {ts / tv:.2f} |")
    lines += ["", "Peak memory of a fresh process (`VmHWM`), pathwise, m = 32: "
              + ", ".join(f"N = {n:,}: {v:.0f} MiB" for n, v in mem.items())
              + " (flat in N: the engine's chunks).", ""]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
