"""sg.measure_valued(): exact enumeration (bernoulli, poisson), closed forms, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm
from model_util import fixed_draw
from stats_util import assert_below, assert_power, assert_unbiased, replicate_stats

import scoregrad as sg

KEY = jax.random.key(31337)
MV = sg.measure_valued()


def _expected_grad(family, theta, f, xs, probs, cost):
    def one(x0):
        return sg.estimate_grad(f, fixed_draw(family, x0), theta, KEY, num_samples=cost,
                                estimator=MV).grad

    grads = jax.vmap(one)(xs)
    return jnp.tensordot(probs, grads, axes=1)


def test_bernoulli_exact_by_enumeration(x64):
    fam, theta = sg.families.bernoulli(), jnp.array([0.3, -1.2, 0.8])

    def f(x):
        return (x[0] - 0.45) ** 2 + x[0] * x[1] - 2.0 * x[1] * x[2] + jnp.sin(x[2])

    xs = fam.capabilities["support"](theta)
    probs = jnp.exp(jax.vmap(lambda x: fam.log_prob(theta, x))(xs))
    exact = jax.grad(lambda th: jnp.sum(jnp.exp(jax.vmap(lambda x: fam.log_prob(th, x))(xs))
                                        * jax.vmap(f)(xs)))(theta)
    got = _expected_grad(fam, theta, f, xs, probs, cost=4)
    np.testing.assert_allclose(got, exact, rtol=1e-10)


def test_poisson_exact_by_truncated_enumeration(x64):
    fam, theta = sg.families.poisson(), jnp.array([0.4])
    xs = jnp.arange(80.0)[:, None]  # the mass beyond 80 at rate e^0.4 is below 1e-80
    probs = jnp.exp(jax.vmap(lambda x: fam.log_prob(theta, x))(xs))
    lam = jnp.exp(theta)
    got = _expected_grad(fam, theta, lambda x: jnp.sum(x**2), xs, probs, cost=2)
    np.testing.assert_allclose(got, lam * (1 + 2 * lam), rtol=1e-10)
    step = _expected_grad(fam, theta, lambda x: jnp.sum(x >= 2.0).astype(x.dtype), xs, probs, 2)
    # d/dtheta P(X >= 2) = lam * P(X = 1)
    np.testing.assert_allclose(step, lam * lam * jnp.exp(-lam), rtol=1e-10)


@pytest.mark.statistical
@pytest.mark.slow  # >= 15 s on 2 cores (mostly compile time)
def test_normal_closed_forms_smooth_and_step(x64):
    mu, sigma = jnp.array([0.5, -1.0]), jnp.array([1.0, 2.0])
    theta = {"loc": mu, "scale": sigma}
    r = sg.estimate_grad(lambda x: jnp.sum(x**2), sg.families.normal(), theta, KEY,
                         num_samples=7_000 * 7, estimator=MV)
    assert r.num_samples == 49_000
    for k, truth in {"loc": 2 * mu, "scale": 2 * sigma}.items():
        assert_unbiased(r.grad[k], r.stderr[k], truth, what=k)
        assert_power(r.stderr[k], 0.08, what=k)
    # a step function: pathwise gives 0 here, measure-valued is unbiased
    r = sg.estimate_grad(lambda x: jnp.sum(x > 0).astype(x.dtype), sg.families.normal(), theta,
                         KEY, num_samples=7_000 * 7, estimator=MV)
    z = mu / sigma
    truth = {"loc": norm.pdf(z) / sigma, "scale": -z / sigma * norm.pdf(z)}
    for k in truth:
        assert_unbiased(r.grad[k], r.stderr[k], truth[k], what=f"step {k}")
        assert_power(r.stderr[k], 0.01, what=f"step {k}")


@pytest.mark.statistical
@pytest.mark.slow  # >= 15 s on 2 cores (mostly compile time)
def test_exponential_and_gamma_rate_closed_forms(x64):
    lam = jnp.array([2.0, 0.5])
    r = sg.estimate_grad(lambda x: jnp.sum(x**2), sg.families.exponential(), lam, KEY,
                         num_samples=30_000, estimator=MV)
    assert_unbiased(r.grad, r.stderr, -4 / lam**3, what="exponential")
    assert_power(r.stderr, 1.0, what="exponential")
    alpha = jnp.array([2.0, 0.6])
    r = sg.estimate_grad(lambda x: jnp.sum(x**2), sg.families.gamma(alpha), {"rate": lam}, KEY,
                         num_samples=30_000, estimator=MV)
    truth = -2 * alpha * (alpha + 1) / lam**3
    assert_unbiased(r.grad["rate"], r.stderr["rate"], truth, what="gamma rate")
    assert_power(r.stderr["rate"], 1.5, what="gamma rate")


@pytest.mark.statistical
@pytest.mark.slow  # >= 15 s on 2 cores (mostly compile time)
def test_expectation_gradient_with_f_closing_over_theta(x64):
    """E[sum(x * loc)] = sum(loc^2): weak part + the direct (pathwise) term = 2 loc."""
    theta = {"loc": jnp.array([0.5, -1.0]), "scale": jnp.array([1.0, 0.5])}

    def loss(th, key):
        return sg.expectation(lambda x: jnp.sum(x * th["loc"]), sg.families.normal(), th, key,
                              num_samples=7 * 500, estimator=MV)

    keys = jax.random.split(KEY, 32)
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(theta, keys)
    for k, truth in {"loc": 2 * theta["loc"], "scale": jnp.zeros(2)}.items():
        mean, se = replicate_stats(grads[k])
        assert_unbiased(mean, se, truth, atol=1e-12, what=k)
        assert_power(se, 0.08, what=k)


@pytest.mark.statistical
@pytest.mark.slow  # >= 15 s on 2 cores (mostly compile time)
def test_coupling_beats_score_function_on_normal_loc(x64):
    theta = {"loc": jnp.array([0.5]), "scale": jnp.array([1.0])}
    f = lambda x: jnp.sum(x**2)  # noqa: E731
    mv = sg.estimate_grad(f, sg.families.normal(), theta, KEY, num_samples=4 * 4000, estimator=MV)
    sf = sg.estimate_grad(f, sg.families.normal(), theta, KEY, num_samples=4 * 4000)
    # per evaluation of f: MV spends 4 per unit, the score function 1
    assert_below(4 * float(mv.variance["loc"][0]) / float(sf.variance["loc"][0]), 1.0,
                 what="work-normalized variance, measure-valued / score function")


@pytest.mark.parametrize(
    "fam, theta, match",
    [
        (sg.families.categorical(), jnp.zeros(3), "no weak-derivative"),
        (sg.families.gamma(), {"concentration": jnp.ones(2), "rate": jnp.ones(2)}, "concentration"),
        (sg.families.beta(), {"a": jnp.ones(2), "b": jnp.ones(2)}, "no weak-derivative"),
        (sg.Family(lambda th, x: jnp.sum(-((x - th) ** 2)),
                   lambda th, key: th + jax.random.normal(key, th.shape)), jnp.zeros(2),
         "no weak-derivative"),
    ],
)
def test_unsupported_family_or_parameter_raises(fam, theta, match):
    with pytest.raises(TypeError, match=match):
        sg.estimate_grad(jnp.sum, fam, theta, KEY, num_samples=60, estimator=MV)
    with pytest.raises(TypeError, match=match):
        jax.grad(lambda th: sg.expectation(jnp.sum, fam, th, KEY, num_samples=60,
                                           estimator=MV))(theta)


def test_num_samples_and_given_samples_errors():
    theta = {"loc": jnp.zeros(3), "scale": jnp.ones(3)}  # 1 + 3 * 3 = 10 evaluations per unit
    with pytest.raises(ValueError, match="multiple of 10"):
        sg.estimate_grad(jnp.sum, sg.families.normal(), theta, KEY, num_samples=64, estimator=MV)
    with pytest.raises(TypeError, match="given samples"):
        sg.estimate_grad_from_samples(jnp.sum, sg.families.bernoulli(), jnp.zeros(2),
                                      jnp.zeros((3, 2)), estimator=MV)


def test_jit_equals_eager_float32():
    theta = jnp.array([0.2, -0.3], jnp.float32)

    def run(th, key):
        return sg.estimate_grad(lambda x: jnp.sum(x * x), sg.families.bernoulli(), th, key,
                                num_samples=30, estimator=MV).grad

    eager, jitted = run(theta, KEY), jax.jit(run)(theta, KEY)
    assert eager.dtype == jnp.float32
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
