"""Relaxations: Concrete densities against closed forms, measured bias, contract and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stats_util import assert_power, assert_rejects, assert_unbiased, replicate_stats

import scoregrad as sg
from scoregrad._src.estimators.relaxed import (
    binary_concrete_log_prob,
    concrete_log_prob,
    relax,
    straight_through_input,
)

PHI = 0.6


def toy(t):
    return lambda b: jnp.sum((b - t) ** 2)


def cubic(b):
    return jnp.sum(b**3 - 0.5 * b)


def true_bernoulli_grad(f, phi):
    return jax.nn.sigmoid(phi) * jax.nn.sigmoid(-phi) * (f(jnp.ones(1)) - f(jnp.zeros(1)))


# --- densities --------------------------------------------------------------------------------


@pytest.mark.parametrize("phi,lam", [(0.0, 1.0), (0.7, 0.5), (-1.2, 2.0), (2.0, 0.1)])
def test_binary_concrete_density_is_derivative_of_closed_form_cdf(x64, phi, lam):
    """P(Y <= y) = sigmoid(lam * logit(y) - phi) for Y = sigmoid((phi + L) / lam)."""
    cdf = lambda y: jax.nn.sigmoid(lam * (jnp.log(y) - jnp.log1p(-y)) - phi)  # noqa: E731
    ys = jnp.linspace(0.01, 0.99, 37)
    want = jnp.log(jax.vmap(jax.grad(cdf))(ys))
    got = jax.vmap(lambda y: binary_concrete_log_prob(jnp.asarray(phi), lam, y))(ys)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.statistical
def test_binary_concrete_sampler_matches_cdf(x64):
    fam, phi, lam = sg.families.relaxed_bernoulli(0.5), jnp.asarray([PHI]), 0.5
    ys = jax.vmap(lambda k: fam.sample(phi, k))(jax.random.split(jax.random.key(1), 40_000))[:, 0]
    for y in (0.1, 0.5, 0.9):
        hits = np.asarray(ys <= y, np.float64)
        mean, se = hits.mean(), hits.std(ddof=1) / np.sqrt(hits.size)
        truth = float(jax.nn.sigmoid(lam * np.log(y / (1 - y)) - PHI))
        assert_unbiased(mean, se, truth, what=f"P(Y<={y})")


@pytest.mark.parametrize("lam", [0.3, 1.0, 2.5])
def test_concrete_two_categories_is_binary_concrete(x64, lam):
    phi = jnp.asarray([0.9, -0.4])
    for y in np.linspace(0.02, 0.98, 9):
        got = concrete_log_prob(phi, lam, jnp.asarray([y, 1 - y]))
        np.testing.assert_allclose(got, binary_concrete_log_prob(phi[0] - phi[1], lam, y), rtol=1e-12)


def _simplex_quadrature(half_width=60.0, n=1201):
    """Trapezoid nodes on the 2-simplex in softmax coordinates y = softmax(x1, x2, 0).

    The Jacobian of (x1, x2) -> (y1, y2) is y1 y2 y3, and the integrand decays exponentially in x,
    so the trapezoid rule converges exponentially (to ~1e-13 here)."""
    x = jnp.linspace(-half_width, half_width, n)
    h = x[1] - x[0]
    x1, x2 = jnp.meshgrid(x, x, indexing="ij")
    y = jax.nn.softmax(jnp.stack([x1.ravel(), x2.ravel(), jnp.zeros(x1.size)], -1), axis=-1)
    return y, h * h * jnp.prod(y, -1)


@pytest.mark.statistical
@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0])
def test_concrete_density_normalizes_and_matches_sampler(x64, lam):
    phi = jnp.asarray([0.5, -0.3, 0.1])
    y, w = _simplex_quadrature()
    dens = jnp.exp(jax.vmap(lambda yy: concrete_log_prob(phi, lam, yy))(y))
    np.testing.assert_allclose(jnp.sum(w * dens), 1.0, rtol=1e-10)
    moment = float(jnp.sum(w * dens * y[:, 0] ** 2))  # E[Y_1^2] from the closed-form density
    fam = sg.families.relaxed_categorical(lam)
    ys = jax.vmap(lambda k: fam.sample(phi, k))(jax.random.split(jax.random.key(2), 40_000))
    mean, se = replicate_stats(ys[:, 0] ** 2)
    assert_unbiased(mean, se, moment, what="E[Y1^2]")
    assert_power(se, 0.01)


# --- measured bias ----------------------------------------------------------------------------


def _expected_grad_bernoulli(f, phi, lam, straight_through=False, half_width=45.0, n=40_001):
    """E over the logistic noise of the 1-d estimate, by quadrature in s = (phi + L) / lam.

    E[g] = int g(L(s)) p_logistic(L(s)) lam ds; midpoint rules on s < 0 and s > 0 separately (the
    straight-through estimate jumps at s = 0)."""
    h = half_width / n
    s = jnp.concatenate([-half_width + h * (jnp.arange(n) + 0.5), h * (jnp.arange(n) + 0.5)])
    eps = lam * s - phi
    weight = lam * h * jax.nn.sigmoid(eps) * jax.nn.sigmoid(-eps)

    def g(e):
        def value(th):
            x = straight_through_input(False, th, e, lam) if straight_through else relax(
                False, th, e, lam)
            return f(x)

        return jax.grad(value)(jnp.asarray([phi]))[0]

    return float(jnp.sum(weight * jax.vmap(lambda e: g(e[None]))(eps)))


def test_gumbel_softmax_bias_shrinks_as_temperature_goes_to_zero(x64):
    f = toy(0.45)
    truth = float(true_bernoulli_grad(f, PHI))
    # Theory (substitute s = (phi + L)/lam): E[g] -> sigma'(phi)(f(1) - f(0)) with error O(lam)
    # once lam is small; at large lam the bias need not be monotone, so the sweep starts at 0.5.
    lams = [0.5, 0.25, 0.1, 0.03, 0.01]
    bias = [abs(_expected_grad_bernoulli(f, PHI, lam) - truth) for lam in lams]
    assert all(b1 < b0 for b0, b1 in zip(bias, bias[1:])), bias
    assert bias[0] > 0.2 * abs(truth) and bias[-1] < 0.05 * bias[0], bias
    assert bias[-1] / lams[-1] < 2 * bias[2] / lams[2], bias  # linear rate


@pytest.mark.statistical
@pytest.mark.parametrize("lam", [1.0, 0.25])
def test_gumbel_softmax_estimator_matches_quadrature_and_bias_is_measured(x64, lam):
    f = toy(0.45)
    expected = _expected_grad_bernoulli(f, PHI, lam)
    keys = jax.random.split(jax.random.key(7), 200)
    est = sg.gumbel_softmax(lam)
    grads = jax.vmap(lambda k: sg.estimate_grad(f, sg.families.bernoulli(), jnp.asarray([PHI]), k,
                                                num_samples=500, estimator=est).grad)(keys)
    mean, se = replicate_stats(grads[:, 0])
    assert_unbiased(mean, se, expected, what="gumbel_softmax vs quadrature")
    if lam == 1.0:  # the bias is real: the estimator rejects the true gradient by > 5 SE
        assert_rejects(mean, se, float(true_bernoulli_grad(f, PHI)), what="the unbiased gradient")


def test_straight_through_gumbel_bias_limit(x64):
    """As lam -> 0 the mean tends to sigma'(phi) (f'(0) + f'(1)) / 2: exact for quadratic f
    (bias -> 0), biased for the cubic."""
    s1 = float(jax.nn.sigmoid(PHI) * jax.nn.sigmoid(-PHI))
    for f, dfs in [(toy(0.45), (-0.9, 1.1)), (cubic, (-0.5, 2.5))]:
        limit = s1 * (dfs[0] + dfs[1]) / 2
        errs = [abs(_expected_grad_bernoulli(f, PHI, lam, straight_through=True) - limit)
                for lam in (1.0, 0.1, 0.01, 0.001)]
        assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 0.01 * abs(limit), errs
    truth_q = float(true_bernoulli_grad(toy(0.45), PHI))
    np.testing.assert_allclose(s1 * (-0.9 + 1.1) / 2, truth_q, rtol=1e-12)
    assert abs(s1 * 1.0 - float(true_bernoulli_grad(cubic, PHI))) > 0.05


def _enumerated_mean(est, f, fam, theta):
    support = fam.capabilities["support"](theta)
    total = 0.0
    for x in support:
        p = jnp.exp(fam.log_prob(theta, x))
        total = total + p * sg.estimate_grad_from_samples(f, fam, theta, x[None], estimator=est).grad
    return total


def test_straight_through_bernoulli_exact_bias(x64):
    """E[g] = sigma'(phi) E[f'(b)] by enumeration; for (b - t)^2 the bias is sigma'(phi)(2p - 1)."""
    phi = jnp.asarray([PHI, -1.1])
    f, fam = toy(0.45), sg.families.bernoulli()
    got = _enumerated_mean(sg.straight_through(), f, fam, phi)
    p = jax.nn.sigmoid(phi)
    truth = p * (1 - p) * (1 - 2 * 0.45)
    np.testing.assert_allclose(got - truth, p * (1 - p) * (2 * p - 1), rtol=1e-10)


def test_straight_through_categorical_exact_bias(x64):
    theta, vals = jnp.asarray([0.3, -0.4, 1.0]), jnp.asarray([1.0, -2.0, 0.5])
    f = lambda y: jnp.sum(y * vals) ** 2  # noqa: E731  (one-hot input)
    fam = sg.families.categorical()
    got = _enumerated_mean(sg.straight_through(), f, fam, theta)
    p = jax.nn.softmax(theta)
    jac = jnp.diag(p) - jnp.outer(p, p)
    want = jac @ jnp.sum(p[:, None] * 2 * vals[:, None] * vals[None, :], 0)  # J^T E[grad f(onehot)]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    truth = jax.grad(lambda th: jnp.sum(jax.nn.softmax(th) * vals**2))(theta)
    assert np.max(np.abs(got - truth)) > 0.1  # biased


@pytest.mark.statistical
def test_gumbel_softmax_categorical_bias_measured(x64):
    theta, vals = jnp.asarray([0.3, -0.4, 1.0]), jnp.asarray([1.0, -2.0, 0.5])
    f = lambda y: jnp.sum(y * vals) ** 2  # noqa: E731
    truth = np.asarray(jax.grad(lambda th: jnp.sum(jax.nn.softmax(th) * vals**2))(theta))
    keys = jax.random.split(jax.random.key(9), 100)
    grads = jax.vmap(lambda k: sg.estimate_grad(f, sg.families.categorical(), theta, k,
                                                num_samples=1000,
                                                estimator=sg.gumbel_softmax(1.0)).grad)(keys)
    mean, se = replicate_stats(grads)
    assert_rejects(mean, se, truth, what="the unbiased gradient")  # biased at temperature 1


# --- contract and errors ----------------------------------------------------------------------

ESTIMATORS = [sg.gumbel_softmax(0.5), sg.straight_through(), sg.straight_through_gumbel(0.5)]


@pytest.mark.parametrize(
    "est", [pytest.param(ESTIMATORS[0], marks=pytest.mark.slow), *ESTIMATORS[1:]],
    ids=lambda e: e.name,
)
def test_contract_float32_jit_expectation(est):
    theta, key = jnp.asarray([[0.1, -0.2, 0.3]], jnp.float32), jax.random.key(4)
    f = lambda y: jnp.sum(y * jnp.arange(3.0)) ** 2  # noqa: E731
    fam = sg.families.categorical()
    r = sg.estimate_grad(f, fam, theta, key, num_samples=32, estimator=est)
    rj = jax.jit(lambda th, k: sg.estimate_grad(f, fam, th, k, num_samples=32, estimator=est))(theta, key)
    assert r.grad.dtype == jnp.float32 and r.grad.shape == theta.shape
    np.testing.assert_allclose(r.grad, rj.grad, rtol=1e-5, atol=1e-6)

    def loss(th):
        return sg.expectation(f, fam, th, key, num_samples=32, estimator=est)

    np.testing.assert_allclose(jax.grad(loss)(theta), r.grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss(theta), r.value, rtol=1e-6)


def test_straight_through_value_is_the_hard_mean(x64):
    theta, key = jnp.asarray([0.2, -0.5]), jax.random.key(8)
    r = sg.estimate_grad(toy(0.45), sg.families.bernoulli(), theta, key, num_samples=64,
                         estimator=sg.straight_through_gumbel(0.3))
    # f(b) = 0.405 + 0.1 * (number of ones): the mean over hard draws makes 64 (value - 0.405) / 0.1
    # an integer, which a relaxed value would not.
    ones = 64 * (float(r.value) - 2 * 0.45**2) / (0.55**2 - 0.45**2)
    assert abs(ones - round(ones)) < 1e-9 and 0 < round(ones) < 128


@pytest.mark.parametrize("factory", [sg.gumbel_softmax, sg.straight_through_gumbel])
def test_temperature_errors(factory):
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            factory(bad)
    for bad in ("0.5", True, None, jnp.ones(2)):
        with pytest.raises(TypeError, match="temperature"):
            factory(bad)
    with pytest.raises(TypeError, match="traced"):
        jax.jit(factory)(0.5)


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: e.name)
def test_wrong_family_raises(est):
    with pytest.raises(TypeError, match="bernoulli"):
        sg.estimate_grad(lambda x: jnp.sum(x["loc"] if isinstance(x, dict) else x),
                         sg.families.normal(), {"loc": jnp.zeros(2), "scale": jnp.ones(2)},
                         jax.random.key(0), num_samples=8, estimator=est)
