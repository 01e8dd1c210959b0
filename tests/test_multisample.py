"""sg.rloo(K) and sg.vimco(K): exact enumeration over all K-tuples, CRN variance, Hessians."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stats_util import Z, assert_below, assert_power

import scoregrad as sg
from scoregrad._src.base import Model, Params

KEY = jax.random.key(777)
BERN = sg.families.bernoulli()


def _model(f_theta):
    """A Model whose f depends on theta through params.f, as closure conversion builds it."""
    return Model(f=f_theta, log_prob=BERN.log_prob, sample=BERN.sample, family=BERN,
                 legacy_key=False)


def _tuples(k, d):
    rows = np.array(list(itertools.product([0.0, 1.0], repeat=k * d)))
    return jnp.asarray(rows.reshape(-1, k, d))


def _unit(est, model, params, xs):
    """One unit of ``est`` on the given group ``xs`` (K draws stacked), through its plan."""
    plan = sg.bind(est, BERN, params.theta).plan
    return plan.unit(model, params, sg.Draws(model, params, x=xs), ())


def _enumerated(est, f_theta, theta, k, order):
    """(E[value], E[grad or Hessian]) of one unit over all K-tuples of D Bernoullis."""
    model = _model(f_theta)
    xs = _tuples(k, theta.shape[0])

    def term(th, x):
        return _unit(est, model, Params(th, (th,)), x).terms[0]

    deriv = jax.grad(term) if order == 1 else jax.hessian(term)
    probs = jnp.exp(jax.vmap(lambda x: jnp.sum(jax.vmap(lambda xi: BERN.log_prob(theta, xi))(x)))(xs))
    values = jax.vmap(lambda x: _unit(est, model, Params(theta, (theta,)), x).fvals)(xs)
    return jnp.tensordot(probs, values, 1), jnp.tensordot(probs, jax.vmap(deriv, (None, 0))(theta, xs), 1)


def _exact_objective(per_tuple, theta, k):
    """theta -> sum over K-tuples of p(tuple; theta) * per_tuple(tuple, theta)."""
    xs = _tuples(k, theta.shape[0])

    def objective(th):
        lp = jax.vmap(lambda x: jnp.sum(jax.vmap(lambda xi: BERN.log_prob(th, xi))(x)))(xs)
        return jnp.sum(jnp.exp(lp) * jax.vmap(lambda x: per_tuple(x, th))(xs))

    return objective


def f_toy(x, th):
    return jnp.sum((x - 0.45) ** 2) + 0.7 * x[0] * x[1] + 0.3 * jnp.sum(th * x)


@pytest.mark.parametrize("order", [1, 2])
def test_rloo_exact_gradient_and_hessian(x64, order):
    theta, k = jnp.array([0.7, -0.4]), 3
    est = sg.rloo(k)
    value, got = _enumerated(est, f_toy, theta, k, order)
    exact = _exact_objective(lambda x, th: jnp.mean(jax.vmap(lambda xi: f_toy(xi, th))(x)), theta, k)
    truth = jax.grad(exact)(theta) if order == 1 else jax.hessian(exact)(theta)
    np.testing.assert_allclose(got, truth, rtol=1e-10)
    np.testing.assert_allclose(jnp.mean(value), exact(theta), rtol=1e-10)


def _lme(x, th):
    f = jax.vmap(lambda xi: f_toy(xi, th) - 0.5 * BERN.log_prob(th, xi))(x)
    return jax.nn.logsumexp(f) - jnp.log(f.shape[0])


@pytest.mark.parametrize("order", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_vimco_exact_value_gradient_hessian(x64, order):
    theta, k = jnp.array([0.7, -0.4]), 3
    est = sg.vimco(k)
    f = lambda x, th: f_toy(x, th) - 0.5 * BERN.log_prob(th, x)  # noqa: E731  a log-weight
    value, got = _enumerated(est, f, theta, k, order)
    exact = _exact_objective(_lme, theta, k)
    truth = jax.grad(exact)(theta) if order == 1 else jax.hessian(exact)(theta)
    np.testing.assert_allclose(got, truth, rtol=1e-10)
    np.testing.assert_allclose(value[0], exact(theta), rtol=1e-10)


def _group_draws(theta, key, groups, k):
    """The draws the engine gives rloo/vimco: unit g uses fold_in(key, g), draw j fold_in(., j)."""
    def one(g):
        unit_key = jax.random.fold_in(key, g)
        return jax.vmap(lambda j: BERN.sample(theta, jax.random.fold_in(unit_key, j)))(
            jnp.arange(k, dtype=jnp.uint32))
    return jax.vmap(one)(jnp.arange(groups, dtype=jnp.uint32))


@pytest.mark.parametrize("make", [sg.rloo, pytest.param(sg.vimco, marks=pytest.mark.slow)])
def test_public_api_matches_units_on_the_same_draws(x64, make):
    theta, k, groups = jnp.array([0.7, -0.4]), 4, 5
    est = make(k)

    def loss(th):
        return sg.expectation(lambda x: f_toy(x, th), BERN, th, KEY, num_samples=k * groups,
                              estimator=est)

    draws = _group_draws(theta, jax.random.wrap_key_data(jax.random.key_data(KEY)), groups, k)
    model = _model(f_toy)
    term = lambda th, x: _unit(est, model, Params(th, (th,)), x).terms[0]  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss)(theta),
                               jnp.mean(jax.vmap(jax.grad(term), (None, 0))(theta, draws), 0),
                               rtol=1e-9)
    np.testing.assert_allclose(jax.hessian(loss)(theta),
                               jnp.mean(jax.vmap(jax.hessian(term), (None, 0))(theta, draws), 0),
                               rtol=1e-9)
    r = sg.estimate_grad(lambda x: f_toy(x, theta), BERN, theta, KEY, num_samples=k * groups,
                         estimator=est)
    assert r.num_samples == k * groups
    np.testing.assert_allclose(r.value, loss(theta), rtol=1e-12)


@pytest.mark.statistical
@pytest.mark.parametrize("t", [0.45, pytest.param(0.499, marks=pytest.mark.slow)])
def test_rloo_variance_below_reinforce_common_random_numbers(x64, t):
    """Bernoulli toy E[(b - t)^2]: RLOO-4 and REINFORCE on the SAME draws, 5-SE margin."""
    theta, k, groups, reps = jnp.array([0.3]), 4, 8, 100
    f = lambda x: jnp.sum((x - t) ** 2)  # noqa: E731
    p = jax.nn.sigmoid(theta)
    truth = (1 - 2 * t) * p * (1 - p)

    def one(key):
        r = sg.estimate_grad(f, BERN, theta, key, num_samples=k * groups, estimator=sg.rloo(k))
        draws = _group_draws(theta, key, groups, k).reshape(k * groups, 1)
        s = sg.estimate_grad_from_samples(f, BERN, theta, draws)
        return r.grad[0], s.grad[0]

    a, b = jax.vmap(one)(jax.random.split(KEY, reps))
    sa, sb = (np.asarray(a) - float(truth[0])) ** 2, (np.asarray(b) - float(truth[0])) ** 2
    ratio = sa.mean() / sb.mean()
    cov = np.cov(np.stack([sa, sb]))
    grad = np.array([1 / sb.mean(), -sa.mean() / sb.mean() ** 2])
    se = float(np.sqrt(grad @ cov @ grad / reps))
    assert_below(ratio + Z * se, 1.0, what=f"MSE RLOO / MSE REINFORCE + 5 SE, t={t}")
    assert_power(se, 0.1, what="SE of the MSE ratio")


def test_errors():
    for make, arg in [(sg.rloo, "group_size"), (sg.vimco, "num_particles")]:
        with pytest.raises(ValueError, match=arg):
            make(1)
        with pytest.raises(TypeError, match=arg):
            make(2.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        sg.estimate_grad(jnp.sum, BERN, jnp.zeros(2), KEY, num_samples=6, estimator=sg.rloo(4))
    with pytest.raises(ValueError, match="multiple of 2"):  # given: groups of K samples
        sg.estimate_grad_from_samples(jnp.sum, BERN, jnp.zeros(2), jnp.zeros((5, 2)),
                                      estimator=sg.vimco(2))


def _f_plain(x):
    return jnp.sum((x - 0.45) ** 2) + 0.7 * x[0] * x[1]


def test_given_samples_are_groups_of_k(x64):
    # K consecutive given samples form a group: the same estimate as drawing those groups.
    theta = jnp.array([0.3, -0.4])
    for est, k in [(sg.rloo(4), 4), (sg.vimco(3), 3)]:
        r = sg.estimate_grad(_f_plain, BERN, theta, KEY, num_samples=6 * k, estimator=est)
        xs = _group_draws(theta, jax.random.wrap_key_data(jax.random.key_data(KEY)), 6, k)
        xs = xs.reshape(6 * k, -1)
        g = sg.estimate_grad_from_samples(_f_plain, BERN, theta, xs, estimator=est)
        np.testing.assert_allclose(g.grad, r.grad, rtol=1e-10)
        np.testing.assert_allclose(g.value, r.value, rtol=1e-10)
