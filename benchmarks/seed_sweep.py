"""Reruns the statistical tests over many seeds and compares failure rates with what z = 5 predicts.

Each run sets ``SCOREGRAD_SWEEP_SEED=s`` (tests/conftest.py folds it into every literal key), so
the tests see independent randomness. A 5-sigma two-sided check on one coordinate fails with
probability 5.7e-7 when the estimator is unbiased and the standard error is right; a test that
checks m coordinates at once fails with at most m times that. A test that fails more often than
a handful of times in the sweep has a wrong tolerance (or a real bias) and must be fixed.

    python benchmarks/seed_sweep.py --seeds 200 --out benchmarks/results/seed_sweep.json
    python benchmarks/seed_sweep.py --seeds 20 -k gaussian      # a subset

Runs are sequential pytest processes (``-p no:randomly -q``), each over the selected tests.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
from math import erfc, sqrt

STATISTICAL = ["tests/test_gaussian.py", "tests/test_hessian.py", "tests/test_sampling.py",
               "tests/test_control_variates.py", "tests/test_measure_valued.py",
               "tests/test_arm.py", "tests/test_rebar_relax.py", "tests/test_baselines_extra.py",
               "tests/test_multisample.py", "tests/test_importance.py", "tests/test_examples.py"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--start", type=int, default=1)
    p.add_argument("-k", default=None, help="pytest -k expression")
    p.add_argument("--files", nargs="*", default=None)
    p.add_argument("--workers", type=int, default=0, help="pytest-xdist workers per run (-n)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    files = [f for f in (a.files or STATISTICAL) if os.path.exists(f)]
    failures = collections.Counter()
    runs = collections.Counter()
    per_check = erfc(5 / sqrt(2))

    def report(done):
        return {
            "seeds_requested": a.seeds, "seeds_done": done, "first_seed": a.start, "files": files,
            "k": a.k, "expected_failure_rate_per_5sigma_check": per_check,
            "failures": dict(failures),
            "failure_rates": {t: c / max(done, 1) for t, c in failures.items()},
            "runs": dict(runs),
        }

    def write(rep):  # after every seed, so a run cut short still leaves its results
        if a.out:
            os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
            with open(a.out + ".tmp", "w") as fh:
                json.dump(rep, fh, indent=2)
            os.replace(a.out + ".tmp", a.out)

    for i, s in enumerate(range(a.start, a.start + a.seeds)):
        cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-m", "not slow", "-p",
               "no:cacheprovider", *files] + (["-k", a.k] if a.k else []) + (
                   ["-n", str(a.workers)] if a.workers else [])
        out = subprocess.run(cmd, capture_output=True, text=True,
                             env=dict(os.environ, SCOREGRAD_SWEEP_SEED=str(s)))
        for line in out.stdout.splitlines():
            m = re.match(r"FAILED (\S+)", line)
            if m:
                failures[m.group(1)] += 1
        summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-200:]
        m = re.search(r"(\d+) passed", summary)
        runs["tests_passed"] += int(m.group(1)) if m else 0
        runs["total"] += 1
        print(f"seed {s}: {summary}", flush=True)
        write(report(i + 1))
    rep = report(a.seeds)
    print(json.dumps(rep, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
