"""The seed sweep's bookkeeping: stats_util logs what each check compared, and
benchmarks/seed_sweep.py turns logs into calibration figures and predicted failure rates that
match closed forms on synthetic logs."""

import argparse
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import stats_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep_module():
    spec = importlib.util.spec_from_file_location(
        "seed_sweep", os.path.join(ROOT, "benchmarks", "seed_sweep.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_helpers_log_statistic_and_limit_before_asserting(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    monkeypatch.setattr(stats_util, "_LOG", str(log))
    monkeypatch.setitem(stats_util.CURRENT, "marked", None)  # these calls are not a real check
    stats_util.assert_unbiased([1.0, 2.0], [0.5, 0.0], [1.5, 2.0], atol=0.1, what="u")
    stats_util.assert_power([0.1], 0.2, what="p")
    with pytest.raises(AssertionError, match="not above"):
        stats_util.assert_above([1.0, 3.0], 2.0, what="a")  # logged although it fails
    with pytest.raises(AssertionError, match="no power"):
        stats_util.assert_rejects([1.0, 1.0], [1.0, 0.0], [2.0, 1.0], what="r")  # distance 1 < 5
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["null", "upper", "lower", "lower"]
    assert [r["check"] for r in rows] == [1, 2, 3, 4]  # numbered within the test
    np.testing.assert_allclose(rows[0]["stat"], [-1.0, 0.0])  # z; SE 0 and no error: z = 0
    np.testing.assert_allclose(rows[0]["limit"][0], 5.0 + 0.1 / 0.5)
    assert rows[0]["limit"][1] == math.inf
    np.testing.assert_allclose(rows[2]["stat"], [1.0, 3.0])
    np.testing.assert_allclose(rows[3]["stat"], [1.0])
    assert rows[0]["test"].startswith("tests/test_seed_sweep.py::")


def test_unmarked_test_calling_a_check_fails(monkeypatch):
    monkeypatch.setitem(stats_util.CURRENT, "marked", False)  # what conftest sets for this test
    with pytest.raises(AssertionError, match="not marked @pytest.mark.statistical"):
        stats_util.assert_power(0.1, 1.0)


def _write_seed(logs, seed, rows, failed=()):
    with open(os.path.join(logs, f"seed_{seed}.jsonl"), "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    with open(os.path.join(logs, f"seed_{seed}.status.json"), "w") as fh:
        json.dump({"seed": seed, "passed": 3 - len(failed), "failed": list(failed),
                   "returncode": int(bool(failed)), "seconds": 1.0}, fh)


def test_summary_matches_closed_forms_on_synthetic_logs(tmp_path):
    """Calibrated z passes the KS check, z with sd 1.5 is flagged; a margin with mean 2 sd and
    a 5-sigma null check get their closed-form failure probabilities."""
    sweep = _sweep_module()
    rng = np.random.default_rng(0)  # synthetic data for the summarizer only; no JAX involved
    logs = str(tmp_path)
    seeds = 400
    margin = rng.normal(2.0, 1.0, seeds)
    for s in range(seeds):
        rows = [
            {"test": "t::good", "check": 1, "what": "z", "kind": "null",
             "stat": rng.normal(size=3).tolist(), "limit": [5.0] * 3},
            {"test": "t::wide", "check": 1, "what": "z", "kind": "null",
             "stat": (1.5 * rng.normal(size=3)).tolist(), "limit": [5.0] * 3},
            {"test": "t::tight", "check": 1, "what": "power", "kind": "upper",
             "stat": [1.0 - margin[s]], "limit": [1.0]},
        ]
        _write_seed(logs, s + 1, rows, failed=["t::tight"] if margin[s] < 0 else [])
    a = argparse.Namespace(logs=logs, slow=False, marker=None, k=None, max_rate=1e-4)
    rep = sweep.summarize(a)
    checks = {c["test"]: c for c in rep["per_check"]}
    assert checks["t::good"]["ks_pvalue"] > 1e-3 and abs(checks["t::good"]["z_sd"] - 1) < 0.06
    assert checks["t::wide"]["ks_pvalue"] < 1e-6
    assert any(line.startswith("t::wide") for line in rep["null_checks_off_normal"])
    assert not any(line.startswith("t::good") for line in rep["null_checks_off_normal"])
    np.testing.assert_allclose(checks["t::good"]["predicted_failure_per_run"],
                               3 * math.erfc(5 / math.sqrt(2)), rtol=1e-12)
    # margins N(2, 1): some runs fail, so the normal fit is not trusted (heavy_tail)
    assert checks["t::tight"]["heavy_tail"] and checks["t::tight"]["predicted_failure_per_run"] == 1
    np.testing.assert_allclose(checks["t::tight"]["min_margin_in_sd"], 2.0, atol=0.3)
    assert rep["per_test"]["t::tight"]["failures"] == int(np.sum(margin < 0)) > 0
    # z with sd 1.5 fails a 5-sigma check with probability 2 Phi(-5 / 1.5) per coordinate
    np.testing.assert_allclose(checks["t::wide"]["predicted_failure_per_run"],
                               3 * math.erfc(5 / 1.5 / math.sqrt(2)), rtol=0.5)
    assert {"t::tight", "t::wide"} <= set(rep["fragile"]) and "t::good" not in rep["fragile"]
    assert rep["seeds_done"] == seeds and "| `t::tight` |" in sweep.markdown(rep)
    assert rep["pooled_null_z"]["checks_tested"] == 2
    assert rep["pooled_null_z"]["checks_ks_p_below_0.01"] == 1  # the wide one


def test_sweep_end_to_end_on_one_test(tmp_path):
    """Two seeds of one cheap statistical test through the real pipeline: the seed reaches the
    keys (different z per seed), every check is logged, and the report counts the runs."""
    import subprocess
    import sys

    out = tmp_path / "sweep.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "seed_sweep.py"), "--seeds", "2",
         "--jobs", "1", "--files", "tests/test_relaxed.py", "-k",
         "test_binary_concrete_sampler_matches_cdf", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["seeds_done"] == 2 and rep["test_runs"] == 2 and rep["failed_runs"] == 0
    assert (tmp_path / "sweep.md").exists()
    logs = tmp_path / "sweep.logs"
    z = [[json.loads(line)["stat"] for line in (logs / f"seed_{s}.jsonl").read_text().splitlines()]
         for s in (1, 2)]
    assert len(z[0]) == 3 and z[0] != z[1]  # three checks per run; the seeds differ


def test_margin_prediction_is_the_normal_tail_of_mean_over_sd():
    """An upper check whose relative margins are evenly spread: predicted Phi(-mean/sd) exactly,
    not heavy-tailed (the closest run is about 4 SD from the limit)."""
    sweep = _sweep_module()
    margins = 0.5 + 0.1 * np.linspace(-1.5, 1.5, 60)  # relative to a limit of 2
    rows = [(np.array([2.0 * (1 - m)]), np.array([2.0])) for m in margins]
    out = sweep._margin_summary("upper", rows)
    ratio = margins.mean() / margins.std(ddof=1)
    np.testing.assert_allclose(out["min_margin_in_sd"], ratio, rtol=1e-12)
    np.testing.assert_allclose(out["predicted_failure_per_run"],
                               0.5 * math.erfc(ratio / math.sqrt(2)), rtol=1e-9)
    assert not out["heavy_tail"] and out["closest_run_in_sd"] > 1
