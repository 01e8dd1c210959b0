"""Antithetic, stratified and quasi-Monte Carlo designs; common random numbers (issue 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stats_util import (
    assert_above,
    assert_close_rel,
    assert_power,
    assert_unbiased,
    log_variance_ratio,
    replicate_stats,
)

import scoregrad as sg

FAM = sg.families.normal()
THETA = {"loc": jnp.array([0.3, -0.5]), "scale": jnp.array([1.0, 0.7])}


def _cos(x):
    return jnp.sum(jnp.cos(x))


def _truth():
    e = np.exp(-np.asarray(THETA["scale"]) ** 2 / 2)
    loc, scale = np.asarray(THETA["loc"]), np.asarray(THETA["scale"])
    return np.concatenate([-np.sin(loc) * e, -np.cos(loc) * scale * e])


def _flat(tree):
    return np.concatenate([np.asarray(tree["loc"]), np.asarray(tree["scale"])], axis=-1)


def _reps(est, n, reps=64, f=_cos, seed=21):
    theta = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), THETA)
    keys = jax.random.split(jax.random.key(seed), reps)
    return jax.jit(jax.vmap(lambda k: sg.estimate_grad(f, FAM, theta, k, num_samples=n,
                                                       estimator=est)))(keys)


def test_halton_points(x64):
    key = jax.random.key(0)
    u = sg.sampling.halton(key, jnp.arange(64), 3, jnp.float64)
    np.testing.assert_array_equal(u[16:40], sg.sampling.halton(key, jnp.arange(16, 40), 3, jnp.float64))
    assert np.all((u > 0) & (u < 1))
    # Base 2: the first 2^m points fall one in each of the 2^m cells (low discrepancy).
    cells = np.floor(np.asarray(u[:64, 0]) * 64).astype(int)
    assert sorted(cells) == list(range(64))
    cells3 = np.floor(np.asarray(u[:27, 1]) * 27).astype(int)  # base 3: one point per cell
    assert sorted(cells3) == list(range(27))


@pytest.mark.statistical
@pytest.mark.parametrize("make", [
    lambda: sg.sampling.antithetic(),
    lambda: sg.sampling.antithetic(sg.pathwise()),
    lambda: sg.sampling.stratified(sg.score_function(baseline=sg.baselines.optimal()), num_strata=4),
    lambda: sg.sampling.qmc(block_size=16),
    lambda: sg.sampling.qmc(sg.pathwise(), block_size=16),
])
def test_designs_unbiased(x64, make):
    r = _reps(make(), 64, reps=160)  # 64 replicates left the power check 2.5 SDs from its bound
    m, se = replicate_stats(_flat(r.grad))
    assert_unbiased(m, se, _truth(), what=make().name)
    assert_power(se, 0.05, what=make().name)


@pytest.mark.statistical
def test_antithetic_halves_pathwise_variance_for_monotone_f(x64):
    f = lambda x: jnp.sum(jnp.exp(0.5 * x))  # noqa: E731  (monotone in the noise)
    anti, plain = _reps(sg.sampling.antithetic(sg.pathwise()), 32, 200, f), _reps(sg.pathwise(), 32, 200, f)
    log_ratio, bound = log_variance_ratio(_flat(plain.grad), _flat(anti.grad))
    assert_above(log_ratio[:2], bound, what="log(var plain / var antithetic), loc")


@pytest.mark.statistical
def test_qmc_error_falls_faster_than_sqrt_n(x64):
    theta = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), THETA)
    keys = jax.random.split(jax.random.key(2), 200)
    exact = float(np.sum(np.cos(np.asarray(THETA["loc"])) * np.exp(-np.asarray(THETA["scale"]) ** 2 / 2)))

    def rmse(m):
        est = sg.sampling.qmc(sg.pathwise(), block_size=m)
        v = jax.jit(jax.vmap(lambda k: sg.estimate_grad(_cos, FAM, theta, k, num_samples=m,
                                                        estimator=est).value))(keys)
        return float(np.sqrt(np.mean((np.asarray(v) - exact) ** 2)))

    small, large = rmse(64), rmse(1024)
    # Monte Carlo would give a ratio of 4 (= sqrt(16)); 5 SE of the log-ratio estimate ~ log 2.
    assert_above(small / large, 8.0, what="rmse(64) / rmse(1024)")


@pytest.mark.slow  # >= 15 s on 2 cores (mostly compile time)
def test_chunk_size_invariance_and_given_samples_refused(x64):
    est = sg.sampling.qmc(block_size=8)
    theta = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), THETA)
    a = sg.estimate_grad(_cos, FAM, theta, jax.random.key(1), num_samples=64, estimator=est, chunk_size=1)
    b = sg.estimate_grad(_cos, FAM, theta, jax.random.key(1), num_samples=64, estimator=est, chunk_size=3)
    np.testing.assert_allclose(_flat(a.grad), _flat(b.grad), rtol=1e-12)
    with pytest.raises(TypeError, match="given samples"):
        sg.estimate_grad_from_samples(_cos, FAM, theta, jnp.zeros((8, 2)), estimator=est)


def test_refuses_batch_baselines_and_partial_transform():
    with pytest.raises(TypeError, match="partner"):  # at bind (trace) time
        sg.bind(sg.sampling.antithetic(sg.score_function(baseline=sg.baselines.leave_one_out())),
                sg.families.normal(), {"loc": jnp.zeros(2), "scale": jnp.ones(2)})
    with pytest.raises(TypeError, match="dim"):
        sg.sampling.qmc(transform=lambda th, u: u)
    with pytest.raises(ValueError, match="num_strata"):
        sg.sampling.stratified(num_strata=1)
    with pytest.raises(TypeError, match="transform"):
        fam = sg.Family(lambda th, x: jnp.sum(x * th), lambda th, k: jax.random.normal(k, (2,)))
        sg.estimate_grad(_cos, fam, jnp.zeros(2), jax.random.key(0), num_samples=4,
                         estimator=sg.sampling.antithetic())


@pytest.mark.statistical
def test_finite_difference_common_random_numbers(x64):
    theta = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), THETA)
    coarse = sg.sampling.finite_difference(_cos, FAM, theta, jax.random.key(3), num_samples=2000, step=1e-2)
    fine = sg.sampling.finite_difference(_cos, FAM, theta, jax.random.key(3), num_samples=2000, step=1e-5)
    assert_unbiased(_flat(fine.grad), _flat(fine.stderr), _truth(), atol=1e-6, what="CRN finite difference")
    assert_power(_flat(fine.stderr), 0.05, what="finite difference")
    # With common random numbers the variance stays bounded as the step shrinks.
    assert_close_rel(_flat(fine.stderr), _flat(coarse.stderr), 0.05, what="SE fine vs coarse step")


@pytest.mark.statistical
def test_open_uniform_never_reaches_0_or_1_and_antithetic_partner_is_finite(x64):
    for dtype in (jnp.float32, jnp.float64):
        u = sg.sampling.open_uniform(jax.random.key(3), (200_000,), dtype)
        assert u.dtype == dtype and float(u.min()) > 0 and float(u.max()) < 1
        assert bool(jnp.all(jnp.isfinite(jax.scipy.special.ndtri(1.0 - u))))
        se = float(jnp.std(u)) / (200_000**0.5)
        assert_unbiased(float(jnp.mean(u)), se, 0.5, what=f"mean of open_uniform {dtype.__name__}")
    # The grid's end points map to finite normal quantiles in float32.
    m = jnp.finfo(jnp.float32).nmant
    ends = jnp.asarray([0.5 * 2.0**-m, 1.0 - 0.5 * 2.0**-m], jnp.float32)
    assert bool(jnp.all(jnp.isfinite(jax.scipy.special.ndtri(ends))))
    assert bool(jnp.all(jnp.isfinite(jax.scipy.special.ndtri(1.0 - ends))))

