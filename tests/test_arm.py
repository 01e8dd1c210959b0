"""ARM and DisARM: exact unbiasedness, wiring, variance ordering (CRN), contract and errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stats_util import assert_below, assert_power, assert_unbiased, variance_ratio

import scoregrad as sg
from scoregrad._src.estimators.arm import antithetic_pair, arm_gradient, disarm_gradient

GRADS = {"arm": arm_gradient, "disarm": disarm_gradient}
FACTORIES = {"arm": sg.arm, "disarm": sg.disarm}
LOGITS = (-1.3, 0.0, 0.8)


def toy(t):
    return lambda b: jnp.sum((b - t) ** 2)


def coupled(b):
    """A 2-d f with an interaction, so that the pair's other coordinate matters."""
    return jnp.sum((b - jnp.array([0.45, 0.499], b.dtype)) ** 2) + 2.0 * b[0] * b[1] - b[1]


def true_grad(f, logits):
    fam = sg.families.bernoulli()
    support = fam.capabilities["support"](logits)

    def mean(th):
        lp = jax.vmap(lambda x: fam.log_prob(th, x))(support)
        return jnp.sum(jnp.exp(lp) * jax.vmap(f)(support))

    return jax.grad(mean)(logits)


def exact_mean(grad_fn, f, logits):
    """E_u[g(u)] exactly: per coordinate, [0, 1] splits at p and 1 - p into 3 pieces on which the
    pair is constant and g is linear in u_j, so E = sum over pieces of (prod of lengths) * g(mids)."""
    p = np.asarray(jax.nn.sigmoid(logits))
    pieces = []
    for pj in p:
        cuts = [0.0, min(pj, 1 - pj), max(pj, 1 - pj), 1.0]
        pieces.append([(b - a, (a + b) / 2) for a, b in zip(cuts[:-1], cuts[1:]) if b > a])
    total = jnp.zeros_like(logits)
    for combo in itertools.product(*pieces):
        w = np.prod([c[0] for c in combo])
        u = jnp.asarray([c[1] for c in combo], logits.dtype)
        b, bt = antithetic_pair(logits, u)
        total = total + w * grad_fn(logits, u, f(b), f(bt))
    return total


@pytest.mark.parametrize("name", ["arm", "disarm"])
@pytest.mark.parametrize("t", [0.45, 0.499])
def test_exact_unbiased_toy(x64, name, t):
    logits = jnp.asarray(LOGITS, jnp.float64)
    got = exact_mean(GRADS[name], toy(t), logits)
    np.testing.assert_allclose(got, true_grad(toy(t), logits), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("name", ["arm", "disarm"])
def test_exact_unbiased_interacting_f(x64, name):
    logits = jnp.asarray([0.4, -0.9], jnp.float64)
    got = exact_mean(GRADS[name], coupled, logits)
    np.testing.assert_allclose(got, true_grad(coupled, logits), rtol=1e-10)


@pytest.mark.parametrize("name", ["arm", "disarm"])
def test_engine_uses_the_pair_of_unit_key(x64, name):
    """estimate_grad's unit i is the pair of u = uniform(fold_in(key, i)): exact wiring check."""
    logits, key, f = jnp.asarray([0.3, -0.2], jnp.float64), jax.random.key(11), coupled
    r = sg.estimate_grad(f, sg.families.bernoulli(), logits, key, num_samples=4,
                         estimator=FACTORIES[name]())
    gs, fs = [], []
    for i in range(2):
        u = jax.random.uniform(jax.random.fold_in(key, i), (2,), jnp.float64)
        b, bt = antithetic_pair(logits, u)
        gs.append(GRADS[name](logits, u, f(b), f(bt)))
        fs += [f(b), f(bt)]
    np.testing.assert_allclose(r.grad, np.mean(gs, 0), rtol=1e-12)
    np.testing.assert_allclose(r.value, np.mean(fs), rtol=1e-12)
    assert r.num_samples == 4


@pytest.mark.statistical
@pytest.mark.parametrize("name", ["arm", "disarm"])
def test_statistically_unbiased(x64, name):
    """One jitted estimate over 100 000 pairs per t (t is traced: one compilation), checked with
    its own standard error."""
    logits = jnp.asarray(LOGITS, jnp.float64)
    run = jax.jit(lambda t, k: sg.estimate_grad(lambda b: jnp.sum((b - t) ** 2),
                                                sg.families.bernoulli(), logits, k,
                                                num_samples=200_000, estimator=FACTORIES[name]()))
    for i, t in enumerate((0.45, 0.499)):
        r = run(jnp.asarray(t), jax.random.key(5 + i))
        truth = np.asarray(true_grad(toy(t), logits))
        assert_unbiased(r.grad, r.stderr, truth, what=f"{name} t={t}")
        assert_power(r.stderr, 0.1 * np.abs(true_grad(toy(0.45), logits)).max(), what=name)


def _per_pair(name, f, logits, keys):
    """Per-pair estimates at u = uniform(key) (the engine's unit, see the wiring test above)."""

    def one(k):
        u = jax.random.uniform(k, logits.shape, logits.dtype)
        b, bt = antithetic_pair(logits, u)
        return GRADS[name](logits, u, f(b), f(bt))

    return jax.jit(jax.vmap(one))(keys)


@pytest.mark.statistical
@pytest.mark.parametrize("t", [0.45, 0.499])
def test_disarm_variance_below_arm_common_random_numbers(x64, t):
    logits = jnp.asarray(LOGITS, jnp.float64)
    keys = jax.random.split(jax.random.key(2024), 100_000)  # same keys: same u for both
    ratio, se = variance_ratio(_per_pair("disarm", toy(t), logits, keys),
                               _per_pair("arm", toy(t), logits, keys))
    assert_below(ratio + 5 * se, 1.0, what=f"var DisARM / var ARM + 5 SE, t={t}")


def test_expectation_gradient_includes_direct_term(x64):
    """jax.grad(expectation) = ARM estimate (same draws) + E-hat[d f / d theta] for f(b; theta)."""
    logits, key, n = jnp.asarray([0.2, -0.6], jnp.float64), jax.random.key(3), 8
    fam, est = sg.families.bernoulli(), sg.disarm()

    def loss(th):
        return sg.expectation(lambda b: coupled(b) + 0.1 * jnp.sum(th * b), fam, th, key,
                              num_samples=n, estimator=est)

    fixed = lambda b: coupled(b) + 0.1 * jnp.sum(logits * b)  # noqa: E731
    r = sg.estimate_grad(fixed, fam, logits, key, num_samples=n, estimator=est)
    bs = []
    for i in range(n // 2):
        u = jax.random.uniform(jax.random.fold_in(key, i), (2,), jnp.float64)
        bs += list(antithetic_pair(logits, u))
    np.testing.assert_allclose(jax.grad(loss)(logits), r.grad + 0.1 * np.mean(bs, 0), rtol=1e-10)
    np.testing.assert_allclose(loss(logits), r.value, rtol=1e-12)


@pytest.mark.parametrize("name", ["arm", "disarm"])
def test_float32_jit_and_legacy_key(name):
    logits = jnp.zeros(3, jnp.float32)
    fn = jax.jit(lambda th, k: sg.estimate_grad(toy(0.45), sg.families.bernoulli(), th, k,
                                                num_samples=64, estimator=FACTORIES[name]()))
    r = fn(logits, jax.random.PRNGKey(0))
    eager = sg.estimate_grad(toy(0.45), sg.families.bernoulli(), logits, jax.random.PRNGKey(0),
                             num_samples=64, estimator=FACTORIES[name]())
    assert r.grad.dtype == jnp.float32 and r.value.dtype == jnp.float32
    np.testing.assert_allclose(r.grad, eager.grad, rtol=1e-6)


@pytest.mark.parametrize("name", ["arm", "disarm"])
def test_errors(name):
    est, f = FACTORIES[name](), toy(0.45)
    with pytest.raises(ValueError, match="multiple of 2"):
        sg.estimate_grad(f, sg.families.bernoulli(), jnp.zeros(2), jax.random.key(0),
                         num_samples=7, estimator=est)
    with pytest.raises(TypeError, match="arsm"):
        sg.estimate_grad(lambda x: jnp.sum(x * 1.0), sg.families.categorical(), jnp.zeros(3),
                         jax.random.key(0), num_samples=8, estimator=est)
    with pytest.raises(TypeError, match="bernoulli"):
        sg.estimate_grad(lambda x: jnp.sum(x["loc"] if isinstance(x, dict) else x),
                         sg.families.normal(), {"loc": jnp.zeros(2), "scale": jnp.ones(2)},
                         jax.random.key(0), num_samples=8, estimator=est)
    with pytest.raises(TypeError, match="given samples"):
        sg.estimate_grad_from_samples(f, sg.families.bernoulli(), jnp.zeros(2),
                                      jnp.zeros((4, 2)), estimator=est)
