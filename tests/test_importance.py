"""Importance-weighted score function, plain and self-normalized, with ESS (issue 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stats_util import assert_close_rel, assert_power, assert_unbiased, replicate_stats

import scoregrad as sg

FAM = sg.families.normal()
P = {"loc": jnp.array([0.5, -0.3]), "scale": jnp.array([1.0, 0.8])}
Q = {"loc": jnp.array([0.0, 0.0]), "scale": jnp.array([1.5, 1.5])}


def _f(x):
    return jnp.sum(x**2)


def _truth():
    return np.concatenate([2 * np.asarray(P["loc"]), 2 * np.asarray(P["scale"])])


def _flat(tree):
    return np.concatenate([np.asarray(tree["loc"]), np.asarray(tree["scale"])], axis=-1)


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def test_importance_weighted_exact_by_enumeration(x64):
    fam = sg.families.bernoulli()
    logits, q_logits = jnp.array([0.4, -1.0]), jnp.array([-0.5, 0.7])
    support = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    q = jax.nn.sigmoid(q_logits)
    probs = jnp.prod(jnp.where(support == 1.0, q, 1 - q), axis=1)
    est = sg.importance.importance_weighted(fam, q_logits)
    f = lambda x: x[0] + 3.0 * x[0] * x[1]  # noqa: E731
    g = jax.vmap(lambda x: sg.estimate_grad_from_samples(f, fam, logits, x[None], estimator=est).grad)(support)
    exact = jax.grad(lambda th: jax.nn.sigmoid(th[0]) * (1 + 3 * jax.nn.sigmoid(th[1])))(logits)
    np.testing.assert_allclose(probs @ g, exact, rtol=1e-10)


@pytest.mark.statistical
@pytest.mark.parametrize("self_normalized", [False, True])
def test_unbiased_and_honest_stderr(x64, self_normalized):
    # 400 replicates: at 64 the spread over replicates is itself too noisy for a 30% comparison
    # with the claimed SE (the seed sweep saw it off by 39%).
    keys = jax.random.split(jax.random.key(8), 400)
    run = jax.jit(jax.vmap(lambda k: sg.importance.estimate_grad_importance(
        _f, FAM, _f64(P), proposal=FAM, proposal_theta=_f64(Q), key=k, num_samples=512,
        self_normalized=self_normalized)))
    r = run(keys)
    g = _flat(r.grad)
    m, se = replicate_stats(g)
    assert_unbiased(m, se, _truth(), atol=0.01 if self_normalized else 0.0, what="IS")
    assert_power(se, 0.1, what="IS")
    spread = np.std(g, axis=0, ddof=1)
    assert_close_rel(np.mean(_flat(r.stderr), 0), spread, 0.3, what="claimed SE vs spread")


@pytest.mark.statistical
@pytest.mark.slow  # >= 15 s on 2 cores (mostly compile time)
def test_ess_closed_form(x64):
    r = sg.importance.estimate_grad_importance(_f, FAM, _f64(P), proposal=FAM, proposal_theta=_f64(Q),
                                               key=jax.random.key(1), num_samples=20_000)
    # E_q[w^2] for normals, per coordinate: s_q^2 / (s_p sqrt(2 s_q^2 - s_p^2)) exp((mu_p - mu_q)^2 / (2 s_q^2 - s_p^2))
    sp, sq, mu = (np.asarray(P["scale"]), np.asarray(Q["scale"]), np.asarray(P["loc"] - Q["loc"]))
    ew2 = np.prod(sq**2 / (sp * np.sqrt(2 * sq**2 - sp**2)) * np.exp(mu**2 / (2 * sq**2 - sp**2)))
    assert_close_rel(float(r.ess) / 20_000, 1 / ew2, 0.1, what="ESS / N vs 1 / E_q[w^2]")
    same = sg.importance.estimate_grad_importance(_f, FAM, _f64(P), proposal=FAM, proposal_theta=_f64(P),
                                                  key=jax.random.key(1), num_samples=100)
    np.testing.assert_allclose(float(same.ess), 100.0, rtol=1e-10)


def test_given_samples_and_log_space(x64):
    far = {"loc": jnp.full(50, 4.0), "scale": jnp.ones(50)}
    xs = jax.random.normal(jax.random.key(2), (64, 50))
    r = sg.importance.estimate_grad_importance(_f, FAM, _f64(far), proposal=FAM,
                                               proposal_theta=_f64({"loc": jnp.zeros(50), "scale": jnp.ones(50)}),
                                               samples=xs)
    assert np.all(np.isfinite(_flat(r.grad))) and 1.0 <= float(r.ess) < 64


def test_bad_arguments():
    with pytest.raises(TypeError, match="proposal"):
        sg.importance.importance_weighted("q", jnp.zeros(2))
    with pytest.raises(TypeError, match="exactly one"):
        sg.importance.estimate_grad_importance(_f, FAM, P, proposal=FAM, proposal_theta=Q)
