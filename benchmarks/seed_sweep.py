"""Reruns every statistical test over many seeds and compares its failure rate with theory.

Which tests: those marked ``@pytest.mark.statistical`` (their outcome depends on the random key;
every such check goes through ``tests/stats_util.py``). Seed ``s`` runs them in one pytest
process with ``SCOREGRAD_SWEEP_SEED=s`` (``tests/conftest.py`` folds ``s`` into every literal
key) and ``SCOREGRAD_SWEEP_LOG`` set, so each check writes its statistic and limit to a log.

What is compared with what:

* **Observed failures** per test, over the seeds run.
* **Unbiasedness checks** (``null``): under an unbiased estimator and an honest standard error,
  ``z = (mean - truth) / SE`` is N(0, 1), and a 5-sigma check on one coordinate fails with
  probability ``2 Phi(-5) = 5.7e-7``. The sweep pools each check's z over seeds and coordinates
  and reports its spread, its tails (|z| > 2, > 3 against 4.55% and 0.27%) and a
  Kolmogorov-Smirnov p-value against N(0, 1). Too-wide z means an understated standard error
  (the check fails more often than it claims) or a bias; the predicted failure rate then uses
  the measured spread of z instead of 1.
* **Power and effect-size checks** (``upper``/``lower``: SE below a bound, a variance ratio
  below 1, a wrong answer rejected): their margin to the limit, relative to the limit, varies
  over seeds; a normal fit to it gives the failure probability per run, ``Phi(-mean / sd)``,
  and "margin in sd" (``mean / sd``). A margin skewed toward the limit makes the normal fit an
  underestimate: when some run over >= 50 seeds came within one SD of the limit, the check is
  marked ``heavy_tail`` and its test fragile.
* Per test, the predicted failure probability per run (the sum over its checks) and the failures
  it predicts for this many seeds. A test that failed at all, or whose predicted rate exceeds
  what its 5-sigma checks cost by design (5.7e-7 per coordinate) by more than ``--max-rate``
  (default 1e-4 per run), is listed under ``fragile``: its tolerance is wrong.

    python benchmarks/seed_sweep.py --seeds 200 --jobs 2              # default statistical tests
    python benchmarks/seed_sweep.py --seeds 20 --slow                 # the slow ones too
    python benchmarks/seed_sweep.py --seeds 20 --marker "statistical and slow"   # only those
    python benchmarks/seed_sweep.py --seeds 20 -k gaussian            # a subset
    python benchmarks/seed_sweep.py --summarize-only --logs DIR       # re-read finished seeds

Seeds already in ``--logs`` are not rerun, so a sweep cut short resumes where it stopped. Every
process shares a persistent XLA compilation cache (``--cache``), so after the first seed most
programs load instead of compiling.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
from scipy import stats
from scipy.special import erfc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
Z = 5.0  # the tests' z (tests/stats_util.py)
PER_CHECK = math.erfc(Z / math.sqrt(2))  # 2 Phi(-5): one coordinate of a 5-sigma check
MIN_RUNS = 10  # runs of a power or effect-size check before its margin is extrapolated
MIN_NULL = 50  # z-scores of an unbiasedness check before their spread replaces the theory's 1


def run_seed(seed, a, commit="unknown"):
    """One pytest process over the selected tests with seed ``seed``; writes the check log and
    a status file into ``a.logs``."""
    log = os.path.join(a.logs, f"seed_{seed}.jsonl")
    status = os.path.join(a.logs, f"seed_{seed}.status.json")
    if os.path.exists(status):
        return seed, _read_json(status), True
    if os.path.exists(log):
        os.remove(log)  # a seed cut short: run it again from the start
    marker = _marker(a)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-p",
           "no:randomly", "-m", marker, *a.files] + (["-k", a.k] if a.k else [])
    env = dict(os.environ, SCOREGRAD_SWEEP_SEED=str(seed), SCOREGRAD_SWEEP_LOG=log,
               JAX_COMPILATION_CACHE_DIR=a.cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    failed = sorted({m.group(1) for m in re.finditer(r"^FAILED (\S+)", out.stdout, re.M)})
    m = re.search(r"(\d+) passed", out.stdout)
    res = {"seed": seed, "passed": int(m.group(1)) if m else 0, "failed": failed,
           "returncode": out.returncode, "seconds": round(time.time() - t0, 1),
           "commit": commit}
    if out.returncode not in (0, 1):  # 2-5: pytest itself failed (collection, usage): keep it
        res["error"] = (out.stdout + out.stderr)[-2000:]
    with open(status + ".tmp", "w") as fh:
        json.dump(res, fh)
    os.replace(status + ".tmp", status)
    return seed, res, False


def _commit():
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT)
    return out.stdout.strip() or "unknown"


def _environment():
    import platform

    import jax

    return {"jax": jax.__version__, "python": platform.python_version(),
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs"}


def _marker(a):
    return a.marker or ("statistical" if a.slow else "statistical and not slow")


def _read_json(path):
    with open(path) as fh:
        return json.load(fh)


def _load(logs):
    statuses, checks = {}, collections.defaultdict(list)
    for name in sorted(os.listdir(logs)):
        m = re.match(r"seed_(\d+)\.status\.json$", name)
        if not m:
            continue
        seed = int(m.group(1))
        statuses[seed] = _read_json(os.path.join(logs, name))
        log = os.path.join(logs, f"seed_{seed}.jsonl")
        if not os.path.exists(log):
            continue
        with open(log) as fh:
            for line in fh:
                row = json.loads(line)
                checks[(row["test"], row["check"], row["what"], row["kind"])].append(
                    (np.asarray(row["stat"], float), np.asarray(row["limit"], float)))
    return statuses, checks


def _null_summary(rows):
    """z-scores of one unbiasedness check over seeds (rows) and coordinates (columns).

    Seeds are independent, coordinates of one estimate are not: the KS test runs per coordinate
    over seeds, and the check's p-value is the smallest, times the number of coordinates
    (Bonferroni). Spread and tails pool all z (descriptive)."""
    z, lim = _modal(rows)
    used = np.all(np.isfinite(lim), 0) & np.all(np.isfinite(z), 0)  # SE 0 and error 0: no z
    # The check is |z| <= Z + atol / SE. Fold the atol into the scale, z * Z / limit =
    # error / (SE + atol / Z): the same pass/fail at limit Z, and a z at rounding level (SE
    # tiny, atol dominant) shrinks instead of exploding.
    z, lim = z[:, used] * Z / lim[:, used], np.full(z[:, used].shape, Z)
    if z.size == 0:
        return {"kind": "null", "n": 0, "predicted_failure_per_run": 0.0}
    # Theory says sd(z) = 1; where the sweep measured a wider z (an understated SE), the
    # prediction uses the measured spread instead, when significantly above 1: the sample sd of
    # n independent normal z has SE 1 / sqrt(2 n), and n is the effective number of z (runs
    # times coordinates over the design effect of the correlated coordinates' z^2).
    sd = float(z.std())
    n_eff = _effective_n(z ** 2)
    spread = sd if n_eff >= MIN_NULL and sd > 1 + 3 / math.sqrt(2 * n_eff) else 1.0
    per_run = float(np.mean(np.sum(erfc(lim / spread / math.sqrt(2)), 1)))
    nominal = float(np.mean(np.sum(erfc(lim / math.sqrt(2)), 1)))
    out = {"kind": "null", "n": int(z.size), "n_effective": round(n_eff, 1),
           "coordinates": int(z.shape[1]),
           "z_mean": float(z.mean()), "z_sd": sd,
           "frac_abs_z_gt_2": float(np.mean(np.abs(z) > 2)),
           "frac_abs_z_gt_3": float(np.mean(np.abs(z) > 3)), "max_abs_z": float(np.abs(z).max()),
           "predicted_failure_per_run": per_run, "nominal_failure_per_run": nominal}
    if z.shape[0] >= 8:
        p = min(stats.kstest(z[:, c], "norm").pvalue for c in range(z.shape[1]))
        out["ks_pvalue"] = float(min(1.0, p * z.shape[1]))
    return out


def _effective_n(v):
    """Independent-equivalent count of the entries of v (runs x coordinates): runs are
    independent, coordinates within a run may be correlated (design effect of the run means)."""
    runs, cols = v.shape
    if runs < 2 or cols < 2:
        return float(v.size)
    within = float(np.var(v, ddof=1))
    if within == 0:
        return float(v.size)
    deff = float(np.var(v.mean(1), ddof=1)) / (within / cols)
    return float(v.size / min(max(deff, 1.0), cols))


def _pooled(null_checks, null_rows):
    """Descriptive figures over all z (atol folded in, as in _null_summary), and how many
    checks (their summaries in null_rows) the KS test rejects at 1%."""
    z = np.concatenate([np.ravel(s * Z / lim) for rows in null_checks for s, lim in rows
                        if np.all(np.isfinite(lim))])
    pvals = [c["ks_pvalue"] for c in null_rows if "ks_pvalue" in c]
    return {"n": int(z.size), "z_mean": float(z.mean()), "z_sd": float(z.std()),
            "frac_abs_z_gt_2": float(np.mean(np.abs(z) > 2)),
            "frac_abs_z_gt_3": float(np.mean(np.abs(z) > 3)), "max_abs_z": float(np.abs(z).max()),
            "checks_tested": len(pvals), "checks_ks_p_below_0.01": int(sum(p < 0.01 for p in pvals))}


def _modal(rows):
    """The runs whose statistic has the most common shape (a check may select coordinates by
    a seed-dependent mask), as (runs x coordinates) arrays of statistic and limit."""
    shape = collections.Counter(np.shape(s) for s, _ in rows).most_common(1)[0][0]
    keep = [(s, lim) for s, lim in rows if np.shape(s) == shape]
    return np.stack([s for s, _ in keep]), np.stack([lim for _, lim in keep])


def _margin_summary(kind, rows):
    stat, lim = _modal(rows)
    # > 0 passes; relative to the limit, so a limit that changes with the seed (a problem drawn
    # from the key, say) is compared on one scale
    margin = (lim - stat) if kind == "upper" else (stat - lim)
    margin = np.where(lim != 0, margin / np.where(lim != 0, np.abs(lim), 1.0), margin)
    mu = margin.mean(0)
    sd = margin.std(0, ddof=1) if len(margin) > 1 else np.zeros(margin.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(sd > 0, mu / sd, np.where(mu > 0, np.inf, -np.inf))
    p = [0.5 * math.erfc(r / math.sqrt(2)) if np.isfinite(r) else float(r < 0) for r in ratio]
    if len(margin) < MIN_RUNS:  # too few runs for a normal fit of the margin: no prediction
        p = [float("nan")]
    # Is the normal fit believable? If the fit allows no failure but some run came within one
    # SD of the limit, the tail toward the limit is heavier than normal (a right-skewed
    # statistic such as an optimizer's final gap): the fit is not trusted and the test is
    # listed as fragile. (For a normal margin this needs mean/sd < ~3.7, already flagged.)
    with np.errstate(divide="ignore", invalid="ignore"):
        closest = float(np.min(np.where(sd > 0, margin.min(0) / sd, np.inf)))
    heavy = len(margin) >= MIN_NULL and closest < 1.0
    if heavy:
        p = [1.0]  # unknown, and possibly large
    return {"kind": kind, "n": int(margin.size), "min_margin_in_sd": float(np.min(ratio)),
            "closest_run_in_sd": closest, "heavy_tail": heavy,
            "worst_relative_margin": float(margin.min()),
            "predicted_failure_per_run": float(np.sum(p))}


def summarize(a):
    statuses, checks = _load(a.logs)
    seeds = sorted(statuses)
    failures = collections.Counter(t for s in seeds for t in statuses[s]["failed"])
    errors = {s: statuses[s]["error"] for s in seeds if "error" in statuses[s]}
    per_check = []
    per_test = collections.defaultdict(lambda: {"predicted": 0.0, "nominal": 0.0, "checks": 0})
    for (test, idx, what, kind), rows in sorted(checks.items()):
        if kind == "null":
            row = _null_summary(rows)
        else:
            row = _margin_summary(kind, rows)
        row.update(test=test, check=idx, what=what, runs=len(rows))
        per_check.append(row)
        per_test[test]["predicted"] += row["predicted_failure_per_run"]
        per_test[test]["nominal"] += row.get("nominal_failure_per_run", 0.0)
        per_test[test]["checks"] += 1
    pooled = _pooled([rs for (t, i, w, k), rs in checks.items() if k == "null"],
                     [c for c in per_check if c["kind"] == "null"])
    tests = {}
    for test in sorted(set(per_test) | set(failures)):
        pred = per_test[test]["predicted"] if test in per_test else float("nan")
        tests[test] = {"failures": failures.get(test, 0), "predicted_failure_per_run": pred,
                       "nominal_failure_per_run": per_test[test]["nominal"],
                       "expected_failures": pred * len(seeds), "checks": per_test[test]["checks"]}
    # Fragile: failed, or predicted to fail more often than its 5-sigma checks cost by design
    # (m coordinates at 5.7e-7 each) by more than max_rate.
    fragile = sorted(t for t, v in tests.items() if v["failures"] > 0 or (
        v["predicted_failure_per_run"] - v["nominal_failure_per_run"] > a.max_rate))
    z_tail = sorted((c for c in per_check if c["kind"] == "null" and c.get("n", 0) >= 50
                     and c.get("ks_pvalue", 1.0) < 1e-3), key=lambda c: c["ks_pvalue"])
    return {
        "seeds": [seeds[0], seeds[-1]] if seeds else [], "seeds_done": len(seeds),
        "marker": _marker(a), "k": a.k,
        "test_runs": int(sum(statuses[s]["passed"] + len(statuses[s]["failed"]) for s in seeds)),
        "tests": len(tests), "failed_runs": int(sum(failures.values())),
        "expected_failure_rate_per_5sigma_check": PER_CHECK, "max_rate": a.max_rate,
        "pooled_null_z": pooled, "fragile": fragile,
        "null_checks_off_normal": [f"{c['test']} #{c['check']} {c['what']}: KS p = "
                                   f"{c['ks_pvalue']:.1e}, sd(z) = {c['z_sd']:.2f}" for c in z_tail],
        "per_test": tests, "per_check": per_check, "pytest_errors": errors,
        "seconds": float(sum(statuses[s]["seconds"] for s in seeds)),
        "commits": sorted({statuses[s].get("commit", "unrecorded") for s in seeds}),
        "environment": _environment(),
    }


def markdown(rep):
    """A short table of the tests, worst first, for benchmarks/README.md."""
    pz = rep["pooled_null_z"]
    lines = [f"{rep['seeds_done']} seeds ({rep['seeds'][0]}-{rep['seeds'][-1]}), "
             f"`-m \"{rep['marker']}\"`: {rep['tests']} tests, {rep['test_runs']} test runs, "
             f"**{rep['failed_runs']} failed**. Pooled z of the unbiasedness checks: "
             f"n = {pz.get('n', 0)}, mean {pz.get('z_mean', 0):+.3f}, sd {pz.get('z_sd', 0):.3f}, "
             f"|z| > 2: {100 * pz.get('frac_abs_z_gt_2', 0):.2f}% (theory 4.55%), "
             f"|z| > 3: {100 * pz.get('frac_abs_z_gt_3', 0):.3f}% (theory 0.270%), "
             f"max |z| {pz.get('max_abs_z', 0):.2f}. Kolmogorov-Smirnov against N(0, 1), per "
             f"check over seeds: {pz.get('checks_ks_p_below_0.01', 0)} of "
             f"{pz.get('checks_tested', 0)} checks at p < 0.01 (chance alone: about 1%).", "",
             "| test | runs failed | predicted failure / run | tightest check (margin in sd) |",
             "|---|---|---|---|"]
    worst = {}
    for c in rep["per_check"]:
        if c["kind"] != "null":
            if c["test"] not in worst or c["min_margin_in_sd"] < worst[c["test"]][0]:
                heavy = ", heavy tail: a run came within 1 SD" if c.get("heavy_tail") else ""
                worst[c["test"]] = (c["min_margin_in_sd"], c["what"] + heavy)
    def rate(item):
        r = item[1]["predicted_failure_per_run"]
        return -(1.0 if math.isnan(r) else r)

    order = sorted(rep["per_test"].items(), key=rate)
    for test, v in order:
        w = worst.get(test)
        tight = f"{w[0]:.1f} ({w[1]})" if w else "only unbiasedness checks"
        lines.append(f"| `{test}` | {v['failures']} | {v['predicted_failure_per_run']:.1e} | "
                     f"{tight} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--start", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="seeds run at once (one process each)")
    p.add_argument("--slow", action="store_true", help="include tests marked slow")
    p.add_argument("--marker", default=None,
                   help='pytest -m expression (e.g. "statistical and slow"); overrides --slow')
    p.add_argument("-k", default=None, help="pytest -k expression")
    p.add_argument("--files", nargs="*", default=["tests"])
    p.add_argument("--out", default=None, help="JSON report (and a .md table beside it)")
    p.add_argument("--logs", default=None, help="per-seed logs (default: OUT without .json "
                   "plus .logs/, or ./seed-sweep-logs)")
    p.add_argument("--cache", default=None, help="XLA compilation cache (default: LOGS/xla)")
    p.add_argument("--max-rate", type=float, default=1e-4,
                   help="a test predicted to fail more often than this per run is fragile")
    p.add_argument("--summarize-only", action="store_true")
    a = p.parse_args(argv)
    a.logs = os.path.abspath(a.logs or (a.out[:-5] + ".logs" if a.out and a.out.endswith(".json")
                                        else "seed-sweep-logs"))
    a.cache = os.path.abspath(a.cache or os.path.join(a.logs, "xla"))
    os.makedirs(a.cache, exist_ok=True)
    os.makedirs(a.logs, exist_ok=True)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)

    def write(rep):
        if a.out:
            with open(a.out + ".tmp", "w") as fh:
                json.dump(rep, fh, indent=1)
            os.replace(a.out + ".tmp", a.out)
            with open(a.out[:-5] + ".md" if a.out.endswith(".json") else a.out + ".md", "w") as fh:
                fh.write(markdown(rep))

    if not a.summarize_only:
        seeds, commit = list(range(a.start, a.start + a.seeds)), _commit()
        with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool:
            for seed, res, cached in pool.map(lambda s: run_seed(s, a, commit), seeds):
                tag = "(done before)" if cached else f"{res['seconds']:.0f} s"
                print(f"seed {seed}: {res['passed']} passed, {len(res['failed'])} failed "
                      f"{tag} {' '.join(res['failed'])}", flush=True)
                if "error" in res:
                    print(res["error"], file=sys.stderr)
                try:  # the running report; a bug in it must not stop the sweep
                    write(summarize(a))
                except Exception as exc:  # noqa: BLE001
                    print(f"summary failed: {exc!r}", file=sys.stderr)
    rep = summarize(a)
    write(rep)
    print(markdown(rep))
    print("fragile:", rep["fragile"] or "none")
    return 1 if rep["fragile"] or rep["pytest_errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
