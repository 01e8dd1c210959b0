"""REBAR and RELAX: exact unbiasedness by quadrature, wiring, learning reduces variance, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from stats_util import assert_below, assert_power, assert_unbiased, variance_ratio

import scoregrad as sg
from scoregrad._src.estimators.rebar_relax import mlp_cv, rebar_cv, relax_surrogate

FAM = sg.families.bernoulli()


def toy(t):
    return lambda b: jnp.sum((b - t) ** 2)


def true_grad(f, logits):
    support = FAM.capabilities["support"](logits)

    def mean(th):
        lp = jax.vmap(lambda x: FAM.log_prob(th, x))(support)
        return jnp.sum(jnp.exp(lp) * jax.vmap(f)(support))

    return jax.grad(mean)(logits)


def exact_mean_1d(f, cv, omega, phi, n):
    """E over (u, v) of the 1-d estimate by Gauss-Legendre: u on [0, 1-p] (b = 0) and [1-p, 1]
    (b = 1), where the estimate is smooth, times v on [0, 1]; L = logit(u)."""
    x, w = np.polynomial.legendre.leggauss(n)
    x, w = (x + 1) / 2, w / 2
    # smoothstep substitution x -> 3x^2 - 2x^3 flattens the u^(1/lam) endpoint behaviour
    x, w = 3 * x**2 - 2 * x**3, w * 6 * x * (1 - x)
    p = float(jax.nn.sigmoid(phi))
    us = np.concatenate([x * (1 - p), (1 - p) + x * p])
    wu = np.concatenate([w * (1 - p), w * p])
    uu, vv = np.meshgrid(us, x, indexing="ij")
    eps = jnp.log(uu.ravel()) - jnp.log1p(-uu.ravel())

    def g(e, v):
        term = lambda t: relax_surrogate(f, FAM.log_prob, cv, omega, t, e[None], v[None])[0]  # noqa: E731
        return jax.grad(term)(jnp.asarray([phi]))[0]

    vals = jax.vmap(g)(eps, jnp.asarray(vv.ravel()))
    return float(jnp.sum(jnp.asarray(np.outer(wu, w).ravel()) * vals))


def _rebar_omega(lam, eta):
    return {"eta": jnp.asarray(eta), "log_temperature": jnp.asarray(math.log(lam))}


# Quadrature nodes per piece and the tolerance: at temperature lam the estimate behaves like
# u^(1/lam) at the ends of [0, 1]; the smoothstep substitution keeps lam = 3 at ~1e-11.
@pytest.mark.parametrize("lam,n,rtol", [(0.3, 200, 1e-10), (1.0, 200, 1e-10), (3.0, 200, 1e-10)])
@pytest.mark.parametrize("t", [0.45, 0.499])
def test_rebar_exactly_unbiased_for_every_temperature_and_eta(x64, lam, n, rtol, t):
    f = toy(t)
    for phi in (0.6, -1.4):
        truth = float(true_grad(f, jnp.asarray([phi]))[0])
        for eta in (0.0, 1.0, 2.5):
            got = exact_mean_1d(f, rebar_cv, _rebar_omega(lam, eta), phi, n)
            np.testing.assert_allclose(got, truth, rtol=rtol, atol=1e-12, err_msg=f"phi={phi} eta={eta}")


def test_relax_exactly_unbiased_with_arbitrary_network(x64):
    f, phi = toy(0.45), 0.3
    k1, k2 = jax.random.split(jax.random.key(3))
    omega = {"eta": jnp.asarray(0.7), "log_temperature": jnp.asarray(math.log(0.6)),
             "mlp": {"w1": jax.random.normal(k1, (1, 8)), "b1": jnp.linspace(-1, 1, 8),
                     "w2": jax.random.normal(k2, (8,)), "b2": jnp.asarray(0.3)}}
    got = exact_mean_1d(f, mlp_cv, omega, phi, 200)
    np.testing.assert_allclose(got, true_grad(f, jnp.asarray([phi]))[0], rtol=1e-10)


def test_engine_wiring_matches_surrogate(x64):
    """estimate_grad's unit i draws L from its key k = fold_in(key, i) (the first stream) and v
    from fold_in(k, 2^31 + 1) (the second, see sg.Draws): exact check."""
    theta, key, f = jnp.asarray([0.2, -0.7]), jax.random.key(12), toy(0.45)
    est = sg.rebar(0.4, 1.3, learn=False)
    r = sg.estimate_grad(f, FAM, theta, key, num_samples=3, estimator=est)
    gs = []
    for i in range(3):
        ku = jax.random.fold_in(key, i)
        kv = jax.random.fold_in(ku, 2**31 + 1)
        eps = jax.random.logistic(ku, (2,), jnp.float64)
        v = jnp.maximum(jax.random.uniform(kv, (2,), jnp.float64), jnp.finfo(jnp.float64).tiny)
        term = lambda t: relax_surrogate(f, FAM.log_prob, rebar_cv, _rebar_omega(0.4, 1.3),  # noqa: E731
                                         t, eps, v)[0]
        gs.append(jax.grad(term)(theta))
    np.testing.assert_allclose(r.grad, np.mean(gs, 0), rtol=1e-12)


def _per_unit(cv, omega, f, theta, key, reps):
    """Per-draw estimates from the surrogate (the wiring test ties it to estimate_grad)."""

    def one(k):
        ku, kv = jax.random.split(k)
        eps = jax.random.logistic(ku, theta.shape, theta.dtype)
        v = jax.random.uniform(kv, theta.shape, theta.dtype, minval=jnp.finfo(theta.dtype).tiny)
        term = lambda t: relax_surrogate(f, FAM.log_prob, cv, omega, t, eps, v)[0]  # noqa: E731
        return jax.grad(term)(theta)

    return jax.jit(jax.vmap(one))(jax.random.split(key, reps))


def _train(est, f, theta, steps, n=64):
    state = est.init(theta)
    step = jax.jit(lambda st, k: sg.estimate_grad(f, FAM, theta, k, num_samples=n, estimator=est,
                                                  state=st).state)
    for i in range(steps):
        state = step(state, jax.random.key(1000 + i))
    return state


@pytest.mark.statistical
@pytest.mark.slow  # ~14 s on 2 cores; test_engine_wiring_matches_surrogate stays in the default set
def test_statistically_unbiased_before_and_after_learning(x64):
    """t = 0.45 (both t are covered exactly above): one jitted call of 20 000 independent draws
    with its own standard error, at the initial state and after 30 learning steps."""
    f, theta = toy(0.45), jnp.asarray([0.6, -1.4, 0.1])
    truth = np.asarray(true_grad(f, theta))
    est = sg.relax()
    step = jax.jit(lambda st, k: sg.estimate_grad(f, FAM, theta, k, num_samples=20_000,
                                                  estimator=est, state=st))
    state = est.init(theta)
    for i in range(31):
        r = step(state, jax.random.key(77 + i))
        if i in (0, 30):
            assert_unbiased(r.grad, r.stderr, truth, what=f"relax after {i} steps")
            assert_power(r.stderr, 0.1 * np.abs(truth).max())
        state = r.state
    assert float(jnp.abs(state.params["eta"] - 1.0)) > 1e-3  # it did learn


@pytest.mark.statistical
@pytest.mark.parametrize(
    "est,cv", [(sg.rebar(2.0, 0.0), rebar_cv), (sg.relax(temperature=2.0), mlp_cv)],
    ids=["rebar", "relax"],
)
def test_learning_reduces_variance_common_random_numbers(x64, est, cv):
    """From a poor start (REBAR with eta = 0 is the score function), training lowers the
    per-sample variance; measured on the same draws (common random numbers), 5-SE margin."""
    f, theta = toy(0.45), jnp.asarray([0.6, -1.4])
    init, trained = est.init(theta), _train(est, f, theta, 150)
    key = jax.random.key(31)
    before = _per_unit(cv, init.params, f, theta, key, 4000)
    after = _per_unit(cv, trained.params, f, theta, key, 4000)
    ratio, se = variance_ratio(after, before)
    assert_below(ratio + 5 * se, 1.0, what="var after / var before training + 5 SE")


@pytest.mark.slow  # >= 15 s on 2 cores (mostly compile time)
def test_expectation_with_state_threads_and_learns():
    f, theta = toy(0.45), jnp.zeros(3, jnp.float32)
    est = sg.rebar(0.5, 0.5, optimizer=optax.sgd(0.1))
    state = est.init(theta)

    @jax.jit
    def step(theta, key, state):
        def loss(th):
            return sg.expectation_with_state(f, FAM, th, key, state, num_samples=16, estimator=est)

        (value, new_state), g = jax.value_and_grad(loss, has_aux=True)(theta)
        return value, g, new_state

    value, g, new_state = step(theta, jax.random.key(0), state)
    r = sg.estimate_grad(f, FAM, theta, jax.random.key(0), num_samples=16, estimator=est,
                         state=state)
    np.testing.assert_allclose(g, r.grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(value, r.value, rtol=1e-6)
    assert g.dtype == jnp.float32 and new_state.params["eta"].dtype == jnp.float32
    assert float(new_state.params["eta"]) != 0.5
    np.testing.assert_allclose(new_state.params["eta"], r.state.params["eta"], rtol=1e-5)
    with pytest.raises(ValueError, match="stateful"):
        sg.expectation(f, FAM, theta, jax.random.key(0), num_samples=4, estimator=est)
    fixed = sg.rebar(0.5, 0.5, learn=False)  # stateless: plain expectation works
    jax.grad(lambda th: sg.expectation(f, FAM, th, jax.random.key(0), num_samples=4,
                                       estimator=fixed))(theta)


def test_errors():
    with pytest.raises(ValueError, match="temperature"):
        sg.rebar(temperature=0.0)
    with pytest.raises(TypeError, match="temperature"):
        sg.relax(temperature="hot")
    with pytest.raises(TypeError, match="eta"):
        sg.rebar(eta=float("nan"))
    with pytest.raises(TypeError, match="optax"):
        sg.relax(optimizer=0.01)
    with pytest.raises(ValueError, match="cv_params"):
        sg.relax(lambda p, z, f: jnp.sum(z))
    with pytest.raises(TypeError, match="Bernoulli only"):
        sg.estimate_grad(lambda y: jnp.sum(y * 1.0), sg.families.categorical(), jnp.zeros(3),
                         jax.random.key(0), num_samples=4, estimator=sg.rebar(learn=False))
    bad = sg.relax(lambda p, z, f: p * z, cv_params=jnp.ones(()))
    with pytest.raises(TypeError, match="scalar"):
        sg.estimate_grad(toy(0.45), FAM, jnp.zeros(2), jax.random.key(0), num_samples=4,
                         estimator=bad, state=bad.init(jnp.zeros(2)))
