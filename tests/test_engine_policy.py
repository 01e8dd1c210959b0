"""The run policy is honoured by every estimator through the one engine loop.

Regressions for issue 14's table: nan_policy="drop" rescaled VIMCO/measure-valued/IndeCateR
gradients by the draws per unit (the units were inferred from the count of f values), and the
cross-fitted estimators ran in a second loop without devices or "drop".
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stats_util import assert_unbiased

import scoregrad as sg

BERN = jnp.asarray([0.3, -0.5])


def _f(b):
    return jnp.sum((b - jnp.asarray([0.45, 0.2], b.dtype)) ** 2) + b[0] * b[1]


def _lw(b):  # a log-weight for VIMCO
    return -jnp.sum((b - 0.3) ** 2)


CASES = {
    "vimco4": (sg.vimco(4), _lw, 64),
    "measure_valued": (sg.measure_valued(), _f, 5 * 12),
    "indecater": (sg.indecater(), _f, 5 * 12),
    "rloo2": (sg.rloo(2), _f, 64),
    "optimal": (sg.score_function(sg.baselines.optimal()), _f, 64),
    "cv_optimal": (sg.control_variates.with_control_variates(
        sg.score_function(), sg.control_variates.control_variate(
            lambda x, t: x[0], lambda t: jax.nn.sigmoid(t[0]))), _f, 64),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_drop_without_nans_is_raise(name):
    """With no non-finite value, "drop" and "raise" give the same gradient (to rounding: the
    drop path masks per-unit rows) and count the same units."""
    est, f, n = CASES[name]
    fam = sg.families.bernoulli()
    key = jax.random.key(4)
    out = {}
    for policy in ("raise", "drop"):
        g = jax.grad(lambda t, p=policy: sg.expectation(
            f, fam, t, key, num_samples=n, estimator=est, nan_policy=p))(BERN)
        r = sg.estimate_grad(f, fam, BERN, key, num_samples=n, estimator=est, nan_policy=policy)
        out[policy] = (np.asarray(g), np.asarray(r.grad), np.asarray(r.stderr), int(r.num_nonfinite))
    for a, b in zip(out["raise"], out["drop"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)
    assert np.all(np.abs(out["raise"][0]) > 0)


def test_drop_with_cross_fitting_leaves_units_out_and_counts_them():
    """The optimal baseline now honours "drop" (it was refused): a non-finite f on some draws is
    counted, the estimate stays finite, and "raise" raises."""
    fam = sg.families.bernoulli()
    est = sg.score_function(sg.baselines.optimal())
    f = lambda b: jnp.where((b[0] == 1) & (b[1] == 1), jnp.nan, _f(b))  # noqa: E731
    r = sg.estimate_grad(f, fam, BERN, jax.random.key(2), num_samples=256, estimator=est,
                         nan_policy="drop")
    assert int(r.num_nonfinite) > 0
    assert np.all(np.isfinite(np.asarray(r.grad))) and np.all(np.isfinite(np.asarray(r.stderr)))
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        sg.estimate_grad(f, fam, BERN, jax.random.key(2), num_samples=256, estimator=est)


def test_a_nan_score_is_counted_and_raised():
    """nan_policy used to look only at f: a normal with scale 0 in one coordinate gave NaN
    gradients with num_nonfinite = 0."""
    theta = {"loc": jnp.zeros(2), "scale": jnp.asarray([1.0, 0.0])}
    fam = sg.families.normal()
    r = sg.estimate_grad(lambda x: jnp.sum(x), fam, theta, jax.random.key(0), num_samples=64,
                         nan_policy="propagate")
    assert int(r.num_nonfinite) > 0
    with pytest.raises(FloatingPointError):
        sg.estimate_grad(lambda x: jnp.sum(x), fam, theta, jax.random.key(0), num_samples=64)
    grad = jax.jit(jax.grad(lambda t: sg.expectation(
        lambda x: jnp.sum(x), fam, t, jax.random.key(0), num_samples=64)))
    with pytest.raises(Exception, match="NaN or infinite"):
        jax.block_until_ready(grad(theta))


@pytest.mark.statistical
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_f_keeps_float32_statistics(dtype):
    """Counts and sums in f's dtype overflowed past 65,504 draws (float16). f takes 0, 256 and
    512, exact in both dtypes."""
    fam = sg.families.bernoulli()
    f = lambda b: (256.0 * jnp.sum(b)).astype(dtype)  # noqa: E731
    r = sg.estimate_grad(f, fam, BERN, jax.random.key(0), num_samples=70_000,
                         estimator=sg.score_function(sg.baselines.leave_one_out()))
    p = jax.nn.sigmoid(BERN)
    exact = 256.0 * p * (1 - p)
    assert r.value.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(r.stderr)))
    assert_unbiased(np.asarray(r.grad), np.asarray(r.stderr), np.asarray(exact),
                    what=f"grad with a {dtype.__name__} f")


def test_reference_draw_with_nan_f_still_centres():
    """Review finding: a NaN f at the reference draw switched centring off. Key 5's first
    reference draw is (1, 1), where f is NaN: the gradient must not move with the offset."""
    f = lambda x: 3 * x[0] + 2 * x[0] * x[1] - x[1]  # noqa: E731
    fnan = lambda x: jnp.where(x[0] + x[1] > 1.5, jnp.nan, f(x))  # noqa: E731
    loo = sg.score_function(sg.baselines.leave_one_out())
    theta = jnp.asarray([0.3, -0.7])
    out = [sg.estimate_grad(lambda x, c=c: fnan(x) + c, sg.families.bernoulli(), theta,
                            jax.random.key(5), num_samples=512, estimator=loo,
                            nan_policy="drop") for c in (0.0, 1e5)]
    np.testing.assert_array_equal(np.asarray(out[0].grad), np.asarray(out[1].grad))
    np.testing.assert_array_equal(np.asarray(out[0].stderr), np.asarray(out[1].stderr))


def test_every_unit_dropped_is_nan_not_zero():
    f = lambda x: jnp.nan * jnp.sum(x)  # noqa: E731
    fam = sg.families.bernoulli()
    v = sg.expectation(f, fam, BERN, jax.random.key(0), num_samples=16, nan_policy="drop")
    g = jax.grad(lambda t: sg.expectation(f, fam, t, jax.random.key(0), num_samples=16,
                                          nan_policy="drop"))(BERN)
    assert np.isnan(np.asarray(v)) and np.all(np.isnan(np.asarray(g)))


def test_estimate_grad_refuses_to_drop_the_path_through_f():
    """Review finding: an f that closes over theta lost its pathwise term under jax.grad of
    estimate_grad(...).value (half the answer). Refused, pointing to sg.expectation."""
    fam = sg.families.normal()
    theta = {"loc": jnp.asarray([0.5, -1.0]), "scale": jnp.ones(2)}
    with pytest.raises(ValueError, match="sg.expectation"):
        jax.grad(lambda t: sg.estimate_grad(lambda x: jnp.sum(x * t["loc"]), fam, t,
                                            jax.random.key(0), num_samples=64).value)(theta)
