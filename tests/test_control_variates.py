"""Control variates, the delta method and Rao-Blackwellization (issue 5)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stats_util import (
    assert_above,
    assert_power,
    assert_unbiased,
    log_variance_ratio,
    replicate_stats,
)

import scoregrad as sg
from scoregrad import control_variates as cv

FAM = sg.families.normal()
THETA = {"loc": jnp.array([0.3, -0.5]), "scale": jnp.array([1.0, 0.7])}


def _cos(x):
    return jnp.sum(jnp.cos(x))


def _cos_truth(theta):
    e = np.exp(-np.asarray(theta["scale"]) ** 2 / 2)
    loc, scale = np.asarray(theta["loc"]), np.asarray(theta["scale"])
    return np.concatenate([-np.sin(loc) * e, -np.cos(loc) * scale * e])


def _flat(tree):
    return np.concatenate([np.asarray(tree["loc"]), np.asarray(tree["scale"])], axis=-1)


def _reps(est, f, n, reps=200, seed=3, theta=THETA):
    theta = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), theta)
    keys = jax.random.split(jax.random.key(seed), reps)
    return jax.jit(jax.vmap(lambda k: sg.estimate_grad(f, FAM, theta, k, num_samples=n,
                                                       estimator=est)))(keys)


# The Taylor expansion behind the delta method is accurate where the draws are concentrated.
NARROW = {"loc": jnp.array([0.3, -0.5]), "scale": jnp.array([0.3, 0.2])}


def _check(est, n=64, reps=100):
    r = _reps(est, _cos, n, reps, theta=NARROW)
    plain = _reps(sg.score_function(), _cos, n, reps, theta=NARROW)
    m, se = replicate_stats(_flat(r.grad))
    assert_unbiased(m, se, _cos_truth(NARROW), what=est.name)
    assert_power(se, 0.05, what=est.name)
    log_ratio, bound = log_variance_ratio(_flat(plain.grad), _flat(r.grad))
    assert_above(log_ratio, bound, what=f"log(var plain / var {est.name})")


@pytest.mark.statistical
def test_delta_method_unbiased_and_reduces_variance(x64):
    _check(cv.with_control_variates(sg.score_function(), cv.delta_method(_cos, order=2)))


@pytest.mark.statistical
def test_several_control_variates_at_once(x64):
    user = cv.control_variate(lambda x, th: jnp.sum(x), lambda th: jnp.sum(th["loc"]), name="sum")
    _check(cv.with_control_variates(sg.score_function(baseline=sg.baselines.optimal()), user,
                                    cv.delta_method(_cos, order=1)))


@pytest.mark.slow  # >= 15 s on 2 cores (mostly compile time)
def test_delta_method_exact_for_quadratic(x64):
    f = lambda x: jnp.sum((x - 1.0) ** 2) + x[0] * x[1]  # noqa: E731
    est = cv.with_control_variates(sg.score_function(), cv.delta_method(f, order=2))
    theta = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), THETA)
    r = sg.estimate_grad(f, FAM, theta, jax.random.key(0), num_samples=64, estimator=est)
    loc, scale = np.asarray(theta["loc"]), np.asarray(theta["scale"])
    np.testing.assert_allclose(r.grad["loc"], 2 * (loc - 1) + loc[::-1], atol=1e-8)
    np.testing.assert_allclose(r.grad["scale"], 2 * scale, atol=1e-8)


def test_delta_method_refuses_an_array_valued_control_function():
    """An array f handed to the delta method was a raw JAX error ("Gradient only defined for
    scalar-output functions"); it is a TypeError naming delta_method, the shape and the fix."""
    f = lambda x: jnp.stack([jnp.sum(x**2), jnp.sum(x)])  # noqa: E731
    est = cv.with_control_variates(sg.score_function(), cv.delta_method(f, order=2))
    with pytest.raises(TypeError, match=r"delta_method\(f=\.\.\.\).*scalar.*\(2,\).*f\(x\)\[j\]"):
        sg.estimate_grad(f, FAM, THETA, jax.random.key(0), num_samples=64, estimator=est)


@pytest.mark.statistical
def test_pathwise_with_control_variate_unbiased(x64):
    est = cv.with_control_variates(sg.pathwise(), cv.delta_method(_cos, order=2))
    r = _reps(est, _cos, 16, 100)
    m, se = replicate_stats(_flat(r.grad))
    assert_unbiased(m, se, _cos_truth(THETA), what="pathwise+delta")
    assert_power(se, 0.05, what="pathwise+delta")


def test_fixed_coefficient_and_expectation_grad(x64):
    user = cv.control_variate(lambda x, th: jnp.sum(x), lambda th: jnp.sum(th["loc"]))
    est = cv.with_control_variates(sg.score_function(), user, coefficient=0.5)
    theta = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), THETA)
    key = jax.random.key(4)
    r = sg.estimate_grad(_cos, FAM, theta, key, num_samples=256, estimator=est)
    g = jax.grad(lambda th: sg.expectation(_cos, FAM, th, key, num_samples=256, estimator=est))(theta)
    np.testing.assert_allclose(_flat(g), _flat(r.grad), rtol=1e-10)


def test_rao_blackwell_exact_by_enumeration(x64):
    logits = jnp.array([0.4, -0.3])
    fam = sg.families.bernoulli()
    w = jnp.array([1.5, -2.0])
    est = cv.rao_blackwell(lambda x: w * x, baseline=True)
    n = 4
    rows = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=2 * n))).reshape(-1, n, 2)
    p = jax.nn.sigmoid(logits)
    probs = jnp.prod(jnp.where(rows == 1.0, p, 1 - p), axis=(1, 2))
    g = jax.vmap(lambda xs: sg.estimate_grad_from_samples(lambda x: jnp.sum(w * x), fam, logits,
                                                          xs, estimator=est).grad)(rows)
    np.testing.assert_allclose(probs @ g, w * p * (1 - p), rtol=1e-10)


@pytest.mark.statistical
def test_rao_blackwell_reduces_variance(x64):
    d = 8
    theta = {"loc": jnp.linspace(-1.0, 1.0, d), "scale": jnp.ones(d)}
    keys = jax.random.split(jax.random.key(9), 200)

    def run(est):
        return jax.jit(jax.vmap(lambda k: sg.estimate_grad(
            lambda x: jnp.sum(x**2), FAM, theta, k, num_samples=32, estimator=est).grad["loc"]))(keys)

    rb, plain = run(cv.rao_blackwell(lambda x: x**2)), run(sg.score_function())
    m, se = replicate_stats(rb)
    assert_unbiased(m, se, 2 * np.asarray(theta["loc"]), what="rao_blackwell")
    log_ratio, bound = log_variance_ratio(plain, rb)
    assert_above(log_ratio, bound, what="log(var plain / var rao_blackwell)")


def test_bad_arguments():
    with pytest.raises(TypeError, match="callable"):
        cv.control_variate(1.0, lambda th: 0.0)
    with pytest.raises(ValueError, match="order"):
        cv.delta_method(_cos, order=3)
    with pytest.raises(TypeError, match="ControlVariate"):
        cv.with_control_variates(sg.score_function())
    with pytest.raises(TypeError, match="biased"):  # refused at bind (arm: ok)
        sg.bind(cv.with_control_variates(sg.gumbel_softmax(0.5), cv.delta_method(_cos)),
                sg.families.bernoulli(), jnp.zeros(2))
    with pytest.raises(TypeError, match="moments"):
        sg.estimate_grad(lambda x: jnp.sum(x) * 1.0, sg.families.categorical(), jnp.zeros((2, 3)),
                         jax.random.key(0), num_samples=8,
                         estimator=cv.with_control_variates(None, cv.delta_method(_cos)))
    with pytest.raises(ValueError, match="f_terms"):
        sg.estimate_grad(lambda x: jnp.sum(x), FAM, THETA, jax.random.key(0), num_samples=8,
                         estimator=cv.rao_blackwell(lambda x: jnp.sum(x)))
