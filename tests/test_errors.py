"""The bad-input catalogue (issue 3 item 7, issue 9): each bad input raises a TypeError or
ValueError at construction or trace time, and the message names the argument (and the fix)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoregrad as sg

KEY = jax.random.key(0)
NORMAL_THETA = {"loc": jnp.zeros(2), "scale": jnp.ones(2)}


def _sum(x):
    return jnp.sum(x)


def _lp(theta, x):
    return jnp.sum(jax.scipy.stats.norm.logpdf(x, theta, 1.0))


def _sample(theta, key):
    return theta + jax.random.normal(key, jnp.shape(theta))


def _user(log_prob=_lp, sample=_sample, **kw):
    return sg.Family(log_prob=log_prob, sample=sample, **kw)


_DEFAULT = object()


def _grad(f=_sum, family=None, theta=_DEFAULT, key=KEY, **kw):
    """sg.estimate_grad with defaults for everything not under test."""
    family = sg.families.normal() if family is None else family
    theta = NORMAL_THETA if theta is _DEFAULT else theta
    kw.setdefault("num_samples", 4)
    return sg.estimate_grad(f, family, theta, key, **kw)


def _from(samples, f=_sum, family=None, theta=None, **kw):
    family = sg.families.bernoulli() if family is None else family
    theta = jnp.zeros(2) if theta is None else theta
    return sg.estimate_grad_from_samples(f, family, theta, samples, **kw)


def _loo():
    return sg.score_function(baseline=sg.baselines.leave_one_out())


def _ma():
    return sg.score_function(baseline=sg.baselines.moving_average(0.9))


def _user_dtype_sampler(theta, key):
    return jax.random.bernoulli(key, 0.5, theta.shape).astype(jnp.float32)


def _stopped_sampler(theta, key):
    return jax.lax.stop_gradient(theta) + jax.random.normal(key, theta.shape)


def _rounding_sampler(theta, key):
    return jnp.round(theta + jax.random.normal(key, theta.shape))


# (id, thunk, exception type, a regex the message must contain: the argument's name)
CATALOGUE = [
    # non-callable arguments
    ("f_not_callable", lambda: _grad(f=3.0), TypeError, "`f` must be callable"),
    ("family_not_a_family", lambda: _grad(family="normal"), TypeError, "`family` must be"),
    ("family_factory_not_called", lambda: _grad(family=sg.families.normal), TypeError,
     "`family` must be.*got function"),
    ("estimator_not_an_estimator", lambda: _grad(estimator="reinforce"), TypeError,
     "`estimator` must be"),
    ("estimator_factory_not_called", lambda: _grad(estimator=sg.score_function), TypeError,
     "`estimator` must be.*got function"),
    ("baseline_factory_not_called",
     lambda: sg.score_function(baseline=sg.baselines.leave_one_out), TypeError,
     r"baseline=\.\.\.\) must be"),
    ("baseline_wrong_type", lambda: sg.score_function(baseline=0.5), TypeError, "baseline"),
    ("log_prob_not_callable", lambda: _user(log_prob=1.0), TypeError, "`log_prob` must be callable"),
    ("sample_not_callable", lambda: _user(sample=None), TypeError, "`sample` must be callable"),
    ("check_theta_not_callable", lambda: _user(check_theta=3), TypeError, "`check_theta`"),
    ("reparameterized_not_bool", lambda: _user(reparameterized="yes"), TypeError,
     "reparameterized"),
    # log_prob returning the wrong thing
    ("log_prob_vector",
     lambda: _grad(family=_user(log_prob=lambda t, x: jax.scipy.stats.norm.logpdf(x, t, 1.0)),
                   theta=jnp.zeros(2)), ValueError, r"log_prob\(theta, x\) must return a scalar"),
    ("log_prob_shape_1",
     lambda: _grad(family=_user(log_prob=lambda t, x: _lp(t, x)[None]), theta=jnp.zeros(2)),
     ValueError, r"log_prob\(theta, x\) must return a scalar; got shape \(1,\)"),
    ("log_prob_int",
     lambda: _grad(family=_user(log_prob=lambda t, x: jnp.sum(x).astype(jnp.int32)),
                   theta=jnp.zeros(2)), TypeError, r"log_prob\(theta, x\) must return a floating"),
    ("log_prob_tuple",
     lambda: _grad(family=_user(log_prob=lambda t, x: (_lp(t, x), _lp(t, x))), theta=jnp.zeros(2)),
     TypeError, r"log_prob\(theta, x\) must return a single floating-point scalar.*tuple"),
    ("log_prob_dict_of_one_scalar",
     lambda: _grad(family=_user(log_prob=lambda t, x: {"lp": _lp(t, x)}), theta=jnp.zeros(2)),
     TypeError, r"log_prob\(theta, x\) must return a single floating-point scalar.*dict"),
    ("log_prob_wrong_theta_structure",
     lambda: _grad(family=_user(log_prob=lambda t, x: _lp(t["mean"], x)), theta=jnp.zeros(2)),
     TypeError, r"family\.log_prob\(theta, x\) failed while tracing.*structure"),
    # f returning the wrong thing
    # (an array-valued f is accepted: tests/test_vector_f.py; a stateful estimator refuses it)
    ("f_vector_stateful", lambda: _grad(f=lambda x: x, estimator=sg.score_function(
        sg.baselines.moving_average(0.9))), ValueError, r"f returns an array.*stateful"),
    ("f_tuple_of_entries", lambda: _grad(f=lambda x: (x[0], x[1])), TypeError,
     r"f\(x\) must return a single floating-point scalar array"),
    ("f_int", lambda: _grad(f=lambda x: jnp.sum(x).astype(jnp.int32)), TypeError,
     r"f\(x\) must return a floating-point scalar \(or array\); got dtype int32"),
    ("f_bool", lambda: _grad(f=lambda x: jnp.sum(x) > 0), TypeError,
     r"f\(x\) must return a floating-point scalar \(or array\); got dtype bool"),
    ("f_complex", lambda: _grad(f=lambda x: jnp.sum(x).astype(jnp.complex64)), TypeError,
     r"f\(x\) must return a floating-point scalar"),
    ("f_tuple", lambda: _grad(f=lambda x: (jnp.sum(x), jnp.sum(x))), TypeError,
     r"f\(x\) must return a single floating-point scalar"),
    ("f_none", lambda: _grad(f=lambda x: None), TypeError,
     r"f\(x\) must return a single floating-point scalar.*None"),
    ("f_two_arguments", lambda: _grad(f=lambda x, theta: jnp.sum(x)), TypeError,
     r"f\(x\) failed while tracing.*one draw"),
    # theta
    ("theta_int", lambda: _grad(family=sg.families.bernoulli(), theta=jnp.zeros(2, jnp.int32)),
     TypeError, "`theta` has dtype int32"),
    ("theta_bool", lambda: _grad(family=sg.families.bernoulli(), theta=jnp.zeros(2, bool)),
     TypeError, "`theta` has dtype bool"),
    ("theta_python_int", lambda: _grad(family=sg.families.bernoulli(), theta=1), TypeError,
     "`theta` has dtype int32"),
    ("theta_complex", lambda: _grad(family=sg.families.bernoulli(),
                                    theta=jnp.zeros(2, jnp.complex64)),
     TypeError, "`theta` has dtype complex64"),
    ("theta_int_leaf_in_dict",
     lambda: _grad(theta={"loc": jnp.zeros(2, jnp.int32), "scale": jnp.ones(2)}), TypeError,
     r"`theta\['loc'\]` has dtype int32"),
    ("theta_string", lambda: _grad(family=sg.families.bernoulli(), theta="logits"), TypeError,
     "`theta` is a str"),
    ("theta_empty", lambda: _grad(theta={}), ValueError, "`theta` has no array leaves"),
    ("theta_none", lambda: _grad(family=sg.families.bernoulli(), theta=None), ValueError,
     "`theta` has no array leaves"),
    ("theta_function", lambda: _grad(family=sg.families.bernoulli(), theta=jnp.sin), TypeError,
     "`theta` is a function"),
    ("normal_theta_array", lambda: _grad(theta=jnp.zeros(2)), TypeError,
     r"normal\(\): theta must be a dict \{'loc'"),
    ("normal_theta_wrong_keys", lambda: _grad(theta={"mu": jnp.zeros(2), "sigma": jnp.ones(2)}),
     TypeError, r"normal\(\): theta must be a dict.*mu"),
    ("normal_theta_tuple", lambda: _grad(theta=(jnp.zeros(2), jnp.ones(2))), TypeError,
     r"normal\(\): theta must be a dict.*tuple"),
    ("normal_theta_shapes_differ",
     lambda: _grad(theta={"loc": jnp.zeros(2), "scale": jnp.ones(3)}), ValueError,
     r"theta\['loc'\] and theta\['scale'\] must have the same shape"),
    ("normal_theta_list_leaf", lambda: _grad(theta={"loc": [0.0, 1.0], "scale": jnp.ones(2)}),
     TypeError, r"theta\['loc'\] must be an array, not a list"),
    ("bernoulli_theta_dict", lambda: _grad(family=sg.families.bernoulli(),
                                           theta={"logits": jnp.zeros(2)}),
     TypeError, r"bernoulli\(\): theta must be an array of logits"),
    ("bernoulli_theta_list", lambda: _grad(family=sg.families.bernoulli(), theta=[0.0, 1.0]),
     TypeError, r"bernoulli\(\): theta \(the logits\) must be an array, not a list"),
    ("categorical_theta_scalar", lambda: _grad(family=sg.families.categorical(),
                                               theta=jnp.zeros(())),
     ValueError, r"categorical\(\): theta must have a trailing axis of K"),
    # num_samples
    ("num_samples_zero", lambda: _grad(num_samples=0), ValueError,
     "`num_samples` must be at least 1"),
    ("num_samples_negative", lambda: _grad(num_samples=-3), ValueError,
     "`num_samples` must be at least 1"),
    ("num_samples_float", lambda: _grad(num_samples=10.0), TypeError,
     "`num_samples` must be a Python int; got float"),
    ("num_samples_bool", lambda: _grad(num_samples=True), TypeError,
     "`num_samples` must be a Python int; got bool"),
    ("num_samples_string", lambda: _grad(num_samples="10"), TypeError,
     "`num_samples` must be a Python int; got str"),
    ("num_samples_array", lambda: _grad(num_samples=jnp.asarray(10)), TypeError,
     "`num_samples` must be a Python int"),
    ("num_samples_traced", lambda: jax.jit(lambda n: _grad(num_samples=n))(4), TypeError,
     "`num_samples` is traced.*static"),
    ("num_samples_traced_expectation",
     lambda: jax.jit(lambda n: sg.expectation(_sum, sg.families.normal(), NORMAL_THETA, KEY,
                                              num_samples=n))(4),
     TypeError, "`num_samples` is traced"),
    ("num_samples_beyond_32_bit_index", lambda: _grad(num_samples=2**33), ValueError,
     "`num_samples`=8589934592 exceeds"),
    ("leave_one_out_one_sample", lambda: _grad(num_samples=1, estimator=_loo()), ValueError,
     r"`num_samples` must be at least 2 by score_function\[leave_one_out\]"),
    ("leave_one_out_one_sample_expectation",
     lambda: sg.expectation(_sum, sg.families.normal(), NORMAL_THETA, KEY, num_samples=1,
                            estimator=_loo()),
     ValueError, "`num_samples` must be at least 2"),
    ("leave_one_out_one_given_sample", lambda: _from(jnp.ones((1, 2)), estimator=_loo()),
     ValueError, "`samples` must hold at least 2 draws"),
    # pathwise where it does not apply
    ("pathwise_bernoulli", lambda: _grad(family=sg.families.bernoulli(), theta=jnp.zeros(2),
                                         estimator=sg.pathwise()),
     TypeError, r"pathwise\(\) needs a reparameterizable sampler.*'bernoulli'"),
    ("pathwise_categorical",
     lambda: _grad(f=lambda x: jnp.sum(x).astype(jnp.float32), family=sg.families.categorical(),
                   theta=jnp.zeros(3), estimator=sg.pathwise()),
     TypeError, r"pathwise\(\) needs a reparameterizable sampler.*'categorical'"),
    ("pathwise_user_integer_draws",
     lambda: _grad(f=lambda x: jnp.sum(x).astype(jnp.float32),
                   family=_user(sample=lambda t, k: jax.random.bernoulli(k, 0.5, t.shape)),
                   theta=jnp.zeros(2), estimator=sg.pathwise()),
     TypeError, r"pathwise\(\) needs draws that are differentiable.*bool"),
    ("pathwise_user_stop_gradient_sampler",
     lambda: _grad(family=_user(sample=_stopped_sampler), theta=jnp.zeros(2),
                   estimator=sg.pathwise()),
     TypeError, r"pathwise\(\) needs a sampler differentiable in theta"),
    ("pathwise_user_rounding_sampler",
     lambda: _grad(family=_user(sample=_rounding_sampler), theta=jnp.zeros(2),
                   estimator=sg.pathwise()),
     TypeError, r"pathwise\(\) needs a sampler differentiable in theta"),
    ("pathwise_user_thresholding_sampler",
     lambda: _grad(family=_user(sample=_user_dtype_sampler), theta=jnp.zeros(2),
                   estimator=sg.pathwise()),
     TypeError, r"pathwise\(\) needs a sampler differentiable in theta"),
    ("pathwise_given_samples", lambda: _from(jnp.ones((3, 2)), family=sg.families.normal(),
                                             theta=NORMAL_THETA, estimator=sg.pathwise()),
     TypeError, "cannot use given samples"),
    # keys
    ("key_int", lambda: _grad(key=0), TypeError, "`key` must be a JAX PRNG key, got the int 0"),
    ("key_none", lambda: _grad(key=None), TypeError, "`key` must be a JAX PRNG key"),
    ("key_float_array", lambda: _grad(key=jnp.zeros(2)), TypeError,
     "`key` must be a PRNG key.*float32"),
    ("key_int32_array", lambda: _grad(key=jnp.zeros(2, jnp.int32)), TypeError,
     "`key` must be a PRNG key.*int32"),
    ("key_uint32_wrong_shape", lambda: _grad(key=jnp.zeros(3, jnp.uint32)), TypeError,
     r"`key` is a uint32 array of shape \(3,\)"),
    ("key_typed_batch", lambda: _grad(key=jax.random.split(KEY, 2)), ValueError,
     r"`key` must be a single key.*jax\.vmap"),
    ("key_legacy_batch", lambda: _grad(key=jax.random.split(jax.random.PRNGKey(0), 2)),
     ValueError, r"`key` must be a single key.*jax\.vmap"),
    # chunk_size
    ("chunk_size_zero", lambda: _grad(chunk_size=0), ValueError, "`chunk_size` must be >= 1"),
    ("chunk_size_negative", lambda: _grad(chunk_size=-2), ValueError, "`chunk_size` must be >= 1"),
    ("chunk_size_float", lambda: _grad(chunk_size=2.0), TypeError,
     "`chunk_size` must be None .* or a static Python int"),
    ("chunk_size_bool", lambda: _grad(chunk_size=True), TypeError, "`chunk_size` must be"),
    ("chunk_size_traced", lambda: jax.jit(lambda c: _grad(chunk_size=c))(2), TypeError,
     "`chunk_size` must be"),
    # moving-average decay
    ("decay_one", lambda: sg.baselines.moving_average(1.0), ValueError, r"decay=\.\.\.\) must be in"),
    ("decay_negative", lambda: sg.baselines.moving_average(-0.1), ValueError, "decay"),
    ("decay_nan", lambda: sg.baselines.moving_average(float("nan")), ValueError, "decay"),
    ("decay_string", lambda: sg.baselines.moving_average("0.9"), TypeError, "decay"),
    ("decay_bool", lambda: sg.baselines.moving_average(True), TypeError, "decay"),
    ("decay_traced", lambda: jax.jit(lambda d: sg.baselines.moving_average(d).name)(0.9),
     TypeError, "decay"),
    # state
    ("stateful_estimator_in_expectation",
     lambda: sg.expectation(_sum, sg.families.normal(), NORMAL_THETA, KEY, num_samples=4,
                            estimator=_ma()),
     ValueError, "is stateful; use sg.expectation_with_state"),
    ("state_none_in_expectation_with_state",
     lambda: sg.expectation_with_state(_sum, sg.families.normal(), NORMAL_THETA, KEY, None,
                                       num_samples=4, estimator=_ma()),
     ValueError, "`state` is None"),
    ("state_wrong_structure", lambda: _grad(estimator=_ma(), state=(1.0,)), TypeError,
     "`state` has structure.*estimator.init"),
    ("state_wrong_structure_with_state",
     lambda: sg.expectation_with_state(_sum, sg.families.normal(), NORMAL_THETA, KEY, {"a": 1.0},
                                       num_samples=4, estimator=_ma()),
     TypeError, "`state` has structure"),
    ("state_for_stateless_estimator",
     lambda: _grad(state=_ma().init(NORMAL_THETA)), TypeError, "`state`: .* is stateless"),
    # given samples
    ("samples_leading_axes_differ",
     lambda: _from({"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))},
                   f=lambda x: jnp.sum(x["a"] + x["b"]),
                   family=_user(log_prob=lambda t, x: jnp.sum(x["a"] * t),
                                sample=lambda t, k: {"a": t, "b": t})),
     ValueError, r"`samples` leaves disagree on the number of draws: \[3, 4\]"),
    ("samples_scalar", lambda: _from(jnp.asarray(1.0)), ValueError,
     "`samples` must be a pytree of arrays with a leading axis"),
    ("samples_none", lambda: _from(None), ValueError, "`samples` must be a pytree of arrays"),
    ("samples_nested_list", lambda: _from([[0.0, 1.0], [1.0, 1.0]]), ValueError,
     "`samples` must be a pytree of arrays.*list"),
    ("samples_empty", lambda: _from(jnp.ones((0, 2))), ValueError,
     "`samples` must hold at least 1 draws"),
    ("samples_wrong_draw_shape", lambda: _from(jnp.ones((4, 3))), ValueError,
     r"`samples` leaves must have shape \(N, \*draw_shape\)"),
    ("samples_wrong_dtype_kind", lambda: _from(jnp.ones((4, 2), jnp.int32)), TypeError,
     "`samples` has dtype int32, but family.sample draws dtype float32"),
    ("samples_wrong_structure", lambda: _from({"x": jnp.ones((4, 2))}), TypeError,
     "`samples` has structure"),
    # sampler
    ("sample_fails_to_trace",
     lambda: _grad(family=_user(sample=lambda t, k: t["nope"]), theta=jnp.zeros(2)), TypeError,
     r"family\.sample\(theta, key\) failed while tracing"),
    # other options
    ("nan_policy_unknown", lambda: _grad(nan_policy="ignore"), ValueError, "`nan_policy` must be"),
    ("devices_unknown_string", lambda: _grad(devices="gpus"), ValueError, "`devices` must be"),
    ("devices_zero", lambda: _grad(devices=0), ValueError, "`devices`=0"),
    ("devices_not_devices", lambda: _grad(devices=[1, 2]), TypeError, "`devices` must be"),
    ("num_samples_keyword_only", lambda: sg.estimate_grad(_sum, sg.families.normal(),
                                                          NORMAL_THETA, KEY, 4),
     TypeError, "positional argument"),
]


def test_catalogue_is_large_and_ids_unique():
    ids = [c[0] for c in CATALOGUE]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 25


@pytest.mark.parametrize("thunk,exc,pattern", [c[1:] for c in CATALOGUE],
                         ids=[c[0] for c in CATALOGUE])
def test_bad_input_raises_naming_the_argument(thunk, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        thunk()
    assert type(info.value) is exc  # not a subclass (e.g. a JAX-internal error)


def test_errors_are_raised_at_trace_time_under_jit():
    """Inside jax.jit the same errors come out while tracing (no compile, no run)."""
    with pytest.raises(TypeError, match=r"f\(x\) must return a single floating-point scalar"):
        jax.jit(lambda th: _grad(f=lambda x: (x, x), theta=th).grad)(NORMAL_THETA)
    with pytest.raises(TypeError, match=r"pathwise\(\) needs a reparameterizable sampler"):
        jax.jit(lambda th: sg.expectation(_sum, sg.families.bernoulli(), th, KEY, num_samples=4,
                                          estimator=sg.pathwise()))(jnp.zeros(2))


def test_good_inputs_that_look_odd_are_accepted():
    """Inputs near the catalogue that are fine: numpy ints, numpy keys, a constant f, static
    num_samples under jit, a chunk size that does not divide num_samples."""
    r = _grad(num_samples=np.int64(6), key=np.asarray(jax.random.PRNGKey(1)), chunk_size=4)
    assert r.num_samples == 6
    const = _grad(f=lambda x: 1.0, estimator=_loo())
    np.testing.assert_allclose(const.value, 1.0)
    np.testing.assert_allclose(const.grad["loc"], 0.0, atol=1e-6)  # f_i - mean f = 0
    run = jax.jit(lambda th, n: _grad(theta=th, num_samples=n).value, static_argnames="n")
    assert np.isfinite(run(NORMAL_THETA, n=5))
    r = _from(jnp.asarray([[0, 1], [1, 1]], jnp.float64 if jax.config.x64_enabled else jnp.float32))
    assert r.num_samples == 2
