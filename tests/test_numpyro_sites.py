"""Per-site estimators for NumPyro programs (scoregrad.numpyro_sites): the ELBO gradient against
a closed form x enumeration and against numpyro's TraceGraph_ELBO; exact gradient and Hessian by
enumeration where TraceGraph_ELBO's Hessian is wrong; the engine's contract (chunks, jit, vmap,
dtypes); refusals."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer import TraceGraph_ELBO
from stats_util import assert_above, assert_rejects, assert_unbiased, replicate_stats

import scoregrad as sg
import scoregrad.numpyro_sites as ns
from scoregrad._src.base import Draws, Model, Params
from scoregrad._src.engine import fstats_of
from scoregrad._src.numpyro_sites_credit import credit_of

Y = 0.7


# --------------------------------------------- a discrete and a continuous latent, and a guide

def mixed_model():
    c = numpyro.sample("c", dist.Bernoulli(probs=0.4))
    z = numpyro.sample("z", dist.Normal(2.0 * c - 1.0, 1.0))
    numpyro.sample("y", dist.Normal(z, 0.5), obs=Y)


def mixed_guide():
    c = numpyro.sample("c", dist.Bernoulli(logits=numpyro.param("a", 0.0)))
    loc = numpyro.param("m0", 0.0) + numpyro.param("m1", 0.0) * c
    numpyro.sample("z", dist.Normal(loc, jnp.exp(numpyro.param("s", 0.0))))


def _mixed_theta(dtype=jnp.float64):
    return {k: jnp.asarray(v, dtype) for k, v in
            {"a": 0.3, "m0": -0.2, "m1": 0.9, "s": -0.3}.items()}


def _gauss_parts(th, c):
    """E_{z ~ q(z|c)} of log q(z|c) - log p(z|c) - log p(y|z), in closed form."""
    mu, sig2 = th["m0"] + th["m1"] * c, jnp.exp(2 * th["s"])
    ent = -0.5 * jnp.log(2 * jnp.pi) - th["s"] - 0.5
    prior = -0.5 * jnp.log(2 * jnp.pi) - 0.5 * ((mu - (2 * c - 1)) ** 2 + sig2)
    lik = -0.5 * jnp.log(2 * jnp.pi * 0.25) - ((Y - mu) ** 2 + sig2) / (2 * 0.25)
    return ent - prior - lik


def _mixed_exact(th, credit_c_for_z=True):
    """The negative ELBO by enumeration over c and a closed form over z. With
    ``credit_c_for_z=False``, the objective whose gradient forgets that c changes the
    distribution of z (the z costs not credited to c): a wrong answer the tests must reject."""
    total = 0.0
    for c in (0.0, 1.0):
        qc = jax.nn.sigmoid(th["a"]) if c else jax.nn.sigmoid(-th["a"])
        pc = 0.4 if c else 0.6
        w = qc if credit_c_for_z else jax.lax.stop_gradient(qc)
        total = total + qc * (jnp.log(qc) - jnp.log(pc)) + w * _gauss_parts(th, c)
    return total


def _vec(g):
    return np.array([g[k] for k in ("a", "m0", "m1", "s")], np.float64)


# --------------------------------------------- a discrete-only guide (everything enumerable)

def disc_model():
    c1 = numpyro.sample("c1", dist.Bernoulli(probs=0.3))
    c2 = numpyro.sample("c2", dist.Bernoulli(logits=-1.0 + 2.0 * c1))
    numpyro.sample("y", dist.Normal(c1 + c2, 1.0), obs=1.3)


def disc_guide():
    c1 = numpyro.sample("c1", dist.Bernoulli(logits=numpyro.param("a", 0.0)))
    numpyro.sample("c2", dist.Bernoulli(logits=numpyro.param("b", 0.0)
                                        + numpyro.param("w", 0.0) * c1))


OUTCOMES = [dict(c1=jnp.int32(i), c2=jnp.int32(j)) for i, j in itertools.product([0, 1], [0, 1])]


def _disc_theta():
    return {"a": jnp.float64(0.4), "b": jnp.float64(-0.3), "w": jnp.float64(1.1)}


def _log_q(th, c1, c2):
    return (dist.Bernoulli(logits=th["a"]).log_prob(c1)
            + dist.Bernoulli(logits=th["b"] + th["w"] * c1).log_prob(c2))


def _q(th, x):
    """The guide's probability of an outcome (enumeration weight)."""
    return jnp.exp(_log_q(th, x["c1"], x["c2"]))


def _disc_exact(th):
    """The negative ELBO by enumerating the four outcomes, written by hand (no numpyro
    handlers, independent of the code under test)."""
    c1, c2 = jnp.array([0, 0, 1, 1]), jnp.array([0, 1, 0, 1])
    lq = _log_q(th, c1, c2)
    lp = (dist.Bernoulli(probs=0.3).log_prob(c1)
          + dist.Bernoulli(logits=-1.0 + 2.0 * c1).log_prob(c2)
          + dist.Normal(c1 + c2, 1.0).log_prob(1.3))
    return jnp.sum(jnp.exp(lq) * (lq - lp))


def _surrogate(p, theta, est=None):
    """The estimator's surrogate s(theta, x) on a given draw (a group of draws for a group
    baseline), from the bound unit: its derivatives of every order are the estimator's."""
    est = p.estimator if est is None else est
    bound = sg.bind(est, p.family, theta)
    model = Model(p.f(theta), p.family.log_prob, p.family.sample, p.family, False)

    def s(th, x):
        params = Params(th)
        return bound.unit(model, params, Draws(model, params, x=x), ()).terms[0]

    return s


def _batch_surrogate(p, theta):
    """The surrogate on a given batch of draws (leading axis N) as the engine combines it:
    sum_k w_k mean_i terms_ik, the weights from the batch's f statistics."""
    bound = sg.bind(p.estimator, p.family, theta)
    model = Model(p.f(theta), p.family.log_prob, p.family.sample, p.family, False)

    def s(th, xs):
        params = Params(th)
        x1 = jax.tree_util.tree_map(lambda a: a[:, None], xs)
        out = jax.vmap(lambda x: bound.unit(model, params, Draws(model, params, x=x), ()))(x1)
        fs = fstats_of(jax.lax.stop_gradient(out.fvals), out.terms.dtype)
        n = jax.tree_util.tree_leaves(xs)[0].shape[0]
        w = jax.lax.stop_gradient(bound.weights(fs, (), n))
        return jnp.dot(w, jnp.mean(out.terms, axis=0))

    return s


def _expect(fn, weights_and_draws):
    """sum_i w_i fn(x_i), with fn jitted and vmapped over the stacked draws."""
    w = np.array([wi for wi, _ in weights_and_draws])
    xs = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[x for _, x in weights_and_draws])
    out = jax.jit(jax.vmap(fn))(xs)
    return jax.tree_util.tree_map(lambda a: np.tensordot(w, np.asarray(a), axes=1), out)


def _close(a, b, rtol=1e-10, atol=1e-12):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol),
                           a, b)


def _differ(a, b, min_gap=1e-3):
    gap = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
              for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert gap > min_gap, f"the two agree to {gap}"


# ---------------------------------------------------------------- structure

def _structure(p, theta, x_struct):
    """Guide sites, model sites, score sites and the (costs x score sites) dependence."""
    c = credit_of(p.runner, theta, x_struct, True)
    return list(c.guide_sites), list(c.model_sites), list(c.score), c.dependence()


def test_sites_and_dependencies():
    """Automatic choice (score for the Bernoulli, pathwise for the Normal) and the dependence of
    every cost on the score sites: c influences every cost (z's distribution depends on it); in
    the discrete model c2 does not influence log q(c1) or log p(c1)."""
    p = ns.elbo(mixed_model, mixed_guide)
    theta = _mixed_theta(jnp.float32)
    assert p.sites(theta) == {"c": "score", "z": "pathwise"}
    x = jax.eval_shape(p.family.sample, theta, jax.random.key(0))
    g, m, score, d = _structure(p, theta, x)
    assert (g, m, score) == (["c", "z"], ["c", "y", "z"], ["c"]) and d.all()
    q = ns.elbo(disc_model, disc_guide)
    th = {"a": jnp.float32(0.0), "b": jnp.float32(0.0), "w": jnp.float32(0.0)}
    x = jax.eval_shape(q.family.sample, th, jax.random.key(0))
    g, m, score, d = _structure(q, th, x)
    rows = dict(zip([f"q:{n}" for n in g] + [f"p:{n}" for n in m], d.tolist()))
    assert score == ["c1", "c2"]
    assert rows == {"q:c1": [True, False], "q:c2": [True, True], "p:c1": [True, False],
                    "p:c2": [True, True], "p:y": [True, True]}
    assert ns.elbo(mixed_model, mixed_guide, site_estimators={"z": "score"}).sites(theta) == {
        "c": "score", "z": "score"}
    assert set(p.init_params()) == {"a", "m0", "m1", "s"}


# ---------------------------------------------------------------- exact, by enumeration

def _all_orders(fn):
    """(value, gradient, Hessian) of fn(theta, x) in theta, as one function of (theta, x)."""
    return lambda th, x: (fn(th, x), jax.grad(fn)(th, x), jax.hessian(fn)(th, x))


def _exact_all_orders(theta):
    return jax.jit(lambda th: (_disc_exact(th), jax.grad(_disc_exact)(th),
                               jax.hessian(_disc_exact)(th)))(theta)


@pytest.mark.parametrize("baseline", [None, pytest.param(2, marks=pytest.mark.slow)])
def test_exact_gradient_and_hessian_discrete(x64, baseline):
    """Score sites only: E over every outcome (every pair with the group baseline) of the
    surrogate's value, gradient and Hessian equal the exact ones (rtol 1e-10)."""
    bl = None if baseline is None else ns.group_leave_one_out(baseline)
    p = ns.elbo(disc_model, disc_guide, baseline=bl)
    theta = _disc_theta()
    s = _surrogate(p, theta)
    if baseline is None:
        draws = [(float(_q(theta, x)), jax.tree_util.tree_map(lambda a: a[None], x))
                 for x in OUTCOMES]
    else:
        draws = [(float(_q(theta, x) * _q(theta, y)),
                  jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), x, y))
                 for x, y in itertools.product(OUTCOMES, OUTCOMES)]
    f = _all_orders(s)
    _close(_expect(lambda x: f(theta, x), draws), _exact_all_orders(theta))


@pytest.mark.slow
def test_exact_batch_leave_one_out_over_pairs(x64):
    """The batch-wide leave-one-out baseline, every pair of outcomes: value, gradient and
    Hessian of the engine's weighted surrogate are exact."""
    p = ns.elbo(disc_model, disc_guide, baseline=ns.leave_one_out())
    theta = _disc_theta()
    assert sg.bind(p.estimator, p.family, theta).num_terms == 4  # main, 2 sites, sum
    draws = [(float(_q(theta, x) * _q(theta, y)),
              jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), x, y))
             for x, y in itertools.product(OUTCOMES, OUTCOMES)]
    f = _all_orders(_batch_surrogate(p, theta))
    _close(_expect(lambda x: f(theta, x), draws), _exact_all_orders(theta))


@pytest.mark.slow
def test_exact_gradient_through_the_public_api(x64):
    """sum_x q(x) * estimate_grad_from_samples(one outcome x) is the exact gradient."""
    p = ns.elbo(disc_model, disc_guide)
    theta = _disc_theta()

    def one(x):
        xs = jax.tree_util.tree_map(lambda a: a[None], x)
        return sg.estimate_grad_from_samples(p.f(theta), p.family, theta, xs,
                                             estimator=p.estimator).grad

    _close(_expect(one, [(float(_q(theta, x)), x) for x in OUTCOMES]),
           jax.grad(_disc_exact)(theta))


def test_tracegraph_hessian_is_wrong_ours_is_right(x64):
    """numpyro's TraceGraph_ELBO on each outcome (the guide substituted): its expected
    gradient is exact, its expected Hessian is not; ours (previous test) is. A naive surrogate
    (TraceGraph's form written with the same costs) gives TraceGraph's Hessian."""
    theta = _disc_theta()
    draws = [(float(_q(theta, x)), x) for x in OUTCOMES]

    def tg_loss(th, x):
        # the guide seeded first, so that TraceGraph_ELBO's provenance pass finds a key
        guide = handlers.substitute(handlers.seed(disc_guide, 0), data=x)
        return TraceGraph_ELBO().loss(jax.random.key(0), th, disc_model, guide)

    _, exact_grad, exact_hess = _exact_all_orders(theta)
    tg_grad, tg_hess = _expect(lambda x: _all_orders(tg_loss)(theta, x)[1:], draws)
    _close(tg_grad, exact_grad, rtol=1e-8)
    _differ(tg_hess, exact_hess)
    # the naive (first-order) surrogate, TraceGraph's form written with our costs and
    # dependencies: costs + sum_s (lq_s - sg(lq_s)) * sg(downstream cost)
    p = ns.elbo(disc_model, disc_guide)
    x0 = jax.eval_shape(p.family.sample, theta, jax.random.key(0))
    g, m, score, d = _structure(p, theta, x0)

    def naive(th, x):
        lq, lp = p.runner.site_terms(th, x)
        # TraceGraph_ELBO also stops the gradient of a score site's own log q in the ELBO
        c = jnp.stack([jax.lax.stop_gradient(lq[n]) if n in score else lq[n] for n in g]
                      + [-lp[n] for n in m])
        down = jax.lax.stop_gradient(c) @ jnp.asarray(d, c.dtype)
        lqs = jnp.stack([lq[n] for n in score])
        return jnp.sum(c) + jnp.sum((lqs - jax.lax.stop_gradient(lqs)) * down)

    n_grad, n_hess = _expect(lambda x: _all_orders(naive)(theta, x)[1:], draws)
    _close(n_grad, exact_grad)
    _close(n_hess, tg_hess, rtol=1e-8)


# ---------------------------------------------------------------- statistical, mixed sites

@pytest.mark.statistical
@pytest.mark.slow
def test_mixed_gradient_unbiased_with_power(x64):
    """Pathwise z, score c: E[g] within 5 SE of the exact gradient (enumeration over c x closed
    form over z), and far from the gradient that forgets c's influence on z's costs."""
    p = ns.elbo(mixed_model, mixed_guide)
    theta = _mixed_theta()
    r = p.estimate_grad(theta, jax.random.key(20), num_samples=20_000)
    truth = _vec(jax.grad(_mixed_exact)(theta))
    assert_unbiased(_vec(r.grad), _vec(r.stderr), truth, atol=1e-6, what="per-site grad")
    wrong = _vec(jax.grad(lambda th: _mixed_exact(th, credit_c_for_z=False))(theta))
    assert_rejects(_vec(r.grad), _vec(r.stderr), wrong, what="no credit of z's costs to c")
    np.testing.assert_allclose(r.value, _mixed_exact(theta), atol=5 * float(r.value_stderr))


@pytest.mark.statistical
@pytest.mark.slow
@pytest.mark.parametrize("baseline", ["group", "batch", "z_score"])
def test_mixed_baselines_unbiased(x64, baseline):
    """The same with the group leave-one-out baseline (4 programs per unit), the batch-wide
    one, and with the Normal site z forced to the score function (batch-wide baseline)."""
    bl = ns.group_leave_one_out(4) if baseline == "group" else ns.leave_one_out()
    choice = {"z": "score"} if baseline == "z_score" else None
    p = ns.elbo(mixed_model, mixed_guide, baseline=bl, site_estimators=choice)
    theta = _mixed_theta()
    r = p.estimate_grad(theta, jax.random.key(21), num_samples=20_000)
    truth = _vec(jax.grad(_mixed_exact)(theta))
    assert_unbiased(_vec(r.grad), _vec(r.stderr), truth, atol=1e-6, what=f"{baseline} LOO")


@pytest.mark.statistical
@pytest.mark.slow
def test_tracegraph_and_ours_agree_with_exact(x64):
    """numpyro's TraceGraph_ELBO gradient (mean over 4000 keys) and ours (jax.grad of
    sg.expectation, the same replicates) are both within 5 SE of the exact gradient."""
    p = ns.elbo(mixed_model, mixed_guide)
    theta = _mixed_theta()
    keys = jax.random.split(jax.random.key(22), 4000)
    tg = jax.jit(jax.vmap(lambda k: jax.grad(
        lambda th: TraceGraph_ELBO().loss(k, th, mixed_model, mixed_guide))(theta)))(keys)
    ours = jax.jit(jax.vmap(lambda k: jax.grad(
        lambda th: p.expectation(th, k, num_samples=1))(theta)))(keys)
    truth = _vec(jax.grad(_mixed_exact)(theta))
    for name, g in (("TraceGraph_ELBO", tg), ("numpyro_sites", ours)):
        mean, se = replicate_stats(np.stack([_vec(gi) for gi in _rows(g)]))
        assert_unbiased(mean, se, truth, atol=1e-6, what=name)


def _rows(g):
    n = len(g["a"])
    return [{k: v[i] for k, v in g.items()} for i in range(n)]


# ---------------------------------------------------------------- the engine's contract

def test_chunk_invariance_under_jit():
    """Two chunk sizes give the same value and gradient on one key, under jit."""
    p = ns.elbo(mixed_model, mixed_guide)
    theta = _mixed_theta(jnp.float32)
    key = jax.random.key(3)

    def vg(chunk):
        return jax.jit(jax.value_and_grad(
            lambda th: p.expectation(th, key, num_samples=12, chunk_size=chunk)))(theta)

    _close(vg(4), vg(12), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_eager_jit_vmap_agree():
    p = ns.elbo(mixed_model, mixed_guide)
    theta = _mixed_theta(jnp.float32)
    key = jax.random.key(3)
    g1 = jax.grad(lambda th: p.expectation(th, key, num_samples=48, chunk_size=4))(theta)
    gj = jax.jit(jax.grad(lambda th: p.expectation(th, key, num_samples=48, chunk_size=4)))(theta)
    _close(g1, gj, rtol=1e-5, atol=1e-6)
    keys = jax.random.split(key, 2)
    v = jax.vmap(lambda k: p.expectation(theta, k, num_samples=16))(keys)
    _close(v[1], p.expectation(theta, keys[1], num_samples=16), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_group_chunk_invariance_and_devices():
    """Groups never straddle chunks: chunk sizes 1 and 3 (units of 4 programs) agree;
    devices="all" and nan_policy pass through."""
    p = ns.elbo(mixed_model, mixed_guide, baseline=ns.group_leave_one_out(4))
    theta = _mixed_theta(jnp.float32)
    key = jax.random.key(4)
    a = p.estimate_grad(theta, key, num_samples=24, chunk_size=1)
    b = p.estimate_grad(theta, key, num_samples=24, chunk_size=3, devices="all",
                        nan_policy="propagate")
    _close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert a.num_samples == 24


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.float64,
                                                               marks=pytest.mark.slow)])
def test_dtypes(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        p = ns.elbo(mixed_model, mixed_guide)
        theta = _mixed_theta(dtype)
        g = jax.jit(jax.grad(lambda th: p.expectation(th, jax.random.key(5),
                                                       num_samples=8)))(theta)
        for v in g.values():
            assert v.dtype == dtype and np.isfinite(v)


@pytest.mark.slow
def test_whole_guide_score_function_runs_on_the_same_family():
    """sg.score_function() on the problem's family and f is whole-guide REINFORCE."""
    p = ns.elbo(mixed_model, mixed_guide)
    theta = _mixed_theta(jnp.float32)
    r = sg.estimate_grad(p.f(theta), p.family, theta, jax.random.key(6), num_samples=64)
    assert np.isfinite(_vec(r.grad)).all()


# ---------------------------------------------------------------- refusals

def test_refusals():
    theta = _mixed_theta(jnp.float32)
    key = jax.random.key(0)

    def guide_without_z():
        numpyro.sample("c", dist.Bernoulli(logits=numpyro.param("a", 0.0)))

    with pytest.raises(ValueError, match=r"mismatch.*\['z'\].*Add numpyro.sample"):
        ns.elbo(mixed_model, guide_without_z).expectation({"a": theta["a"]}, key,
                                                          num_samples=4)
    with pytest.raises(ValueError, match=r"site_estimators names \['zz'\].*sites are"):
        ns.elbo(mixed_model, mixed_guide, site_estimators={"zz": "score"}).expectation(
            theta, key, num_samples=4)
    with pytest.raises(ValueError, match=r"site_estimators\['c'\] = 'pathwise'.*use 'score'"):
        ns.elbo(mixed_model, mixed_guide, site_estimators={"c": "pathwise"}).expectation(
            theta, key, num_samples=4)
    with pytest.raises(ValueError, match="choose one of"):
        ns.elbo(mixed_model, mixed_guide, site_estimators={"c": "reinforce"})
    with pytest.raises(ValueError, match=r"param sites \['s'\] have no entry"):
        ns.elbo(mixed_model, mixed_guide).expectation(
            {k: v for k, v in theta.items() if k != "s"}, key, num_samples=4)
    with pytest.raises(TypeError, match="group_leave_one_out"):
        ns.elbo(mixed_model, mixed_guide, baseline="loo")
    with pytest.raises(ValueError, match="k >= 2"):
        ns.group_leave_one_out(1)
    def model_sub():
        with numpyro.plate("data", 10, subsample_size=3):
            numpyro.sample("u", dist.Normal(0.0, 1.0))

    def guide_sub():
        with numpyro.plate("data", 10, subsample_size=3):
            numpyro.sample("u", dist.Normal(numpyro.param("a", 0.0), 1.0))

    with pytest.raises(ValueError, match=r"plate 'data' subsamples \(3 of 10\)"):
        ns.elbo(model_sub, guide_sub).expectation({"a": theta["a"]}, key, num_samples=4)
    with pytest.raises(TypeError, match="belongs to the family"):
        sg.expectation(lambda x: 0.0, sg.families.normal(),
                       {"loc": jnp.zeros(1), "scale": jnp.ones(1)}, key, num_samples=4,
                       estimator=ns.elbo(mixed_model, mixed_guide).estimator)


def _hvec(h):
    """The Hessian dict of dicts as a flat (16,) array."""
    keys = ("a", "m0", "m1", "s")
    return jnp.stack([jnp.stack([h[i][j] for j in keys]) for i in keys]).ravel()


@pytest.mark.statistical
@pytest.mark.slow
def test_mixed_hessian_unbiased_tracegraph_not(x64):
    """Pathwise z and score c: the mean of jax.hessian of sg.expectation over independent keys
    is within 5 SE of the exact Hessian (enumeration x closed form); TraceGraph_ELBO's mean
    Hessian on the same keys is rejected."""
    p = ns.elbo(mixed_model, mixed_guide)
    theta = _mixed_theta()
    keys = jax.random.split(jax.random.key(23), 3000)
    ours = jax.jit(jax.vmap(lambda k: _hvec(jax.hessian(
        lambda th: p.expectation(th, k, num_samples=4))(theta))))
    tg = jax.jit(jax.vmap(lambda k: _hvec(jax.hessian(
        lambda th: TraceGraph_ELBO().loss(k, th, mixed_model, mixed_guide))(theta))))
    truth = np.asarray(_hvec(jax.hessian(_mixed_exact)(theta)))
    mean, se = replicate_stats(np.asarray(ours(keys)))
    assert_unbiased(mean, se, truth, atol=1e-6, what="per-site Hessian")
    tg_mean, tg_se = replicate_stats(np.asarray(tg(keys)))
    assert_rejects(tg_mean, tg_se, truth, what="TraceGraph_ELBO's Hessian")


def test_param_of_another_shape_is_refused():
    import numpyro
    import numpyro.distributions as dist

    import scoregrad.numpyro_sites as ns

    def model():
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        s = numpyro.param("s", 0.0)
        numpyro.sample("z", dist.Normal(s, 1.0))

    p = ns.elbo(model, guide)
    with pytest.raises(ValueError, match=r"theta\['s'\] has shape \(2,\).*declared with shape \(\)"):
        p.estimate_grad({"s": jnp.array([0.1, 0.2])}, jax.random.key(0), num_samples=8)


# ---------------------------------------------------------------- plates: per-element credit

XP = jnp.array([0.4, -0.3, 1.2])
XN = jnp.array([[0.3, -0.6], [1.1, 0.2]])


def local_model():
    with numpyro.plate("data", 3):
        z = numpyro.sample("z", dist.Bernoulli(probs=0.35))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=XP)


def local_guide():
    with numpyro.plate("data", 3):
        numpyro.sample("z", dist.Bernoulli(logits=numpyro.param("b", jnp.zeros(3))))


def _local_lq(th, x):
    return jnp.sum(dist.Bernoulli(logits=th["b"]).log_prob(x["z"]))


def _local_lp(x):
    z = x["z"]
    return jnp.sum(dist.Bernoulli(probs=0.35).log_prob(z) + dist.Normal(z, 1.0).log_prob(XP))


def global_model():
    g = numpyro.sample("g", dist.Bernoulli(probs=0.4))
    with numpyro.plate("data", 3):
        z = numpyro.sample("z", dist.Bernoulli(logits=-0.5 + g))
        numpyro.sample("x", dist.Normal(z + 0.5 * g, 1.0), obs=XP)


def global_guide():
    g = numpyro.sample("g", dist.Bernoulli(logits=numpyro.param("a", 0.0)))
    with numpyro.plate("data", 3):
        numpyro.sample("z", dist.Bernoulli(logits=numpyro.param("b", jnp.zeros(3))
                                           + numpyro.param("w", 0.0) * g))


def _global_lq(th, x):
    g, z = x["g"], x["z"]
    return (dist.Bernoulli(logits=th["a"]).log_prob(g)
            + jnp.sum(dist.Bernoulli(logits=th["b"] + th["w"] * g).log_prob(z)))


def _global_lp(x):
    g, z = x["g"], x["z"]
    return (dist.Bernoulli(probs=0.4).log_prob(g)
            + jnp.sum(dist.Bernoulli(logits=-0.5 + g).log_prob(z)
                      + dist.Normal(z + 0.5 * g, 1.0).log_prob(XP)))


def nested_model():
    with numpyro.plate("a", 2):
        u = numpyro.sample("u", dist.Bernoulli(probs=0.4))
        with numpyro.plate("b", 2, dim=-2):
            z = numpyro.sample("z", dist.Bernoulli(logits=u - 0.3))
            numpyro.sample("x", dist.Normal(z + u, 1.0), obs=XN)


def nested_guide():
    with numpyro.plate("a", 2):
        u = numpyro.sample("u", dist.Bernoulli(logits=numpyro.param("c", jnp.zeros(2))))
        with numpyro.plate("b", 2, dim=-2):
            numpyro.sample("z", dist.Bernoulli(logits=numpyro.param("d", jnp.zeros((2, 2)))
                                               + numpyro.param("v", 0.0) * u))


def _nested_lq(th, x):
    u, z = x["u"], x["z"]
    return (jnp.sum(dist.Bernoulli(logits=th["c"]).log_prob(u))
            + jnp.sum(dist.Bernoulli(logits=th["d"] + th["v"] * u).log_prob(z)))


def _nested_lp(x):
    u, z = x["u"], x["z"]
    return (jnp.sum(dist.Bernoulli(probs=0.4).log_prob(u))
            + jnp.sum(dist.Bernoulli(logits=u - 0.3).log_prob(z)
                      + dist.Normal(z + u, 1.0).log_prob(XN)))


def path_model():
    """A global site t read from every element of the plate's z, and read by every x_i: x_i's
    cost depends on every z_j through t, so the plate is not kept for (z, x)."""
    with numpyro.plate("data", 3):
        z = numpyro.sample("z", dist.Bernoulli(probs=0.5))
    t = numpyro.sample("t", dist.Bernoulli(logits=jnp.sum(z) - 1.5))
    with numpyro.plate("data", 3):
        numpyro.sample("x", dist.Normal(z + t, 1.0), obs=XP)


def path_guide():
    with numpyro.plate("data", 3):
        z = numpyro.sample("z", dist.Bernoulli(logits=numpyro.param("b", jnp.zeros(3))))
    numpyro.sample("t", dist.Bernoulli(logits=numpyro.param("e", 0.0) * jnp.sum(z)
                                       + numpyro.param("f", 0.0)))


def _path_lq(th, x):
    z, t = x["z"], x["t"]
    return (jnp.sum(dist.Bernoulli(logits=th["b"]).log_prob(z))
            + dist.Bernoulli(logits=th["e"] * jnp.sum(z) + th["f"]).log_prob(t))


def _path_lp(x):
    z, t = x["z"], x["t"]
    return (jnp.sum(dist.Bernoulli(probs=0.5).log_prob(z))
            + dist.Bernoulli(logits=jnp.sum(z) - 1.5).log_prob(t)
            + jnp.sum(dist.Normal(z + t, 1.0).log_prob(XP)))


# name: (model, guide, hand-written log q, log p, theta, the guide's site shapes)
PLATED = {
    "local": (local_model, local_guide, _local_lq, _local_lp,
              {"b": [0.2, -0.4, 0.7]}, {"z": (3,)}),
    "global": (global_model, global_guide, _global_lq, _global_lp,
               {"a": 0.3, "b": [0.2, -0.4, 0.7], "w": 0.6}, {"g": (), "z": (3,)}),
    "nested": (nested_model, nested_guide, _nested_lq, _nested_lp,
               {"c": [0.3, -0.5], "d": [[0.1, -0.2], [0.4, 0.25]], "v": 0.8},
               {"u": (2,), "z": (2, 2)}),
    "path": (path_model, path_guide, _path_lq, _path_lp,
             {"b": [0.2, -0.4, 0.7], "e": 0.5, "f": -0.3}, {"t": (), "z": (3,)}),
}


def _plated(name):
    model, guide, lq, lp, th, shapes = PLATED[name]
    theta = {k: jnp.asarray(v, jnp.float64) for k, v in th.items()}
    outcomes = []
    sizes = [int(np.prod(s, dtype=int)) for s in shapes.values()]
    for bits in itertools.product([0, 1], repeat=sum(sizes)):
        x, i = {}, 0
        for (n, s), k in zip(shapes.items(), sizes):
            x[n] = jnp.asarray(bits[i:i + k], jnp.int32).reshape(s)
            i += k
        outcomes.append(x)

    def exact(th):
        xs = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outcomes)
        lqs = jax.vmap(lambda x: lq(th, x))(xs)
        return jnp.sum(jnp.exp(lqs) * (lqs - jax.vmap(lp)(xs)))

    weights = [float(jnp.exp(lq(theta, x))) for x in outcomes]
    return model, guide, theta, outcomes, weights, exact


def _exact_orders(exact, theta):
    return jax.jit(lambda th: (exact(th), jax.grad(exact)(th), jax.hessian(exact)(th)))(theta)


@pytest.mark.parametrize("name,credit", [
    ("global", "element"), ("path", "element"),
    pytest.param("local", "element", marks=pytest.mark.slow),
    pytest.param("nested", "element", marks=pytest.mark.slow),
    pytest.param("global", "site", marks=pytest.mark.slow)])
def test_plated_exact_gradient_and_hessian(x64, name, credit):
    """Plated Bernoulli latents, every joint draw enumerated and weighted by its probability:
    the expected value, gradient and Hessian of the per-element surrogate equal the exact
    negative ELBO's (rtol 1e-10): a local plate, a global site over a plate, nested plates,
    and a global site on the path between a plate's elements (whole-site credit as well)."""
    model, guide, theta, outcomes, w, exact = _plated(name)
    p = ns.elbo(model, guide, credit=credit)
    s = _surrogate(p, theta)
    draws = [(wi, jax.tree_util.tree_map(lambda a: a[None], x)) for wi, x in zip(w, outcomes)]
    assert abs(sum(w) - 1) < 1e-12
    _close(_expect(lambda x: _all_orders(s)(theta, x), draws), _exact_orders(exact, theta))


def test_plated_credit_structure(x64):
    """The plates kept per (score site, cost): z_i with x_i and log q(z_i) elementwise, a global
    site summed; through a global site t on the path, z's plate is summed for x."""
    p = ns.elbo(global_model, global_guide)
    _, _, theta, outcomes, _, _ = _plated("global")
    x = jax.eval_shape(lambda: outcomes[0])
    c = credit_of(p.runner, theta, x, True)
    assert c.plates == (("data", 3),) and c.score == ("g", "z") and c.num_elements == 4
    links = dict(zip([f"q:{n}" for n in c.guide_sites] + [f"p:{n}" for n in c.model_sites],
                     c.links))
    # (score index, canonical axes summed): g (0) in every cost, z (1) elementwise
    assert links == {"q:g": ((0, (0,)),), "q:z": ((0, (0,)), (1, ())),
                     "p:g": ((0, (0,)),), "p:z": ((0, (0,)), (1, ())),
                     "p:x": ((0, (0,)), (1, ()))}
    p = ns.elbo(path_model, path_guide)
    _, _, theta, outcomes, _, _ = _plated("path")
    c = credit_of(p.runner, theta, jax.eval_shape(lambda: outcomes[0]), True)
    links = dict(zip([f"q:{n}" for n in c.guide_sites] + [f"p:{n}" for n in c.model_sites],
                     c.links))
    assert c.score == ("t", "z")
    assert links["q:z"] == ((1, ()),) and links["p:x"] == ((0, (0,)), (1, (0,)))


@pytest.mark.slow
def test_plated_wrong_credit_is_rejected(x64):
    """Power of the exact tests: keeping the plate for z and x in the path model (TraceGraph's
    plate rule, ignoring the path through t) gives another expected gradient."""
    model, guide, theta, outcomes, w, exact = _plated("path")
    from scoregrad._src.numpyro_sites_credit import program_terms

    p = ns.elbo(model, guide)
    c = credit_of(p.runner, theta, jax.eval_shape(lambda: outcomes[0]), True)
    names = [f"q:{n}" for n in c.guide_sites] + [f"p:{n}" for n in c.model_sites]
    wrong = c._replace(links=tuple(((0, (0,)), (1, ())) if n == "p:x" else row
                                   for n, row in zip(names, c.links)))

    def grad_of(credit):
        fn = jax.grad(lambda th, x: program_terms(
            credit, *p.runner.checked_traces(th, x))[0])
        return _expect(lambda x: fn(theta, x), list(zip(w, outcomes)))

    truth = jax.grad(exact)(theta)
    _close(grad_of(c), truth)
    _differ(grad_of(wrong), truth)


@pytest.mark.slow
@pytest.mark.parametrize("baseline", ["group", "batch"])
def test_plated_exact_with_baselines(x64, baseline):
    """Per-element leave-one-out baselines over every pair of draws of the local plate:
    value, gradient and Hessian exact (group of 2; batch of 2 with the engine's weights)."""
    model, guide, theta, outcomes, w, exact = _plated("global")
    bl = ns.group_leave_one_out(2) if baseline == "group" else ns.leave_one_out()
    p = ns.elbo(model, guide, baseline=bl)
    s = _surrogate(p, theta) if baseline == "group" else _batch_surrogate(p, theta)
    if baseline == "batch":
        assert sg.bind(p.estimator, p.family, theta).num_terms == 1 + 4 + 1
    draws = [(wx * wy, jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), x, y))
             for (wx, x), (wy, y) in itertools.product(zip(w, outcomes), zip(w, outcomes))]
    _close(_expect(lambda x: _all_orders(s)(theta, x), draws), _exact_orders(exact, theta))


def wide_model(x):
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(probs=0.35))
        numpyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)


def wide_guide(x):
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Bernoulli(logits=numpyro.param("b", jnp.zeros(x.shape[0]))))


@pytest.mark.statistical
def test_per_element_credit_has_less_variance(x64):
    """Common random numbers (the same keys, so the same draws), a plate of 8 local latents:
    per-element credit has less variance than whole-site credit in every coordinate, the
    variance ratio 5 SE above 1; both means agree with the exact gradient."""
    from stats_util import Z, variance_ratio

    x = jnp.linspace(-1.0, 2.5, 8)
    theta = {"b": jnp.linspace(-0.8, 0.8, 8)}
    keys = jax.random.split(jax.random.key(31), 2000)
    out = {}
    for credit in ("element", "site"):
        p = ns.elbo(wide_model, wide_guide, x, credit=credit)
        out[credit] = np.asarray(jax.jit(jax.vmap(lambda k, p=p: jax.grad(
            lambda th: p.expectation(th, k, num_samples=1))(theta)["b"]))(keys))
    q = jax.nn.sigmoid(theta["b"])
    prior = jnp.log(0.35) - jnp.log(0.65)
    # d/db_i of sum_i E_q[log q - log p] for independent Bernoulli z_i: q(1-q)(b - prior - llr)
    llr = dist.Normal(2.0, 1.0).log_prob(x) - dist.Normal(0.0, 1.0).log_prob(x)
    truth = np.asarray(q * (1 - q) * (theta["b"] - prior - llr))
    for credit, g in out.items():
        mean, se = replicate_stats(g)
        assert_unbiased(mean, se, truth, atol=1e-8, what=f"{credit} credit")
    r, se = variance_ratio(out["site"], out["element"])
    assert_above(r - Z * se, 1.0, what="var(site credit) / var(element credit) - 5 SE")


def test_scaled_guide_site_boxes_its_unscaled_log_prob(x64):
    """numpyro.handlers.scale on a plated guide site scales its cost, not its score: the
    expected gradient (8 draws enumerated) is the exact gradient of E_q[2 log q - log p]; the
    box of the scaled log q (the code before per-element credit) would be biased."""
    _, _, theta, outcomes, w, _ = _plated("local")

    def scaled_guide():
        with handlers.scale(scale=2.0):
            local_guide()

    def exact(th):
        xs = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outcomes)
        lqs = jax.vmap(lambda x: _local_lq(th, x))(xs)
        return jnp.sum(jnp.exp(lqs) * (2 * lqs - jax.vmap(_local_lp)(xs)))

    p = ns.elbo(local_model, scaled_guide)
    g = jax.grad(_surrogate(p, theta))
    draws = [(wi, jax.tree_util.tree_map(lambda a: a[None], x)) for wi, x in zip(w, outcomes)]
    _close(_expect(lambda x: g(theta, x), draws), jax.grad(exact)(theta))
