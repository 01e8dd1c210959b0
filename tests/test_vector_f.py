"""Array-valued f (issue 18, item 3): ``sg.expectation`` / ``sg.estimate_grad`` of an f that
returns an array, one pass over the draws for every entry.

The defining property is exact: entry j of the vector result equals the scalar result for
``f_j(x) = f(x)[j]`` with the same key (common random numbers), for every estimator of the
registry, and ``jax.jacrev`` / ``jax.jacfwd`` of the vector ``sg.expectation`` equal
``estimate_grad(...).grad``. Unbiasedness is then the scalar estimators' (checked against the
exact Jacobian by enumeration and by closed form below); the options (chunk sizes, theta
pytrees, float32/64, a large constant, NaN policies, jit, Hessians) are checked on the vector
path itself.
"""

import gc
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stats_util as su
from model_util import stateful

import scoregrad as sg
from scoregrad.bench import problems as P
from scoregrad.bench import registry as R


@pytest.fixture(autouse=True)
def _release_compiled_programs_per_test():
    """This module's tests each compile large vmapped programs (an engine per output entry) and
    share none: dropping them after every test keeps the worker under 3 GB (it reached 3.4 GB
    with the per-module release alone)."""
    yield
    jax.clear_caches()
    gc.collect()

BERN = sg.families.bernoulli()
THETA = jnp.asarray([0.3, -0.5])


def f_vec(b):
    return jnp.stack([jnp.sum((b - jnp.asarray([0.45, 0.2], b.dtype)) ** 2), b[0] * b[1],
                      jnp.sum(b)])


def exact_jac(f, theta):
    def mean(th):
        out = 0.0
        for b in itertools.product([0.0, 1.0], repeat=2):
            b = jnp.asarray(b, th.dtype)
            out = out + jnp.exp(BERN.log_prob(th, b)) * f(b)
        return out
    return jax.jacrev(mean)(theta), mean(theta)


def _leaves(t):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(t)]


# ------------------------------------------------------------------------------------------
# Unbiased against the exact Jacobian.

@pytest.mark.statistical
@pytest.mark.parametrize("chunk", [None, 700])
def test_jacobian_unbiased_at_several_chunks(x64, chunk):
    theta = THETA.astype(jnp.float64)
    J, value = exact_jac(f_vec, theta)
    est = sg.score_function(sg.baselines.leave_one_out())
    n = 4200  # above the automatic chunk split (4,096)
    r = sg.estimate_grad(f_vec, BERN, theta, jax.random.key(3), num_samples=n,
                         estimator=est, chunk_size=chunk)
    assert r.grad.shape == (3, 2) and r.stderr.shape == (3, 2) and r.value.shape == (3,)
    su.assert_unbiased(r.grad, r.stderr, J, what="Jacobian")
    su.assert_unbiased(r.value, r.value_stderr, value, what="value")
    su.assert_power(r.stderr, 0.012, what="Jacobian SE")
    # the estimate is chunk invariant: one chunk gives the same numbers
    ref = sg.estimate_grad(f_vec, BERN, theta, jax.random.key(3), num_samples=n,
                           estimator=est, chunk_size=n)
    np.testing.assert_allclose(r.grad, ref.grad, rtol=1e-10, atol=1e-15)


@pytest.mark.statistical
def test_pathwise_jacobian_closed_form():
    # x ~ N(mu, sigma^2) in 2-d; f(x) = (x0, x0 * x1, x1^2): E = (mu0, mu0 mu1, mu1^2 + s1^2)
    fam = sg.families.normal()
    theta = {"loc": jnp.asarray([0.5, -1.0]), "scale": jnp.asarray([0.7, 1.3])}

    def f(x):
        return jnp.stack([x[0], x[0] * x[1], x[1] ** 2])

    r = sg.estimate_grad(f, fam, theta, jax.random.key(11), num_samples=8192,
                         estimator=sg.pathwise())
    mu, s = np.asarray(theta["loc"]), np.asarray(theta["scale"])
    exact_loc = np.array([[1, 0], [mu[1], mu[0]], [0, 2 * mu[1]]])
    exact_scale = np.array([[0, 0], [0, 0], [0, 2 * s[1]]])
    assert r.grad["loc"].shape == (3, 2)
    su.assert_unbiased(r.grad["loc"], r.stderr["loc"], exact_loc, atol=1e-5, what="d/dloc")
    su.assert_unbiased(r.grad["scale"], r.stderr["scale"], exact_scale, atol=1e-5,
                       what="d/dscale")
    su.assert_power(r.stderr["loc"], 0.05, what="SE")


# ------------------------------------------------------------------------------------------
# Entry j of the vector result is the scalar result for f_j, for every estimator.

FAST = ("score_function+loo", "score_function+optimal", "pathwise", "rloo(4)", "disarm")


def _home(entry):
    for name in ("bernoulli_t0.45", "categorical_k10", "gauss_square_d1", "bs_call",
                 "barrier_t6"):
        if R.applies(entry, P.get_problem(name)):
            return P.get_problem(name)
    return None


def _cells():
    out = []
    for e in R.ESTIMATORS:
        marks = () if e.name in FAST else (pytest.mark.slow,)
        out.append(pytest.param(e.name, id=e.name, marks=marks))
    return out


@pytest.mark.parametrize("name", _cells())
def test_entry_j_is_the_scalar_estimate(x64, name):
    entry = next(e for e in R.ESTIMATORS if e.name == name)
    problem = _home(entry)
    assert problem is not None, f"{name} applies to none of the home problems"
    est = entry.factory(problem)
    theta = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), problem.theta)
    f = problem.f

    def fv(x):
        y = f(x)
        if "program" in problem.capabilities:
            # a program's f must stay the sum of its per-step costs (linear in the step
            # weights); test_programs checks that any other f is refused
            return jnp.stack([y, 3.0 * y, -0.5 * y])
        return jnp.stack([y, 3.0 * y - 1.0, y * y])

    b = sg.bind(est, problem.family, theta)
    n = b.draws_per_unit * max(6, b.min_units)
    key = jax.random.key(5)
    if stateful(est):
        with pytest.raises(ValueError, match="stateful"):
            sg.estimate_grad(fv, problem.family, theta, key, num_samples=n, estimator=est)
        return
    chunk = max(1, n // b.draws_per_unit - 1)  # two chunks, the second of one unit
    r = sg.estimate_grad(fv, problem.family, theta, key, num_samples=n, estimator=est,
                         chunk_size=chunk)
    jac = jax.jacrev(lambda th: sg.expectation(fv, problem.family, th, key, num_samples=n,
                                               estimator=est))(theta)
    for j, fj in enumerate([lambda x: fv(x)[0], lambda x: fv(x)[1], lambda x: fv(x)[2]]):
        s = sg.estimate_grad(fj, problem.family, theta, key, num_samples=n, estimator=est,
                             chunk_size=chunk)
        for a, c, d in zip(_leaves(r.grad), _leaves(s.grad), _leaves(jac)):
            np.testing.assert_allclose(a[j], c, rtol=1e-9, atol=1e-12, err_msg=f"grad[{j}]")
            np.testing.assert_allclose(d[j], c, rtol=1e-9, atol=1e-12, err_msg=f"jacrev[{j}]")
        for a, c in zip(_leaves(r.stderr), _leaves(s.stderr)):
            # batched rounding: a zero-variance coordinate's SE is O(1e-10), not equal bits
            np.testing.assert_allclose(a[j], c, rtol=1e-7, atol=1e-9, err_msg=f"stderr[{j}]")
        np.testing.assert_allclose(r.value[j], s.value, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# Options on the vector path.

class Params(NamedTuple):
    a: jax.Array
    b: jax.Array


@pytest.mark.parametrize("form", ["dict", "tuple", "namedtuple"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_theta_pytrees_and_dtypes(x64, form, dtype):
    base = THETA.astype(dtype)
    wrap = {"dict": lambda a, b: {"a": a, "b": b}, "tuple": lambda a, b: (a, b),
            "namedtuple": Params}[form]
    theta = wrap(base[:1], base[1:])
    fam = sg.Family(lambda th, x: BERN.log_prob(jnp.concatenate(jax.tree_util.tree_leaves(th)), x),
                    lambda th, k: BERN.sample(jnp.concatenate(jax.tree_util.tree_leaves(th)), k))
    est = sg.score_function(sg.baselines.leave_one_out())
    key = jax.random.key(2)
    r = sg.estimate_grad(f_vec, fam, theta, key, num_samples=512, estimator=est)
    assert jax.tree_util.tree_structure(r.grad) == jax.tree_util.tree_structure(theta)
    jac = jax.jacrev(lambda th: sg.expectation(f_vec, fam, th, key, num_samples=512,
                                               estimator=est))(theta)
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    for a, c in zip(_leaves(r.grad), _leaves(jac)):
        assert a.shape == (3, 1) and a.dtype == dtype
        np.testing.assert_allclose(a, c, rtol=tol, atol=tol)


def test_large_constant_changes_nothing_but_the_value(x64):
    # float64: f + 1e8 still resolves f to 1.5e-8 (in float32, f + 1e6 itself rounds f to 1/16:
    # that is f's precision, not the estimator's); each entry is centred on its own reference
    theta = THETA.astype(jnp.float64)
    est = sg.score_function(sg.baselines.leave_one_out())
    key = jax.random.key(4)
    r = sg.estimate_grad(f_vec, BERN, theta, key, num_samples=2048, estimator=est)
    s = sg.estimate_grad(lambda b: f_vec(b) + 1e8, BERN, theta, key, num_samples=2048,
                         estimator=est)
    np.testing.assert_allclose(s.grad, r.grad, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s.stderr, r.stderr, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(s.value - 1e8, r.value, rtol=0, atol=1e-6)
    assert np.all(np.asarray(r.stderr) > 0)


def test_jit_jacfwd_and_one_entrys_hessian(x64):
    theta = THETA.astype(jnp.float64)
    est = sg.score_function(sg.baselines.leave_one_out())
    key = jax.random.key(8)

    def ev(th):
        return sg.expectation(f_vec, BERN, th, key, num_samples=600, estimator=est,
                              chunk_size=250)

    jr = jax.jit(jax.jacrev(ev))(theta)
    jf = jax.jacfwd(ev)(theta)
    np.testing.assert_allclose(jr, jf, rtol=1e-10, atol=1e-14)
    # the Hessian of entry 1 equals the scalar expectation's Hessian (DiCE at every order)
    h_vec = jax.hessian(lambda th: ev(th)[1])(theta)
    h_one = jax.hessian(lambda th: sg.expectation(lambda b: f_vec(b)[1], BERN, th, key,
                                                  num_samples=600, estimator=est,
                                                  chunk_size=250))(theta)
    np.testing.assert_allclose(h_vec, h_one, rtol=1e-10, atol=1e-14)
    assert np.any(np.asarray(h_one) != 0)


def test_matrix_valued_f_keeps_its_shape():
    def fm(b):
        return jnp.outer(b, b)  # (2, 2)

    r = sg.estimate_grad(fm, BERN, THETA, jax.random.key(0), num_samples=64)
    assert r.value.shape == (2, 2) and r.grad.shape == (2, 2, 2)
    assert r.num_nonfinite.shape == (2, 2) and r.num_samples == 64
    v = sg.expectation(fm, BERN, THETA, jax.random.key(0), num_samples=64)
    assert v.shape == (2, 2)
    np.testing.assert_allclose(v, r.value, rtol=1e-6)


def test_nan_in_one_entry():
    def fn(b):
        return jnp.stack([jnp.sum(b), jnp.where(b[0] > 0, jnp.nan, 1.0)])

    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        sg.estimate_grad(fn, BERN, THETA, jax.random.key(0), num_samples=256)
    r = sg.estimate_grad(fn, BERN, THETA, jax.random.key(0), num_samples=256, nan_policy="drop")
    assert int(r.num_nonfinite[0]) == 0 and int(r.num_nonfinite[1]) > 0
    assert np.all(np.isfinite(np.asarray(r.grad)))
    p = sg.estimate_grad(fn, BERN, THETA, jax.random.key(0), num_samples=256,
                         nan_policy="propagate")
    assert np.all(np.isfinite(np.asarray(p.grad[0]))) and not np.all(np.isfinite(np.asarray(p.grad[1])))
    with pytest.raises(Exception, match="NaN or infinite"):
        jax.jit(lambda th: sg.estimate_grad(fn, BERN, th, jax.random.key(0),
                                            num_samples=256).grad)(THETA).block_until_ready()


def test_from_samples_and_chains(x64):
    theta = THETA.astype(jnp.float64)
    xs = BERN.sample(theta, jax.random.key(0))[None] * 0 + jax.vmap(
        lambda k: BERN.sample(theta, k))(jax.random.split(jax.random.key(1), 400))
    r = sg.estimate_grad_from_samples(f_vec, BERN, theta, xs)
    s = sg.estimate_grad_from_samples(lambda b: f_vec(b)[2], BERN, theta, xs)
    np.testing.assert_allclose(r.grad[2], s.grad, rtol=1e-12)
    rc = sg.estimate_grad_from_samples(f_vec, BERN, theta, xs.reshape(4, 100, 2),
                                       correlation="chains")
    sc = sg.estimate_grad_from_samples(lambda b: f_vec(b)[0], BERN, theta,
                                       xs.reshape(4, 100, 2), correlation="chains")
    np.testing.assert_allclose(rc.stderr[0], sc.stderr, rtol=1e-10)
    np.testing.assert_allclose(rc.value_stderr[0], sc.value_stderr, rtol=1e-10)


def test_refusals():
    key = jax.random.key(0)
    ma = sg.score_function(sg.baselines.moving_average(0.9))
    with pytest.raises(ValueError, match="stateful"):
        sg.estimate_grad(f_vec, BERN, THETA, key, num_samples=64, estimator=ma)
    with pytest.raises(ValueError, match="stateful"):
        sg.expectation(f_vec, BERN, THETA, key, num_samples=64, estimator=ma)
    with pytest.raises(ValueError, match="f returns an array"):
        sg.expectation_with_state(f_vec, BERN, THETA, key, ma.init(THETA), num_samples=64,
                                  estimator=ma)
    with pytest.raises(ValueError, match="empty array"):
        sg.estimate_grad(lambda b: jnp.zeros((0,)), BERN, THETA, key, num_samples=64)
    with pytest.raises(TypeError, match="floating-point"):
        sg.expectation(lambda b: b.astype(jnp.int32), BERN, THETA, key, num_samples=64)
    with pytest.raises(TypeError, match="single floating-point scalar array"):
        sg.expectation(lambda b: (b[0], b[1]), BERN, THETA, key, num_samples=64)


@pytest.mark.statistical
def test_the_docs_page_example_runs_and_agrees():
    """docs/vector-f.md's example: its comments say r.grad has shape (3, 2) and equals J."""
    import pathlib
    import re

    page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "vector-f.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    ns: dict = {}
    exec(compile(code, "docs/vector-f.md", "exec"), ns)  # noqa: S102 - our own docs page
    r, J, fam, theta, f = ns["r"], ns["J"], ns["fam"], ns["theta"], ns["f"]
    assert r.grad.shape == (3, 2) and r.value.shape == (3,)
    np.testing.assert_allclose(J, r.grad, rtol=1e-5, atol=1e-7)

    def mean(th):
        out = 0.0
        for b in itertools.product([0.0, 1.0], repeat=2):
            b = jnp.asarray(b, th.dtype)
            out = out + jnp.exp(fam.log_prob(th, b)) * f(b)
        return out

    su.assert_unbiased(r.grad, r.stderr, jax.jacrev(mean)(theta), atol=1e-6, what="docs J")
    su.assert_power(r.stderr, 0.01, what="docs SE")


def test_one_entry_arrays_keep_their_shape():
    est = sg.score_function(sg.baselines.leave_one_out())
    r = sg.estimate_grad(lambda b: jnp.sum(b)[None], BERN, THETA, jax.random.key(1),
                         num_samples=128, estimator=est)
    s = sg.estimate_grad(lambda b: jnp.sum(b), BERN, THETA, jax.random.key(1), num_samples=128,
                         estimator=est)
    assert r.grad.shape == (1, 2) and r.value.shape == (1,) and r.num_nonfinite.shape == (1,)
    np.testing.assert_allclose(r.grad[0], s.grad, rtol=1e-6)
    np.testing.assert_allclose(r.stderr[0], s.stderr, rtol=1e-6)
    v = sg.expectation(lambda b: jnp.sum(b).reshape(1, 1), BERN, THETA, jax.random.key(1),
                       num_samples=128, estimator=est)
    assert v.shape == (1, 1)
    with pytest.raises(FloatingPointError):
        sg.estimate_grad(lambda b: jnp.where(b[0] > 0, jnp.nan, 1.0)[None], BERN, THETA,
                         jax.random.key(1), num_samples=128)


def test_expectation_raises_floating_point_error_eagerly_and_jacfwd_keeps_finite_rows(x64):
    theta = THETA.astype(jnp.float64)

    def fn(b):
        return jnp.stack([jnp.sum(b), jnp.where(b[0] > 0, jnp.nan, 1.0)])

    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        sg.expectation(fn, BERN, theta, jax.random.key(0), num_samples=64)
    est = sg.score_function(sg.baselines.leave_one_out())
    jf = jax.jacfwd(lambda th: sg.expectation(fn, BERN, th, jax.random.key(0), num_samples=64,
                                              estimator=est, nan_policy="propagate"))(theta)
    r = sg.estimate_grad(fn, BERN, theta, jax.random.key(0), num_samples=64, estimator=est,
                         nan_policy="propagate")
    np.testing.assert_allclose(jf[0], r.grad[0], rtol=1e-10)
    assert np.all(np.isfinite(np.asarray(jf[0]))) and not np.all(np.isfinite(np.asarray(jf[1])))


_FOUR_DEVICES = """
import json, jax, jax.numpy as jnp, numpy as np
import scoregrad as sg
assert len(jax.devices()) == 4
theta = {"loc": jnp.array([0.3, -0.2]), "scale": jnp.array([1.0, 0.7])}
f = lambda x: jnp.stack([jnp.sum(x ** 2), jnp.sin(x[0]) * x[1], jnp.sum(x)])
fam, key = sg.families.normal(), jax.random.key(3)
out = {}
for devices in (None, "all"):
    jac = jax.jit(jax.jacrev(lambda th: sg.expectation(f, fam, th, key, num_samples=4000,
                                                        devices=devices)))(theta)
    r = jax.jit(lambda th: sg.estimate_grad(f, fam, th, key, num_samples=4000,
                                            devices=devices))(theta)
    text = jax.jit(lambda th: sg.estimate_grad(f, fam, th, key, num_samples=4000,
                                               devices=devices).grad).lower(theta).as_text()
    out[str(devices)] = {"jac": np.asarray(jac["scale"]).tolist(),
                         "grad": np.asarray(r.grad["scale"]).tolist(),
                         "stderr": np.asarray(r.stderr["scale"]).tolist(),
                         "sharded": "shard_map" in text or "sdy.manual_computation" in text}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_array_f_on_one_and_four_host_devices():
    """devices="all" with an array f: sharded (a shard_map in the program), and the Jacobian,
    the gradient and its standard errors equal the one-device ones (here and in a 4-device
    process) up to summation order."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", _FOUR_DEVICES], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    four = json.loads(proc.stdout.strip().splitlines()[-1])
    theta = {"loc": jnp.array([0.3, -0.2]), "scale": jnp.array([1.0, 0.7])}
    f = lambda x: jnp.stack([jnp.sum(x ** 2), jnp.sin(x[0]) * x[1], jnp.sum(x)])  # noqa: E731
    fam, key = sg.families.normal(), jax.random.key(3)
    one = sg.estimate_grad(f, fam, theta, key, num_samples=4000)
    jac = jax.jacrev(lambda th: sg.expectation(f, fam, th, key, num_samples=4000))(theta)
    assert four["all"]["sharded"] and not four["None"]["sharded"]
    for run in ("None", "all"):
        np.testing.assert_allclose(four[run]["jac"], jac["scale"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(four[run]["grad"], one.grad["scale"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(four[run]["stderr"], one.stderr["scale"], rtol=1e-4, atol=1e-6)
    # Power: the three entries' Jacobian rows differ, so a run that mixed them up would fail.
    assert np.min(np.abs(np.diff(np.asarray(jac["scale"]), axis=0))) > 1e-3
