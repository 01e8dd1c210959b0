"""Sequential programs with causal credit (scoregrad.programs): exact by enumeration, at every
derivative order, with each per-step baseline; the LOLA cross-Hessian of a two-agent game; the
entry points' contract (chunks, dtypes, nan_policy, refusals)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from stats_util import assert_below, assert_power, assert_rejects, assert_unbiased, variance_ratio

import scoregrad as sg
import scoregrad.programs as sp
from scoregrad._src.base import Draws, Model, Params
from scoregrad._src.engine import fstats_of

T = 3


def _prev(x):
    return jnp.concatenate([jnp.zeros((1,), x.dtype), x[:-1]])


def _sample(theta, key):
    keys = jax.random.split(key, T)

    def step(prev, inp):
        a, k = inp
        p = jax.nn.sigmoid(a + theta["b"] * prev)
        x = jax.random.bernoulli(k, p).astype(theta["a"].dtype)
        return x, x

    return jax.lax.scan(step, jnp.zeros((), theta["a"].dtype), (theta["a"], keys))[1]


def _log_prob(theta, x):
    logit = theta["a"] + theta["b"] * _prev(x)
    return x * jax.nn.log_sigmoid(logit) + (1 - x) * jax.nn.log_sigmoid(-logit)


def _cost(x):
    return (x - 0.3 * jnp.arange(T, dtype=x.dtype)) ** 2 + 0.7 * x * _prev(x)


PROG = sp.program(_log_prob, _sample, _cost, num_steps=T)
PATHS = np.array(list(itertools.product([0.0, 1.0], repeat=T)))


def _theta(dtype=jnp.float64):
    return {"a": jnp.array([0.2, -0.4, 0.5], dtype), "b": jnp.array(0.8, dtype)}


def _exact_value(theta, paths=PATHS, prog=PROG, log_prob=_log_prob):
    paths = jnp.asarray(paths)
    lp = jax.vmap(lambda x: jnp.sum(log_prob(theta, x)))(paths)
    total = jax.vmap(lambda x: prog.f(prog.steps(x[None])._replace(
        x=x, weights=jnp.ones(prog.num_steps, lp.dtype))))(paths)
    return jnp.sum(jnp.exp(lp) * total)


def _probs(theta, paths=PATHS, log_prob=_log_prob):
    return np.exp(np.asarray(jax.vmap(lambda x: jnp.sum(log_prob(theta, x)))(jnp.asarray(paths))))


def _surrogate(est, prog, theta, state=()):
    """The estimator's surrogate ``s(theta, batch)`` on a given batch of trajectories, as the
    engine combines it (sum_k w_k mean_i terms_ik, weights from the batch's f statistics): its
    derivatives at every order are the estimator's."""
    bound = sg.bind(est, prog.family, theta)
    model = Model(prog.f, prog.family.log_prob, prog.family.sample, prog.family, False)

    def s(th, batch):
        p = Params(th)
        steps = prog.steps(batch)
        k = bound.samples_per_unit  # a group of k programs per unit
        if k > 1:
            steps = jax.tree_util.tree_map(lambda a: a.reshape((-1, k) + a.shape[1:]), steps)
        out = jax.vmap(lambda x: bound.unit(model, p, Draws(model, p, x=x), state))(steps)
        fs = fstats_of(jax.lax.stop_gradient(out.fvals), out.terms.dtype)
        w = jax.lax.stop_gradient(bound.weights(fs, state, batch.shape[0]))
        return jnp.dot(w, jnp.mean(out.terms, axis=0))

    return s


def _expected(est, prog, theta, paths, probs, n, order, state=()):
    """E over i.i.d. batches of n trajectories (every tuple enumerated) of the surrogate's
    derivative of the given order."""
    idx = np.array(list(itertools.product(range(len(paths)), repeat=n)))
    w = np.prod(probs[idx], axis=1)
    s = _surrogate(est, prog, theta, state)
    d = jax.jit(jax.vmap(lambda b: [s, jax.grad(s), jax.hessian(s)][order](theta, b)))(
        jnp.asarray(paths)[idx])
    return jax.tree_util.tree_map(lambda a: np.tensordot(w, np.asarray(a), axes=1), d)


def _close(a, b, rtol=1e-10, atol=1e-12):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol),
                           a, b)


# ---------------------------------------------------------------- exact, by enumeration

@pytest.mark.parametrize("baseline", ["none", "moving_average", "value_function"])
def test_exact_value_gradient_hessian_single_program(x64, baseline):
    """E[surrogate], E[grad], E[hessian] over every trajectory equal the exact value, gradient
    and Hessian (DiCE at every order, per-step baselines included)."""
    theta = _theta()
    state = ()
    if baseline == "none":
        est = PROG.estimator()
    elif baseline == "moving_average":
        est = PROG.estimator(sp.moving_average(0.5))
        state = sp.MovingAverageState(jnp.array([1.3, -0.4, 0.9]), jnp.array([2, 2, 2]))
    else:  # a value function reading only the draws before each step
        base, _ = sp.value_function(lambda phi, x: phi[0] + phi[1] * _prev(x),
                                    jnp.array([0.5, 2.0]), optax.sgd(0.1))
        est = PROG.estimator(base)
        state = est.init(theta)
    probs = _probs(theta)
    _close(_expected(est, PROG, theta, PATHS, probs, 1, 0, state), _exact_value(theta))
    _close(_expected(est, PROG, theta, PATHS, probs, 1, 1, state), jax.grad(_exact_value)(theta))
    _close(_expected(est, PROG, theta, PATHS, probs, 1, 2, state),
           jax.hessian(_exact_value)(theta))


def test_exact_leave_one_out_over_pairs(x64):
    """Batch-wide per-step leave-one-out, every pair of trajectories: gradient and Hessian."""
    theta, est = _theta(), PROG.estimator(sp.leave_one_out())
    probs = _probs(theta)
    _close(_expected(est, PROG, theta, PATHS, probs, 2, 1), jax.grad(_exact_value)(theta))
    _close(_expected(est, PROG, theta, PATHS, probs, 2, 2), jax.hessian(_exact_value)(theta))


def test_exact_group_leave_one_out(x64):
    """Groups of two programs, every pair enumerated: value, gradient and Hessian; and through
    estimate_grad_from_samples (a group reads two consecutive given trajectories)."""
    theta, est = _theta(), PROG.estimator(sp.group_leave_one_out(2))
    assert sg.bind(est, PROG.family, theta).num_terms == 1
    probs = _probs(theta)
    _close(_expected(est, PROG, theta, PATHS, probs, 2, 0), _exact_value(theta))
    _close(_expected(est, PROG, theta, PATHS, probs, 2, 1), jax.grad(_exact_value)(theta))
    _close(_expected(est, PROG, theta, PATHS, probs, 2, 2), jax.hessian(_exact_value)(theta))
    pairs = np.array(list(itertools.product(range(len(PATHS)), repeat=2)))

    def two(ij):
        return sg.estimate_grad_from_samples(PROG.f, PROG.family, theta,
                                             PROG.steps(jnp.asarray(PATHS)[ij]),
                                             estimator=est).grad

    grads = jax.vmap(two)(jnp.asarray(pairs))
    w = probs[pairs[:, 0]] * probs[pairs[:, 1]]
    _close(jax.tree_util.tree_map(lambda g: jnp.tensordot(w, g, axes=1), grads),
           jax.grad(_exact_value)(theta))


def test_exact_gradient_through_the_public_api(x64):
    """sum_x p(x) * estimate_grad_from_samples(one trajectory x) is the exact gradient; the
    leave-one-out estimator over every pair of trajectories too."""
    theta = _theta()
    probs = _probs(theta)
    truth = jax.grad(_exact_value)(theta)

    def one(x):
        return sg.estimate_grad_from_samples(PROG.f, PROG.family, theta, PROG.steps(x[None]),
                                             estimator=PROG.estimator()).grad

    grads = jax.vmap(one)(jnp.asarray(PATHS))
    _close(jax.tree_util.tree_map(lambda g: jnp.tensordot(probs, g, axes=1), grads), truth)
    pairs = np.array(list(itertools.product(range(len(PATHS)), repeat=2)))

    def two(ij):
        xs = jnp.asarray(PATHS)[ij]
        return sg.estimate_grad_from_samples(PROG.f, PROG.family, theta, PROG.steps(xs),
                                             estimator=PROG.estimator(sp.leave_one_out())).grad

    grads = jax.vmap(two)(jnp.asarray(pairs))
    w = probs[pairs[:, 0]] * probs[pairs[:, 1]]
    _close(jax.tree_util.tree_map(lambda g: jnp.tensordot(w, g, axes=1), grads), truth)


def test_exact_variance_causal_below_whole_program(x64):
    """Per-trajectory variance by enumeration: causal credit strictly below whole-program
    REINFORCE on every coordinate a later step touches; equal on the first step's."""
    theta = _theta()
    probs = _probs(theta)

    def per_path(est):
        def one(x):
            g = sg.estimate_grad_from_samples(PROG.f, PROG.family, theta, PROG.steps(x[None]),
                                              estimator=est).grad
            return jnp.concatenate([g["a"], g["b"][None]])
        g = np.asarray(jax.vmap(one)(jnp.asarray(PATHS)))
        mean = probs @ g
        return probs @ (g - mean) ** 2, mean

    v_causal, m_causal = per_path(PROG.estimator())
    v_whole, m_whole = per_path(sg.score_function())
    np.testing.assert_allclose(m_causal, m_whole, rtol=1e-10)
    np.testing.assert_allclose(v_causal[0], v_whole[0], rtol=1e-10)
    assert np.all(v_causal[1:] < 0.9 * v_whole[1:]), (v_causal, v_whole)


# ---------------------------------------------------------------- the two-agent game (LOLA)

def _ipd_paths(t):
    return np.array(list(itertools.product([0, 1], repeat=2 * t)), np.int32).reshape(-1, t, 2)


def _ipd_theta():
    return {"agent1": jnp.array([0.3, -0.2, 0.5, -0.7, 0.1]),
            "agent2": jnp.array([-0.4, 0.6, 0.2, 0.3, -0.5])}


def _ipd_exact(theta, t=2):
    p1, _ = sp.iterated_prisoners_dilemma(t, discount=0.9)
    lp = jax.vmap(lambda x: jnp.sum(p1.family.log_prob(theta, p1.steps(x[None])._replace(
        x=x, weights=jnp.ones(t)))))(jnp.asarray(_ipd_paths(t)))
    tot = jax.vmap(lambda x: p1.f(sp.Steps(x, jnp.ones(t))))(jnp.asarray(_ipd_paths(t)))
    return jnp.sum(jnp.exp(lp) * tot)


def test_lola_cross_hessian_exact(x64):
    """E over every 2-step game of the causal surrogate's Hessian is the exact Hessian of V1,
    in particular LOLA's cross block d2 V1 / d theta1 d theta2 (theta a dict of two agents)."""
    p1, _ = sp.iterated_prisoners_dilemma(2, discount=0.9)
    theta, paths = _ipd_theta(), _ipd_paths(2)
    lp = jax.vmap(lambda x: jnp.sum(p1.family.log_prob(theta, sp.Steps(x, jnp.ones(2)))))(
        jnp.asarray(paths))
    probs = np.exp(np.asarray(lp))
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-12)
    h = _expected(p1.estimator(), p1, theta, paths, probs, 1, 2)
    truth = jax.hessian(_ipd_exact)(theta)
    _close(h, truth)
    assert np.max(np.abs(truth["agent1"]["agent2"])) > 0.05  # the cross block is not trivial


@pytest.mark.statistical
def test_lola_cross_hessian_through_expectation(x64):
    """jax.hessian of sg.expectation (chunked engine, custom JVP) over replicate keys: unbiased
    for the cross block, and the test rejects the cross block's sign flipped."""
    p1, _ = sp.iterated_prisoners_dilemma(2, discount=0.9)
    theta, est = _ipd_theta(), p1.estimator(sp.leave_one_out())

    def cross(key):
        h = jax.hessian(lambda th: sg.expectation(p1.f, p1.family, th, key, num_samples=512,
                                                  estimator=est, chunk_size=128))(theta)
        return h["agent1"]["agent2"]

    keys = jax.random.split(jax.random.key(17), 40)
    hs = np.asarray(jax.jit(jax.vmap(cross))(keys))
    mean, se = hs.mean(0), hs.std(0, ddof=1) / np.sqrt(len(hs))
    truth = np.asarray(jax.hessian(_ipd_exact)(theta)["agent1"]["agent2"])
    assert_unbiased(mean, se, truth, what="LOLA cross-Hessian")
    assert_rejects(mean, se, -truth, what="LOLA cross-Hessian, sign flipped")


# ---------------------------------------------------------------- Monte Carlo, entry points

@pytest.mark.statistical
@pytest.mark.parametrize("baseline", [None, "leave_one_out", "group_leave_one_out"])
def test_estimate_grad_unbiased_with_power(x64, baseline):
    est = PROG.estimator({None: None, "leave_one_out": sp.leave_one_out(),
                          "group_leave_one_out": sp.group_leave_one_out(4)}[baseline])
    theta = _theta()
    r = sg.estimate_grad(PROG.f, PROG.family, theta, jax.random.key(3), num_samples=8192,
                         estimator=est)
    truth = jax.grad(_exact_value)(theta)
    for k in ("a", "b"):
        assert_unbiased(r.grad[k], r.stderr[k], truth[k], what=f"grad[{k}]")
        assert_power(r.stderr[k], 0.02, what=f"stderr[{k}]")
    if baseline != "leave_one_out":  # its value_stderr is over per-step values (docs: Limits)
        assert_unbiased(r.value, r.value_stderr, _exact_value(theta), what="value")


@pytest.mark.statistical
def test_hessian_of_expectation_unbiased(x64):
    theta, est = _theta(), PROG.estimator(sp.leave_one_out())

    def hess(key):
        h = jax.hessian(lambda th: sg.expectation(PROG.f, PROG.family, th, key,
                                                  num_samples=256, estimator=est))(theta)
        return jnp.concatenate([h["a"]["a"].ravel(), h["a"]["b"], h["b"]["b"][None]])

    hs = np.asarray(jax.jit(jax.vmap(hess))(jax.random.split(jax.random.key(5), 60)))
    h = jax.hessian(_exact_value)(theta)
    truth = np.concatenate([h["a"]["a"].ravel(), h["a"]["b"], h["b"]["b"][None]])
    mean, se = hs.mean(0), hs.std(0, ddof=1) / np.sqrt(len(hs))
    assert_unbiased(mean, se, truth, atol=1e-6, what="Hessian")
    assert_rejects(mean, se, np.zeros_like(truth), what="Hessian vs zero")


@pytest.mark.statistical
def test_causal_variance_below_whole_program_common_random_numbers(x64):
    """A 20-step game: replicate estimates on the same keys (the same games); causal credit's
    variance is below whole-program REINFORCE's by a 5-SE margin on the memory states."""
    p1, _ = sp.iterated_prisoners_dilemma(20)
    theta = _ipd_theta()

    def both(key):
        a = sg.estimate_grad(p1.f, p1.family, theta, key, num_samples=32,
                             estimator=p1.estimator()).grad["agent1"]
        b = sg.estimate_grad(p1.f, p1.family, theta, key, num_samples=32).grad["agent1"]
        return a, b

    a, b = jax.jit(jax.vmap(both))(jax.random.split(jax.random.key(11), 200))
    ratio, se = variance_ratio(np.asarray(a)[:, 1:], np.asarray(b)[:, 1:])
    assert_below(ratio + 5 * se, 1.0, what="var(causal) / var(whole program)")


@pytest.mark.statistical
def test_moving_average_threads_state_and_stays_unbiased(x64):
    theta = _theta()
    est = PROG.estimator(sp.moving_average(0.5))
    state = est.init(theta)
    assert state.average.shape == (T,)
    run = jax.jit(lambda st, key: sg.estimate_grad(PROG.f, PROG.family, theta, key,
                                                   num_samples=8192, estimator=est, state=st))
    for i in range(3):
        state = run(state, jax.random.key(i)).state
    assert int(state.steps[0]) == 3
    # the average tracks the mean cost-to-go per step
    g = sp.cost_to_go(jax.vmap(_cost)(jnp.asarray(PATHS)))
    np.testing.assert_allclose(state.average / (1 - 0.5**3), _probs(theta) @ np.asarray(g),
                               atol=0.05)
    truth = jax.grad(_exact_value)(theta)
    r = run(state, jax.random.key(9))
    for k in ("a", "b"):
        assert_unbiased(r.grad[k], r.stderr[k], truth[k], what=f"grad[{k}]")
    value, new = sg.expectation_with_state(PROG.f, PROG.family, theta, jax.random.key(1), state,
                                           num_samples=64, estimator=est)
    assert int(new.steps[0]) == 4 and value.shape == ()


def test_value_function_fit_lowers_its_loss(x64):
    base, fit = sp.value_function(lambda phi, x: phi[0] + phi[1] * _prev(x),
                                  jnp.zeros(2), optax.sgd(0.2))
    est = PROG.estimator(base)
    theta = _theta()
    state = est.init(theta)
    keys = jax.random.split(jax.random.key(2), 256)
    xs = jax.vmap(lambda k: _sample(theta, k))(keys)
    costs = jax.vmap(_cost)(xs)
    losses = []
    for _ in range(20):
        state, loss = fit(state, xs, costs)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    r = sg.estimate_grad(PROG.f, PROG.family, theta, jax.random.key(0), num_samples=512,
                         estimator=est, state=state)
    assert np.isfinite(r.grad["b"])


def test_chunk_size_invariance(x64):
    """Program i depends only on (key, i): two chunk sizes give the same estimate."""
    theta, est = _theta(), PROG.estimator(sp.leave_one_out())
    rs = [sg.estimate_grad(PROG.f, PROG.family, theta, jax.random.key(0), num_samples=48,
                           estimator=est, chunk_size=c) for c in (5, 16)]
    _close(rs[1].grad, rs[0].grad)
    _close(rs[1].stderr, rs[0].stderr, rtol=1e-8)
    np.testing.assert_allclose(rs[1].value, rs[0].value, rtol=1e-12)


def test_chunk_size_invariance_above_the_automatic_split(x64):
    """5000 programs: more than the automatic chunk (4096 units), against explicit chunks of
    1000 in jax.grad of expectation (the custom JVP's grad mode)."""
    theta, est = _theta(), PROG.estimator()
    auto = sg.estimate_grad(PROG.f, PROG.family, theta, jax.random.key(4), num_samples=5000,
                            estimator=est)
    g = jax.grad(lambda th: sg.expectation(PROG.f, PROG.family, th, jax.random.key(4),
                                           num_samples=5000, estimator=est,
                                           chunk_size=1000))(theta)
    _close(g, auto.grad, rtol=1e-9)


def test_whole_program_is_the_single_site_special_case(x64):
    """score_function on a program's family and f is whole-program REINFORCE; both estimators
    report the same value (the mean total cost) on the same draws."""
    theta = _theta()
    a = sg.estimate_grad(PROG.f, PROG.family, theta, jax.random.key(0), num_samples=256,
                         estimator=PROG.estimator())
    b = sg.estimate_grad(PROG.f, PROG.family, theta, jax.random.key(0), num_samples=256)
    np.testing.assert_allclose(a.value, b.value, rtol=1e-12)
    np.testing.assert_allclose(a.grad["a"][0], b.grad["a"][0], rtol=1e-10)  # first step: same


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtypes_and_jit(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        theta = _theta(dtype)
        est = PROG.estimator()

        @jax.jit
        def run(th, key):
            return sg.estimate_grad(PROG.f, PROG.family, th, key, num_samples=64, estimator=est)

        r = run(theta, jax.random.key(0))
        assert r.grad["a"].dtype == dtype and r.value.dtype == dtype
        eager = sg.estimate_grad(PROG.f, PROG.family, theta, jax.random.key(0),
                                 num_samples=64, estimator=est)
        _close(r.grad, eager.grad, rtol=1e-5 if dtype == jnp.float32 else 1e-10, atol=1e-6)


def test_closure_over_theta_gets_its_pathwise_term(x64):
    """A cost that closes over theta: jax.grad of expectation adds E[d cost / d theta]."""
    theta = _theta()

    def loss(th):
        prog = sp.program(_log_prob, _sample, lambda x: _cost(x) + th["b"] * x, num_steps=T)
        return sg.expectation(prog.f, prog.family, th, jax.random.key(0), num_samples=256,
                              estimator=prog.estimator())

    def plain(th, b):
        prog = sp.program(_log_prob, _sample, lambda x: _cost(x) + b * x, num_steps=T)
        return sg.expectation(prog.f, prog.family, th, jax.random.key(0), num_samples=256,
                              estimator=prog.estimator())

    g = jax.grad(loss)(theta)["b"]
    ref = jax.grad(plain)(theta, theta["b"])["b"] + jax.grad(plain, argnums=1)(theta, theta["b"])
    np.testing.assert_allclose(g, ref, rtol=1e-10)


def test_optax_loop_on_the_game_lowers_agent_costs(x64):
    p1, p2 = sp.iterated_prisoners_dilemma(5)
    theta = {"agent1": jnp.zeros(5), "agent2": jnp.zeros(5)}
    opt = optax.adam(0.1)
    st = opt.init(theta)

    def joint(th, key):  # both agents minimize the sum of their costs (cooperation pays)
        v1 = sg.expectation(p1.f, p1.family, th, key, num_samples=128, estimator=p1.estimator())
        v2 = sg.expectation(p2.f, p2.family, th, key, num_samples=128, estimator=p2.estimator())
        return v1 + v2

    step = jax.jit(lambda th, st, key: opt.update(jax.grad(joint)(th, key), st, th))
    start = float(joint(theta, jax.random.key(99)))
    for i in range(30):
        upd, st = step(theta, st, jax.random.key(i))
        theta = optax.apply_updates(theta, upd)
    assert float(joint(theta, jax.random.key(99))) < start - 2.0


# ---------------------------------------------------------------- policy and refusals

def test_nan_policy_raise_by_default_and_drop():
    prog = sp.program(_log_prob, _sample,
                      lambda x: jnp.where(x[2] > 0, jnp.nan, 1.0) * _cost(x), num_steps=T)
    theta = _theta(jnp.float32)
    with pytest.raises(FloatingPointError):
        sg.estimate_grad(prog.f, prog.family, theta, jax.random.key(0), num_samples=64,
                         estimator=prog.estimator())
    r = sg.estimate_grad(prog.f, prog.family, theta, jax.random.key(0), num_samples=64,
                         estimator=prog.estimator(), nan_policy="drop")
    assert int(r.num_nonfinite) > 0 and np.isfinite(r.grad["b"])


def test_refusals():
    theta = _theta(jnp.float32)
    with pytest.raises(TypeError, match="sg.programs.program"):
        sg.estimate_grad(lambda x: jnp.sum(x), sg.families.bernoulli(), jnp.zeros(3),
                         jax.random.key(0), num_samples=8, estimator=sp.causal())
    with pytest.raises(ValueError, match="num_steps"):
        sp.causal(sp.moving_average(0.9))
    with pytest.raises(ValueError, match="has 3 steps"):
        sg.estimate_grad(PROG.f, PROG.family, theta, jax.random.key(0), num_samples=8,
                         estimator=sp.causal(num_steps=4))
    bad = sp.program(_log_prob, _sample, lambda x: jnp.sum(_cost(x)), num_steps=T)
    with pytest.raises(ValueError, match="one value per step"):
        sg.estimate_grad(bad.f, bad.family, theta, jax.random.key(0), num_samples=8,
                         estimator=bad.estimator())
    with pytest.raises(TypeError, match="per-step baseline"):
        sp.causal(sg.baselines.leave_one_out())
    with pytest.raises(ValueError, match="num_steps"):
        sp.program(_log_prob, _sample, _cost, num_steps=0)
    cv = sg.control_variates.control_variate(lambda s, th: jnp.sum(s.x), lambda th: 0.0)
    with pytest.raises(TypeError, match="per-step costs"):
        sg.estimate_grad(PROG.f, PROG.family, theta, jax.random.key(0), num_samples=8,
                         estimator=sg.control_variates.with_control_variates(PROG.estimator(),
                                                                              cv))


@pytest.mark.parametrize("steps", [pytest.param(3, marks=pytest.mark.slow), 10])
def test_weights_from_a_value_pass_equal_one_reverse_pass_per_term(x64, monkeypatch, steps):
    """From PREPASS_TERMS weighted terms up (per-step baselines of long programs), expectation's
    gradient and estimate_grad fix the weights by a value pass and differentiate the weighted
    sum once (K reverse passes took 91x the whole-program time and a 5-minute compile at
    T = 500). Both routes give the same gradient, Hessian, standard errors and variance
    reduction, below and above the threshold, at two chunks."""
    from scoregrad._src import surrogate

    p1, _ = sp.iterated_prisoners_dilemma(steps)
    th = {"agent1": jnp.linspace(-1.0, 1.0, 5), "agent2": jnp.linspace(0.5, -0.5, 5)}
    est = p1.estimator(sp.leave_one_out())
    assert sg.bind(est, p1.family, th).num_terms == steps + 2

    def derivatives(chunk):
        v = lambda t: sg.expectation(p1.f, p1.family, t, jax.random.key(5),  # noqa: E731
                                     num_samples=48, estimator=est, chunk_size=chunk)
        r = sg.estimate_grad(p1.f, p1.family, th, jax.random.key(5), num_samples=48,
                             estimator=est, chunk_size=chunk)
        return (jax.grad(v)(th), jax.hessian(v)(th)["agent1"]["agent2"], r.grad, r.stderr,
                r.variance_reduction, r.value_stderr)

    out = {}
    for route, threshold in (("per term", 10**6), ("value pass", 1)):
        monkeypatch.setattr(surrogate, "PREPASS_TERMS", threshold)
        out[route] = [derivatives(c) for c in (None, 20)]
    for a, b in zip(out["per term"], out["value pass"]):
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    # Power: the baseline's weights matter (without them the gradient differs).
    plain = jax.grad(lambda t: sg.expectation(p1.f, p1.family, t, jax.random.key(5),
                                              num_samples=48, estimator=p1.estimator()))(th)
    assert not np.allclose(plain["agent1"], out["per term"][0][0]["agent1"], rtol=1e-3)


def test_value_pass_route_under_drop(x64):
    """The value-pass route (8 weighted terms) under nan_policy="drop": with no NaN it equals
    "raise" at two chunk sizes; with NaN costs in some programs those are counted and left out,
    and expectation's gradient equals estimate_grad's."""
    from scoregrad._src import surrogate

    p1, _ = sp.iterated_prisoners_dilemma(6)
    th = {"agent1": jnp.linspace(-1.0, 1.0, 5), "agent2": jnp.linspace(0.5, -0.5, 5)}
    est = p1.estimator(sp.leave_one_out())
    assert sg.bind(est, p1.family, th).num_terms == 8 >= surrogate.PREPASS_TERMS

    def run(f, policy, chunk):
        v = lambda t: sg.expectation(f, p1.family, t, jax.random.key(5),  # noqa: E731
                                     num_samples=48, estimator=est, chunk_size=chunk,
                                     nan_policy=policy)
        r = sg.estimate_grad(f, p1.family, th, jax.random.key(5), num_samples=48,
                             estimator=est, chunk_size=chunk, nan_policy=policy)
        return jax.grad(v)(th), r

    for chunk in (None, 20):
        (g_raise, r_raise), (g_drop, r_drop) = run(p1.f, "raise", chunk), run(p1.f, "drop", chunk)
        for x, y in zip(jax.tree_util.tree_leaves((g_raise, r_raise.grad, r_raise.stderr)),
                        jax.tree_util.tree_leaves((g_drop, r_drop.grad, r_drop.stderr))):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)
        assert int(r_drop.num_nonfinite) == 0

    def f_nan(x):  # every step's cost NaN in programs whose first step draws two zeros (~1/4)
        return p1.f(x) * jnp.where(jnp.sum(jnp.abs(jnp.ravel(x.x)[:2])) == 0, jnp.nan, 1.0)

    g, r = run(f_nan, "drop", 20)
    bad = int(r.num_nonfinite)  # per-step costs: T = 6 per program left out
    assert bad % 6 == 0 and 0 < bad // 6 < 48
    leaves = jax.tree_util.tree_leaves((g, r.grad, r.stderr))
    assert all(np.all(np.isfinite(a)) for a in leaves)
    np.testing.assert_allclose(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(r.grad),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("entry", ["estimate_grad", "expectation"])
def test_f_that_is_not_the_sum_of_its_step_costs_is_refused(x64, entry):
    """Causal credit reads per-step costs off f's gradient in the step weights; an f that is not
    linear in them (a square, a constant offset) would give a silent wrong answer: its costs are
    NaN, so the default nan_policy raises. The program's own f, and a multiple of it, pass."""
    theta = _theta()
    est = PROG.estimator(sp.leave_one_out())

    def run(f, **kw):
        if entry == "estimate_grad":
            return sg.estimate_grad(f, PROG.family, theta, jax.random.key(0), num_samples=16,
                                    estimator=est, **kw).value
        return sg.expectation(f, PROG.family, theta, jax.random.key(0), num_samples=16,
                              estimator=est, **kw)

    for bad in (lambda s: PROG.f(s) ** 2, lambda s: PROG.f(s) - 1.0):
        with pytest.raises(FloatingPointError, match="not their sum"):
            run(bad)
    np.testing.assert_allclose(run(lambda s: 3.0 * PROG.f(s)), 3.0 * run(PROG.f), rtol=1e-12)
    # under "propagate" the wrong f's value is NaN, never a number
    assert np.isnan(run(lambda s: PROG.f(s) ** 2, nan_policy="propagate"))


def test_bind_derives_terms_and_presample():
    theta = _theta(jnp.float32)
    b = sg.bind(PROG.estimator(), PROG.family, theta)
    assert (b.num_terms, b.presample, b.needs_key, b.stateful) == (1, True, False, False)
    b = sg.bind(PROG.estimator(sp.leave_one_out()), PROG.family, theta)
    assert (b.num_terms, b.min_units) == (T + 2, 2)
    b = sg.bind(PROG.estimator(sp.moving_average()), PROG.family, theta)
    assert (b.num_terms, b.stateful) == (2, True)


_DEVICES_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import scoregrad as sg, scoregrad.programs as sp
assert len(jax.devices()) == 2
p1, _ = sp.iterated_prisoners_dilemma(8)
th = {"agent1": jnp.linspace(-1, 1, 5), "agent2": jnp.linspace(1, -1, 5)}
for est in [p1.estimator(sp.leave_one_out())]:  # per-step statistics merged across devices
    kw = dict(num_samples=64, estimator=est)
    a = sg.estimate_grad(p1.f, p1.family, th, jax.random.key(0), **kw)
    b = sg.estimate_grad(p1.f, p1.family, th, jax.random.key(0), devices="all", **kw)
    np.testing.assert_allclose(a.grad["agent1"], b.grad["agent1"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.value, b.value, rtol=1e-12)
    def cross(devices):
        v = lambda t: sg.expectation(p1.f, p1.family, t, jax.random.key(0), devices=devices, **kw)
        return jax.hessian(v)(th)["agent1"]["agent2"]
    np.testing.assert_allclose(cross("all"), cross(None), rtol=1e-10, atol=1e-12)
print("ok")
"""


@pytest.mark.slow
def test_devices_all_matches_one_device(tmp_path):
    """Programs sharded over two host devices: the same gradient, value and cross-Hessian."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
