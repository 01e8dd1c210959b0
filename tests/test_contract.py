"""The contract suite (DESIGN.md §1), run over every estimator configuration.

Each configuration is an estimator with a family it applies to. Every configuration must: give
the plain Monte Carlo mean of f as its value; give the same numbers under jit and eagerly, under
vmap (over keys and over theta) and one at a time, with a legacy and a typed key, and for every
chunk size; preserve float32/float64; not recompile on the second jitted step; and drive an optax
loop to a known optimum.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_util import stateful  # noqa: E402

import scoregrad as sg
from scoregrad.baselines import MovingAverageState


class Config(NamedTuple):
    name: str
    estimator: Callable[[], sg.Estimator]
    family: Callable[[], sg.Family]
    theta: Callable[[jnp.dtype], object]
    f: Callable


def _normal_theta(dtype):
    return {"loc": jnp.asarray([0.3, -0.2, 0.1], dtype), "scale": jnp.asarray([1.0, 0.5, 0.8], dtype)}


def _normal_f(x):
    return jnp.sum((x - 0.7) ** 2) + jnp.sin(x[0])


def _bern_theta(dtype):
    return jnp.asarray([0.2, -1.0, 0.5], dtype)


def _bern_f(x):
    return jnp.sum((x - jnp.asarray([0.45, 0.2, 0.9], x.dtype)) ** 2)


def _cat_theta(dtype):
    return jnp.asarray([[0.1, -0.3, 0.4], [1.0, 0.0, -1.0]], dtype)


def _cat_f(x):
    return jnp.sum(jnp.asarray([0.5, -1.0, 2.0])[x])


_SF = sg.score_function
_BL = sg.baselines
CONFIGS = [
    Config("score-normal", lambda: _SF(), sg.families.normal, _normal_theta, _normal_f),
    Config("score_loo-normal", lambda: _SF(_BL.leave_one_out()), sg.families.normal,
           _normal_theta, _normal_f),
    Config("score_ma-normal", lambda: _SF(_BL.moving_average(0.8)), sg.families.normal,
           _normal_theta, _normal_f),
    Config("pathwise-normal", sg.pathwise, sg.families.normal, _normal_theta, _normal_f),
    Config("score-bernoulli", lambda: _SF(_BL.none()), sg.families.bernoulli, _bern_theta, _bern_f),
    Config("score_loo-categorical", lambda: _SF(_BL.leave_one_out()), sg.families.categorical,
           _cat_theta, _cat_f),
]
N = 20
# The configurations every default run covers (the most machinery: a baseline with batch
# weights; differentiation through the sampler); the others run with the slow marker.
FAST = ("score_loo-normal", "pathwise-normal")


def _configs(only=None):
    """pytest params over CONFIGS; those outside FAST carry the slow marker."""
    chosen = [c for c in CONFIGS if only is None or only(c)]
    return [pytest.param(c, id=c.name, marks=() if c.name in FAST else pytest.mark.slow)
            for c in chosen]


def _state(est, theta):
    """A non-trivial state for stateful estimators (as if from earlier steps), else None."""
    if not stateful(est):
        return None
    dtype = jax.tree_util.tree_leaves(theta)[0].dtype
    return MovingAverageState(jnp.asarray(1.5, dtype), jnp.asarray(2, jnp.int32))


def _estimate(cfg, theta, key, **kw):
    est = cfg.estimator()
    kw.setdefault("num_samples", N)
    return sg.estimate_grad(cfg.f, cfg.family(), theta, key, estimator=est,
                            state=_state(est, theta), **kw)


def _expectation(cfg, theta, key, f=None, **kw):
    est = cfg.estimator()
    kw.setdefault("num_samples", N)
    f = cfg.f if f is None else f
    if stateful(est):
        return sg.expectation_with_state(f, cfg.family(), theta, key, _state(est, theta),
                                         estimator=est, **kw)[0]
    return sg.expectation(f, cfg.family(), theta, key, estimator=est, **kw)


def _close(a, b, rtol=2e-5, atol=1e-6):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _f32_only(tree):
    assert {a.dtype for a in jax.tree_util.tree_leaves(tree)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("cfg", _configs())
def test_value_is_mean_of_f_jit_equals_eager_keys_agree(cfg):
    theta, key, legacy = cfg.theta(jnp.float32), jax.random.key(42), jax.random.PRNGKey(42)
    fam = cfg.family()
    xs = jax.vmap(lambda i: fam.sample(theta, jax.random.fold_in(key, i)))(jnp.arange(N))
    mean_f = jnp.mean(jax.vmap(cfg.f)(xs))

    def everything(theta, key, legacy):
        r, rl = _estimate(cfg, theta, key), _estimate(cfg, theta, legacy)
        value, grad = jax.value_and_grad(lambda th: _expectation(cfg, th, key))(theta)
        return (r.value, r.grad, r.stderr), (rl.value, rl.grad, rl.stderr), value, grad

    typed, from_legacy, value, grad = jax.jit(everything)(theta, key, legacy)
    _f32_only((typed, from_legacy, value, grad))
    r = _estimate(cfg, theta, key)  # eager
    _close(typed, (r.value, r.grad, r.stderr))
    # Same draws from the typed and the legacy key; equal to float32 rounding (one ulp): the two
    # paths are different programs (the legacy one unwraps key data), which XLA may fuse and
    # sum in a different order.
    _close(typed, from_legacy, rtol=2.5e-7, atol=0)
    np.testing.assert_allclose(typed[0], mean_f, rtol=1e-5)
    np.testing.assert_allclose(value, mean_f, rtol=1e-5)
    _close(grad, typed[1])  # grad of expectation == estimate_grad's grad, same draws


@pytest.mark.parametrize("cfg", _configs())
def test_vmap_over_keys_and_theta(cfg):
    """vmap over a batch of legacy keys (shape (3, 2)) and over theta equals one-at-a-time
    calls with the same keys as typed keys."""
    theta = cfg.theta(jnp.float32)
    legacy = jax.random.split(jax.random.PRNGKey(1), 3)
    typed = jax.random.wrap_key_data(legacy)
    thetas = jax.tree_util.tree_map(lambda a: jnp.stack([a, a + 0.1, a - 0.2]), theta)

    def grads(th, k):
        return _estimate(cfg, th, k).grad, jax.grad(_expectation, argnums=1)(cfg, th, k)

    step = jax.jit(grads)
    by_key = jax.jit(jax.vmap(grads, in_axes=(None, 0)))(theta, legacy)
    by_theta = jax.jit(jax.vmap(grads, in_axes=(0, None)))(thetas, typed[0])
    for i in range(3):
        _close(jax.tree_util.tree_map(lambda a, i=i: a[i], by_key), step(theta, typed[i]))
        th_i = jax.tree_util.tree_map(lambda a, i=i: a[i], thetas)
        _close(jax.tree_util.tree_map(lambda a, i=i: a[i], by_theta), step(th_i, typed[0]))


@pytest.mark.parametrize("cfg", _configs())
def test_float64_in_float64_out(cfg):
    key = jax.random.key(0)

    def run(theta):
        r = _estimate(cfg, theta, key)
        g = jax.grad(_expectation, argnums=1)(cfg, theta, key)
        return r.value, r.grad, r.stderr, r.variance, r.value_stderr, g

    with jax.enable_x64(True):
        out = jax.jit(run)(cfg.theta(jnp.float64))
        assert {a.dtype for a in jax.tree_util.tree_leaves(out)} == {jnp.dtype(jnp.float64)}


@pytest.mark.parametrize("cfg", _configs())
def test_chunk_size_invariance(cfg):
    """Sample i depends only on (key, i): equal to rounding for chunk sizes 1, 7 (not a divisor
    of N = 20) and automatic."""
    theta, key = cfg.theta(jnp.float32), jax.random.key(5)

    def go(theta, key):
        ests = [_estimate(cfg, theta, key, chunk_size=c) for c in (None, 1, 7)]
        grads = [jax.grad(_expectation, argnums=1)(cfg, theta, key, chunk_size=c) for c in (None, 7)]
        return [(r.value, r.grad, r.stderr) for r in ests], grads

    ests, grads = jax.jit(go)(theta, key)
    for out in ests[1:]:
        _close(out, ests[0], rtol=1e-5, atol=1e-6)
    _close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


class _Counter:
    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, x):
        self.calls += 1
        return self.f(x)


@pytest.mark.parametrize("cfg", _configs())
def test_second_jitted_step_does_not_recompile(cfg):
    f = _Counter(cfg.f)
    est, fam = cfg.estimator(), cfg.family()
    opt = optax.sgd(1e-3)

    @jax.jit
    def step(theta, opt_state, est_state, key):
        def loss(th):
            if stateful(est):
                return sg.expectation_with_state(f, fam, th, key, est_state, num_samples=N,
                                                 estimator=est)
            return sg.expectation(f, fam, th, key, num_samples=N, estimator=est), est_state

        (value, est_state), g = jax.value_and_grad(loss, has_aux=True)(theta)
        updates, opt_state = opt.update(g, opt_state)
        return optax.apply_updates(theta, updates), opt_state, est_state, value

    theta = cfg.theta(jnp.float32)
    opt_state, est_state = opt.init(theta), est.init(theta)
    theta, opt_state, est_state, _ = step(theta, opt_state, est_state, jax.random.key(0))
    traced = f.calls
    assert traced > 0
    for i in range(1, 4):
        theta, opt_state, est_state, _ = step(theta, opt_state, est_state, jax.random.key(i))
    assert f.calls == traced, "the second step retraced f"
    assert step._cache_size() == 1


def test_estimate_grad_second_call_does_not_recompile():
    cfg = CONFIGS[0]
    f = _Counter(cfg.f)
    run = jax.jit(lambda th, k: sg.estimate_grad(f, cfg.family(), th, k, num_samples=N).grad)
    run(cfg.theta(jnp.float32), jax.random.key(0))
    traced = f.calls
    run(cfg.theta(jnp.float32), jax.random.key(1))
    assert f.calls == traced and run._cache_size() == 1


TARGET = jnp.asarray([1.0, -0.5, 0.25])


def _optax_objective(theta):
    """E[sum (x - t)^2] - 2 sum log scale = sum (loc - t)^2 + scale^2 - 2 log scale:
    minimized at loc = t, scale = 1 (f closes over theta: the pathwise term flows)."""
    return lambda x: jnp.sum((x - TARGET) ** 2) - 2.0 * jnp.sum(jnp.log(theta["scale"]))


@pytest.mark.parametrize("cfg", _configs(only=lambda c: c.family is sg.families.normal))
def test_optax_loop_reaches_the_optimum(cfg):
    est, fam = cfg.estimator(), cfg.family()
    opt = optax.adam(optax.exponential_decay(0.05, 100, 0.5))
    theta = {"loc": jnp.zeros(3), "scale": jnp.full(3, 2.0)}

    def step(carry, key):
        theta, opt_state, est_state = carry

        def loss(th):
            f = _optax_objective(th)
            if stateful(est):
                return sg.expectation_with_state(f, fam, th, key, est_state, num_samples=64,
                                                 estimator=est)
            return sg.expectation(f, fam, th, key, num_samples=64, estimator=est), est_state

        (_, est_state), g = jax.value_and_grad(loss, has_aux=True)(theta)
        updates, opt_state = opt.update(g, opt_state)
        return (optax.apply_updates(theta, updates), opt_state, est_state), None

    keys = jax.random.split(jax.random.key(2025), 600)
    carry = (theta, opt.init(theta), est.init(theta))
    (theta, _, _), _ = jax.jit(lambda c, k: jax.lax.scan(step, c, k))(carry, keys)
    np.testing.assert_allclose(theta["loc"], TARGET, atol=0.05)
    np.testing.assert_allclose(theta["scale"], 1.0, atol=0.05)
