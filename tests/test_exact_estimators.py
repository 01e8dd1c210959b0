"""sg.enumerate() (exact, zero variance, exact Hessian) and sg.indecater() (exactly unbiased)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_util import fixed_draw

import scoregrad as sg

KEY = jax.random.key(4242)


def f_bern(x):
    return (x[0] - 0.45) ** 2 + 1.5 * x[0] * x[1] - x[1] * x[2] + jnp.cos(x[2])


def test_enumerate_bernoulli_value_grad_hessian_closed_form(x64):
    theta = jnp.array([0.3, -0.8, 1.1])
    fam = sg.families.bernoulli()

    def closed(th):  # E f with independent coordinates, by hand
        p = jax.nn.sigmoid(th)
        e0 = p[0] * 0.55**2 + (1 - p[0]) * 0.45**2
        return e0 + 1.5 * p[0] * p[1] - p[1] * p[2] + p[2] * jnp.cos(1.0) + (1 - p[2])

    def loss(th):
        return sg.expectation(f_bern, fam, th, KEY, num_samples=8, estimator=sg.enumerate())

    np.testing.assert_allclose(loss(theta), closed(theta), rtol=1e-12)
    np.testing.assert_allclose(jax.grad(loss)(theta), jax.grad(closed)(theta), rtol=1e-10)
    np.testing.assert_allclose(jax.hessian(loss)(theta), jax.hessian(closed)(theta), rtol=1e-10,
                               atol=1e-14)
    r = sg.estimate_grad(f_bern, fam, theta, KEY, num_samples=16, estimator=sg.enumerate())
    np.testing.assert_allclose(r.grad, jax.grad(closed)(theta), rtol=1e-10)
    np.testing.assert_allclose(r.stderr, 0.0, atol=1e-12)  # zero variance


def test_enumerate_categorical(x64):
    theta = jnp.array([[0.2, -0.5, 1.0], [0.0, 0.3, -0.1]])
    w = jnp.array([1.0, -2.0, 0.5])
    f = lambda x: w[x[0]] * w[x[1]] + w[x[1]]  # noqa: E731

    def closed(th):
        p = jax.nn.softmax(th, -1)
        return (p[0] @ w) * (p[1] @ w) + p[1] @ w

    r = sg.estimate_grad(f, sg.families.categorical(), theta, KEY, num_samples=9,
                         estimator=sg.enumerate())
    np.testing.assert_allclose(r.value, closed(theta), rtol=1e-12)
    np.testing.assert_allclose(r.grad, jax.grad(closed)(theta), rtol=1e-10)


def test_enumerate_errors():
    with pytest.raises(TypeError, match="finite support"):
        sg.estimate_grad(jnp.sum, sg.families.normal(), {"loc": jnp.zeros(2), "scale": jnp.ones(2)},
                         KEY, num_samples=4, estimator=sg.enumerate())
    with pytest.raises(TypeError, match="finite support"):
        sg.estimate_grad(jnp.sum, sg.families.poisson(), jnp.zeros(2), KEY, num_samples=4,
                         estimator=sg.enumerate())
    with pytest.raises(ValueError, match="max_support"):
        sg.estimate_grad(jnp.sum, sg.families.bernoulli(), jnp.zeros(13), KEY,
                         num_samples=8192, estimator=sg.enumerate())
    with pytest.raises(ValueError, match="multiple of 8"):
        sg.estimate_grad(jnp.sum, sg.families.bernoulli(), jnp.zeros(3), KEY, num_samples=10,
                         estimator=sg.enumerate())
    with pytest.raises(TypeError, match="max_support"):
        sg.enumerate(max_support=10.0)
    with pytest.raises(ValueError, match="max_support"):
        sg.enumerate(max_support=0)


def _indecater_expected(family, theta, f):
    support = family.capabilities["support"](theta)
    probs = jnp.exp(jax.vmap(lambda x: family.log_prob(theta, x))(support))
    cost = theta.size if family.name == "categorical" else 2 * theta.size

    def one(x0):
        return jax.grad(lambda th: sg.expectation(
            lambda x: f(x, th), fixed_draw(family, x0), th, KEY, num_samples=cost,
            estimator=sg.indecater()))(theta)

    exact = jax.grad(lambda th: jnp.sum(
        jnp.exp(jax.vmap(lambda x: family.log_prob(th, x))(support))
        * jax.vmap(lambda x: f(x, th))(support)))(theta)
    return jnp.tensordot(probs, jax.vmap(one)(support), 1), exact


def test_indecater_exactly_unbiased_categorical(x64):
    theta = jnp.array([[0.2, -0.5, 1.0], [0.0, 0.3, -0.1], [0.4, 0.1, -0.7]])
    w = jnp.array([1.0, -2.0, 0.5])

    def f(x, th):  # coupled coordinates, and a direct dependence on theta
        return w[x[0]] * w[x[1]] - jnp.sin(w[x[2]] + w[x[0]]) + 0.3 * th[0, x[2]]

    got, exact = _indecater_expected(sg.families.categorical(), theta, f)
    np.testing.assert_allclose(got, exact, rtol=1e-10)


def test_indecater_exactly_unbiased_bernoulli(x64):
    theta = jnp.array([0.3, -0.8, 1.1])
    got, exact = _indecater_expected(sg.families.bernoulli(), theta, lambda x, th: f_bern(x))
    np.testing.assert_allclose(got, exact, rtol=1e-10)


def test_indecater_errors_and_cost():
    with pytest.raises(TypeError, match="indecater"):
        sg.estimate_grad(jnp.sum, sg.families.poisson(), jnp.zeros(2), KEY, num_samples=4,
                         estimator=sg.indecater())
    with pytest.raises(ValueError, match="multiple of 6"):
        sg.estimate_grad(lambda x: jnp.sum(x).astype(jnp.float32), sg.families.categorical(),
                         jnp.zeros((2, 3)), KEY, num_samples=8, estimator=sg.indecater())
    r = sg.estimate_grad(lambda x: jnp.sum(x).astype(jnp.float32), sg.families.categorical(),
                         jnp.zeros((2, 3)), KEY, num_samples=12, estimator=sg.indecater())
    assert r.num_samples == 12 and r.grad.dtype == jnp.float32
