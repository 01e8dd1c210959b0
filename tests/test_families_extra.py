"""More built-in families: densities against jax.scipy.stats, pathwise against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy import stats
from stats_util import assert_power, assert_unbiased

import scoregrad as sg

KEY = jax.random.key(20240601)


def test_log_probs_match_scipy(x64):
    lr = jnp.array([0.3, -1.0])
    x = jnp.array([2.0, 0.0])
    assert np.isclose(sg.families.poisson().log_prob(lr, x),
                      jnp.sum(stats.poisson.logpmf(x, jnp.exp(lr))), rtol=1e-12)
    rate, xe = jnp.array([2.0, 0.5]), jnp.array([0.3, 1.7])
    assert np.isclose(sg.families.exponential().log_prob(rate, xe),
                      jnp.sum(stats.expon.logpdf(xe, scale=1 / rate)), rtol=1e-12)
    th = {"concentration": jnp.array([2.0, 0.7]), "rate": rate}
    assert np.isclose(sg.families.gamma().log_prob(th, xe),
                      jnp.sum(stats.gamma.logpdf(xe, th["concentration"], scale=1 / rate)), rtol=1e-12)
    assert np.isclose(sg.families.gamma(jnp.array([2.0, 0.7])).log_prob({"rate": rate}, xe),
                      sg.families.gamma().log_prob(th, xe), rtol=1e-12)
    ab, xb = {"a": jnp.array([2.0, 0.5]), "b": jnp.array([3.0, 1.5])}, jnp.array([0.2, 0.9])
    assert np.isclose(sg.families.beta().log_prob(ab, xb),
                      jnp.sum(stats.beta.logpdf(xb, ab["a"], ab["b"])), rtol=1e-12)
    alpha, xd = jnp.array([1.5, 2.0, 0.7]), jnp.array([0.2, 0.5, 0.3])
    assert np.isclose(sg.families.dirichlet().log_prob(alpha, xd),
                      stats.dirichlet.logpdf(xd, alpha), rtol=1e-12)
    tril = jnp.array([[1.5, 0.0], [0.4, 0.7]])
    mvn = {"loc": jnp.array([0.5, -1.0]), "scale_tril": tril}
    xm = jnp.array([0.1, 0.2])
    assert np.isclose(sg.families.multivariate_normal().log_prob(mvn, xm),
                      stats.multivariate_normal.logpdf(xm, mvn["loc"], tril @ tril.T), rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32])
def test_draw_shapes_and_dtypes(dtype):
    cases = [
        (sg.families.poisson(), jnp.zeros(3, dtype), (3,)),
        (sg.families.exponential(), jnp.ones(3, dtype), (3,)),
        (sg.families.gamma(), {"concentration": jnp.ones(3, dtype), "rate": jnp.ones(3, dtype)}, (3,)),
        (sg.families.beta(), {"a": jnp.ones(3, dtype), "b": jnp.ones(3, dtype)}, (3,)),
        (sg.families.dirichlet(), jnp.ones((2, 3), dtype), (2, 3)),
        (sg.families.multivariate_normal(), {"loc": jnp.zeros(3, dtype), "scale_tril": jnp.eye(3, dtype=dtype)}, (3,)),
    ]
    for fam, theta, shape in cases:
        x = fam.sample(theta, KEY)
        assert x.shape == shape and x.dtype == dtype, fam.name
        assert fam.log_prob(theta, x).dtype == dtype, fam.name
    assert sg.families.poisson().reparameterized is False
    assert sg.families.gamma().reparameterized is True
    caps = sg.families.poisson().capabilities
    assert caps.discrete is True and caps.weak_derivative is not None and caps.support is None


def _pathwise(f, fam, theta, n=20_000):
    return sg.estimate_grad(f, fam, theta, KEY, num_samples=n, estimator=sg.pathwise())


def _check(r, truth, bound, what):
    for k in truth:
        assert_unbiased(r.grad[k], r.stderr[k], truth[k], what=f"{what}[{k}]")
        assert_power(r.stderr[k], bound, what=f"{what}[{k}]")


@pytest.mark.statistical
def test_pathwise_gamma_implicit_reparameterization(x64):
    a, b = jnp.array([0.7, 3.0]), jnp.array([2.0, 0.5])
    r = _pathwise(jnp.sum, sg.families.gamma(), {"concentration": a, "rate": b})
    # The rate gradient -a / b^2 reaches -12, and its SE (about 0.049) sat at a bound of 0.05:
    # the seed sweep measured 2.9 SDs of margin. 0.1 still rejects an error of 4%.
    _check(r, {"concentration": 1 / b, "rate": -a / b**2}, 0.1, "gamma")


@pytest.mark.statistical
@pytest.mark.slow  # >= 15 s on 2 cores (mostly compile time)
def test_pathwise_beta_dirichlet_exponential(x64):
    a, b = jnp.array([2.0, 0.5]), jnp.array([3.0, 1.5])
    r = _pathwise(jnp.sum, sg.families.beta(), {"a": a, "b": b})
    _check(r, {"a": b / (a + b) ** 2, "b": -a / (a + b) ** 2}, 0.01, "beta")
    alpha = jnp.array([1.5, 2.0, 0.7])
    r = _pathwise(lambda x: x[0], sg.families.dirichlet(), alpha)
    s = alpha.sum()
    truth = jnp.array([(s - alpha[0]) / s**2, -alpha[0] / s**2, -alpha[0] / s**2])
    assert_unbiased(r.grad, r.stderr, truth, what="dirichlet")
    assert_power(r.stderr, 0.01, what="dirichlet")
    lam = jnp.array([2.0, 0.5])
    r = _pathwise(jnp.sum, sg.families.exponential(), lam)
    assert_unbiased(r.grad, r.stderr, -1 / lam**2, what="exponential")
    assert_power(r.stderr, 0.1, what="exponential")


@pytest.mark.statistical
def test_pathwise_multivariate_normal(x64):
    tril = jnp.array([[1.5, 0.3], [0.4, 0.7]])  # the 0.3 above the diagonal is ignored
    theta = {"loc": jnp.array([0.5, -1.0]), "scale_tril": tril}
    r = _pathwise(lambda x: jnp.sum(x**2), sg.families.multivariate_normal(), theta)
    _check(r, {"loc": 2 * theta["loc"], "scale_tril": 2 * jnp.tril(tril)}, 0.05, "mvn")
    assert float(jnp.abs(r.grad["scale_tril"][0, 1])) == 0.0


@pytest.mark.statistical
@pytest.mark.slow  # measured 20-30 s per case on 2 cores
def test_score_function_poisson_closed_form(x64):
    lr = jnp.array([0.3, -1.0])
    lam = jnp.exp(lr)
    r = sg.estimate_grad(lambda x: jnp.sum(x**2), sg.families.poisson(), lr, KEY,
                         num_samples=40_000)
    assert_unbiased(r.grad, r.stderr, lam * (1 + 2 * lam), what="poisson score")
    assert_power(r.stderr, 0.2, what="poisson score")


def test_pathwise_refuses_poisson():
    with pytest.raises(TypeError, match="reparameterized=False"):
        _pathwise(jnp.sum, sg.families.poisson(), jnp.zeros(2), n=10)


@pytest.mark.parametrize(
    "fam, theta, err",
    [
        (sg.families.poisson(), {"rate": jnp.ones(2)}, TypeError),
        (sg.families.gamma(), {"rate": jnp.ones(2)}, TypeError),
        (sg.families.gamma(), {"concentration": jnp.ones(2), "rate": jnp.ones(3)}, ValueError),
        (sg.families.gamma(2.0), {"concentration": jnp.ones(2), "rate": jnp.ones(2)}, TypeError),
        (sg.families.beta(), {"a": jnp.ones(2)}, TypeError),
        (sg.families.dirichlet(), jnp.ones(()), ValueError),
        (sg.families.dirichlet(), jnp.ones((3, 1)), ValueError),
        (sg.families.multivariate_normal(), {"loc": jnp.zeros(2), "scale_tril": jnp.eye(3)}, ValueError),
        (sg.families.multivariate_normal(), {"loc": jnp.zeros(2)}, TypeError),
    ],
)
def test_bad_theta(fam, theta, err):
    with pytest.raises(err, match=f"families.{fam.name}"):
        sg.estimate_grad(jnp.sum, fam, theta, KEY, num_samples=4)
