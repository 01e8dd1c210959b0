"""Categorical estimators: ARSM, the unordered-set estimator (Gumbel-top-k), categorical
REBAR/RELAX. Exact unbiasedness (enumeration of k-subsets; exact integration over the simplex),
wiring to the engine's draws, statistical checks, contract and errors."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stats_util import (
    assert_above,
    assert_power,
    assert_rejects,
    assert_unbiased,
    log_variance_ratio,
)

import scoregrad as sg
from scoregrad._src.estimators.categorical import (
    arsm,
    arsm_gradient,
    arsm_pseudo_actions,
    gumbel_top_k,
    joint_table,
    unordered_set,
    unordered_set_surrogate,
)
from scoregrad._src.estimators.categorical_rebar import (
    categorical_rebar,
    categorical_relax,
    rebar_cv,
    relax_surrogate,
)

FAM = sg.families.categorical()
THETA = [[0.3, -0.5, 1.0], [0.1, 0.7, -0.2]]
VALS = [[1.0, -2.0, 0.5], [0.3, 2.0, -1.0]]


def f_index(x):
    """An f of two categoricals (K = 3) with an interaction: integer input."""
    vals = jnp.asarray(VALS)
    return jnp.sum(vals[jnp.arange(2), x]) + 3.0 * (x[0] == x[1]).astype(vals.dtype)


def f_onehot(y):
    """The same f on one-hot (or relaxed) input (..., 3), for REBAR/RELAX."""
    vals = jnp.asarray(VALS, y.dtype)
    return jnp.sum(y * vals) + 3.0 * jnp.sum(y[0] * y[1])


def truth(f, theta):
    return sg.estimate_grad(f, FAM, theta, jax.random.key(0), num_samples=int(FAM.capabilities.
                            support_size(theta)), estimator=sg.enumerate())


# ------------------------------------------------------------------ unordered set: exact


def _brute_set_prob(p, subset):
    """P(the unordered set) by summing over orders, in numpy (independent of the module)."""
    total = 0.0
    for order in itertools.permutations(subset):
        prob, used = 1.0, 0.0
        for s in order:
            prob *= p[s] / (1.0 - used)
            used += p[s]
        total += prob
    return total


def _exact_unordered_set(theta, f, k):
    """E[g] and E[value] by enumerating every k-subset of the joint support with its probability."""
    c, batch = theta.shape[-1], theta.shape[:-1]
    table = joint_table(batch, c)

    def log_p(th):
        lp = jax.nn.log_softmax(th.reshape(-1, c), -1)
        return jnp.sum(lp[np.arange(table.shape[1])[None, :], table], axis=1)

    p = np.exp(np.asarray(log_p(theta)))
    fv_all = jax.vmap(f)(jnp.asarray(table).reshape((-1,) + batch))
    subsets = np.array(list(itertools.combinations(range(len(p)), k)), np.int32)
    w = np.array([_brute_set_prob(p, s) for s in subsets])

    def one(idx):
        return jax.value_and_grad(lambda th: unordered_set_surrogate(log_p(th), idx,
                                                                     fv_all[idx]))(theta)

    value, g = jax.jit(jax.vmap(one))(jnp.asarray(subsets))
    return jnp.tensordot(w, g, 1), jnp.dot(w, value), w.sum()


@pytest.mark.parametrize("k", [2, 3, 5, 9])
def test_unordered_set_exact_two_categoricals(x64, k):
    theta = jnp.asarray(THETA)
    g, v, total = _exact_unordered_set(theta, f_index, k)
    ref = truth(f_index, theta)
    np.testing.assert_allclose(total, 1.0, rtol=1e-12)
    np.testing.assert_allclose(g, ref.grad, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(v, ref.value, rtol=1e-10)


@pytest.mark.parametrize("k", [2, 4])
def test_unordered_set_exact_one_categorical_peaked(x64, k):
    theta = jnp.asarray([2.5, -1.0, 0.3, -3.0, 0.0])
    f = lambda x: jnp.sin(1.0 + x.astype(jnp.float64)) ** 2  # noqa: E731
    g, v, _ = _exact_unordered_set(theta, f, k)
    ref = truth(f, theta)
    np.testing.assert_allclose(g, ref.grad, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(v, ref.value, rtol=1e-10)


def test_unordered_set_wiring(x64):
    """Unit i is the Gumbel-top-k of gumbel(fold_in(key, i), (C^D,)): exact check."""
    theta, key, k = jnp.asarray(THETA), jax.random.key(7), 3
    r = sg.estimate_grad(f_index, FAM, theta, key, num_samples=3 * k, estimator=unordered_set(k))
    table = joint_table((2,), 3)
    lp = jax.nn.log_softmax(theta, -1)

    def log_p(th):
        lq = jax.nn.log_softmax(th, -1)
        return lq[0, table[:, 0]] + lq[1, table[:, 1]]

    @jax.jit
    def one(i):
        g = jax.random.gumbel(jax.random.fold_in(key, i), (9,), jnp.float64)
        idx = jax.lax.top_k(lp[0, table[:, 0]] + lp[1, table[:, 1]] + g, k)[1]
        fv = jax.vmap(f_index)(jnp.asarray(table)[idx])
        return jax.value_and_grad(lambda th: unordered_set_surrogate(log_p(th), idx, fv))(theta)

    vs, gs = jax.vmap(one)(jnp.arange(3))
    np.testing.assert_allclose(r.grad, np.mean(gs, 0), rtol=1e-12)
    np.testing.assert_allclose(r.value, np.mean(vs), rtol=1e-12)
    assert r.grad.dtype == r.value.dtype == jnp.float64


@pytest.mark.statistical
def test_gumbel_top_k_is_sampling_without_replacement(x64):
    """Frequencies of the ordered pairs of gumbel_top_k(k=2) against p(a) p(b) / (1 - p(a))."""
    logits = jnp.asarray([0.5, -0.3, 1.2, 0.0])
    n = 100_000
    draws = jax.jit(jax.vmap(lambda kk: gumbel_top_k(kk, logits, 2)))(
        jax.random.split(jax.random.key(3), n))
    p = np.asarray(jax.nn.softmax(logits))
    codes = np.asarray(draws[:, 0] * 4 + draws[:, 1])
    assert np.all(draws[:, 0] != draws[:, 1])
    freq = np.bincount(codes, minlength=16) / n
    exact = np.array([p[a] * p[b] / (1 - p[a]) if a != b else 0.0
                      for a in range(4) for b in range(4)])
    se = np.sqrt(exact * (1 - exact) / n)
    assert_unbiased(freq, se, exact, what="ordered-pair frequencies of Gumbel-top-2")
    assert_rejects(freq, np.maximum(se, 1e-12), np.outer(p, p).ravel(),
                   what="rejects sampling with replacement")


# --------------------------------------------------------------------------- ARSM: exact


def _split(poly, h):
    pos, neg = [], []
    n = len(poly)
    for i in range(n):
        p, q, hp, hq = poly[i], poly[(i + 1) % n], h[i], h[(i + 1) % n]
        if hp >= 0:
            pos.append(p)
        if hp <= 0:
            neg.append(p)
        if hp * hq < 0:
            x = p + hp / (hp - hq) * (q - p)
            pos.append(x)
            neg.append(x)
    return [np.array(s) for s in (pos, neg) if len(s) >= 3]


def _simplex_triangles(phi):
    """Triangles (weights, centroids) partitioning the 2-simplex into cells on which every
    pseudo action of ARSM is constant: the lines pi_x = r pi_u for x < u and
    r = exp(phi_y - phi_w) (every comparison ln pi_x - phi_y vs ln pi_u - phi_w of a swap)."""
    lines = {(x, u, float(np.exp(phi[y] - phi[w])))
             for x in range(3) for u in range(x + 1, 3) for y in range(3) for w in range(3)}
    polys = [np.eye(3)]
    for x, u, r in sorted(lines):
        polys = [piece for poly in polys for piece in _split(poly, poly[:, x] - r * poly[:, u])]
    weights, cents = [], []
    for poly in polys:
        for i in range(1, len(poly) - 1):
            tri = poly[[0, i, i + 1]]
            a, b = tri[1, :2] - tri[0, :2], tri[2, :2] - tri[0, :2]
            weights.append(abs(a[0] * b[1] - a[1] * b[0]))  # area / (1/2): the simplex has 1/2
            cents.append(tri.mean(0))
    return np.array(weights), np.array(cents)


def _arsm_estimate(logits, gumbel, f):
    points = arsm_pseudo_actions(logits, gumbel)
    fv = jax.vmap(f)(points.reshape((-1,) + logits.shape[:-1]))
    return arsm_gradient(logits, gumbel, fv), jnp.mean(fv)


def test_arsm_exact_by_integration_two_categoricals(x64):
    """pi_1, pi_2 ~ Dir(1_3) independent: ARSM's estimate is constant in f and linear in pi_d on
    products of cells, so the sum of area x estimate at the centroid of each product of
    triangles is E[g] exactly (up to rounding)."""
    theta = jnp.asarray(THETA)
    (w1, c1), (w2, c2) = (_simplex_triangles(np.asarray(theta[d])) for d in range(2))
    assert abs(w1.sum() - 1) < 1e-12 and abs(w2.sum() - 1) < 1e-12
    pi = np.stack([np.repeat(c1, len(c2), 0), np.tile(c2, (len(c1), 1))], 1)  # (n1 n2, 2, 3)
    wts = np.outer(w1, w2).ravel()
    g, v = jax.jit(jax.vmap(lambda q: _arsm_estimate(theta, -jnp.log(q), f_index)))(jnp.asarray(pi))
    ref = truth(f_index, theta)
    np.testing.assert_allclose(jnp.tensordot(wts, g, 1), ref.grad, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(jnp.dot(wts, v), ref.value, rtol=1e-10)


@pytest.mark.parametrize("phi", [[0.0, 0.0, 0.0], [2.0, -1.5, 0.4]])
def test_arsm_exact_by_integration_one_categorical(x64, phi):
    theta = jnp.asarray(phi)
    w, c = _simplex_triangles(np.asarray(phi))
    f = lambda x: jnp.asarray([1.5, -0.7, 4.0])[x[0]]  # noqa: E731 (x: shape (1,))
    g, _ = jax.vmap(lambda q: _arsm_estimate(theta[None], -jnp.log(q[None]), f))(jnp.asarray(c))
    ref = truth(lambda x: f(x[None]), theta).grad
    np.testing.assert_allclose(jnp.tensordot(w, g[:, 0], 1), ref, rtol=1e-10,
                               atol=1e-14)


def test_arsm_pseudo_actions_match_brute_force(x64):
    """The O(M D) selection equals argmin over the swapped vector, for C up to 7."""
    for c in (2, 3, 7):
        key = jax.random.key(c)
        logits = jax.random.normal(key, (4, c))
        g = jax.random.gumbel(jax.random.fold_in(key, 1), (4, c))
        got = np.asarray(arsm_pseudo_actions(logits, g))
        log_e = -np.asarray(g)
        pairs = [(0, 0)] + [(a, b) for a in range(c) for b in range(a + 1, c)]
        for m, (a, b) in enumerate(pairs):
            sw = log_e.copy()
            sw[:, [a, b]] = sw[:, [b, a]]
            np.testing.assert_array_equal(got[m], np.argmin(sw - np.asarray(logits), -1))


def test_arsm_wiring(x64):
    theta, key = jnp.asarray(THETA), jax.random.key(5)
    r = sg.estimate_grad(f_index, FAM, theta, key, num_samples=8, estimator=arsm())
    one = jax.jit(jax.vmap(lambda i: _arsm_estimate(
        theta, jax.random.gumbel(jax.random.fold_in(key, i), (2, 3), jnp.float64), f_index)))
    gs, vs = one(jnp.arange(2))
    np.testing.assert_allclose(r.grad, np.mean(gs, 0), rtol=1e-12)
    np.testing.assert_allclose(r.value, np.mean(vs), rtol=1e-12)
    assert r.grad.dtype == r.value.dtype == jnp.float64


# --------------------------------------------------------------------- REBAR / RELAX


def test_rebar_wiring(x64):
    """Unit i: Gumbel noise from the unit key fold_in(key, i), uniforms from its next stream
    fold_in(unit key, 2^31 + 1) (sg.Draws)."""
    theta, key = jnp.asarray(THETA), jax.random.key(9)
    omega = {"eta": jnp.asarray(0.8), "log_temperature": jnp.asarray(math.log(0.4))}
    r = sg.estimate_grad(f_onehot, FAM, theta, key, num_samples=3,
                         estimator=categorical_rebar(0.4, 0.8))

    @jax.jit
    @jax.vmap
    def one(i):
        uk = jax.random.fold_in(key, i)
        g = jax.random.gumbel(uk, (2, 3), jnp.float64)
        v = jax.random.uniform(jax.random.fold_in(uk, 2**31 + 1), (2, 3), jnp.float64)
        term = lambda th: relax_surrogate(f_onehot, lambda b: FAM.log_prob(th, b), rebar_cv,  # noqa: E731
                                          omega, th, g, v)[0]
        return jax.grad(term)(theta)

    gs = one(jnp.arange(3))
    np.testing.assert_allclose(r.grad, np.mean(gs, 0), rtol=1e-12)
    assert r.grad.dtype == jnp.float64


@pytest.mark.statistical
@pytest.mark.parametrize("lam,eta", [(0.5, 1.0), (2.0, 0.3)])
def test_rebar_statistically_unbiased(x64, lam, eta):
    theta = jnp.asarray(THETA)
    ref = np.asarray(truth(f_index, theta).grad)
    r = jax.jit(lambda k: sg.estimate_grad(f_onehot, FAM, theta, k, num_samples=40_000,
                                           estimator=categorical_rebar(lam, eta)))(jax.random.key(21))
    assert_unbiased(r.grad, r.stderr, ref, what=f"categorical_rebar({lam}, {eta})")
    assert_power(r.stderr, 0.05 * np.abs(ref).max(), what="rebar SE")
    # power against the most likely bug, dropping the reparameterized correction -grad c(z~)
    assert_rejects(r.grad, r.stderr, 1.1 * ref, what="rejects 1.1 x truth")


@pytest.mark.statistical
@pytest.mark.slow  # learning steps compile second-order programs (~20 s on 2 cores)
def test_relax_unbiased_after_learning(x64):
    theta = jnp.asarray(THETA)
    ref = np.asarray(truth(f_index, theta).grad)
    est = categorical_relax()
    step = jax.jit(lambda st, k: sg.estimate_grad(f_onehot, FAM, theta, k, num_samples=20_000,
                                                  estimator=est, state=st))
    state = est.init(theta)
    for i in range(6):
        r = step(state, jax.random.key(300 + i))
        state = r.state
    assert_unbiased(r.grad, r.stderr, ref, what="categorical_relax after 5 learning steps")
    assert_power(r.stderr, 0.1 * np.abs(ref).max(), what="relax SE")
    assert float(jnp.abs(state.params["eta"] - 1.0)) > 1e-4


# ------------------------------------------------------------------------------ contract


ESTIMATORS = {
    "arsm": (arsm, f_index),
    "unordered_set(3)": (lambda: unordered_set(3), f_index),
    "categorical_rebar": (lambda: categorical_rebar(0.5, 1.0), f_onehot),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_bind_jit_vmap_dtype_hessian(name):
    """sg.bind, jit = vmap row, float32 kept, grad of expectation = the estimate, no Hessian."""
    make, f = ESTIMATORS[name]
    est, theta = make(), jnp.asarray(THETA, jnp.float32)
    b = sg.bind(est, FAM, theta)
    cost = {"arsm": 4, "unordered_set(3)": 3, "categorical_rebar": 1}[name]
    assert b.draws_per_unit == cost and b.num_terms == 1 and b.needs_key and b.max_order == 1
    n, keys = 4 * cost, jax.random.split(jax.random.key(2), 3)
    run = lambda k: sg.estimate_grad(f, FAM, theta, k, num_samples=n, estimator=est)  # noqa: E731
    single = jax.jit(run)(keys[1])
    batch = jax.jit(jax.vmap(run))(keys)
    assert single.grad.shape == (2, 3) and single.grad.dtype == jnp.float32
    assert batch.grad.shape == (3, 2, 3)
    np.testing.assert_allclose(batch.grad[1], single.grad, rtol=1e-5, atol=1e-6)

    def loss(th):
        return sg.expectation(f, FAM, th, keys[1], num_samples=n, estimator=est)

    np.testing.assert_allclose(jax.jit(jax.grad(loss))(theta), single.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        jax.hessian(loss)(theta)


@pytest.mark.statistical
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_antithetic_design_reaches_the_noise_and_stays_unbiased(x64, name):
    """sg.sampling.antithetic couples the Gumbel/uniform noise these units draw through
    sg.Draws (u, 1 - u): accepted, and unbiased against the exact gradient."""
    make, f = ESTIMATORS[name]
    theta = jnp.asarray(THETA)
    ref = np.asarray(truth(f_index, theta).grad)
    cost = sg.bind(make(), FAM, theta).draws_per_unit
    est = sg.sampling.antithetic(make())
    r = jax.jit(lambda k: sg.estimate_grad(f, FAM, theta, k, num_samples=2 * 6000 * cost,
                                           estimator=est))(jax.random.key(61))
    assert_unbiased(r.grad, r.stderr, ref, what=f"antithetic[{name}]")
    assert_power(r.stderr, 0.1 * np.abs(ref).max(), what=f"antithetic[{name}] SE")


def test_errors():
    theta = jnp.zeros(3)
    for est in (arsm(), unordered_set(2), categorical_rebar()):
        with pytest.raises(TypeError, match="categorical_logits"):
            sg.bind(est, sg.families.bernoulli(), theta)
        with pytest.raises(TypeError, match="categorical_logits"):
            sg.bind(est, sg.families.normal(), {"loc": theta, "scale": jnp.ones(3)})
    for bad in (1, 9):
        with pytest.raises(ValueError, match="num_draws"):
            unordered_set(bad)
    with pytest.raises(TypeError, match="num_draws"):
        unordered_set(2.0)
    with pytest.raises(ValueError, match="max_support"):
        sg.bind(unordered_set(2), FAM, jnp.zeros((3, 20)))
    with pytest.raises(ValueError, match="distinct"):
        sg.bind(unordered_set(4), FAM, jnp.zeros(3))
    with pytest.raises(ValueError, match="temperature"):
        categorical_rebar(temperature=0.0)
    with pytest.raises(ValueError, match="multiple"):
        sg.estimate_grad(f_index, FAM, jnp.zeros((2, 3)), jax.random.key(0), num_samples=6,
                         estimator=arsm())


# ---------------------------------------------------------------------- variance (small)


def _per_unit_grads(est, f, theta, cost, reps, key):
    """`reps` independent estimates, each from one unit's worth of `cost` evaluations of f."""
    run = jax.jit(jax.vmap(lambda k: sg.estimate_grad(f, FAM, theta, k, num_samples=cost,
                                                      estimator=est).grad))
    return np.asarray(run(jax.random.split(key, reps)))


@pytest.mark.statistical
def test_unordered_set_variance_below_rloo_equal_cost(x64):
    """K = 10, k = 4 evaluations per estimate: the unordered-set estimator (Rao-Blackwellized
    over order, with its leave-one-out baseline) has lower variance than RLOO(4) on the
    most-probable categories, by more than 5 standard errors of the log variance ratio."""
    theta = jnp.linspace(1.5, -1.5, 10)
    f = lambda x: (x.astype(jnp.float64) - 3.5) ** 2 / 10  # noqa: E731
    us = _per_unit_grads(unordered_set(4), f, theta, 4, 4000, jax.random.key(41))
    ro = _per_unit_grads(sg.rloo(4), f, theta, 4, 4000, jax.random.key(42))
    ratio, bound = log_variance_ratio(ro[:, :3], us[:, :3])
    assert_above(ratio, bound, what="log var RLOO(4) / var unordered_set(4), top 3 logits")
