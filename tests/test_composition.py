"""Wrappers x estimators: each combination gives the inner estimator's expectation or is refused.

* Binding (``Estimator.bind``: measure-valued, enumerate, IndeCateR depend on the family and
  theta's shapes) never drops a wrapper: wrappers are Plan -> Plan maps inside ``bind``.
* A control variate h is the wrapped estimator applied to h on the same draws, minus the gradient
  of h's known mean. Every estimator here is linear in its integrand (REBAR with fixed eta and
  temperature too), so with a fixed coefficient c the estimate equals, for the same key, the
  plain estimator of f - c h plus c grad mean(h), to rounding: the control variate inherits the
  estimator's (exact, quadrature- or enumeration-tested) unbiasedness. Biased estimators and
  other objectives are refused.
* Sampling designs reach every uniform a unit draws through its ``Draws`` (the family's draw and
  the estimator's own noise); estimators that draw with a raw key or in groups are refused at
  trace time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stats_util import assert_power, assert_rejects, assert_unbiased

import scoregrad as sg
from scoregrad import control_variates as cv
from scoregrad import sampling

BERN = sg.families.bernoulli()
NORMAL = sg.families.normal()
THETA = jnp.array([0.3, -0.5])


def f_bern(b):  # not separable: measure-valued and IndeCateR have variance
    return (b[0] - 0.45) ** 2 * (1.0 + b[1]) + 0.3 * b[0] * b[1]


def h_fn(b, th):  # depends on theta directly as well
    return jnp.sum(b * jnp.tanh(th))


def h_mean(th):
    return jnp.sum(jax.nn.sigmoid(th) * jnp.tanh(th))


H = cv.control_variate(h_fn, h_mean, name="h")


def _truth(f, theta):
    return sg.estimate_grad(f, BERN, theta, jax.random.key(0), num_samples=4,
                            estimator=sg.enumerate()).grad


# ---------------------------------------------------------------- 1. binding keeps the wrapper


def test_specialize_reapplies_control_variates():
    for inner, cost in [(sg.measure_valued(), 3), (sg.enumerate(), 4), (sg.indecater(), 4)]:
        est = cv.with_control_variates(inner, H, coefficient=0.5)
        bound = sg.bind(est, BERN, THETA)
        assert bound.num_terms == 2 and bound.draws_per_unit == cost, bound
        assert bound.name.endswith("+cv[h]")
        nested = cv.with_control_variates(est, cv.delta_method(f_bern), coefficient=0.5)
        assert sg.bind(nested, BERN, THETA).num_terms == 3


@pytest.mark.parametrize("design", [sampling.antithetic, sampling.stratified, sampling.qmc])
def test_designs_refuse_raw_key_draws(design):
    # measure_valued draws its weak-derivative points with a raw key: no design reaches them.
    est = design(sg.measure_valued())
    with pytest.raises(TypeError, match="raw key.*without a sampling design"):
        sg.bind(est, BERN, THETA)
    with pytest.raises(TypeError, match="raw key.*without a sampling design"):
        sg.estimate_grad(f_bern, BERN, THETA, jax.random.key(0), num_samples=64 * 3,
                         estimator=est)


@pytest.mark.statistical
@pytest.mark.parametrize("design", [sampling.antithetic, sampling.stratified, sampling.qmc])
def test_designs_bind_through_shape_dependent_estimators(design, x64):
    # enumerate and IndeCateR are bound to the family inside the design: draws per unit are the
    # design's copies times the inner cost; enumerate under a design is still exact, IndeCateR
    # unbiased (each copy's draw is exactly Bernoulli).
    truth = _truth(f_bern, THETA)
    est = design(sg.enumerate())
    b = sg.bind(est, BERN, THETA)
    r = sg.estimate_grad(f_bern, BERN, THETA, jax.random.key(0),
                         num_samples=b.draws_per_unit, estimator=est)
    np.testing.assert_allclose(r.grad, truth, rtol=1e-10)
    est = design(sg.indecater())
    b = sg.bind(est, BERN, THETA)
    r = sg.estimate_grad(f_bern, BERN, THETA, jax.random.key(1),
                         num_samples=b.draws_per_unit * 256, estimator=est)
    assert_unbiased(r.grad, r.stderr, truth, what="design[indecater]")
    assert_rejects(r.grad, r.stderr, 0.8 * truth, what="design[indecater] power")


def test_measure_valued_with_cv_is_no_longer_a_plain_measure_valued(x64):
    # Before: specialize rebuilt measure_valued and the cv vanished (variance_reduction 1).
    est = cv.with_control_variates(sg.measure_valued(), cv.control_variate(
        lambda b, th: f_bern(b), lambda th: jnp.sum(jnp.exp(jax.vmap(
            lambda x: BERN.log_prob(th, x))(BERN.capabilities["support"](th))) * jax.vmap(f_bern)(
            BERN.capabilities["support"](th)))), coefficient=1.0)
    theta = THETA.astype(jnp.float64)
    r = sg.estimate_grad(f_bern, BERN, theta, jax.random.key(1), num_samples=30, estimator=est)
    # h == f with coefficient 1: the estimate is grad mean(h) exactly, for every draw
    np.testing.assert_allclose(r.grad, _truth(f_bern, theta), rtol=1e-10, atol=1e-14)
    # zero up to rounding: the variance of equal terms is O(eps * g^2), its root O(1e-9 * |g|)
    np.testing.assert_allclose(r.stderr, 0.0, atol=1e-8)


# ------------------------------------------- 2. control variates: the estimator applied to h

UNBIASED = {
    "score_function": (sg.score_function, 64),
    "measure_valued": (sg.measure_valued, 3 * 64),
    "rebar_fixed": (lambda: sg.rebar(0.5, 1.3, learn=False), 64),
    "arm": (sg.arm, 2 * 64),
    "disarm": (sg.disarm, 2 * 64),
    "rloo": (lambda: sg.rloo(2), 2 * 64),
    "indecater": (sg.indecater, 4 * 64),
    "enumerate": (sg.enumerate, 4),
}


@pytest.mark.parametrize("name", sorted(UNBIASED))
def test_cv_equals_estimator_of_f_minus_c_h_on_the_same_draws(x64, name):
    """E[estimate] is then exactly grad E[f] wherever the inner estimator is exact in mean."""
    make, n = UNBIASED[name]
    c, key = 0.7, jax.random.key(5)
    theta = THETA.astype(jnp.float64)
    wrapped = cv.with_control_variates(make(), H, coefficient=c)

    def loss(th, est, shifted):
        f = (lambda b: f_bern(b) - c * h_fn(b, th)) if shifted else f_bern
        return sg.expectation(f, BERN, th, key, num_samples=n, estimator=est)

    got = jax.grad(loss)(theta, wrapped, False)
    ref = jax.grad(loss)(theta, make(), True) + c * jax.grad(h_mean)(theta)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)


def test_pathwise_cv_equals_pathwise_of_f_minus_c_h(x64):
    theta = {"loc": jnp.array([0.3, -0.5]), "scale": jnp.array([1.0, 0.7])}
    h = cv.control_variate(lambda x, th: jnp.sum(x * th["loc"]),
                           lambda th: jnp.sum(th["loc"] ** 2))
    f, c, key = (lambda x: jnp.sum(jnp.cos(x))), 0.4, jax.random.key(2)

    def loss(th, est, shifted):
        g = (lambda x: f(x) - c * jnp.sum(x * th["loc"])) if shifted else f
        return sg.expectation(g, NORMAL, th, key, num_samples=32, estimator=est)

    got = jax.grad(loss)(theta, cv.with_control_variates(sg.pathwise(), h, coefficient=c), False)
    ref = jax.grad(loss)(theta, sg.pathwise(), True)
    for a, b, d in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref),
                       jax.tree_util.tree_leaves({"loc": 2 * c * theta["loc"],
                                                  "scale": jnp.zeros(2)}), strict=True):
        np.testing.assert_allclose(a, b + d, rtol=1e-10, atol=1e-13)


def test_score_function_cv_exact_by_enumerating_the_draws(x64):
    """Given its draw, the score-function estimate is a function of x: sum p(x) g(x) is exact."""
    theta = THETA.astype(jnp.float64)
    est = cv.with_control_variates(sg.score_function(), H, cv.delta_method(f_bern, order=1),
                                   coefficient=0.9)
    support = BERN.capabilities["support"](theta)
    grads = jax.vmap(lambda x: sg.estimate_grad_from_samples(
        f_bern, BERN, theta, x[None], estimator=est).grad)(support)
    probs = jnp.exp(jax.vmap(lambda x: BERN.log_prob(theta, x))(support))
    np.testing.assert_allclose(probs @ grads, _truth(f_bern, theta), rtol=1e-10)


@pytest.mark.statistical
@pytest.mark.parametrize("name", ["rebar_fixed", "measure_valued", "arm"])
def test_optimal_cv_unbiased_and_rejects_the_old_answer(x64, name):
    make, n = UNBIASED[name]
    theta = THETA.astype(jnp.float64)
    est = cv.with_control_variates(make(), H)  # cross-fitted optimal coefficient
    r = sg.estimate_grad(f_bern, BERN, theta, jax.random.key(11), num_samples=60 * n,
                         estimator=est)
    truth = _truth(f_bern, theta)
    assert_unbiased(r.grad, r.stderr, truth, what=f"{name}+cv")
    assert_power(r.stderr, 0.02, what=f"{name}+cv")
    # the first edition's answer for REBAR + cv on this toy was off by orders of magnitude
    assert_rejects(r.grad, r.stderr, truth + 0.05, what=f"{name}+cv vs a 0.05 error")


@pytest.mark.parametrize("inner,match", [
    (lambda: sg.gumbel_softmax(0.5), "biased"),
    (sg.straight_through, "biased"),
    (lambda: sg.straight_through_gumbel(0.5), "biased"),
    (lambda: sg.vimco(4), "log-mean-exp"),
    (lambda: cv.rao_blackwell(lambda b: b), "f_terms"),
    (lambda: sampling.antithetic(sg.straight_through()), "biased"),
])
def test_cv_refuses_biased_estimators_and_other_objectives(inner, match):
    # refused when bound (at trace time), naming the estimator and why
    with pytest.raises(TypeError, match=rf"with_control_variates\(estimator=.*{match}.*unbiased"):
        sg.bind(cv.with_control_variates(inner(), H), BERN, THETA)


# ------------------------- 3. designs reach every uniform drawn through Draws; raw keys refused

OWN_NOISE = {
    "gumbel_softmax": lambda: sg.gumbel_softmax(0.5),
    "straight_through_gumbel": lambda: sg.straight_through_gumbel(0.5),
    "rebar_fixed": lambda: sg.rebar(learn=False),
    "rebar_cv": lambda: cv.with_control_variates(sg.rebar(learn=False), H, coefficient=0.5),
    "arm": sg.arm,
    "disarm": sg.disarm,
}


@pytest.mark.parametrize("design", [sampling.antithetic, sampling.qmc])
@pytest.mark.parametrize("name", sorted(OWN_NOISE))
def test_designs_reach_estimators_with_their_own_noise(design, name):
    # At theta = 0, f = sum(b): an antithetic (or QMC-stratified) copy of logistic noise flips
    # the hard sample, so f's mean over a unit is exactly D / 2 per draw for antithetic.
    est = design(OWN_NOISE[name]())
    b = sg.bind(est, BERN, THETA)
    assert b.needs_key and not b.presample
    jax.jit(lambda th: sg.expectation(f_bern, BERN, th, jax.random.key(0),
                                      num_samples=64 * b.draws_per_unit, estimator=est)).lower(THETA)
    if design is sampling.antithetic:
        r = sg.estimate_grad(lambda y: jnp.sum(y), BERN, jnp.zeros(2), jax.random.key(1),
                             num_samples=16 * b.draws_per_unit, estimator=est)
        np.testing.assert_allclose(r.value, 1.0, rtol=1e-6)


@pytest.mark.parametrize("design", [sampling.antithetic, sampling.qmc])
def test_designs_refuse_raw_key_estimators_at_trace_time(design):
    est = design(sg.importance.importance_weighted(BERN, jnp.zeros(2)))
    with pytest.raises(TypeError, match="importance_weighted draws its own samples with a raw key"):
        jax.jit(lambda th: sg.expectation(f_bern, BERN, th, jax.random.key(0), num_samples=128,
                                          estimator=est)).lower(THETA)


def test_designs_apply_to_relax(x64):
    """RELAX's noise is the design's; its learning step runs on the plain estimator's noise."""
    theta = THETA.astype(jnp.float64)
    relax = sampling.stratified(sg.relax(), num_strata=4)
    r = sg.estimate_grad(f_bern, BERN, theta, jax.random.key(0), num_samples=64, estimator=relax,
                         state=relax.init(theta))
    assert np.all(np.isfinite(r.grad)) and r.num_samples == 64


def test_designs_still_accept_draw_only_estimators(x64):
    """straight_through's only randomness is the draw: the design applies (bias unchanged)."""
    theta = THETA.astype(jnp.float64)
    for inner in (sg.straight_through(), cv.with_control_variates(sg.score_function(), H,
                                                                    coefficient=1.0)):
        r = sg.estimate_grad(f_bern, BERN, theta, jax.random.key(0), num_samples=64,
                             estimator=sampling.antithetic(inner))
        assert np.all(np.isfinite(r.grad))
