"""Typed family capabilities: adapted numpyro/distrax Bernoulli and Categorical families work with
every estimator a built-in one does (same key, same result), and a family without the capability
an estimator needs gets a TypeError naming it."""

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from model_util import stateful  # noqa: E402

import scoregrad as sg

KEY = jax.random.key(3)
LOGITS = jnp.array([0.3, -0.5, 1.1])
CAT_LOGITS = jnp.array([[0.2, -0.4, 0.9], [1.0, 0.0, -1.0]])
WEIGHTS = jnp.array([1.0, -2.0, 0.5])


def f_bern(x):
    return jnp.sum(WEIGHTS * (x - 0.45) ** 2)


def f_cat(y):  # y: integer draws (..,) or one-hot / simplex points (.., K)
    values = jnp.array([0.5, -1.0, 2.0])
    if jnp.issubdtype(y.dtype, jnp.integer):
        return jnp.sum(values[y])
    return jnp.sum(y * values)


ADAPTED_BERNOULLI = {
    "distrax": lambda: sg.families.from_distrax(lambda th: distrax.Bernoulli(logits=th), LOGITS),
    "numpyro": lambda: sg.families.from_numpyro(lambda th: dist.Bernoulli(logits=th), LOGITS),
}
ADAPTED_CATEGORICAL = {
    "distrax": lambda: sg.families.from_distrax(lambda th: distrax.Categorical(logits=th), CAT_LOGITS),
    "numpyro": lambda: sg.families.from_numpyro(lambda th: dist.Categorical(logits=th), CAT_LOGITS),
}

BERNOULLI_ESTIMATORS = {
    "arm": (sg.arm, 8),
    "disarm": (sg.disarm, 8),
    "rebar": (lambda: sg.rebar(learn=False), 8),
    "relax": (lambda: sg.relax(), 8),
    "gumbel_softmax": (lambda: sg.gumbel_softmax(0.5), 8),
    "straight_through": (sg.straight_through, 8),
    "straight_through_gumbel": (lambda: sg.straight_through_gumbel(0.5), 8),
    "enumerate": (sg.enumerate, 8),
    "indecater": (sg.indecater, 12),
    "antithetic": (lambda: sg.sampling.antithetic(sg.score_function()), 8),
    "stratified": (lambda: sg.sampling.stratified(sg.score_function(), num_strata=4), 8),
    "measure_valued": (sg.measure_valued, 8),
}
CATEGORICAL_ESTIMATORS = {
    "gumbel_softmax": (lambda: sg.gumbel_softmax(0.5), 8),
    "straight_through": (sg.straight_through, 8),
    "enumerate": (sg.enumerate, 9),
    "indecater": (sg.indecater, 12),
    "antithetic": (lambda: sg.sampling.antithetic(sg.score_function()), 8),
}


def _run(f, family, theta, make, n):
    est = make()
    state = est.init(theta) if stateful(est) else None
    return sg.estimate_grad(f, family, theta, KEY, num_samples=n, estimator=est, state=state)


def _same(a, b):
    np.testing.assert_allclose(float(a.value), float(b.value), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a.grad), np.asarray(b.grad), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lib", sorted(ADAPTED_BERNOULLI))
@pytest.mark.parametrize("name", sorted(BERNOULLI_ESTIMATORS))
def test_adapted_bernoulli_matches_builtin(lib, name):
    make, n = BERNOULLI_ESTIMATORS[name]
    want = _run(f_bern, sg.families.bernoulli(), LOGITS, make, n)
    got = _run(f_bern, ADAPTED_BERNOULLI[lib](), LOGITS, make, n)
    _same(got, want)


@pytest.mark.parametrize("lib", sorted(ADAPTED_CATEGORICAL))
@pytest.mark.parametrize("name", sorted(CATEGORICAL_ESTIMATORS))
def test_adapted_categorical_matches_builtin(lib, name):
    make, n = CATEGORICAL_ESTIMATORS[name]
    want = _run(f_cat, sg.families.categorical(), CAT_LOGITS, make, n)
    got = _run(f_cat, ADAPTED_CATEGORICAL[lib](), CAT_LOGITS, make, n)
    _same(got, want)


def test_adapted_bernoulli_with_probs_chain_rule():
    """theta need not be the logits: the gradient flows through the distribution's parameters."""
    probs = jax.nn.sigmoid(LOGITS)
    fam = sg.families.from_numpyro(lambda p: dist.Bernoulli(probs=p), probs)
    exact = sg.estimate_grad(f_bern, fam, probs, KEY, num_samples=8, estimator=sg.enumerate())
    for est in (sg.arm(), sg.disarm()):
        r = sg.estimate_grad(f_bern, fam, probs, KEY, num_samples=20_000, estimator=est)
        assert np.all(np.abs(np.asarray(r.grad - exact.grad)) <= 5 * np.asarray(r.stderr) + 1e-6)


def test_adapted_normal_capabilities_match_builtin():
    theta = {"loc": jnp.array([0.5, -1.0]), "scale": jnp.array([1.0, 2.0])}
    fams = [
        sg.families.from_numpyro(lambda th: dist.Normal(th["loc"], th["scale"]), theta),
        sg.families.from_distrax(lambda th: distrax.Normal(th["loc"], th["scale"]), theta,
                                 reparameterized=True),
    ]
    f = lambda x: jnp.sum(x**2)  # noqa: E731
    for make in (lambda: sg.sampling.antithetic(sg.score_function()),
                 lambda: sg.sampling.antithetic(sg.pathwise()),
                 lambda: sg.control_variates.with_control_variates(
                     sg.score_function(), sg.control_variates.delta_method(f))):
        want = _run(f, sg.families.normal(), theta, make, 16)
        for fam in fams:
            got = _run(f, fam, theta, make, 16)
            np.testing.assert_allclose(float(got.value), float(want.value), rtol=1e-5)
            for k in theta:
                np.testing.assert_allclose(np.asarray(got.grad[k]), np.asarray(want.grad[k]),
                                           rtol=1e-5, atol=1e-5)


def _user_family():
    return sg.Family(
        log_prob=lambda th, x: jnp.sum(jax.scipy.stats.norm.logpdf(x, th, 1.0)),
        sample=lambda th, key: th + jax.random.normal(key, jnp.shape(th)),
        name="mine",
    )


@pytest.mark.parametrize("est, capability", [
    (sg.arm(), "bernoulli_logits"),
    (sg.disarm(), "bernoulli_logits"),
    (sg.rebar(learn=False), "bernoulli_logits"),
    (sg.gumbel_softmax(0.5), "bernoulli_logits or categorical_logits"),
    (sg.straight_through(), "bernoulli_logits or categorical_logits"),
    (sg.indecater(), "categorical_logits or bernoulli_logits"),
    (sg.enumerate(), "support"),
    (sg.measure_valued(), "weak_derivative"),
    (sg.sampling.antithetic(sg.score_function()), "inverse_cdf"),
    (sg.sampling.qmc(sg.score_function(), block_size=4), "inverse_cdf"),
    (sg.control_variates.with_control_variates(
        sg.score_function(), sg.control_variates.delta_method(lambda x: jnp.sum(x))), "moments"),
    (sg.control_variates.rao_blackwell(lambda x: x), "log_prob_terms"),
], ids=lambda v: getattr(v, "name", v))
def test_missing_capability_is_named(est, capability):
    with pytest.raises(TypeError, match=f"family.capabilities.{capability}.*'mine' has none"):
        sg.estimate_grad(lambda x: jnp.sum(x), _user_family(), jnp.zeros(2), KEY,
                         num_samples=8, estimator=est)


def test_mapping_capabilities_are_converted():
    support = lambda th: jnp.array([[0.0], [1.0]])  # noqa: E731
    fam = sg.Family(log_prob=lambda th, x: jnp.sum(x * th), sample=lambda th, k: jnp.zeros(1),
                    capabilities={"kind": "mine", "support": support, "discrete": True})
    caps = fam.capabilities
    assert isinstance(caps, sg.Capabilities)
    assert caps.support is support and caps.discrete is True and caps.inverse_cdf is None
    assert caps["support"] is support and "support" in caps and "inverse_cdf" not in caps
    with pytest.raises(KeyError):
        caps["kind"]
    with pytest.raises(TypeError, match="Capabilities"):
        sg.Family(log_prob=lambda th, x: 0.0, sample=lambda th, k: 0.0, capabilities=3)
