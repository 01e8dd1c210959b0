"""Up-and-out barrier call with a rebate: per-date credit vs the whole-path likelihood ratio.

The drift sensitivity dV/dmu of a discretely monitored up-and-out call (rebate paid at the
knock-out date) under a binomial or a log-normal walk, ``scoregrad.examples.finance_programs``.
For each number of monitoring dates T: R replicates of n paths; every estimator estimates from
the same paths (common random numbers); per-path variance = n * variance over replicates; the
ratio whole path / estimator with its delta-method SE (paired replicates). Where T <= 16 (binomial)
the exact answer (enumeration of the 2^T paths) is shown with each estimator's z-score.

Writes benchmarks/results/barrier_causal.md.

    python benchmarks/barrier_causal.py            # about 3 minutes on 2 CPU cores
    python benchmarks/barrier_causal.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import jax
import numpy as np
from _meta import commit, machine  # benchmarks/ is sys.path[0] when run as a script

import scoregrad as sg
import scoregrad.programs as sp
from scoregrad.examples import finance_programs as fp

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "barrier_causal.md")
MU = 0.05
LABELS = {
    "whole": "whole path (single site)",
    "whole_loo": "whole path + leave-one-out",
    "per_date": "per-date credit",
    "per_date_loo": "per-date + per-date leave-one-out",
    "per_date_value": "per-date + exact continuation value",
    "knockout": "per-date, telescoped knock-out credit",
}


def ratio_se(a, b):
    """var(a) / var(b) over paired replicates and its delta-method SE."""
    da, db = (a - a.mean()) ** 2, (b - b.mean()) ** 2
    r = da.mean() / db.mean()
    return r, (da - r * db).std(ddof=1) / np.sqrt(len(da)) / db.mean()


def run(option, n, reps, key):
    prog = fp.barrier_program(option)
    ests = {"whole": sg.score_function(),
            "whole_loo": sg.score_function(baseline=sg.baselines.leave_one_out()),
            "per_date": prog.estimator(),
            "per_date_loo": prog.estimator(sp.group_leave_one_out(n))}
    if option.walk == "binomial":
        ests["per_date_value"] = prog.estimator(fp.exact_value_baseline(option, MU))
    g = fp.gradient_replicates(option, MU, key, ests, num_paths=n, num_replicates=reps)
    g.update(fp.gradient_replicates(option, MU, key, {"knockout": prog.estimator()},
                                    num_paths=n, num_replicates=reps, credit="knockout"))
    return g


def main():
    jax.config.update("jax_enable_x64", True)  # exact answers and z-scores in float64
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t_all = time.perf_counter()
    n, reps = 64, (300 if args.quick else 2000)
    dates = [4, 8, 16, 32] if args.quick else [4, 8, 16, 32, 64, 128]
    base = fp.BarrierCall()
    lines = [
        "# Barrier option: per-date credit vs the whole-path likelihood ratio",
        "",
        f"`python benchmarks/barrier_causal.py` on {datetime.date.today().isoformat()}, "
        "commit {commit}, {machine}; total {total}.",
        "",
        f"Up-and-out call, spot {base.spot}, strike {base.strike}, barrier {base.barrier} "
        f"(monitored at the T dates), rebate {base.rebate} paid at the knock-out date, vol "
        f"{base.vol}, rate {base.rate}, maturity {base.maturity}; the Greek is dV/dmu, the "
        f"drift of the increments, at mu = {MU}. {reps} replicates of {n} paths; every "
        "estimator uses the same paths in a replicate. Per-path variance = "
        f"{n} x the variance of the replicate estimates; ratio = variance of the whole-path "
        "estimator / the estimator's (> 1: less variance), ± its delta-method SE. Per-date "
        "credit scores each date's cash flow (the rebate when it knocks out, the call at "
        "maturity) only with the increments up to that date; the telescoped variant credits "
        "the change of the knocked-out intrinsic value date by date instead.",
        "",
    ]
    for walk in ("binomial", "lognormal"):
        lines += [f"## {walk} walk", ""]
        names = [k for k in LABELS if walk == "binomial" or k != "per_date_value"]
        lines += ["| T | exact dV/dmu | " + " | ".join(LABELS[k] for k in names[1:]) + " |",
                  "|---:|---:|" + "---:|" * (len(names) - 1)]
        zrows = []
        for t in dates:
            option = base._replace(num_dates=t, walk=walk)
            g = run(option, n, reps, jax.random.key(t))
            truth = (float(fp.exact_drift_sensitivity(option, MU))
                     if walk == "binomial" and t <= 16 else None)
            cells = []
            for k in names[1:]:
                r, se = ratio_se(g["whole"], g[k])
                cells.append(f"{r:.2f} ± {se:.2f}")
            lines.append(f"| {t} | {'' if truth is None else f'{truth:.4f}'} | "
                         + " | ".join(cells) + " |")
            means = {k: (g[k].mean(), g[k].std(ddof=1) / np.sqrt(reps)) for k in names}
            zrows.append((t, truth, means, {k: n * g[k].var(ddof=1) for k in names}))
            print(walk, t, lines[-1], flush=True)
        lines += ["", "Means ± SE over the replicates (z-score against the exact answer where "
                  "there is one) and per-path variances:", "",
                  "| T | estimator | mean ± SE | z | per-path variance |",
                  "|---:|---|---:|---:|---:|"]
        for t, truth, means, pvar in zrows:
            for k in names:
                m, se = means[k]
                z = "" if truth is None else f"{(m - truth) / se:+.2f}"
                lines.append(f"| {t} | {LABELS[k]} | {m:.3f} ± {se:.3f} | {z} | {pvar[k]:.4g} |")
        lines.append("")
    total = time.perf_counter() - t_all
    text = "\n".join(lines).replace("{commit}", commit()).replace(
        "{machine}", machine()).replace("{total}", f"{total / 60:.1f} minutes")
    print(text)
    if not args.no_write:
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as fh:
            fh.write(text)
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
