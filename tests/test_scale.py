"""Scale: many devices, NaN policies, memory bounded in N, chunk-size invariance."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoregrad as sg

THETA = {"loc": jnp.array([1.0, -0.5, 0.25]), "scale": jnp.array([1.0, 2.0, 0.5])}


def _run_python(code: str, env_extra: dict, timeout: int = 1200) -> dict:
    env = dict(os.environ, **env_extra)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
        env=env, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _four_device_check(names, hessian):
    code = f"""
        import json, jax, jax.numpy as jnp, scoregrad as sg
        assert jax.local_device_count() == 4
        theta = {{"loc": jnp.array([1.0, -0.5]), "scale": jnp.array([1.0, 2.0])}}
        f = lambda x: jnp.sum(x ** 2)
        fam, key, out = sg.families.normal(), jax.random.key(7), {{}}
        ests = {{"sf": sg.score_function(), "loo": sg.score_function(sg.baselines.leave_one_out()),
                "pw": sg.pathwise(), "opt": sg.score_function(sg.baselines.optimal())}}
        for name in {list(names)!r}:
            est = ests[name]
            for dev in (None, "all"):
                r = sg.estimate_grad(f, fam, theta, key, num_samples=1003, estimator=est, devices=dev)
                g = jax.jit(jax.grad(lambda th: sg.expectation(
                    f, fam, th, key, num_samples=1003, estimator=est, devices=dev)))(theta)
                out[f"{{name}}-{{dev}}"] = [r.grad["loc"].tolist(), r.stderr["scale"].tolist(),
                                        g["scale"].tolist(), float(r.value)]
        if {hessian!r}:
            h = {{}}
            for dev in (None, 4):
                h[str(dev)] = jax.hessian(lambda th: sg.expectation(
                    f, fam, th, key, num_samples=1000, devices=dev))(theta)["loc"]["loc"].tolist()
            out["hessian"] = h
        print(json.dumps(out))
    """
    out = _run_python(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    for name in names:
        np.testing.assert_allclose(
            np.concatenate([np.ravel(a) for a in out[f"{name}-None"]]),
            np.concatenate([np.ravel(a) for a in out[f"{name}-all"]]), rtol=2e-5, atol=1e-6,
        )
    if hessian:
        np.testing.assert_allclose(out["hessian"]["None"], out["hessian"]["4"], rtol=2e-5, atol=1e-6)


def test_four_virtual_devices_match_one_device():
    # Leave-one-out: batch-statistic weights merged across devices, estimate_grad and jax.grad.
    _four_device_check(["loo"], hessian=False)


@pytest.mark.slow
def test_four_virtual_devices_match_one_device_all_estimators_and_hessian():
    # opt: the optimal baseline's cross-fitted folds accumulate in the same sharded loop
    # (devices was silently ignored by the separate cross-fitting runner before).
    _four_device_check(["sf", "loo", "pw", "opt"], hessian=True)


def test_devices_argument_errors():
    with pytest.raises(ValueError, match="devices"):
        sg.estimate_grad(lambda x: jnp.sum(x), sg.families.normal(), THETA, jax.random.key(0),
                         num_samples=8, devices="gpu-please")
    with pytest.raises(ValueError, match="devices"):
        sg.estimate_grad(lambda x: jnp.sum(x), sg.families.normal(), THETA, jax.random.key(0),
                         num_samples=8, devices=1000)
    with pytest.raises(TypeError, match="devices"):
        sg.estimate_grad(lambda x: jnp.sum(x), sg.families.normal(), THETA, jax.random.key(0),
                         num_samples=8, devices=3.5)


def _nan_f(x):
    return jnp.where(x[0] > 1.5, jnp.nan, jnp.sum(x**2))


def test_nan_policy_raise_is_default_eager_and_jit():
    with pytest.raises(Exception, match="nan_policy"):
        sg.estimate_grad(_nan_f, sg.families.normal(), THETA, jax.random.key(0), num_samples=500)
    grad_fn = jax.jit(jax.grad(lambda th: sg.expectation(
        _nan_f, sg.families.normal(), th, jax.random.key(0), num_samples=500)))
    with pytest.raises(Exception, match="NaN or infinite"):
        jax.block_until_ready(grad_fn(THETA))


def test_nan_policy_propagate_counts():
    r = sg.estimate_grad(_nan_f, sg.families.normal(), THETA, jax.random.key(0),
                         num_samples=500, nan_policy="propagate")
    assert int(r.num_nonfinite) > 0
    assert not np.all(np.isfinite(np.asarray(r.grad["loc"])))


@pytest.mark.parametrize("baseline", [None, pytest.param("loo", marks=pytest.mark.slow)])
def test_nan_policy_drop_equals_estimate_on_the_finite_draws(baseline):
    with jax.enable_x64(True):
        theta = jnp.array([0.3, -0.2, 1.0])
        fam = sg.families.bernoulli()
        xs = (jax.random.uniform(jax.random.key(3), (64, 3)) < 0.5).astype(jnp.float64)
        bad = (xs[:, 0] == 1) & (xs[:, 1] == 1)
        f = lambda x: jnp.where((x[0] == 1) & (x[1] == 1), jnp.inf, jnp.sum(x * jnp.arange(1.0, 4.0)))
        g = lambda x: jnp.sum(x * jnp.arange(1.0, 4.0))
        est = sg.score_function(None if baseline is None else sg.baselines.leave_one_out())
        dropped = sg.estimate_grad_from_samples(f, fam, theta, xs, estimator=est, nan_policy="drop",
                                                chunk_size=5)
        kept = sg.estimate_grad_from_samples(g, fam, theta, xs[~bad], estimator=est)
        assert int(dropped.num_nonfinite) == int(bad.sum()) > 0
        np.testing.assert_allclose(dropped.value, kept.value, rtol=1e-12)
        np.testing.assert_allclose(dropped.stderr, kept.stderr, rtol=1e-10)
        np.testing.assert_allclose(dropped.grad, kept.grad, rtol=1e-10)


def test_nan_policy_drop_in_expectation_gradient_is_finite():
    g = jax.grad(lambda th: sg.expectation(_nan_f, sg.families.normal(), th, jax.random.key(0),
                                           num_samples=500, nan_policy="drop"))(THETA)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in g.values())


def test_nan_policy_bad_value():
    with pytest.raises(ValueError, match="nan_policy"):
        sg.estimate_grad(lambda x: jnp.sum(x), sg.families.normal(), THETA, jax.random.key(0),
                         num_samples=8, nan_policy="ignore")


@pytest.mark.slow  # measured 20-30 s per case on 2 cores
@pytest.mark.parametrize("est", [sg.score_function(), sg.pathwise(),
                                 sg.score_function(sg.baselines.leave_one_out())])
def test_chunk_size_invariance_with_remainder(est):
    f = lambda x: jnp.sum(jnp.cos(x))
    outs = [sg.estimate_grad(f, sg.families.normal(), THETA, jax.random.key(11), num_samples=203,
                             estimator=est, chunk_size=c) for c in (1, 7, 64, None)]
    grads = [jax.jit(jax.grad(lambda th, c=c: sg.expectation(
        f, sg.families.normal(), th, jax.random.key(11), num_samples=203, estimator=est,
        chunk_size=c)))(THETA) for c in (1, 7, 64, None)]
    for o, g in zip(outs[1:], grads[1:]):
        for name in ("loc", "scale"):
            np.testing.assert_allclose(o.grad[name], outs[0].grad[name], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(o.stderr[name], outs[0].stderr[name], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(g[name], grads[0][name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # >= 15 s on 2 cores (mostly compile time)
def test_memory_is_bounded_in_num_samples():
    """2e6 draws of a d = 100 normal (800 MB if materialized) stay within a small RSS growth."""
    code = """
        import json, resource, jax, jax.numpy as jnp, scoregrad as sg
        theta = {"loc": jnp.zeros(100), "scale": jnp.ones(100)}
        f = lambda x: jnp.sum(x ** 2)
        def run(n):
            r = sg.estimate_grad(f, sg.families.normal(), theta, jax.random.key(0), num_samples=n)
            g = jax.grad(lambda th: sg.expectation(f, sg.families.normal(), th, jax.random.key(0),
                                                   num_samples=n))(theta)
            jax.block_until_ready((r, g))
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        small = run(20_000)
        big = run(2_000_000)
        print(json.dumps({"small_kb": small, "big_kb": big}))
    """
    out = _run_python(code, {})
    growth_mb = (out["big_kb"] - out["small_kb"]) / 1024
    assert growth_mb < 100, f"peak RSS grew by {growth_mb:.0f} MB from 2e4 to 2e6 draws"


@pytest.mark.slow
def test_multihost_example_two_processes_agree_with_one_device():
    """examples/multihost.py: 2 processes x 2 CPU devices (gloo) give the one-device gradient."""
    import pathlib
    import re
    import socket

    script = pathlib.Path(__file__).parents[1] / "examples" / "multihost.py"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script), "--process-id", str(i),
                               "--coordinator", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    theta = {"loc": jnp.array([1.0, -0.5]), "scale": jnp.array([1.0, 2.0])}
    one = jax.jit(jax.grad(lambda th: sg.expectation(
        lambda x: jnp.sum(x**2), sg.families.normal(), th, jax.random.key(0),
        num_samples=100_000)))(theta)
    for out in outs:
        line = [ln for ln in out.splitlines() if ln.startswith("process")][-1]
        nums = [float(v) for v in re.findall(r"-?\d+\.\d+", line.split("grad =")[1].split("(exact")[0])]
        np.testing.assert_allclose(nums, np.concatenate([one["loc"], one["scale"]]), rtol=1e-4)


def test_cross_fitted_estimators_honor_nan_policy():
    # The optimal baseline's folds run in the engine's one loop; a NaN in f must not slip
    # through it, and "drop" (refused while cross-fitting had its own loop) is honoured.
    f = lambda x: jnp.where(x[0] > 1.5, jnp.nan, jnp.sum(x**2))  # noqa: E731
    est = sg.score_function(sg.baselines.optimal())
    args = (f, sg.families.normal(), THETA, jax.random.key(0))
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        jax.block_until_ready(sg.estimate_grad(*args, num_samples=256, estimator=est).grad)
    r = sg.estimate_grad(*args, num_samples=256, estimator=est, nan_policy="drop")
    assert int(r.num_nonfinite) > 0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(r.grad))


@pytest.mark.slow
def test_cross_fitted_estimators_honor_nan_policy_in_expectation_and_propagate():
    f = lambda x: jnp.where(x[0] > 1.5, jnp.nan, jnp.sum(x**2))  # noqa: E731
    est = sg.score_function(sg.baselines.optimal())
    with pytest.raises(Exception, match="NaN or infinite"):
        jax.block_until_ready(jax.grad(lambda t: sg.expectation(
            f, sg.families.normal(), t, jax.random.key(0), num_samples=256, estimator=est))(THETA))
    r = sg.estimate_grad(f, sg.families.normal(), THETA, jax.random.key(0), num_samples=256,
                         estimator=est, nan_policy="propagate")
    assert int(r.num_nonfinite) > 0 and not bool(jnp.all(jnp.isfinite(r.grad["loc"])))
