"""Tests of `scoregrad bench`: problem answers, the registry, statistics, the CLI end to end."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from stats_util import assert_power, assert_unbiased

import scoregrad as sg
from scoregrad.bench import cli, plots, problems, registry, report, runner
from scoregrad.bench import stats as bench_stats

ALL_PROBLEMS = problems.problem_names()


def _theta(problem):
    return jax.tree_util.tree_map(jnp.asarray, problem.theta)


def _per_draw(problem, theta, baseline):
    """One draw's gradient contribution and f value: pathwise where valid, else score function."""
    fam, f = problem.family, problem.f
    if {"reparameterizable", "differentiable_f"} <= problem.capabilities:
        def per(k):
            g = jax.grad(lambda th: f(fam.sample(th, k)))(theta)
            return jnp.append(ravel_pytree(g)[0], f(fam.sample(theta, k)))
    else:
        def per(k):
            x = fam.sample(theta, k)
            s = jax.grad(fam.log_prob)(theta, x)
            return jnp.append(ravel_pytree(s)[0] * (f(x) - baseline), f(x))
    return per


def _mc_estimate(problem, key, num_samples, batch=10_000):
    """High-sample (grad, SE, value, SE), independent of the scoregrad engine: i.i.d. draws in
    batches under lax.map, summed; the score function's baseline comes from independent draws."""
    theta = _theta(problem)

    @jax.jit
    def run(key):
        pilot_keys = jax.random.split(jax.random.fold_in(key, 1), 2000)
        pilot = jax.vmap(lambda k: problem.f(problem.family.sample(theta, k)))(pilot_keys)
        per = _per_draw(problem, theta, jnp.mean(pilot))
        keys = jax.random.split(jax.random.fold_in(key, 2), num_samples)
        vals = jax.lax.map(jax.vmap(per), keys.reshape(-1, batch))  # (B, batch, P + 1)
        mean_b = vals.mean(1)
        m2_b = jnp.sum((vals - mean_b[:, None]) ** 2, axis=1)
        mean = mean_b.mean(0)
        m2 = m2_b.sum(0) + batch * jnp.sum((mean_b - mean) ** 2, axis=0)
        return mean, jnp.sqrt(m2 / (num_samples - 1) / num_samples)

    mean, se = (np.asarray(a, np.float64) for a in run(key))
    return mean[:-1], se[:-1], mean[-1], se[-1]


# 1e5 draws: every problem's power check needs at most 6e4 (measured; gauss_cos_d1 the most).
NUM_SAMPLES = 100_000


# The d = 100 Gaussian problems repeat the d = 1 and d = 10 closed forms coordinatewise: slow.
@pytest.mark.statistical
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n.endswith("_d100") else n for n in ALL_PROBLEMS])
def test_exact_answer_matches_high_sample_estimate(name, x64):
    problem = problems.get_problem(name)
    exact = problems.flat(problem.exact_grad)
    key = jax.random.fold_in(jax.random.key(8), runner.stable_id(name))
    grad, se, value, value_se = _mc_estimate(problem, key, NUM_SAMPLES)
    scale = np.abs(exact).max()
    assert_unbiased(grad, se, exact, atol=1e-9 * scale, what=f"{name} gradient")
    assert_unbiased(value, value_se, problem.exact_value, atol=1e-9, what=f"{name} value")
    # Power: a 10% error in the largest gradient coordinate, and a 5% error in the value (or 0.05
    # absolute when |value| < 1), would be detected.
    assert_power(5 * se, 0.1 * scale, what=f"{name} gradient")
    assert_power(5 * value_se, 0.05 * max(abs(problem.exact_value), 1.0), what=f"{name} value")


@pytest.mark.parametrize("name", [n for n in ALL_PROBLEMS
                                  if "enumerable" in problems.get_problem(n).capabilities])
def test_discrete_answers_by_enumeration(name, x64):
    problem = problems.get_problem(name)
    theta = _theta(problem)
    support = problem.family.capabilities["support"](theta)
    fx = jax.vmap(problem.f)(support)

    def expected(th):
        logp = jax.vmap(lambda x: problem.family.log_prob(th, x))(support)
        return jnp.sum(jnp.exp(logp) * fx)

    value, grad = jax.value_and_grad(expected)(theta)
    np.testing.assert_allclose(float(value), problem.exact_value, rtol=1e-10)
    np.testing.assert_allclose(problems.flat(grad), problems.flat(problem.exact_grad), rtol=1e-10,
                               atol=1e-15)


def test_problem_registry_is_well_formed():
    assert len(ALL_PROBLEMS) == len(set(ALL_PROBLEMS)) >= 16
    for name in ALL_PROBLEMS:
        p = problems.get_problem(name)
        assert p.capabilities <= problems.CAPABILITIES
        assert jax.tree_util.tree_structure(p.theta) == jax.tree_util.tree_structure(p.exact_grad)
        assert np.all(np.isfinite(problems.flat(p.exact_grad)))
    assert "pathwise" not in [e.name for e in registry.applicable(problems.get_problem("bs_digital"))]
    with pytest.raises(KeyError, match="known"):
        problems.get_problem("nope")


def test_every_registered_estimator_builds_for_its_problems():
    names = registry.estimator_names()
    assert {"score_function", "score_function+loo", "score_function+ema", "pathwise"} <= set(names)
    for pname in ALL_PROBLEMS:
        p = problems.get_problem(pname)
        for entry in registry.applicable(p):
            est = entry.factory(p)
            assert sg.bind(est, p.family, p.theta).num_terms >= 1, (entry.name, pname)


def test_keys_are_stable_and_shared_across_estimators():
    assert runner.stable_id("bernoulli_t0.45") == runner.stable_id("bernoulli_t0.45")
    assert runner.stable_id("abc") == 891568578  # CRC-32, the same in every process
    a = jax.random.key_data(runner.cell_key("gauss_square_d10", 100))
    b = jax.random.key_data(runner.cell_key("gauss_square_d10", 1000))
    assert not np.array_equal(a, b)


def test_summarize_flags_bias_and_checks_stderr():
    rng = np.random.default_rng(0)
    exact = np.array([1.0, -2.0])
    g = exact + rng.normal(size=(400, 2))
    s = np.ones((400, 2))
    ok = runner.summarize(g, s, exact, [1e-3, 2e-3, 3e-3], num_samples=10)
    assert not ok["biased"] and ok["bias_flag"] is None and not ok["stderr_off"]
    assert 0.8 < ok["stderr_ratio"] < 1.2 and 0 < ok["bias_p"] <= 1
    assert ok["seconds"] == 2e-3 and ok["seconds_q25"] == 1.5e-3 and ok["seconds_q75"] == 2.5e-3
    assert ok["work_normalized_variance"] == pytest.approx(ok["variance"] * 2e-3)
    assert ok["var_x_n"] == pytest.approx(ok["variance"] * 10)
    bad = runner.summarize(g + 1.0, s, exact, [1e-3], num_samples=10)
    assert bad["biased"] and bad["bias_t_max"] > bad["bias_threshold"] and bad["bias_p"] < 1e-10
    assert "bias_norm" not in bad  # a norm is positive even when unbiased: not reported


def test_zero_variance_cell_is_not_flagged_biased_for_rounding():
    exact = np.array([0.0125])
    g = np.full((100, 1), 0.0125 + 3e-9)  # DisARM at phi = 0: every estimate equal, up to rounding
    s = np.zeros((100, 1))
    flat = runner.summarize(g, s, exact, [1e-3])
    assert not flat["biased"]
    # ... but never silent: |t| is infinite, so the cell says it is at the rounding level
    assert flat["bias_flag"] == "rounding" and "within rounding" in report.notes(flat)[0]
    # ... and the allowance is ulps, not a blanket: a real offset of 1e-4 is still flagged.
    assert runner.summarize(g + 1e-4, s, exact, [1e-3])["biased"]


def test_bias_threshold_uses_t_with_r_minus_1_dof_and_bonferroni():
    assert bench_stats.bias_threshold(8, 20) > bench_stats.bias_threshold(100, 20)
    assert bench_stats.bias_threshold(100, 20) > bench_stats.bias_threshold(100, 1)
    # Unbiased estimates with R = 8 replicates and P = 20 coordinates: the old fixed |z| > 5 fires
    # on about 3% of cells; the threshold keeps the false-alarm rate at alpha per cell.
    rng = np.random.default_rng(1)
    exact = np.zeros(20)
    cells = [bench_stats.bias_test(rng.normal(size=(8, 20)), exact, 1e-16) for _ in range(3000)]
    flagged = sum(c["bias_flag"] is not None for c in cells)
    old = sum(c["bias_t_max"] > 5 for c in cells)
    assert flagged <= 12 and old > 50  # alpha = 1e-3: 3 expected; a flag rate of 0.4% is 5 SDs


def test_every_cell_above_the_threshold_is_flagged():
    rng = np.random.default_rng(2)
    exact = np.ones(3)
    for shift in np.linspace(0.0, 3.0, 31):
        g = exact + shift + 0.5 * rng.normal(size=(16, 3))
        c = bench_stats.bias_test(g, exact, 1e-16)
        assert (c["bias_flag"] is not None) == (c["bias_t_max"] > c["bias_threshold"])


def test_absurd_stderr_ratio_is_flagged():
    rng = np.random.default_rng(3)
    exact = np.zeros(2)
    g = rng.normal(size=(100, 2))
    honest = runner.summarize(g, np.ones((100, 2)), exact, [1e-3])
    absurd = runner.summarize(g, 1640 * np.ones((100, 2)), exact, [1e-3])
    assert not honest["stderr_off"] and absurd["stderr_off"]
    assert "SE RATIO OFF" in report._row({**absurd, "status": "ok", "estimator": "e",
                                          "num_samples": 8, "budget": 8})[-1]


def test_categorical_relaxations_apply_and_are_measured():
    p = problems.get_problem("categorical_k10")
    names = [e.name for e in registry.applicable(p)]
    assert {"gumbel_softmax(0.5)", "straight_through", "straight_through_gumbel(0.5)"} <= set(names)
    # f on a one-hot draw is f on its index, so the relaxation's f extends the exact one.
    for k in (0, 3, 9):
        assert float(p.f(jnp.eye(10)[k])) == pytest.approx(float(p.f(jnp.asarray(k))))
    cell = runner.run_cell(p, registry.get_estimator("gumbel_softmax(0.5)"), 64, 8, jnp.float32)
    assert cell["status"] == "ok" and cell["variance"] > 0


def _cell(v, est="e", budget=8, replicates=100):
    return {"problem": "p", "budget": budget, "num_samples": budget, "status": "ok",
            "estimator": est, "replicates": replicates, "var_x_n": v}


def test_rank_within_problem_and_budget_with_ties():
    cells = [_cell(v, f"e{i}") for i, v in enumerate((9.0, 1.0, 3.0, 1.2, 0.0))]
    runner.rank(cells)
    # 1.0 and 1.2 are within replicate noise (F test at R = 100): tied; 0 beats everything
    assert [c["rank"] for c in cells] == [5, 2, 4, 2, 1]
    assert cells[1]["tied_with"] == ["e3"] and cells[4]["tied_with"] == []


def test_ranks_never_depend_on_timings():
    rng = np.random.default_rng(4)
    exact = np.zeros(3)
    gs = [rng.normal(size=(16, 3)) * s for s in (1.0, 1.05, 3.0)]
    runs = []
    for seconds in ([1e-3, 1e-3, 1e-3], [9e-3, 1e-4, 5e-2]):  # wildly different timings
        cells = [{**_cell(None, f"e{i}", replicates=16),
                  **runner.summarize(g, np.ones_like(g), exact, [seconds[i]] * 3,
                                     num_samples=8)}
                 for i, g in enumerate(gs)]
        runner.rank(cells)
        runs.append(([c["rank"] for c in cells], report.recommend(cells)[0]["estimator"]))
    assert runs[0] == runs[1]


def test_estimators_with_a_unit_run_at_the_nearest_multiple():
    assert runner.usable_budget(100, 64, 1) == 128 and runner.usable_budget(10, 64, 1) == 64
    assert runner.usable_budget(1000, 31, 1) == 992 and runner.usable_budget(3, 1, 4) == 4
    # every applicable estimator of the default suite gets a usable budget: none is skipped
    suite = runner.SUITES["default"]
    planned, _ = runner.plan(suite.problems, registry.estimator_names(), suite.samples)
    ran = set()
    for problem, entry, n in planned:
        b = sg.bind(entry.factory(problem), problem.family, problem.theta)
        m = runner.usable_budget(n, b.draws_per_unit, b.min_units)
        assert m % b.draws_per_unit == 0 and m >= b.min_units * b.draws_per_unit
        ran.add(entry.name)
    assert {"measure_valued", "qmc64[pathwise]", "qmc64[score_function]"} <= ran


def test_default_suite_runs_every_registered_estimator_and_stays_small():
    # The default run must fit in 3 minutes on 2 cores (README): nearly all of it is compiling one
    # program per cell, so the number of cells is its cost. Every estimator runs somewhere.
    suite = runner.SUITES["default"]
    planned, _ = runner.plan(suite.problems, registry.estimator_names(), suite.samples)
    assert {entry.name for _, entry, _ in planned} == set(registry.estimator_names())
    # 108 + the 4 categorical x 2 N + barrier_t6's 7 x 2 (whole-program and causal credit)
    assert len(planned) <= 130 and len(suite.samples) >= 2
    extended = runner.SUITES["extended"]
    assert set(suite.problems) <= set(extended.problems)


def test_suite_compiles_in_threads_and_gives_the_statistics_of_single_cells():
    p = problems.get_problem("bernoulli_t0.45")
    entries = [registry.get_estimator(n) for n in ("score_function+ema", "disarm")]
    planned = [(p, e, 8) for e in entries]
    suite = runner.run_suite(planned, 4, jnp.float32, threads=2)
    single = [runner.run_cell(p, e, 8, 4, jnp.float32) for e in entries]
    runner.rank(single)
    for a, b in zip(suite, single):
        assert a["status"] == b["status"] == "ok", (a.get("reason"), b.get("reason"))
        for k in ("bias_t_max", "variance", "stderr_ratio", "var_x_n", "rank"):
            assert a[k] == b[k], k
        assert a["seconds_compile"] > 0
    summary = runner.compile_summary(suite)
    assert summary["compile_seconds_median"] > summary["estimate_seconds_median"] > 0
    assert runner.PHASES["threads"] == 2 and runner.PHASES["compile"] > 0


def test_full_flag_is_the_full_suite(tmp_path, capsys):
    args = cli.build_parser().parse_args(["bench", "--full"])
    assert cli._suite_name(args) == "full"
    assert cli._suite_name(cli.build_parser().parse_args(["bench"])) == "default"
    assert cli.main(["bench", "--full", "--suite", "quick", "--out", str(tmp_path)]) == 2
    assert "contradicts --suite quick" in capsys.readouterr().err


def test_qmc_cell_runs_and_reports_the_n_used():
    p = problems.get_problem("gauss_square_d1")
    cell = runner.run_cell(p, registry.get_estimator("qmc64[pathwise]"), 100, 4, jnp.float32)
    assert cell["status"] == "ok" and cell["budget"] == 100 and cell["num_samples"] == 128
    assert "ran at N=128" in report._row(cell)[-1]


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "x.json"
    report.atomic_write(target, b"1")
    report.atomic_write(target, b"2")
    assert target.read_bytes() == b"2"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--suite", "quick", "--problems", "gauss_square_d1", "bernoulli_t0.45",
            "--estimators", "score_function+ema", "pathwise", "--samples", "8", "16",
            "--replicates", "4", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "gauss_square_d1" in printed and "var×s" in printed
    files = sorted(p.name for p in out.iterdir())
    assert files == ["report.html", "report.md", "results.json", "variance_vs_samples.png",
                     "work_normalized_variance.png"]
    for png in ("variance_vs_samples.png", "work_normalized_variance.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    res = json.loads((out / "results.json").read_text())
    assert {"schema_version", "meta", "settings", "problems", "estimators", "cells",
            "not_applicable", "summary"} <= set(res)
    assert {"jax_version", "scoregrad_version", "git_commit", "timestamp", "machine"} <= set(res["meta"])
    assert res["settings"]["samples"] == [8, 16] and res["settings"]["replicates"] == 4
    assert {k: res["summary"][k] for k in ("ok", "skipped", "error")} == {
        "ok": 6, "skipped": 0, "error": 0}
    assert "6 cells in" in printed and "2 plots" in printed
    assert res["summary"]["wall_seconds"] > 0
    assert res["summary"]["compile_seconds_median"] > res["summary"]["estimate_seconds_median"]
    assert [(s["problem"], s["estimator"]) for s in res["not_applicable"]] == [
        ("bernoulli_t0.45", "pathwise")]
    for cell in res["cells"]:
        assert {"problem", "estimator", "budget", "num_samples", "bias_t_max", "bias_p",
                "bias_threshold", "bias_flag", "variance", "stderr_ratio", "stderr_off",
                "seconds", "seconds_q25", "seconds_q75", "var_x_n", "work_normalized_variance",
                "rank"} <= set(cell)
        assert cell["variance"] > 0 and cell["seconds"] > 0 and cell["timings"] >= 3
    md = (out / "report.md").read_text()
    assert "![variance_vs_samples.png](variance_vs_samples.png)" in md and "| pathwise |" in md
    # the recommendation first, then the plots, then the details; no norm of the bias
    assert md.index("## Recommendation") < md.index("![") < md.index("## Results")
    assert "| `gauss_square_d1` | 8 | `" in md and "bias ± SE" not in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "http" not in html


def test_rerun_gives_the_same_statistics():
    p = problems.get_problem("bernoulli_t0.45")
    e = registry.get_estimator("score_function")
    a = runner.run_cell(p, e, 8, 4, jnp.float32)
    b = runner.run_cell(p, e, 8, 4, jnp.float32)
    runner.rank([a])
    runner.rank([b])
    for k in ("bias_t_max", "bias_p", "variance", "stderr_ratio", "var_x_n", "rank"):
        assert a[k] == b[k], k


@pytest.mark.parametrize("argv, message", [
    (["bench", "--suite", "huge"], "invalid choice"),
    (["bench", "--samples", "0"], "positive integer"),
    (["bench", "--samples", "ten"], "positive integer"),
    (["bench", "--replicates", "1"], "--replicates must be >= 2"),
    (["bench", "--problems", "no_such_problem"], "unknown problem 'no_such_problem'"),
    (["bench", "--estimators", "magic"], "unknown estimator 'magic'"),
    (["bench", "--device", "tpu"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_fail_clearly(argv, message, capsys, tmp_path):
    code = cli.main([*argv, "--out", str(tmp_path)] if argv else argv)
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_arguments_via_subprocess(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    root = pathlib.Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "scoregrad.bench.cli", "bench", "--problems", "nope"],
        capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert proc.returncode == 2
    assert "unknown problem 'nope'" in proc.stderr and "--list" in proc.stderr


def test_list(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ALL_PROBLEMS + registry.estimator_names())


def test_unusable_budgets_are_skipped_and_failures_recorded(tmp_path, monkeypatch, capsys):
    p = problems.get_problem("bernoulli_t0.45")
    pairs = registry.get_estimator("arm")  # coupled pairs: runs at an even N
    cell = runner.run_cell(p, pairs, 7, 4, jnp.float32)
    assert cell["status"] == "ok" and (cell["budget"], cell["num_samples"]) == (7, 8)

    def broken(problem):
        raise RuntimeError("factory exploded")

    monkeypatch.setattr(registry, "ESTIMATORS",
                        [*registry.ESTIMATORS, registry.EstimatorEntry("broken", broken)])
    code = cli.main(["bench", "--problems", "bernoulli_t0.45", "--estimators", "broken",
                     "--samples", "8", "--replicates", "2", "--out", str(tmp_path), "--quiet"])
    assert code == 1
    assert "1 cell failed" in capsys.readouterr().err
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["cells"][0]["status"] == "error" and "factory exploded" in res["cells"][0]["reason"]
    assert (tmp_path / "variance_vs_samples.png").stat().st_size > 0


def test_exact_name_is_exact_and_globs_only_with_star_or_question_mark():
    names = registry.estimator_names()
    assert problems.select(["antithetic[pathwise]"], names, "estimator") == ["antithetic[pathwise]"]
    assert problems.select(["qmc64*"], names, "estimator") == [
        "qmc64[pathwise]", "qmc64[score_function]"]
    assert problems.select(["antithetic[*"], names, "estimator")[0].startswith("antithetic[")
    with pytest.raises(ValueError, match="unknown estimator 'antithetic'"):
        problems.select(["antithetic"], names, "estimator")


def test_out_is_checked_before_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run_suite", lambda *a, **k: pytest.fail("the run started"))
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    argv = ["bench", "--problems", "bernoulli_t0.45", "--estimators", "antithetic[pathwise]",
            "score_function", "--samples", "8", "--quiet", "--out"]
    assert cli.main([*argv, str(not_a_folder)]) == 2
    assert "not a folder" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o500)
    else:  # root writes anywhere: make the write probe fail as it would for a user

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(cli.tempfile, "TemporaryFile", denied)
    assert cli.main([*argv, str(locked)]) == 2
    assert "not writable" in capsys.readouterr().err


def test_python_dash_m_scoregrad_and_plurals():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    root = pathlib.Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "scoregrad", "bench", "--list"],
                          capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "antithetic[pathwise]" in proc.stdout and "problem patterns" in proc.stdout
    assert "(1 problem pattern," in proc.stdout  # the full suite: "*"
    assert cli._plural(1, "cell") == "1 cell" and cli._plural(2, "cell") == "2 cells"


def test_plot_styles_are_distinct_per_estimator():
    names = registry.estimator_names()
    st = plots.styles(names)
    assert len({c for c, _ in st.values()}) == len(names)
    assert len(set(st.values())) == len(names)


def test_plots_draw_zero_variance_estimators(tmp_path):
    cells = [{**_cell(v * n, est, budget=n), "variance": v, "unbiased_by_design": True,
              "bias_flag": None}
             for est, v in (("enumerate", 0.0), ("score_function", 2.0), ("arm", 0.5))
             for n in (10, 100)]
    names = plots.write_plots(cells, tmp_path)
    for name in names:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
