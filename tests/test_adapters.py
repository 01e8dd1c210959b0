"""Families from numpyro and distrax: capabilities carried over, estimates exact / closed form."""

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from stats_util import assert_power, assert_unbiased

import scoregrad as sg

KEY = jax.random.key(99)


def _closed_bern(th):
    p = jax.nn.sigmoid(th)
    return p[0] * p[1] + p[1]


def f_bern(x):
    x = x.astype(jnp.float64)
    return x[0] * x[1] + x[1]


@pytest.mark.parametrize("lib", [pytest.param("numpyro", marks=pytest.mark.slow),
                                 pytest.param("distrax", marks=pytest.mark.slow)])
def test_bernoulli_capabilities_and_exact_gradients(x64, lib):
    theta = jnp.array([0.4, -0.9])
    if lib == "numpyro":
        fam = sg.families.from_numpyro(lambda th: dist.Bernoulli(logits=th), theta)
    else:
        fam = sg.families.from_distrax(lambda th: distrax.Bernoulli(logits=th), theta)
    assert fam.reparameterized is False and fam.capabilities["discrete"] is True
    assert fam.capabilities["support"](theta).shape == (4, 2)
    np.testing.assert_allclose(fam.log_prob(theta, jnp.array([1, 0])),
                               sg.families.bernoulli().log_prob(theta, jnp.array([1.0, 0.0])),
                               rtol=1e-12)
    r = sg.estimate_grad(f_bern, fam, theta, KEY, num_samples=4, estimator=sg.enumerate())
    np.testing.assert_allclose(r.grad, jax.grad(_closed_bern)(theta), rtol=1e-10)
    with pytest.raises(TypeError, match="reparameterized=False"):
        sg.estimate_grad(f_bern, fam, theta, KEY, num_samples=4, estimator=sg.pathwise())
    # the score function on the adapted family: exactly unbiased by enumeration
    xs = fam.capabilities["support"](theta)
    probs = jnp.exp(jax.vmap(lambda x: fam.log_prob(theta, x))(xs))
    grads = jax.vmap(lambda x: sg.estimate_grad_from_samples(f_bern, fam, theta, x[None]).grad)(xs)
    np.testing.assert_allclose(jnp.tensordot(probs, grads, 1), jax.grad(_closed_bern)(theta),
                               rtol=1e-10)


@pytest.mark.parametrize("lib", ["numpyro", "distrax"])
def test_categorical_support(x64, lib):
    theta = jnp.array([[0.1, 0.5, -0.3], [0.0, 1.0, 0.2]])
    make = (lambda th: dist.Categorical(logits=th)) if lib == "numpyro" else (
        lambda th: distrax.Categorical(logits=th))
    adapt = sg.families.from_numpyro if lib == "numpyro" else sg.families.from_distrax
    fam = adapt(make, theta)
    assert fam.capabilities["support_size"](theta) == 9
    w = jnp.array([1.0, -2.0, 0.5])
    r = sg.estimate_grad(lambda x: w[x[0]] * w[x[1]], fam, theta, KEY, num_samples=9,
                         estimator=sg.enumerate())
    closed = lambda th: (jax.nn.softmax(th, -1) @ w).prod()  # noqa: E731
    np.testing.assert_allclose(r.grad, jax.grad(closed)(theta), rtol=1e-10)


@pytest.mark.statistical
@pytest.mark.parametrize("lib", ["numpyro", "distrax"])
def test_normal_pathwise_closed_form(x64, lib):
    theta = {"loc": jnp.array([0.5, -1.0]), "scale": jnp.array([1.0, 2.0])}
    if lib == "numpyro":
        fam = sg.families.from_numpyro(lambda th: dist.Normal(th["loc"], th["scale"]), theta)
        assert fam.reparameterized is True
    else:
        make = lambda th: distrax.Normal(th["loc"], th["scale"])  # noqa: E731
        assert sg.families.from_distrax(make, theta).reparameterized is None
        fam = sg.families.from_distrax(make, theta, reparameterized=True)
    assert fam.capabilities["continuous"] is True and "support" not in fam.capabilities
    r = sg.estimate_grad(lambda x: jnp.sum(x**2), fam, theta, KEY, num_samples=20_000,
                         estimator=sg.pathwise())
    for k in theta:
        assert_unbiased(r.grad[k], r.stderr[k], 2 * theta[k], what=k)
        assert_power(r.stderr[k], 0.05, what=k)


def test_numpyro_gamma_is_reparameterized():
    fam = sg.families.from_numpyro(lambda th: dist.Gamma(th["a"], th["b"]),
                                   {"a": jnp.ones(2), "b": jnp.ones(2)})
    assert fam.reparameterized is True and fam.capabilities["discrete"] is False


def test_errors():
    with pytest.raises(TypeError, match="make"):
        sg.families.from_numpyro(3, jnp.zeros(2))
    with pytest.raises(TypeError, match="numpyro Distribution"):
        sg.families.from_numpyro(lambda th: th, jnp.zeros(2))
    with pytest.raises(TypeError, match="distrax Distribution"):
        sg.families.from_distrax(lambda th: th, jnp.zeros(2))
    fam = sg.families.from_numpyro(lambda th: dist.Normal(th, 1.0), jnp.zeros(2))
    with pytest.raises(TypeError, match="finite support"):
        sg.estimate_grad(jnp.sum, fam, jnp.zeros(2), KEY, num_samples=4, estimator=sg.enumerate())
