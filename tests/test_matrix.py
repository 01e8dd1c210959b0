"""The registry-driven matrix (issue 14, item 6): estimators x problems, wrappers x estimators,
options x entry points, 1 vs 4 host devices, and the six regressions of issue 14.

Everything is read from :mod:`scoregrad.bench.registry` (the registry shared with
``scoregrad bench`` and the docs): ``ESTIMATORS`` and ``applicable(problem)``, ``WRAPPERS``,
``BASELINES`` and ``tracking_control_variate``. Each estimator has a *home* problem (the first
of :data:`HOME` it applies to) on which the default cells run; its other applicable problems
run with the slow set. Every cell runs under ``jax.numpy_dtype_promotion("strict")`` and
``jax.numpy_rank_promotion("raise")`` (as optimistix's tests do), so an implicit promotion in
the library fails the cell.

Exact before statistical: estimators whose unit takes given draws are checked by enumerating
every batch of draws on a small discrete support (rtol 1e-10, float64); the others by replicates
against the problem's exact gradient (5 SE plus a power check, ``@pytest.mark.statistical``).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stats_util as su
from model_util import stateful  # noqa: E402

import scoregrad as sg
from scoregrad.bench import problems as P
from scoregrad.bench import registry as R
from scoregrad.bench.runner import usable_budget


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


# ------------------------------------------------------------------------------------------
# The axes of the matrix, read from the registry.

HOME = ("bernoulli_t0.45", "categorical_k10", "gauss_square_d1", "bs_call", "bs_digital",
        "bandit_k10")
ENTRIES = {e.name: e for e in R.ESTIMATORS}
# score_function with every baseline joins the estimator axis of the wrapper matrix.
SF_BASELINES = {f"score_function+{b}": (lambda b=b: sg.score_function(baseline=R.BASELINES[b]()))
                for b in R.BASELINES}


def _home(entry):
    for name in HOME:
        if R.applies(entry, P.get_problem(name)):
            return name
    for name in P.problem_names():
        if R.applies(entry, P.get_problem(name)):
            return name
    return HOME[0]  # applies nowhere: the cells fail, naming the entry (a registry fault)


# Estimators whose home cell runs in the default suite (one per mechanism: plain score, batch
# baseline, cross-fitted baseline, pathwise, coupled pairs, own noise + state, weak derivative,
# enumeration); every other cell runs with the slow set.
FAST = ("score_function", "score_function+loo", "score_function+optimal", "pathwise", "disarm",
        "rebar", "measure_valued", "enumerate")


def _cells():
    """(entry, problem) params: the home problem of FAST entries by default, the others slow."""
    out = []
    for e in R.ESTIMATORS:
        home = _home(e)
        pnames = [p for p in P.problem_names() if R.applies(e, P.get_problem(p))] or [home]
        for pname in pnames:
            fast = pname == home and e.name in FAST
            out.append(pytest.param(e.name, pname, id=f"{e.name}@{pname}",
                                    marks=() if fast else pytest.mark.matrix_full))
    return out


def _theta(problem, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), problem.theta)


def _b(est, problem):
    """``est`` bound to the problem (its plan's sizes, what is derived)."""
    return sg.bind(est, problem.family, _theta(problem, jnp.float32))


def _units(est, problem):
    """Units for a cell: at least 5 (and the estimator's minimum), so that chunk size
    ``units - 1`` leaves a remainder of one unit."""
    return max(5, _b(est, problem).min_units)


def _n(est, problem):
    b = _b(est, problem)
    return usable_budget(_units(est, problem) * b.draws_per_unit, b.draws_per_unit, b.min_units)


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def _close(a, b, rtol=2e-5, atol=1e-6, what=""):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb), what
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=what)


def _estimate(est, problem, theta, key, n, f=None, state=None, **kw):
    f = problem.f if f is None else f
    if stateful(est) and state is None:
        state = est.init(theta)
    return sg.estimate_grad(f, problem.family, theta, key, num_samples=n, estimator=est,
                            state=state, **kw)


def _value_and_grad(est, problem, theta, key, n, f=None, **kw):
    """(value, grad) of sg.expectation (sg.expectation_with_state for stateful estimators)."""
    f = problem.f if f is None else f
    state = est.init(theta) if stateful(est) else None

    def loss(th):
        if stateful(est):
            return sg.expectation_with_state(f, problem.family, th, key, state, num_samples=n,
                                             estimator=est, **kw)[0]
        return sg.expectation(f, problem.family, th, key, num_samples=n, estimator=est, **kw)

    return jax.value_and_grad(loss)(theta)


def _refusal(err):
    """``err`` as a refusal's message; a strict-promotion error of the library is no refusal."""
    if "promotion" in str(err):
        raise err
    return str(err)


class _Counter:
    """Counts how often f is traced (blackjax's test of recompilation)."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, x):
        self.calls += 1
        return self.f(x)


# ------------------------------------------------------------------------------------------
# Every estimator x every applicable problem (float32 contract).

@pytest.mark.parametrize("name, pname", _cells())
def test_contract_cell(name, pname):
    """value = mean f (estimate_grad's value = expectation's value, same key); grad of
    expectation = estimate_grad's grad; chunk-size invariance (automatic vs units - 1, which
    leaves a remainder); float32 kept; the second jitted call traces f no more."""
    problem = P.get_problem(pname)
    est = ENTRIES[name].factory(problem)
    n, units = _n(est, problem), _units(est, problem)
    f = _Counter(problem.f)

    @jax.jit
    def run(theta, key):
        r = _estimate(est, problem, theta, key, n, f=f)
        rc = _estimate(est, problem, theta, key, n, f=f, chunk_size=units - 1)
        v, g = _value_and_grad(est, problem, theta, key, n, f=f)
        return (r.value, r.grad, r.stderr), (rc.value, rc.grad, rc.stderr), (v, g)

    theta = _theta(problem, jnp.float32)
    full, chunked, (value, grad) = run(theta, jax.random.key(0))
    traced = f.calls
    assert traced > 0
    run(theta, jax.random.key(1))
    assert f.calls == traced and run._cache_size() == 1, "the second jitted call retraced f"
    assert {a.dtype for a in _leaves((full, chunked, value, grad))} == {np.dtype(np.float32)}
    np.testing.assert_allclose(value, full[0], rtol=1e-5, atol=1e-6)
    # Values and gradients to float32 rounding; standard errors to 1e-5 absolute: an estimator
    # that is exact on this problem (the optimal baseline on a linear f) has an SE of rounding
    # noise (a few 1e-6) that legitimately changes with the summation order.
    # float32 rounding relative to the vector's scale; cross-fitted coefficients (a ratio of
    # co-moments per coordinate) amplify the summation-order differences of their moments.
    scale = max(float(np.max(np.abs(x))) for x in _leaves(full[:2])) + 1e-12
    loose = bool(_b(est, problem).fitted)
    _close(chunked[:2], full[:2], rtol=1e-3 if loose else 1e-4,
           atol=(1e-4 if loose else 2e-5) * scale, what="chunk_size=units-1 vs automatic")
    _close(chunked[2], full[2], rtol=1e-3 if loose else 1e-4, atol=1e-5,
           what="stderr, chunk_size=units-1")
    _close(grad, full[1], rtol=1e-3 if loose else 1e-4, atol=(1e-4 if loose else 2e-5) * scale,
           what="grad of expectation vs estimate_grad")


FAST_JIT = ("pathwise", "disarm")


@pytest.mark.parametrize("name", [
    pytest.param(e.name, marks=() if e.name in FAST_JIT else pytest.mark.matrix_full)
    for e in R.ESTIMATORS])
def test_jit_equals_eager_and_vmap_over_keys(name):
    entry = ENTRIES[name]
    problem = P.get_problem(_home(entry))
    est = entry.factory(problem)
    n, theta = _n(est, problem), _theta(problem, jnp.float32)
    keys = jax.random.split(jax.random.key(3), 3)

    def grads(key):
        r = _estimate(est, problem, theta, key, n)
        return r.value, r.grad, r.stderr

    batched = jax.jit(jax.vmap(grads))(keys)
    jitted = jax.jit(grads)
    # cross-fitted coefficients (ratios of co-moments) amplify float32 rounding differences
    # between differently fused programs
    tol = 1e-3 if _b(est, problem).fitted else 1e-5
    for i in range(3):
        one = jitted(keys[i])
        _close(jax.tree_util.tree_map(lambda a, i=i: a[i], batched), one, rtol=tol,
               what="vmap over keys vs one key at a time")
    _close(grads(keys[0]), jitted(keys[0]), rtol=tol, what="eager vs jit")


# ------------------------------------------------------------------------------------------
# Unbiasedness: exact by enumeration where the unit takes given draws, else 5 SE.

def _min_batch(est, problem):
    """The smallest batch of given draws: two, the estimator's minimum units of
    ``draws_per_unit`` draws, two per fold."""
    b = _b(est, problem)
    return max(2, b.min_units * b.samples_per_unit, 2 * b.num_folds if b.fitted else 0)


def _takes_samples(est, problem):
    """Whether estimate_grad_from_samples accepts ``est`` (a trace-time probe)."""
    theta = _theta(problem, jnp.float32)
    x = problem.family.sample(theta, jax.random.key(0))
    xs = jax.tree_util.tree_map(lambda a: jnp.stack([a] * _min_batch(est, problem)), x)
    try:
        jax.eval_shape(lambda th, s: sg.estimate_grad_from_samples(
            problem.f, problem.family, th, s, estimator=est).grad, theta, xs)
    except TypeError:
        return False
    return True


ENUMERABLE_HOMES = ("bernoulli_t0.45", "categorical_k10")


def _unbiased_cells():
    exact, stat = [], []
    for e in R.ESTIMATORS:
        home = _home(e)
        if not e.unbiased:
            continue
        problem = P.get_problem(home)
        try:  # a factory that fails here fails its (statistical) cell, not the collection
            takes = home in ENUMERABLE_HOMES and _takes_samples(e.factory(problem), problem)
        except (TypeError, ValueError):
            takes = False
        if takes:
            exact.append(pytest.param(e.name, id=e.name))
        else:
            stat.append(pytest.param(e.name, id=e.name))
    return exact, stat


EXACT_CELLS, STAT_CELLS = _unbiased_cells()


@pytest.mark.parametrize("name", EXACT_CELLS)
def test_unbiased_exact_by_enumerating_batches(x64, name):
    """E[g] = sum over every batch of m draws from the support of prod p(x_i) g(x_1..x_m),
    float64 to rtol 1e-10 against the registry's exact gradient."""
    entry = ENTRIES[name]
    problem = P.get_problem(_home(entry))
    est = entry.factory(problem)
    theta = _theta(problem, jnp.float64)
    support = problem.family.capabilities["support"](theta)
    m = _min_batch(est, problem)
    k = support.shape[0]
    idx = np.array(np.meshgrid(*[np.arange(k)] * m, indexing="ij")).reshape(m, -1).T

    @jax.jit
    def expected(theta):
        def one(ix):
            xs = support[ix]
            logp = jnp.sum(jax.vmap(lambda x: problem.family.log_prob(theta, x))(xs))
            g = sg.estimate_grad_from_samples(problem.f, problem.family, theta, xs,
                                              estimator=est).grad
            return jax.tree_util.tree_map(lambda a: jnp.exp(logp) * a, g)

        return jax.tree_util.tree_map(lambda a: jnp.sum(a, 0), jax.vmap(one)(jnp.asarray(idx)))

    g = expected(theta)
    assert {a.dtype for a in _leaves(g)} == {np.dtype(np.float64)}
    np.testing.assert_allclose(P.flat(g), P.flat(problem.exact_grad), rtol=1e-10, atol=1e-14)


REPLICATES = 64


def _replicate_grads(est, problem, theta, n, key, replicates=REPLICATES):
    keys = jax.random.split(key, replicates)
    g = jax.jit(jax.vmap(lambda k: _estimate(est, problem, theta, k, n).grad))(keys)
    assert {a.dtype for a in _leaves(g)} == {np.dtype(theta_dtype(theta))}
    return np.stack([P.flat(jax.tree_util.tree_map(lambda a, i=i: a[i], g))
                     for i in range(replicates)])


def theta_dtype(theta):
    return jax.tree_util.tree_leaves(theta)[0].dtype


FAST_STAT = ("arm", "measure_valued")
# Evaluations of f per replicate for the 5-SE checks: 64, more where 64 leaves the check without
# power (ARSM on categorical_k10: SE up to 1.7x the bound at 64).
STAT_BUDGET = {"arsm": 256}


@pytest.mark.statistical
@pytest.mark.parametrize("name", [
    pytest.param(p.values[0], id=p.id, marks=() if p.values[0] in FAST_STAT else pytest.mark.matrix_full)
    for p in STAT_CELLS])
def test_unbiased_by_replicates(x64, name):
    """|mean - exact| <= 5 SE + atol over 64 float64 replicates, with SE small enough to see a
    bias of a fifth of the gradient; a zero-variance estimator must be exact to 1e-10."""
    entry = ENTRIES[name]
    problem = P.get_problem(_home(entry))
    est = entry.factory(problem)
    n = usable_budget(STAT_BUDGET.get(name, 64), _b(est, problem).draws_per_unit,
                      _b(est, problem).min_units)
    g = _replicate_grads(est, problem, _theta(problem, jnp.float64), n, jax.random.key(11))
    exact = P.flat(problem.exact_grad)
    mean, se = su.replicate_stats(g)
    if np.all(se == 0):
        np.testing.assert_allclose(mean, exact, rtol=1e-10, atol=1e-14)
    su.assert_unbiased(mean, se, exact, atol=1e-9, what=name)
    su.assert_power(se, 0.2 * np.abs(exact) + 1e-3, what=name)


# ------------------------------------------------------------------------------------------
# Every wrapper x every estimator: refused at trace time, naming the estimator or capability,
# or the inner estimator's expectation.

WRAPPED = [(e.name, e.factory) for e in R.ESTIMATORS] + [
    (name, lambda problem, make=make: make()) for name, make in SF_BASELINES.items()
    if name not in ENTRIES]
WRAPPED_HOME = {name: _home(ENTRIES[name]) if name in ENTRIES else "bernoulli_t0.45"
                for name, _ in WRAPPED}
WRAPPED_FACTORY = dict(WRAPPED)
REFUSAL_WORDS = ("capabil", "draws", "noise", "biased", "unbiased", "needs", "evaluates",
                 "baseline", "support", "family", "multiple", "pair", "must")


def _wrapped_outcome(wrapper, name, problem):
    """(estimator or None, refusal message or None) at trace time."""
    inner = WRAPPED_FACTORY[name](problem)
    theta = _theta(problem, jnp.float32)
    try:
        est = wrapper.wrap(inner, problem)
        n = _n(est, problem)
        jax.eval_shape(lambda th: _estimate(est, problem, th, jax.random.key(0), n).grad, theta)
    except (TypeError, ValueError) as err:
        return inner, None, _refusal(err)
    return inner, est, None


@pytest.mark.parametrize("wname", [w.name for w in R.WRAPPERS])
@pytest.mark.parametrize("name", [n for n, _ in WRAPPED])
def test_wrapper_refusal_names_the_estimator(wname, name):
    """At trace time (jax.eval_shape, nothing compiled): refused with a message naming the
    estimator or the capability, or accepted (then checked by the tests below)."""
    wrapper = next(w for w in R.WRAPPERS if w.name == wname)
    inner, est, why = _wrapped_outcome(wrapper, name, P.get_problem(WRAPPED_HOME[name]))
    if est is None:
        assert inner.name in why or any(w in why.lower() for w in REFUSAL_WORDS), why


FAST_CV = ("score_function", "score_function+leave_one_out", "score_function+optimal", "pathwise",
           "disarm", "rebar", "measure_valued[bernoulli]",
           "indecater")


@pytest.mark.statistical
@pytest.mark.parametrize("wname", ["control_variates", "control_variates(c=1)"])
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=() if n in FAST_CV else pytest.mark.matrix_full) for n, _ in WRAPPED])
def test_control_variate_tracking_f_is_exact(wname, name):
    """An accepted control variate h = f (coefficient 1, or cross-fitted) gives the exact
    gradient on the same draws: the inner estimator's expectation, with zero variance."""
    wrapper = next(w for w in R.WRAPPERS if w.name == wname)
    problem = P.get_problem(WRAPPED_HOME[name])
    inner, est, why = _wrapped_outcome(wrapper, name, problem)
    if est is None:
        return  # refused: test_wrapper_refusal_names_the_estimator checks the message
    if "+delta_cv" in name:
        return  # its own fitted delta-method term: h tracks f only approximately
    exact_cv = problem.name in ENUMERABLE_HOMES or problem.name == "gauss_square_d1"
    assert exact_cv, problem.name
    b_in = _b(inner, problem)
    if b_in.shift_term is not None and not b_in.fitted:
        _check_cv_over_batch_baseline(inner, est, problem, wname)
        return
    theta = _theta(problem, jnp.float32)
    # The cross-fitted coefficient is 1 (exactness) only when each fold's draws vary: with a
    # handful of Bernoulli draws a fold is often constant and its coefficient falls back to 0
    # (unbiased, not exact). 64 units make a constant fold a 2^-31 event. (So for a fixed
    # coefficient over an inner estimator with a fitted baseline too.)
    few = wname == "control_variates(c=1)" and not _b(inner, problem).fitted
    n = _n(est, problem) if few else usable_budget(
        64 * _b(est, problem).draws_per_unit, _b(est, problem).draws_per_unit, _b(est, problem).min_units)
    r = jax.jit(lambda th, k: _estimate(est, problem, th, k, n))(theta, jax.random.key(4))
    tol = 1e-4 if wname == "control_variates(c=1)" else 2e-3
    np.testing.assert_allclose(P.flat(r.grad), P.flat(problem.exact_grad), rtol=tol,
                               atol=tol * np.max(np.abs(P.flat(problem.exact_grad))))


def _check_cv_over_batch_baseline(inner, est, problem, wname):
    """A batch baseline (leave-one-out, batch mean) centres f by the batch's mean of f, h is
    centred by its exact mean: not exact, but on the same keys the inner's expectation and no
    more variance than the inner. Off the home theta (there h's centred term is constant)."""
    with jax.enable_x64(True):
        _check_cv_over_batch_baseline_x64(inner, est, problem, wname)


def _check_cv_over_batch_baseline_x64(inner, est, problem, wname):
    theta = jax.tree_util.tree_map(lambda a: a + 0.7, _theta(problem, jnp.float64))
    n = usable_budget(64 * _b(est, problem).draws_per_unit, _b(est, problem).draws_per_unit,
                      _b(est, problem).min_units)
    g_cv = _replicate_grads(est, problem, theta, n, jax.random.key(31))
    g_in = _replicate_grads(inner, problem, theta, n, jax.random.key(31))
    mean, se = su.replicate_stats(g_cv - g_in)
    su.assert_unbiased(mean, se, 0.0, atol=1e-12, what=f"{wname}[{inner.name}] - inner")
    sd_cv, sd_in = g_cv.std(0), g_in.std(0)
    assert np.all(sd_cv <= 1.02 * sd_in + 1e-12), (wname, inner.name, sd_cv, sd_in)
    # power: the paired difference is not identically zero, and the inner's noise is resolved
    assert np.all(se > 0) and np.all(sd_in > 0)


@pytest.mark.matrix_full
@pytest.mark.statistical
@pytest.mark.parametrize("wname", ["antithetic", "stratified2", "qmc4"])
@pytest.mark.parametrize("name", [n for n, _ in WRAPPED])
def test_design_same_expectation(x64, wname, name):
    """An accepted sampling design keeps the inner estimator's expectation (the exact gradient
    for an unbiased inner; the inner's own replicate mean for a biased one)."""
    wrapper = next(w for w in R.WRAPPERS if w.name == wname)
    problem = P.get_problem(WRAPPED_HOME[name])
    inner, est, why = _wrapped_outcome(wrapper, name, problem)
    if est is None:
        return  # refused: test_wrapper_refusal_names_the_estimator checks the message
    theta = _theta(problem, jnp.float64)
    n = usable_budget(STAT_BUDGET.get(name, 64), _b(est, problem).draws_per_unit,
                      _b(est, problem).min_units)
    g = _replicate_grads(est, problem, theta, n, jax.random.key(21))
    mean, se = su.replicate_stats(g)
    unbiased = ENTRIES[name].unbiased if name in ENTRIES else name != "score_function+batch_mean"
    if unbiased:
        truth, se_truth = P.flat(problem.exact_grad), 0.0
    else:
        n_in = usable_budget(STAT_BUDGET.get(name, 64), _b(inner, problem).draws_per_unit,
                             _b(inner, problem).min_units)
        truth, se_truth = su.replicate_stats(
            _replicate_grads(inner, problem, theta, n_in, jax.random.key(22)))
    se_all = np.sqrt(se**2 + se_truth**2)
    su.assert_unbiased(mean, se_all, truth, atol=1e-9, what=f"{wname}[{name}]")
    su.assert_power(se_all, 0.2 * np.abs(P.flat(problem.exact_grad)) + 1e-3, what=wname)


# ------------------------------------------------------------------------------------------
# Every option x every entry point: honoured or refused, never ignored.

OPT_PROBLEM = "gauss_square_d1"
OPT_N = 12


def _ep_call(ep, f, theta, key, **opts):
    """Runs entry point ``ep`` with options; returns (value-ish, grad pytree, num_nonfinite)."""
    problem = P.get_problem(OPT_PROBLEM)
    fam = problem.family
    est = sg.score_function(baseline=sg.baselines.leave_one_out())
    if ep == "estimate_grad":
        r = sg.estimate_grad(f, fam, theta, key, num_samples=OPT_N, estimator=est, **opts)
        return r.value, r.grad, r.num_nonfinite
    if ep == "estimate_grad_from_samples":
        xs = jax.vmap(lambda i: fam.sample(theta, jax.random.fold_in(key, i)))(jnp.arange(OPT_N))
        r = sg.estimate_grad_from_samples(f, fam, theta, xs, estimator=est, **opts)
        return r.value, r.grad, r.num_nonfinite
    if ep in ("expectation", "expectation_with_state"):
        def loss(th):
            if ep == "expectation":
                return sg.expectation(f, fam, th, key, num_samples=OPT_N, estimator=est, **opts)
            return sg.expectation_with_state(f, fam, th, key, (), num_samples=OPT_N,
                                             estimator=est, **opts)[0]
        v, g = jax.value_and_grad(loss)(theta)
        return v, g, None
    if ep == "estimate_grad_adaptive":
        a = sg.estimate_grad_adaptive(f, fam, theta, key, target_stderr=1e-6,
                                      max_samples=OPT_N, min_samples=OPT_N, estimator=est, **opts)
        return a.estimate.value, a.estimate.grad, a.estimate.num_nonfinite
    if ep == "estimate_grad_importance":
        r = sg.importance.estimate_grad_importance(
            f, fam, theta, proposal=fam, proposal_theta=theta, key=key, num_samples=OPT_N, **opts)
        return r.value, r.grad, r.num_nonfinite
    if ep == "finite_difference":
        r = sg.sampling.finite_difference(f, fam, theta, key, num_samples=OPT_N, step=1e-2, **opts)
        return r.value, r.grad, r.num_nonfinite
    raise AssertionError(ep)


ENTRY_POINTS = ("estimate_grad", "estimate_grad_from_samples", "expectation",
                "expectation_with_state", "estimate_grad_adaptive", "estimate_grad_importance",
                "finite_difference")
_BASE: dict = {}


def _base(ep):
    if ep not in _BASE:
        problem = P.get_problem(OPT_PROBLEM)
        theta = _theta(problem, jnp.float32)
        _BASE[ep] = jax.jit(lambda th, k: _ep_call(ep, problem.f, th, k))(
            theta, jax.random.key(6))
    return _BASE[ep]


def _opts(nan_policy, devices, chunk):
    return {"nan_policy": nan_policy, "devices": devices, "chunk_size": chunk}


def _refusal_names_option(err, opts):
    msg = _refusal(err)
    named = [k for k, v in opts.items() if v is not None and (k in msg or repr(v) in msg)]
    return bool(named)


def _option_cells():
    """Every entry point x nan_policy x devices x chunk_size; by default the cells that depart
    from the defaults in "drop", devices or chunk_size alone, the rest slow."""
    out = []
    for ep in ENTRY_POINTS:
        for nan_policy in ("raise", "drop", "propagate"):
            for devices in (None, "all"):
                for chunk in (None, 5):
                    departs = [nan_policy != "raise", devices is not None, chunk is not None]
                    fast = sum(departs) == 1 and nan_policy != "propagate"
                    out.append(pytest.param(
                        ep, nan_policy, devices, chunk,
                        id=f"{ep}-{nan_policy}-dev_{devices}-chunk_{chunk}",
                        marks=() if fast else pytest.mark.matrix_full))
    return out


@pytest.mark.parametrize("ep, nan_policy, devices, chunk", _option_cells())
def test_option_honoured_or_refused(ep, nan_policy, devices, chunk):
    """No NaN present: an accepted option set gives the default's result (devices: one local
    device here, so shard_map over one device must still appear in the program; chunk 5 of 12
    units leaves a remainder). "drop" vs "raise" to 1e-6 relative, not bitwise: "drop" masks
    units inside the chunk loop (a select on the statistics), so XLA may fuse the sums
    differently; equality to rounding is what "no unit was dropped" means."""
    problem = P.get_problem(OPT_PROBLEM)
    theta = _theta(problem, jnp.float32)
    opts = {k: v for k, v in _opts(nan_policy, devices, chunk).items() if v is not None}
    if ep == "estimate_grad_adaptive" and "chunk_size" in opts:
        # adaptive draws whole chunks and rounds max_samples down to them (documented): 12 draws
        # in chunks of 5 would be 10 draws, another estimate. Chunks of 4 keep the 12.
        opts["chunk_size"] = 4
    call = lambda th, k: _ep_call(ep, problem.f, th, k, **opts)  # noqa: E731
    try:
        jaxpr = jax.make_jaxpr(call)(theta, jax.random.key(6))
    except (TypeError, ValueError) as err:
        assert _refusal_names_option(err, opts), f"{ep} refused {opts} without naming it: {err}"
        return
    if devices is not None and jax.local_device_count() > 1:  # see test_one_vs_four_host_devices
        assert "shard_map" in str(jaxpr), f"{ep}: devices={devices!r} accepted but ignored"
    out = jax.jit(call)(theta, jax.random.key(6))
    value, grad, _ = out
    base_value, base_grad, _ = _base(ep)
    _close((value, grad), (base_value, base_grad), rtol=1e-6, atol=1e-7,
           what=f"{ep} with {opts} vs defaults")


def _nan_f(x):
    f = P.get_problem(OPT_PROBLEM).f
    return jnp.where(x[0] > 0.0, jnp.nan, f(x))


@pytest.mark.parametrize("nan_policy", ["raise", "drop",
                                        pytest.param("propagate", marks=pytest.mark.matrix_full)])
@pytest.mark.parametrize("ep", ENTRY_POINTS)
def test_nan_policy_with_nans(ep, nan_policy):
    """With NaN on some draws: "raise" raises (at trace time or when computed), "drop" gives a
    finite result and counts the dropped units, "propagate" gives a non-finite result; or the
    policy is refused with a message naming it."""
    problem = P.get_problem(OPT_PROBLEM)
    theta = _theta(problem, jnp.float32)
    call = jax.jit(lambda th, k: _ep_call(ep, _nan_f, th, k, nan_policy=nan_policy))
    if nan_policy == "raise":
        with pytest.raises(Exception, match="NaN or infinite|non-finite|nan_policy"):
            jax.block_until_ready(call(theta, jax.random.key(6)))
        return
    try:
        value, grad, count = jax.block_until_ready(call(theta, jax.random.key(6)))
    except (TypeError, ValueError) as err:
        assert "nan_policy" in _refusal(err) and nan_policy in str(err), str(err)
        return
    finite = all(np.all(np.isfinite(a)) for a in _leaves(grad))
    if nan_policy == "drop":
        assert finite, f"{ep}: drop left a non-finite gradient"
        if count is not None:
            assert int(count) > 0
    else:
        assert not finite, f"{ep}: propagate hid the NaN"
        if count is not None:
            assert int(count) > 0


# ------------------------------------------------------------------------------------------
# 1 vs 4 host devices, all estimators, one subprocess.

_DEVICE_CODE = """
import json, jax, jax.numpy as jnp, scoregrad as sg
from scoregrad.bench import problems as P, registry as R
from scoregrad.bench.runner import usable_budget
assert jax.local_device_count() == 4
out = {}
for e in R.ESTIMATORS:
    pname = HOMES[e.name]
    p = P.get_problem(pname)
    est = e.factory(p)
    b = sg.bind(est, p.family, p.theta)
    n = usable_budget(8 * b.draws_per_unit, b.draws_per_unit, max(b.min_units, 8))
    th = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p.theta)
    state = est.init(th) if b.stateful else None
    def run(dev):
        return sg.estimate_grad(p.f, p.family, th, jax.random.key(9), num_samples=n,
                                estimator=est, state=state, devices=dev)
    row = {"n": n, "one": [float(v) for v in P.flat(jax.jit(lambda: run(None).grad)())]}
    try:
        jaxpr = str(jax.make_jaxpr(lambda: run("all").grad)())
        row["sharded"] = "shard_map" in jaxpr
        row["all"] = [float(v) for v in P.flat(jax.jit(lambda: run("all").grad)())]
    except (TypeError, ValueError) as err:
        row["refused"] = str(err)
    out[e.name] = row
print(json.dumps(out))
"""


@pytest.mark.matrix_full
def test_one_vs_four_host_devices():
    homes = {e.name: _home(e) for e in R.ESTIMATORS}
    code = f"HOMES = {homes!r}\n" + _DEVICE_CODE
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    four = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = []
    for e in R.ESTIMATORS:
        row, problem = four[e.name], P.get_problem(homes[e.name])
        est = e.factory(problem)
        theta = _theta(problem, jnp.float32)
        state = est.init(theta) if stateful(est) else None
        one = P.flat(jax.jit(lambda th, est=est, p=problem, s=state: sg.estimate_grad(
            p.f, p.family, th, jax.random.key(9), num_samples=row["n"], estimator=est,
            state=s).grad)(theta))
        # cross-fitted coefficients amplify float32 rounding between differently built programs
        tol = 1e-3 if _b(est, problem).fitted else 1e-5
        if not np.allclose(one, row["one"], rtol=tol, atol=1e-6):
            bad.append(f"{e.name}: 1-device process {one} vs devices=None in the 4-device "
                       f"process {row['one']}")
        if "refused" in row:
            if "devices" not in row["refused"]:
                bad.append(f"{e.name}: refused without naming devices: {row['refused']}")
            continue
        if not row["sharded"]:
            bad.append(f"{e.name}: devices='all' accepted but no shard_map in the program")
        if not np.allclose(one, row["all"], rtol=max(tol, 1e-4), atol=1e-6):
            bad.append(f"{e.name}: 1 device {one} vs 4 devices {row['all']}")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------
# The six combinations of issue 14: each right or refused.

BERN2 = jnp.asarray([0.3, -0.5], jnp.float32)


def _bern2_f(b):
    return jnp.sum((b - 0.45) ** 2)


def _bern2_exact():
    s = jax.nn.sigmoid(np.asarray(BERN2, np.float64))
    return s * (1 - s) * (1 - 2 * 0.45)


def _bern2_cv():
    return sg.control_variates.control_variate(
        lambda b, th: _bern2_f(b),
        lambda th: jnp.sum(jax.nn.sigmoid(th) * 0.55**2 + (1 - jax.nn.sigmoid(th)) * 0.45**2))


def test_issue14_1_binding_keeps_the_wrapper():
    """with_control_variates(measure_valued(), cv): the bound estimator keeps the control
    variate (h = f, coefficient 1: the exact gradient); antithetic(enumerate()): refused or exact."""
    problem = P.get_problem("gauss_square_d1")
    theta = _theta(problem, jnp.float32)
    cv = R.tracking_control_variate(problem)
    est = sg.control_variates.with_control_variates(sg.measure_valued(), cv, coefficient=1.0)
    r = jax.jit(lambda th: _estimate(est, problem, th, jax.random.key(0), 40))(theta)
    np.testing.assert_allclose(P.flat(r.grad), P.flat(problem.exact_grad), rtol=1e-4, atol=1e-5)
    bern = P.get_problem("bernoulli_t0.45")
    try:
        ant = sg.sampling.antithetic(sg.enumerate())
        r = _estimate(ant, bern, _theta(bern, jnp.float32), jax.random.key(0), 8)
    except (TypeError, ValueError) as err:
        assert "enumerate" in str(err)
        return
    np.testing.assert_allclose(P.flat(r.grad), P.flat(bern.exact_grad), rtol=1e-5)


@pytest.mark.parametrize("coefficient", ["optimal", 1.0])
def test_issue14_2_cv_on_rebar_exact_gumbel_refused(coefficient):
    """with_control_variates(rebar(learn=False), cv) on the 2-d Bernoulli toy: h = f gives the
    exact gradient [0.024, 0.024] (not [-515, 139]); gumbel_softmax is refused (biased)."""
    est = sg.control_variates.with_control_variates(
        sg.rebar(learn=False), _bern2_cv(), coefficient=coefficient)
    r = jax.jit(lambda th: sg.estimate_grad(
        _bern2_f, sg.families.bernoulli(), th, jax.random.key(0), num_samples=64,
        estimator=est))(BERN2)
    np.testing.assert_allclose(r.grad, _bern2_exact(), rtol=2e-3, atol=1e-5)
    with pytest.raises(TypeError, match="gumbel_softmax"):
        g = sg.control_variates.with_control_variates(sg.gumbel_softmax(0.5), _bern2_cv(),
                                                      coefficient=coefficient)
        sg.estimate_grad(_bern2_f, sg.families.bernoulli(), BERN2, jax.random.key(0),
                         num_samples=64, estimator=g)


@pytest.mark.parametrize("inner", [lambda: sg.gumbel_softmax(0.5), lambda: sg.rebar(learn=False),
                                   lambda: sg.straight_through_gumbel(0.5), sg.arm],
                         ids=["gumbel_softmax", "rebar", "st_gumbel", "arm"])
def test_issue14_3_antithetic_reaches_own_noise(inner):
    """antithetic(gumbel_softmax) / antithetic(rebar) / ARM: the design reaches the estimator's
    own noise through its Draws (it was a silent no-op, then refused). At theta = 0 the
    antithetic copy of logistic noise L is -L, so the relaxed or hard sample of the copy is
    1 - y: with f = sum(y) every pair sums to exactly D, and the mean of f is exactly D/2 for
    any N (with independent noise it is not)."""
    est = inner()
    th = jnp.zeros(2, jnp.float32)
    f = lambda y: jnp.sum(y)  # noqa: E731
    r = sg.estimate_grad(f, sg.families.bernoulli(), th, jax.random.key(0), num_samples=64,
                         estimator=sg.sampling.antithetic(est))
    np.testing.assert_allclose(r.value, 1.0, rtol=1e-6)
    if est.name != "arm":  # ARM's own pair is already antithetic
        plain = [float(sg.estimate_grad(f, sg.families.bernoulli(), th, jax.random.key(k),
                                        num_samples=64, estimator=est).value) for k in range(3)]
        assert max(abs(v - 1.0) for v in plain) > 1e-3, plain


@pytest.mark.statistical
def test_issue14_3_antithetic_rebar_unbiased(x64):
    """The design keeps REBAR unbiased (each copy's noise is exactly logistic/uniform)."""
    th = jnp.asarray(BERN2, jnp.float64)
    est = sg.sampling.antithetic(sg.rebar(learn=False))
    r = sg.estimate_grad(_bern2_f, sg.families.bernoulli(), th, jax.random.key(5),
                         num_samples=20000, estimator=est)
    su.assert_unbiased(r.grad, r.stderr, _bern2_exact(), atol=1e-9, what="antithetic[rebar]")
    su.assert_rejects(r.grad, r.stderr, 0.8 * _bern2_exact(), what="antithetic[rebar] power")


def test_issue14_4_optimal_baseline_devices_honoured_or_refused():
    """score_function(optimal()) with devices="all": refused naming devices, or the result of
    devices=None (the 4-device program must contain shard_map: test_one_vs_four_host_devices,
    where this estimator is the registry's score_function+optimal)."""
    problem = P.get_problem("gauss_square_d1")
    est = sg.score_function(baseline=sg.baselines.optimal())
    theta = _theta(problem, jnp.float32)
    run = jax.jit(lambda th, dev: _estimate(est, problem, th, jax.random.key(0), 16,
                                            devices=dev).grad, static_argnums=1)
    try:
        jaxpr = jax.make_jaxpr(lambda th: run(th, "all"))(theta)
    except (TypeError, ValueError) as err:
        assert "devices" in _refusal(err)
        return
    if jax.local_device_count() > 1:
        assert "shard_map" in str(jaxpr)
    _close(run(theta, "all"), run(theta, None), rtol=1e-5)


def test_issue14_5_adaptive_raises_on_nan():
    problem = P.get_problem(OPT_PROBLEM)
    with pytest.raises(Exception, match="NaN or infinite"):
        a = sg.estimate_grad_adaptive(_nan_f, problem.family, _theta(problem, jnp.float32),
                                      jax.random.key(0), target_stderr=1e-6, max_samples=256,
                                      chunk_size=32)
        jax.block_until_ready(a.estimate.grad)


@pytest.mark.parametrize("make", [lambda: sg.vimco(4), sg.measure_valued, sg.indecater],
                         ids=["vimco4", "measure_valued", "indecater"])
def test_issue14_6_drop_equals_raise_without_nan(make):
    """jax.grad(expectation(..., nan_policy="drop")) with no NaN equals "raise" (not x4)."""
    est = make()
    if est.name.startswith("vimco"):
        fam, theta, f = sg.families.normal(), {"loc": jnp.asarray([0.2, -0.1]),
                                              "scale": jnp.asarray([1.0, 0.7])}, \
            lambda x: -jnp.sum(x**2)
        n = 16
    elif est.name.startswith("indecater"):
        fam, theta = sg.families.categorical(), jnp.asarray([[0.1, -0.3, 0.4]])
        f, n = (lambda x: jnp.sum(jnp.asarray([0.5, -1.0, 2.0])[x])), 12
    else:
        fam, theta, f = sg.families.normal(), {"loc": jnp.asarray([0.2]),
                                              "scale": jnp.asarray([1.0])}, \
            lambda x: jnp.sum(jnp.cos(x))
        n = 16

    def grad(policy):
        return jax.jit(jax.grad(lambda th: sg.expectation(
            f, fam, th, jax.random.key(0), num_samples=n, estimator=est,
            nan_policy=policy)))(theta)

    _close(grad("drop"), grad("raise"), rtol=1e-6, atol=1e-7)
