"""Variance of the categorical estimators at equal cost (evaluations of f), K in {3, 10, 100}.

``python benchmarks/categorical_variance.py`` prints a markdown table and writes
``benchmarks/results/categorical_variance.md`` (date, git commit, machine). Under 3 minutes on 2
idle CPUs.

Toy: one categorical with K categories, logits ``1.5 * N(0, 1)`` (key 0), f(x) = v[x] with
``v ~ N(0, 1)`` (key 1), float64. Each estimator's single-unit gradient estimate is replicated
R times (independent keys); a unit costs ``cost`` evaluations of f (RLOO(k), unordered_set(k): k;
IndeCateR: K; ARSM: K(K-1)/2 + 1; categorical REBAR: 3 — at b and at its control variate's two
relaxed points, which the library counts as one sample). With i.i.d. units the variance at a
budget of B evaluations is ``var_unit * cost / B``; the table shows the trace of the covariance
(sum over the K logits) at B = 1000, divided by ||grad||^2 (lower is better). ``bias p`` is the
p-value of the chi-square test of mean = truth over the R replicates (categories of probability
>= 0.05; rarer ones are drawn too seldom for the chi-square approximation): uniform on [0, 1]
for an unbiased estimator, so among the ~20 cells a value below 0.05 is expected. With one
categorical IndeCateR sums the coordinate out exactly (zero variance at cost K): it is the
reference, not a competitor, here.
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
import scipy.stats

jax.config.update("jax_enable_x64", True)

import scoregrad as sg  # noqa: E402
from scoregrad._src.estimators.categorical import arsm, unordered_set  # noqa: E402
from scoregrad._src.estimators.categorical_rebar import categorical_rebar  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "categorical_variance.md")
BUDGET = 1000
KS = (3, 10, 100)
FAM = sg.families.categorical()


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=HERE, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", __file__, "../scoregrad"],
                               capture_output=True, text=True, cwd=HERE).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def estimators(k_cat: int):
    """(name, estimator, cost in evaluations of f, f takes one-hot input, replicates)."""
    m_arsm = k_cat * (k_cat - 1) // 2 + 1
    rows = [
        ("rloo(2)", sg.rloo(2), 2, False, 2000),
        ("unordered_set(2)", unordered_set(2), 2, False, 2000),
        ("rloo(4)", sg.rloo(4), 4, False, 2000),
        ("unordered_set(4)", unordered_set(4), 4, False, 2000),
        ("indecater", sg.indecater(), k_cat, False, 2000),
        ("arsm", arsm(), m_arsm, False, 2000 if k_cat <= 10 else 400),
        ("categorical_rebar(0.5, 1)", categorical_rebar(0.5, 1.0), 3, True, 2000),
    ]
    return [r for r in rows if not (r[0] == "unordered_set(4)" and k_cat < 4)]


def _bias_p_value(g, truth, probs, min_prob=0.05):
    """p-value of the chi-square test of mean = truth (Hotelling, covariance estimated from the
    R replicates) over the coordinates of probability >= min_prob: uniform on [0, 1] for an
    unbiased estimator. Rare categories are left out: most replicates never draw them, so their
    sample variance understates the truth."""
    keep = probs >= min_prob
    d = g.mean(0)[keep] - truth[keep]
    cov = np.cov(g[:, keep].T, ddof=1).reshape(int(keep.sum()), -1) / g.shape[0]
    rank = np.linalg.matrix_rank(cov, hermitian=True)
    stat = float(d @ np.linalg.pinv(cov, hermitian=True) @ d)
    return float(scipy.stats.chi2.sf(stat, rank))


def run_k(k_cat: int):
    theta = 1.5 * jax.random.normal(jax.random.key(0), (k_cat,))
    vals = jax.random.normal(jax.random.key(1), (k_cat,))
    f_idx = lambda x: vals[x]  # noqa: E731
    f_hot = lambda y: jnp.sum(y * vals)  # noqa: E731
    truth = np.asarray(sg.estimate_grad(f_idx, FAM, theta, jax.random.key(0), num_samples=k_cat,
                                        estimator=sg.enumerate()).grad)
    norm2 = float(np.sum(truth**2))
    out = []
    for i, (name, est, cost, onehot, reps) in enumerate(estimators(k_cat)):
        f = f_hot if onehot else f_idx
        n = 1 if onehot else cost  # REBAR's unit is one "sample" (3 evaluations of f)
        one = lambda key: sg.estimate_grad(  # noqa: E731
            f, FAM, theta, key, num_samples=n, estimator=est).grad
        # batches of about 20 000 evaluations of f: memory flat in R
        run = jax.jit(lambda keys: jax.lax.map(one, keys, batch_size=max(1, 20_000 // cost)))
        t0 = time.perf_counter()
        # independent replicates per estimator (fold_in its index): with common keys, one
        # unlucky set of draws lowered every estimator's p-value at once
        g = np.asarray(run(jax.random.split(jax.random.fold_in(jax.random.key(2), i), reps)))
        secs = time.perf_counter() - t0
        var = g.var(0, ddof=1)
        z = _bias_p_value(g, truth, np.asarray(jax.nn.softmax(theta)))
        rel = float(np.sum(var) * cost / BUDGET / norm2)
        out.append((name, cost, rel, z, secs))
        print(f"K={k_cat} {name}: cost {cost}, var/|g|^2 {rel:.3g}, bias p-value {z:.3f}, "
              f"{secs:.1f} s",
              flush=True)
    return out, norm2


def main() -> int:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = {k: run_k(k) for k in KS}
    names = [r[0] for r in results[KS[0]][0]]
    for k in KS[1:]:
        names += [r[0] for r in results[k][0] if r[0] not in names]
    lines = ["| estimator | " + " | ".join(f"K = {k}: cost | var/‖g‖² | bias p" for k in KS) + " |",
             "|---|" + "---|---|---|" * len(KS)]
    for name in names:
        cells = []
        for k in KS:
            row = {r[0]: r for r in results[k][0]}.get(name)
            if row is None:
                cells.append("— | — | —")
            else:
                over = " (unit > B)" if row[1] > BUDGET else ""
                z = "exact" if row[2] < 1e-20 else f"{row[3]:.3f}"  # zero variance: no test
                cells.append(f"{row[1]}{over} | {row[2]:.3g} | {z}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    secs = time.perf_counter() - t0
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    header = (
        f"Categorical estimators at equal cost, `python benchmarks/categorical_variance.py`, run "
        f"{when}: scoregrad {sg.__version__}, jax {jax.__version__}, commit `{_commit()}`; "
        f"{platform.platform()}, {os.cpu_count()} CPUs, device {jax.devices()[0]}; {secs:.0f} s, "
        f"1-minute load average {load:.1f} at the start.\n\n"
        "Trace of the covariance of the gradient in the logits at a budget of B = "
        f"{BUDGET} evaluations of f (var_unit x cost / B), relative to ‖∇E f‖²; one categorical, "
        "logits 1.5 N(0, 1), f(x) = v[x], v ~ N(0, 1); cost = evaluations of f per unit "
        "(REBAR: 3, counted by the library as 1 sample); bias p = p-value of the "
        "chi-square test of mean = truth over the R replicates (categories of probability >= "
        "0.05), uniform on [0, 1] when unbiased. With one categorical, IndeCateR sums it out "
        "exactly (zero variance at cost K).\n"
    )
    text = header + "\n" + table + "\n"
    print(text)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        fh.write(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
