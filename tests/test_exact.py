"""Exact tests: E[estimate] by enumerating every N-tuple of a small discrete support.

For a family with finite support S, the expectation of any function of N i.i.d. draws is a finite
sum over the |S|^N tuples weighted by the product of their probabilities. The tests compare the
enumerated expectation of the estimator (through :func:`scoregrad.estimate_grad_from_samples`)
with the true gradient (enumeration + ``jax.grad``) to rtol 1e-10 in float64.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoregrad as sg
from scoregrad.baselines import MovingAverageState

RTOL = 1e-10


def _from_samples(*args, **kw):
    """sg.estimate_grad_from_samples without the NaN check's debug callback (draws are finite
    here; the callback makes these vmapped programs compile several times slower)."""
    return sg.estimate_grad_from_samples(*args, nan_policy="propagate", **kw)

BERN_THETA = (0.3, -0.7)
CAT_THETA = (0.2, -0.5, 0.9)
CAT_VALUES = (1.0, -2.0, 0.5)


def _bern_f(x):
    return jnp.sum((x - jnp.array([0.45, 0.8], x.dtype)) ** 2) + 3.0 * x[0] * x[1]


def _cat_f(x):
    return jnp.asarray(CAT_VALUES, jnp.float64)[x] ** 2 + jnp.asarray(CAT_VALUES, jnp.float64)[x]


def _cat2_f(x):
    v = jnp.asarray(CAT_VALUES, jnp.float64)
    return v[x[0]] * v[x[1]] + v[x[1]]


def _problem(name):
    """(family, theta, f) for a named problem."""
    if name == "bernoulli":
        return sg.families.bernoulli(), jnp.asarray(BERN_THETA, jnp.float64), _bern_f
    if name == "categorical":
        return sg.families.categorical(), jnp.asarray(CAT_THETA, jnp.float64), _cat_f
    theta = jnp.asarray([CAT_THETA, (0.4, 0.1, -1.2)], jnp.float64)
    return sg.families.categorical(), theta, _cat2_f


def _exact_mean(family, f, support):
    def mean(theta):
        lp = jax.vmap(lambda x: family.log_prob(theta, x))(support)
        return jnp.sum(jnp.exp(lp) * jax.vmap(f)(support))

    return mean


def _tuples(family, theta, n):
    """All n-tuples of the support, shape (|S|^n, n, ...), and their probabilities."""
    support = family.capabilities["support"](theta)
    idx = np.array(list(itertools.product(range(support.shape[0]), repeat=n)))
    tuples = support[idx]
    lp = jax.vmap(jax.vmap(lambda x: family.log_prob(theta, x)))(tuples)
    return support, tuples, jnp.exp(jnp.sum(lp, axis=1))


def _expect(fn, tuples, probs):
    """sum over tuples of probs * fn(tuple), for a pytree-valued fn."""
    vals = jax.jit(jax.vmap(fn))(tuples)
    return jax.tree_util.tree_map(lambda v: jnp.tensordot(probs, v, axes=1), vals)


ESTIMATORS = {
    "plain": lambda: sg.score_function(),
    "none": lambda: sg.score_function(baseline=sg.baselines.none()),
    "loo": lambda: sg.score_function(baseline=sg.baselines.leave_one_out()),
}

CASES = [
    (prob, est, n)
    for prob in ("bernoulli", "categorical")
    for est in ESTIMATORS
    for n in (1, 2, 3)
    if not (est == "loo" and n == 1)
] + [("categorical2", "plain", 2), ("categorical2", "loo", 2)]


@pytest.mark.parametrize("prob,est_name,n", CASES)
def test_expected_gradient_is_exact(x64, prob, est_name, n):
    family, theta, f = _problem(prob)
    support, tuples, probs = _tuples(family, theta, n)
    np.testing.assert_allclose(float(jnp.sum(probs)), 1.0, rtol=RTOL)
    truth = jax.grad(_exact_mean(family, f, support))(theta)
    est = ESTIMATORS[est_name]()
    mean = _expect(
        lambda xs: _from_samples(f, family, theta, xs, estimator=est).grad,
        tuples, probs,
    )
    assert mean.dtype == jnp.float64
    np.testing.assert_allclose(mean, truth, rtol=RTOL, atol=1e-14)
    assert float(jnp.max(jnp.abs(truth))) > 1e-2  # a non-trivial target


def test_expected_value_is_exact(x64):
    family, theta, f = _problem("bernoulli")
    support, tuples, probs = _tuples(family, theta, 2)
    mean = _expect(lambda xs: _from_samples(f, family, theta, xs).value, tuples, probs)
    np.testing.assert_allclose(mean, _exact_mean(family, f, support)(theta), rtol=RTOL)


@pytest.mark.parametrize("prob", ["bernoulli", "categorical"])
@pytest.mark.parametrize("n", [2, 3])
def test_expected_variance_is_exact(x64, prob, n):
    """Plain score function: `variance` is the unbiased sample variance of f(x) * score(x)."""
    family, theta, f = _problem(prob)
    support, tuples, probs = _tuples(family, theta, n)
    _, _, p1 = _tuples(family, theta, 1)
    contrib = jax.vmap(lambda x: f(x) * jax.grad(family.log_prob)(theta, x))(support)
    mean = jnp.tensordot(p1, contrib, axes=1)
    truth = jnp.tensordot(p1, (contrib - mean) ** 2, axes=1)

    def stats(xs):
        r = _from_samples(f, family, theta, xs)
        return r.variance, r.stderr**2 * n

    var, se2n = _expect(stats, tuples, probs)
    np.testing.assert_allclose(var, truth, rtol=RTOL)
    np.testing.assert_allclose(se2n, truth, rtol=RTOL)


# ----------------------------------------------------------------------------- moving average


def _ma_estimate(family, theta, f, decay):
    est = sg.score_function(baseline=sg.baselines.moving_average(decay))

    def run(xs, state):
        return _from_samples(f, family, theta, xs, estimator=est, state=state)

    return est, run


@pytest.mark.parametrize("prob", ["bernoulli", "categorical"])
def test_moving_average_with_given_past_state_is_unbiased(x64, prob):
    family, theta, f = _problem(prob)
    support, tuples, probs = _tuples(family, theta, 2)
    truth = jax.grad(_exact_mean(family, f, support))(theta)
    _, run = _ma_estimate(family, theta, f, 0.9)
    state = MovingAverageState(jnp.asarray(1.7, jnp.float64), jnp.asarray(3, jnp.int32))
    mean = _expect(lambda xs: run(xs, state).grad, tuples, probs)
    np.testing.assert_allclose(mean, truth, rtol=RTOL)


def test_moving_average_two_steps_is_unbiased_at_n2(x64):
    """Regression (issue 3 item 5): the baseline of step 2 is built from step 1's batch only.

    E over both batches (every pair of 2-tuples) of step 2's gradient equals the true gradient;
    the biased variant (the state updated with the current batch before use) is off by exactly the
    factor (1 - 1/N) = 1/2, so this enumeration has the power to tell them apart.
    """
    n = 2
    family, theta, f = _problem("bernoulli")
    support, tuples, probs = _tuples(family, theta, n)
    truth = jax.grad(_exact_mean(family, f, support))(theta)
    est, run = _ma_estimate(family, theta, f, 0.0)
    state0 = est.init(theta)

    def two_steps(prev, cur):
        state1 = run(prev, state0).state
        honest = run(cur, state1).grad
        biased = run(cur, run(cur, state1).state).grad  # updated with `cur` before use
        return honest, biased

    pairs = jax.vmap(lambda p: jax.vmap(lambda c: two_steps(p, c))(tuples))
    honest, biased = jax.jit(pairs)(tuples)
    w = probs[:, None] * probs[None, :]
    e_honest = jnp.tensordot(w, honest, axes=2)
    e_biased = jnp.tensordot(w, biased, axes=2)
    np.testing.assert_allclose(e_honest, truth, rtol=RTOL)
    np.testing.assert_allclose(e_biased, (1.0 - 1.0 / n) * truth, rtol=RTOL)
    assert float(jnp.max(jnp.abs(e_biased - truth))) > 1e-2


def test_current_batch_baseline_is_biased_by_one_minus_one_over_n(x64):
    """A user baseline equal to the current batch mean (not leave-one-out): E = (1 - 1/N) g."""
    current_mean = sg.Baseline(
        name="current_batch_mean",
        num_features=1,
        min_samples=1,
        init=lambda dtype: (),
        features=lambda fi, state: jnp.ones((1,), fi.dtype),
        weights=lambda fstats, state, n: fstats.mean[None],
        update=lambda state, fstats: state,
    )
    est = sg.score_function(baseline=current_mean)
    family, theta, f = _problem("categorical")
    for n in (2, 3):
        support, tuples, probs = _tuples(family, theta, n)
        truth = jax.grad(_exact_mean(family, f, support))(theta)
        mean = _expect(
            lambda xs: _from_samples(f, family, theta, xs, estimator=est).grad,
            tuples, probs,
        )
        np.testing.assert_allclose(mean, (1.0 - 1.0 / n) * truth, rtol=RTOL)


# ----------------------------------------------------------------------------- Hessians


@pytest.mark.parametrize("prob,est_name", [
    ("bernoulli", "plain"), ("bernoulli", "loo"), ("categorical", "plain"), ("categorical", "loo"),
])
def test_expected_dice_hessian_is_exact(x64, prob, est_name):
    """The DiCE surrogate's Hessian (the Jacobian of the gradient estimate in theta, with the
    draws held fixed: the magic box carries the score to every order) is unbiased."""
    n = 3
    family, theta, f = _problem(prob)
    support, tuples, probs = _tuples(family, theta, n)
    truth = jax.hessian(_exact_mean(family, f, support))(theta)
    est = ESTIMATORS[est_name]()

    def hess(xs):
        grad = lambda th: _from_samples(f, family, th, xs, estimator=est).grad  # noqa: E731
        return jax.jacfwd(grad)(theta)

    mean = _expect(hess, tuples, probs)
    np.testing.assert_allclose(mean, truth, rtol=RTOL, atol=1e-14)
    np.testing.assert_allclose(mean, mean.T, rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("est_name", ["plain", "loo"])
def test_expectation_hessian_matches_surrogate_on_same_draws(x64, est_name):
    """jax.grad / jax.hessian of sg.expectation use the same DiCE surrogate as estimate_grad:
    equal for the same key, so the exact tests above cover sg.expectation too."""
    family, theta, f = _problem("bernoulli")
    est = ESTIMATORS[est_name]()
    key = jax.random.key(7)
    kw = dict(num_samples=16, estimator=est)

    def loss(th):
        return sg.expectation(f, family, th, key, **kw)

    def grad(th):
        return sg.estimate_grad(f, family, th, key, **kw).grad

    np.testing.assert_allclose(jax.jit(jax.grad(loss))(theta), jax.jit(grad)(theta), rtol=1e-12)
    np.testing.assert_allclose(
        jax.jit(jax.hessian(loss))(theta), jax.jit(jax.jacfwd(grad))(theta), rtol=1e-12, atol=1e-15
    )
