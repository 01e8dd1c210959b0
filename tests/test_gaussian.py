"""Closed-form Gaussian cases: unbiasedness within 5 SE, honest standard errors, and the
equivalence of sg.expectation's gradient with sg.estimate_grad's (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_util import stateful  # noqa: E402
from stats_util import (
    assert_close_rel,
    assert_power,
    assert_rejects,
    assert_unbiased,
    replicate_stats,
)

import scoregrad as sg

LOC = (0.5, -0.3)
SCALE = (1.0, 0.7)
NUM_SAMPLES = 256
REPS = 1000


def _theta():
    return {"loc": jnp.asarray(LOC, jnp.float64), "scale": jnp.asarray(SCALE, jnp.float64)}


# Integrands h(x) summed over coordinates, with E[h(x)] for x ~ N(m, s^2) in closed form.
K_SQ, K_EXP, K_COS = -1.0, 0.6, 1.3
CASES = {
    "square": (
        lambda x: jnp.sum((x - K_SQ) ** 2),
        lambda m, s: jnp.sum((m - K_SQ) ** 2 + s**2),
    ),
    "gauss_bump": (
        lambda x: jnp.sum(jnp.exp(-K_EXP * x**2)),
        lambda m, s: jnp.sum(jnp.exp(-K_EXP * m**2 / (1 + 2 * K_EXP * s**2))
                             / jnp.sqrt(1 + 2 * K_EXP * s**2)),
    ),
    "cosine": (
        lambda x: jnp.sum(jnp.cos(K_COS * x)),
        lambda m, s: jnp.sum(jnp.cos(K_COS * m) * jnp.exp(-0.5 * K_COS**2 * s**2)),
    ),
}


def _truth(case):
    closed = CASES[case][1]
    return jax.grad(lambda th: closed(th["loc"], th["scale"]))(_theta())


ESTIMATORS = {
    "score": lambda: sg.score_function(),
    "score_loo": lambda: sg.score_function(baseline=sg.baselines.leave_one_out()),
    "score_ma": lambda: sg.score_function(baseline=sg.baselines.moving_average(0.5)),
    "pathwise": lambda: sg.pathwise(),
}


# The default nan_policy="raise" adds a jax.debug.callback that makes these vmapped programs
# compile several times slower; these tests are about the statistics, so they skip it.
NAN = "propagate"


def _replicates(est, f, key, reps=REPS, num_samples=NUM_SAMPLES):
    """estimate_grad over `reps` independent keys (vmap). For a stateful estimator the state
    comes from a previous estimate on an independent key, as in a training loop."""
    fam, theta = sg.families.normal(), _theta()

    def one(k):
        k_prev, k_cur = jax.random.split(k)
        state = None
        if stateful(est):
            state = sg.estimate_grad(f, fam, theta, k_prev, num_samples=num_samples,
                                     estimator=est, nan_policy=NAN).state
        return sg.estimate_grad(f, fam, theta, k_cur, num_samples=num_samples, estimator=est,
                                state=state, nan_policy=NAN)

    return jax.jit(jax.vmap(one))(jax.random.split(key, reps))


def _leaves(tree):
    return np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree_util.tree_leaves(tree)])


def _row(tree, i):
    return _leaves(jax.tree_util.tree_map(lambda a: a[i], tree))


@pytest.mark.statistical
@pytest.mark.parametrize("est_name", list(ESTIMATORS))
def test_unbiased_and_stderr_calibrated(x64, est_name):
    est = ESTIMATORS[est_name]()
    fs = [CASES[c][0] for c in CASES]
    runs = jax.jit(lambda key: [_replicates(est, f, k) for f, k in
                                zip(fs, jax.random.split(key, len(fs)))])(jax.random.key(2024))
    for case, r in zip(CASES, runs):
        truth = _leaves(_truth(case))
        grads = np.stack([_row(r.grad, i) for i in range(REPS)])
        mean, se = replicate_stats(grads)
        what = f"{est_name} on {case}"
        assert_unbiased(mean, se, truth, what=what)
        # Power: the test would reject an answer 12% (plus 0.01) off the truth. (At 10% the bound
        # sat at the plain score function's typical SE on "square"; the seed sweep failed it in
        # 2 of 4 seeds. SE itself varies by ~2% across seeds at 1000 replicates.)
        assert_power(se, (0.12 * np.abs(truth) + 0.01) / 5, what=what)
        # The claimed standard error matches the spread over independent keys within 30%.
        claimed = np.stack([_row(r.stderr, i) for i in range(REPS)]).mean(0)
        assert_close_rel(claimed, grads.std(0, ddof=1), 0.3, what=what + " stderr")
        # The value is the plain MC mean of f: unbiased for the closed form.
        vmean, vse = replicate_stats(np.asarray(r.value))
        closed = CASES[case][1](_theta()["loc"], _theta()["scale"])
        assert_unbiased(vmean, vse, closed, what=what + " value")


@pytest.mark.parametrize("est_name", ["score", "score_loo", "pathwise"])
def test_grad_of_expectation_equals_estimate_grad(x64, est_name):
    est = ESTIMATORS[est_name]()
    f, _ = CASES["gauss_bump"]
    fam, key = sg.families.normal(), jax.random.key(3)

    def both(theta):
        loss = lambda th: sg.expectation(f, fam, th, key, num_samples=100, estimator=est)  # noqa: E731
        value, grad = jax.value_and_grad(loss)(theta)
        r = sg.estimate_grad(f, fam, theta, key, num_samples=100, estimator=est)
        return value, grad, r.value, r.grad

    value, grad, r_value, r_grad = jax.jit(both)(_theta())
    np.testing.assert_allclose(value, r_value, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(r_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_moving_average_in_expectation_with_state_equals_estimate_grad(x64):
    est = ESTIMATORS["score_ma"]()
    f, _ = CASES["square"]
    fam = sg.families.normal()
    key = jax.random.key(2)

    def both(theta):
        state = sg.estimate_grad(f, fam, theta, jax.random.key(1), num_samples=64,
                                 estimator=est, state=est.init(theta)).state

        def loss(th, st):
            return sg.expectation_with_state(f, fam, th, key, st, num_samples=64, estimator=est)

        out = jax.value_and_grad(loss, has_aux=True)(theta, state)
        return out, sg.estimate_grad(f, fam, theta, key, num_samples=64, estimator=est,
                                     state=state)

    ((value, new_state), g), r = jax.jit(both)(_theta())
    np.testing.assert_allclose(value, r.value, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves((g, new_state)),
                    jax.tree_util.tree_leaves((r.grad, r.state))):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert int(new_state.steps) == 2


C_SHIFT = 0.5


def _f_closing_over(theta):
    """f(x; theta) = sum (x - c * loc)^2, so E = (1 - c)^2 loc^2 + scale^2 (summed)."""
    return lambda x: jnp.sum((x - C_SHIFT * theta["loc"]) ** 2)


@pytest.mark.statistical
@pytest.mark.parametrize("est_name", ["score", "score_loo", "pathwise"])
def test_f_closing_over_theta_gets_its_pathwise_term(x64, est_name):
    est = ESTIMATORS[est_name]()
    fam = sg.families.normal()

    def grad_one(key):
        return jax.grad(lambda th: sg.expectation(_f_closing_over(th), fam, th, key,
                                                  num_samples=NUM_SAMPLES, estimator=est,
                                                  nan_policy=NAN))(_theta())

    g = jax.jit(jax.vmap(grad_one))(jax.random.split(jax.random.key(11), REPS))
    th = _theta()
    truth = np.concatenate([2 * (1 - C_SHIFT) ** 2 * np.asarray(th["loc"]),
                            2 * np.asarray(th["scale"])])
    # Without the term through f the loc gradient would be 2 (1 - c) loc.
    wrong = np.concatenate([2 * (1 - C_SHIFT) * np.asarray(th["loc"]), truth[2:]])
    grads = np.concatenate([np.asarray(g["loc"]), np.asarray(g["scale"])], axis=1)
    mean, se = replicate_stats(grads)
    assert_unbiased(mean, se, truth, what=est_name)
    assert_rejects(mean, se, wrong, what=f"{est_name}: without the term through f")
