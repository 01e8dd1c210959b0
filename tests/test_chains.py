"""Standard errors for draws from Markov chains (batch means, independent chains): issue 18.4.

An AR(1) chain with rho = 0.9 has the stationary law N(mu, sd^2) of the normal family, so the
score-function estimate from its draws is unbiased but its draws are correlated: the i.i.d.
standard error is ~0.3x the spread over independent chains, batch means match it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoregrad as sg

RHO, MU, SD = 0.9, 0.5, 1.0
FAM = sg.families.normal()


def _theta():  # in the dtype of the test (float64 under the x64 fixture)
    return {"loc": jnp.array([MU]), "scale": jnp.array([SD])}


def _f(x):
    return jnp.sum(x**2)


def _chain(key, steps):
    x0 = MU + SD * jax.random.normal(jax.random.fold_in(key, 0), (1,))
    eps = jax.random.normal(key, (steps, 1))

    def step(x, e):
        x = MU + RHO * (x - MU) + SD * np.sqrt(1 - RHO**2) * e
        return x, x

    return jax.lax.scan(step, x0, eps)[1]


def _spread_vs_claimed(num_chains, steps, num_batches):
    def one(k):
        xs = _chain(k, steps)
        r = sg.estimate_grad_from_samples(_f, FAM, _theta(), xs, correlation="batch_means",
                                          num_batches=num_batches)
        i = sg.estimate_grad_from_samples(_f, FAM, _theta(), xs)
        return (r.grad["loc"][0], r.stderr["loc"][0], i.stderr["loc"][0], r.value,
                r.value_stderr)

    keys = jax.random.split(jax.random.key(20261202), num_chains)
    return [np.asarray(a) for a in jax.jit(jax.vmap(one))(keys)]


@pytest.mark.slow
def test_batch_means_stderr_matches_spread_over_independent_chains(x64):
    g, se, se_iid, v, vse = _spread_vs_claimed(300, 4000, 10)
    spread = np.std(g, ddof=1)  # relative SE of this spread: 1/sqrt(2 * 299) = 4%
    assert abs(np.mean(se) / spread - 1) < 0.15, (np.mean(se), spread)
    # power: the i.i.d. standard error fails the same criterion (about 0.3x)
    assert np.mean(se_iid) / spread < 0.5, (np.mean(se_iid), spread)
    assert abs(np.mean(vse) / np.std(v, ddof=1) - 1) < 0.15


def test_batch_means_small(x64):
    # The same check at a size for the default suite, with a 30% band (relative SE of the
    # spread ~ 1/sqrt(2 * 79) = 8%, batch-means bias ~ 5%); i.i.d. SE is rejected.
    g, se, se_iid, _, _ = _spread_vs_claimed(80, 2000, 10)
    spread = np.std(g, ddof=1)
    assert abs(np.mean(se) / spread - 1) < 0.3, (np.mean(se), spread)
    assert np.mean(se_iid) / spread < 0.5


def test_chains_axis_equals_per_chain_spread(x64):
    # correlation="chains": the estimate is the mean over all draws (the i.i.d. estimate of the
    # flattened draws, exactly), the SE that of the mean of the per-chain estimates.
    keys = jax.random.split(jax.random.key(3), 6)
    xs = jax.vmap(lambda k: _chain(k, 500))(keys)  # (chains, steps, 1)
    r = sg.estimate_grad_from_samples(_f, FAM, _theta(), xs, correlation="chains")
    flat = sg.estimate_grad_from_samples(_f, FAM, _theta(), xs.reshape(-1, 1))
    np.testing.assert_allclose(r.grad["loc"], flat.grad["loc"], rtol=1e-10)
    np.testing.assert_allclose(r.value, flat.value, rtol=1e-10)
    per = jax.vmap(lambda c: sg.estimate_grad_from_samples(_f, FAM, _theta(), c).grad["loc"][0])(xs)
    np.testing.assert_allclose(r.stderr["loc"][0], np.std(per, ddof=1) / np.sqrt(6), rtol=1e-8)


def test_correlation_errors():
    xs = jnp.zeros((100, 1))
    with pytest.raises(ValueError, match="correlation"):
        sg.estimate_grad_from_samples(_f, FAM, _theta(), xs, correlation="ar1")
    with pytest.raises(ValueError, match="num_batches"):
        sg.estimate_grad_from_samples(_f, FAM, _theta(), xs, num_batches=4)
    with pytest.raises(ValueError, match="num_batches"):
        sg.estimate_grad_from_samples(_f, FAM, _theta(), xs, correlation="batch_means",
                                      num_batches=1)
    with pytest.raises(ValueError, match="equal"):
        sg.estimate_grad_from_samples(_f, FAM, _theta(), xs, correlation="batch_means",
                                      num_batches=7)
    with pytest.raises(ValueError, match="chains, steps"):
        sg.estimate_grad_from_samples(_f, FAM, _theta(), jnp.zeros((100,)), correlation="chains")
    with pytest.raises(ValueError, match="cross-fitting"):
        sg.estimate_grad_from_samples(_f, FAM, _theta(), xs, correlation="batch_means",
                                      estimator=sg.score_function(sg.baselines.optimal()))


def test_default_num_batches_divides_n_or_says_what_to_do():
    fam = sg.families.bernoulli()
    theta = jnp.asarray([0.3, -0.5])
    xs = jax.vmap(lambda k: fam.sample(theta, k))(jax.random.split(jax.random.key(5), 4000))
    r = sg.estimate_grad_from_samples(lambda b: jnp.sum(b), fam, theta, xs,
                                      correlation="batch_means")  # 4000 = 63.2^2: 50 batches
    assert np.all(np.isfinite(np.asarray(r.stderr)))
    with pytest.raises(ValueError, match="N = 4001 draws do not split into equal batches"):
        sg.estimate_grad_from_samples(lambda b: jnp.sum(b), fam, theta,
                                      jnp.concatenate([xs, xs[:1]]), correlation="batch_means")
