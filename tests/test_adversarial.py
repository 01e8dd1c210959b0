"""The adversarial catalogue of issue 15 ("no silent wrong answers").

Every case asserts one of three outcomes, and nothing weaker:

(a) a ``TypeError``/``ValueError`` at trace time whose message names the faulty argument;
(b) a correct answer: exact (closed form, or enumeration of a small Bernoulli/categorical
    support), or for a random estimate a 5-standard-error check through ``stats_util`` (the test
    is then marked ``statistical``);
(c) a non-finite answer that is counted (``num_nonfinite > 0`` under ``nan_policy="propagate"``)
    and raises under the default ``nan_policy="raise"``.

The cases are beyond ``tests/test_errors.py``: every estimator of ``sg.__all__`` and every entry
point (``estimate_grad``, ``estimate_grad_from_samples``, ``expectation``,
``expectation_with_state``, ``estimate_grad_adaptive``, importance sampling, finite differences,
``sg.auto``). Keys are literal; sizes are small; most runs use ``nan_policy="propagate"`` (the
"raise" host check is only exercised where the case is about non-finite values).
"""

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import stats_util

import scoregrad as sg

KEY = jax.random.key(0)
# What nan_policy="raise" raises today: the FloatingPointError is raised inside a host callback
# (jax.pure_callback), and JAX re-raises it as a JaxRuntimeError whose message carries it.
# Eagerly the check raises FloatingPointError itself; under jit/vmap it runs in a host callback,
# and JAX wraps it in a JaxRuntimeError carrying the same message.
NONFINITE_ERROR = (FloatingPointError, jax.errors.JaxRuntimeError)
NONFINITE_MSG = "NaN or infinite"
BAD = (TypeError, ValueError)
P = "propagate"

# ---------------------------------------------------------------------------------------------
# Problems with exact answers.

BERN = jnp.asarray([0.3, -0.5])
BERN_C = jnp.asarray([0.45, 0.2])


def bern_f(b):
    """Values 0, 1, -2, 0.5 on the support: exactly representable, also next to 1e6 in float32."""
    return b[0] - 2.0 * b[1] + 1.5 * b[0] * b[1]


def bern_sq(b):
    return jnp.sum((b - BERN_C) ** 2)


NORMAL = {"loc": jnp.asarray([0.3, -0.2]), "scale": jnp.asarray([1.0, 0.5])}


def sq(x):
    return jnp.sum(x**2)


def normal_exact(theta):
    loc, scale = (np.asarray(theta[k], np.float64) for k in ("loc", "scale"))
    return np.sum(loc**2 + scale**2), {"loc": 2 * loc, "scale": 2 * scale}


CAT = jnp.asarray([[0.1, -0.3, 0.4]])
CAT_VALUES = jnp.asarray([0.5, -1.0, 2.0])


def cat_f(x):
    return jnp.sum(CAT_VALUES[x])


def _sigmoid(t):
    return 1.0 / (1.0 + np.exp(-np.asarray(t, np.float64)))


def bern_exact(theta, f=bern_f, k=1):
    """E and dE/dtheta of f(x_1..x_k) over k i.i.d. draws of independent Bernoullis, by
    enumeration: grad = E[f * sum_k (x_k - p)] (the score of the logits)."""
    theta = np.asarray(theta, np.float64)
    p, d = _sigmoid(theta), theta.size
    pts = [np.asarray(b, np.float64).reshape(theta.shape)
           for b in itertools.product([0.0, 1.0], repeat=d)]
    value, grad = 0.0, np.zeros_like(theta)
    for tup in itertools.product(pts, repeat=k):
        prob = np.prod([np.prod(p**b * (1 - p) ** (1 - b)) for b in tup])
        fv = float(f(*tup)) if k > 1 else float(f(tup[0]))
        value += prob * fv
        grad += prob * fv * sum(b - p for b in tup)
    return value, grad


def cat_exact(logits, values):
    logits = np.asarray(logits, np.float64)[0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    values = np.asarray(values, np.float64)
    value = float(p @ values)
    return value, (p * (values - value))[None]


# ---------------------------------------------------------------------------------------------
# Helpers: each entry point with defaults for everything not under test.

_D = object()


def bern():
    return sg.families.bernoulli()


def _eg(f=bern_f, family=None, theta=_D, key=KEY, **kw):
    kw.setdefault("num_samples", 4)
    family = bern() if family is None else family
    return sg.estimate_grad(f, family, BERN if theta is _D else theta, key, **kw)


def _ex(f=bern_f, family=None, theta=_D, key=KEY, **kw):
    kw.setdefault("num_samples", 4)
    family = bern() if family is None else family
    return sg.expectation(f, family, BERN if theta is _D else theta, key, **kw)


def _ma():
    return sg.score_function(sg.baselines.moving_average(0.9))


def _ews(f=bern_f, family=None, theta=_D, key=KEY, state=_D, **kw):
    kw.setdefault("num_samples", 4)
    kw.setdefault("estimator", _ma())
    family = bern() if family is None else family
    state = kw["estimator"].init(BERN) if state is _D else state
    return sg.expectation_with_state(f, family, BERN if theta is _D else theta, key, state, **kw)


BERN_SAMPLES = jnp.asarray([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])


def _fs(samples=BERN_SAMPLES, f=bern_f, family=None, theta=_D, **kw):
    family = bern() if family is None else family
    return sg.estimate_grad_from_samples(f, family, BERN if theta is _D else theta, samples, **kw)


def _ad(f=bern_f, family=None, theta=_D, key=KEY, **kw):
    kw.setdefault("target_stderr", 0.1)
    kw.setdefault("max_samples", 8)
    family = bern() if family is None else family
    return sg.estimate_grad_adaptive(f, family, BERN if theta is _D else theta, key, **kw)


def _fd(f=sq, family=None, theta=_D, key=KEY, **kw):
    kw.setdefault("num_samples", 4)
    family = sg.families.normal() if family is None else family
    return sg.sampling.finite_difference(f, family, NORMAL if theta is _D else theta, key, **kw)


def _is(f=bern_f, family=None, theta=_D, proposal=None, proposal_theta=_D, **kw):
    family = bern() if family is None else family
    proposal = family if proposal is None else proposal
    if "samples" not in kw:
        kw.setdefault("key", KEY)
        kw.setdefault("num_samples", 4)
    return sg.importance.estimate_grad_importance(
        f, family, BERN if theta is _D else theta, proposal=proposal,
        proposal_theta=jnp.zeros(2) if proposal_theta is _D else proposal_theta, **kw)


def _auto(f=bern_f, family=None, theta=_D, key=KEY, **kw):
    kw.setdefault("num_samples", 8)
    kw.setdefault("candidates", [sg.score_function()])
    kw.setdefault("repeats", 1)
    family = bern() if family is None else family
    return sg.auto(f, family, BERN if theta is _D else theta, key, **kw)


def _lp_normal(theta, x):
    return jnp.sum(jax.scipy.stats.norm.logpdf(x, theta, 1.0))


def _sample_normal(theta, key):
    return theta + jax.random.normal(key, jnp.shape(theta))


def _user(log_prob=_lp_normal, sample=_sample_normal, **kw):
    return sg.Family(log_prob=log_prob, sample=sample, **kw)


def _vector_lp(theta, x):
    return jax.scipy.stats.norm.logpdf(x, theta, 1.0)


def _relax_state_for(shape):
    return sg.relax().init(jnp.zeros(shape))


def _vector_learned():
    base, _ = sg.baselines.learned(lambda phi, x: phi * x, jnp.ones(2), optax.sgd(0.1))
    return sg.score_function(base)


def _hessian(est, theta=BERN, n=8):
    return jax.hessian(lambda t: sg.expectation(bern_f, bern(), t, KEY, num_samples=n,
                                                estimator=est, nan_policy=P))(theta)


def _lp_loc_only(theta, x):  # ignores theta["scale"]: its score is identically zero
    return jnp.sum(jax.scipy.stats.norm.logpdf(x, theta["loc"], 1.0))


def _sample_loc_scale(theta, key):
    return theta["loc"] + theta["scale"] * jax.random.normal(key, jnp.shape(theta["loc"]))


def _lp_no_theta(theta, x):
    return jnp.sum(jax.scipy.stats.norm.logpdf(x, 0.0, 1.0))


def _lp_stopped(theta, x):
    return _lp_normal(jax.lax.stop_gradient(theta), x)


def _sample_keyless(theta, key):  # draws do not depend on the key
    del key
    return theta + 0.5


def _step(x):
    return jnp.sum(x > 0).astype(jnp.float32)


ZERO2 = jnp.zeros(2)
INT2 = jnp.zeros(2, jnp.int32)
NUM_ARG = r"`num_samples`"
CHUNK_ARG = r"`chunk_size`"
THETA_INT = r"`theta` has dtype int32"
THETA_EMPTY = r"`theta` has no array leaves"
F_SCALAR = r"f\(x\) must return a scalar"
F_FLOAT = r"f\(x\) must return a floating-point scalar"
LP_SCALAR = r"log_prob\(theta, x\) must return a scalar"

# (id, thunk, exception type(s), a regex the message must contain: the argument's name)
ERRORS = [
    # --- theta leaves that are integers, at every entry point
    ("expectation_theta_int", lambda: _ex(theta=INT2), TypeError, THETA_INT),
    ("expectation_with_state_theta_int", lambda: _ews(theta=INT2), TypeError, THETA_INT),
    ("from_samples_theta_int", lambda: _fs(theta=INT2), TypeError, THETA_INT),
    ("adaptive_theta_int", lambda: _ad(theta=INT2), TypeError, THETA_INT),
    ("finite_difference_theta_int",
     lambda: _fd(theta={"loc": INT2, "scale": jnp.ones(2)}), TypeError,
     r"`theta\['loc'\]` has dtype int32"),
    ("importance_theta_int", lambda: _is(theta=INT2), TypeError, THETA_INT),
    ("importance_proposal_theta_int", lambda: _is(proposal_theta=INT2), TypeError,
     r"proposal_theta"),
    ("importance_weighted_proposal_theta_int",
     lambda: _eg(estimator=sg.importance.importance_weighted(bern(), INT2)), TypeError,
     r"proposal_theta"),
    ("auto_theta_int", lambda: _auto(theta=INT2), TypeError, THETA_INT),
    ("theta_int_in_tuple",
     lambda: _eg(f=sq, family=_user(log_prob=lambda t, x: _lp_normal(t[0] + t[1], x),
                                    sample=lambda t, k: _sample_normal(t[0] + t[1], k)),
                 theta=(ZERO2, INT2)), TypeError, r"`theta\[1\]` has dtype int32"),
    ("poisson_theta_int", lambda: _eg(family=sg.families.poisson(), theta=INT2), TypeError,
     r"theta.*int32"),
    # --- empty theta pytrees
    ("expectation_theta_empty_dict", lambda: _ex(theta={}), ValueError, THETA_EMPTY),
    ("expectation_with_state_theta_empty", lambda: _ews(theta=()), ValueError, THETA_EMPTY),
    ("from_samples_theta_empty_tuple", lambda: _fs(theta=()), ValueError, THETA_EMPTY),
    ("adaptive_theta_empty_list", lambda: _ad(theta=[]), ValueError, THETA_EMPTY),
    ("finite_difference_theta_empty", lambda: _fd(theta={}), ValueError, THETA_EMPTY),
    ("importance_theta_empty", lambda: _is(theta={}), ValueError, THETA_EMPTY),
    ("auto_theta_empty", lambda: _auto(theta={}), ValueError, THETA_EMPTY),
    # --- mismatched pytrees and state built for another theta
    ("expectation_log_prob_wrong_theta_structure",
     lambda: _ex(f=sq, family=_user(log_prob=lambda t, x: _lp_normal(t["mean"], x)),
                 theta=ZERO2), TypeError, r"family\.log_prob\(theta, x\) failed while tracing"),
    ("adaptive_target_stderr_mismatched_tree",
     lambda: _ad(target_stderr={"a": 0.1, "b": 0.1}), TypeError, r"target_stderr"),
    ("importance_proposal_theta_wrong_structure",
     lambda: _is(f=sq, family=sg.families.normal(), theta=NORMAL, proposal_theta=ZERO2),
     TypeError, r"proposal_theta"),
    ("importance_proposal_draw_shape_mismatch",
     lambda: _is(proposal_theta=jnp.zeros(3)), BAD, r"proposal"),
    ("importance_weighted_proposal_draw_shape_mismatch",
     lambda: _eg(estimator=sg.importance.importance_weighted(bern(), jnp.zeros(3))), BAD,
     r"proposal"),
    ("importance_weighted_proposal_draw_dtype_mismatch",
     lambda: _eg(estimator=sg.importance.importance_weighted(sg.families.categorical(),
                                                             jnp.zeros((2, 2)))),
     BAD, r"proposal"),
    ("importance_proposal_not_a_family",
     lambda: _is(proposal="bernoulli"), TypeError, r"`proposal`"),
    ("relax_state_for_another_theta_shape",
     lambda: _eg(estimator=sg.relax(), state=_relax_state_for((3,))), BAD, r"`state`"),
    ("relax_state_for_another_theta_shape_with_state",
     lambda: _ews(estimator=sg.relax(), state=_relax_state_for((3,))), BAD, r"`state`"),
    ("learned_baseline_returns_vector", lambda: _eg(estimator=_vector_learned(),
                                                     state=_vector_learned().init(BERN)),
     BAD, r"(?s)baseline.*scalar"),
    ("categorical_empty", lambda: _eg(f=cat_f, family=sg.families.categorical(),
                                      theta=jnp.zeros((0,))),
     ValueError, r"categorical\(\).*theta"),
    ("categorical_empty_batch", lambda: _eg(f=cat_f, family=sg.families.categorical(),
                                            theta=jnp.zeros((2, 0))),
     ValueError, r"categorical\(\).*theta"),
    ("enumerate_categorical_empty",
     lambda: _eg(f=cat_f, family=sg.families.categorical(), theta=jnp.zeros((1, 0)),
                 estimator=sg.enumerate()), ValueError, r"categorical\(\).*theta"),
    # --- log_prob returning a vector, at every entry point that reads it
    ("expectation_log_prob_vector", lambda: _ex(f=sq, family=_user(log_prob=_vector_lp),
                                                theta=ZERO2), ValueError, LP_SCALAR),
    ("from_samples_log_prob_vector",
     lambda: _fs(f=sq, family=_user(log_prob=_vector_lp), theta=ZERO2), ValueError, LP_SCALAR),
    ("adaptive_log_prob_vector", lambda: _ad(f=sq, family=_user(log_prob=_vector_lp),
                                             theta=ZERO2), ValueError, LP_SCALAR),
    ("importance_log_prob_vector",
     lambda: _is(f=sq, family=_user(log_prob=_vector_lp), theta=ZERO2,
                 proposal=_user()), ValueError, LP_SCALAR),
    ("importance_proposal_log_prob_vector",
     lambda: _is(f=sq, family=_user(), theta=ZERO2, proposal=_user(log_prob=_vector_lp)),
     ValueError, r"proposal"),
    ("auto_log_prob_vector", lambda: _auto(f=sq, family=_user(log_prob=_vector_lp),
                                           theta=ZERO2), ValueError, LP_SCALAR),
    # --- f returning a vector or an integer, at every entry point and through every estimator
    # (an array-valued f is accepted by expectation/estimate_grad with any stateless estimator:
    # tests/test_vector_f.py checks entry j against the scalar call for every estimator)
    ("expectation_f_vector_stateful", lambda: _ex(f=lambda x: x, estimator=sg.score_function(
        sg.baselines.moving_average(0.9))), ValueError, r"is stateful"),
    ("expectation_f_int", lambda: _ex(f=lambda x: jnp.sum(x).astype(jnp.int32)), TypeError,
     F_FLOAT),
    ("expectation_with_state_f_vector", lambda: _ews(f=lambda x: x), ValueError,
     r"f returns an array"),
    ("from_samples_f_int", lambda: _fs(f=lambda x: jnp.sum(x).astype(jnp.int32)), TypeError,
     F_FLOAT),
    ("adaptive_f_vector", lambda: _ad(f=lambda x: x), ValueError, F_SCALAR),
    ("finite_difference_f_vector", lambda: _fd(f=lambda x: x), ValueError, F_SCALAR),
    ("finite_difference_f_int", lambda: _fd(f=lambda x: jnp.sum(x).astype(jnp.int32)),
     TypeError, F_FLOAT),
    ("importance_f_vector", lambda: _is(f=lambda x: x), ValueError, F_SCALAR),
    ("importance_f_int", lambda: _is(f=lambda x: jnp.sum(x).astype(jnp.int32)), TypeError,
     F_FLOAT),
    ("auto_f_vector", lambda: _auto(f=lambda x: x), ValueError, r"auto: f must return a scalar"),
    ("gumbel_softmax_f_tuple", lambda: _eg(f=lambda x: (x[0], x[1]),
                                           estimator=sg.gumbel_softmax(0.5)),
     TypeError, r"f\(x\) must return a single floating-point scalar array"),
    ("arm_f_int", lambda: _eg(f=lambda x: jnp.sum(x).astype(jnp.int32), estimator=sg.arm()),
     TypeError, F_FLOAT),
    ("rebar_f_int", lambda: _eg(f=lambda x: jnp.sum(x).astype(jnp.int32),
                                estimator=sg.rebar(learn=False)), TypeError, F_FLOAT),
    # --- num_samples: zero, negative, float, not a multiple of what a unit uses
    ("expectation_num_samples_zero", lambda: _ex(num_samples=0), ValueError, NUM_ARG),
    ("expectation_num_samples_negative", lambda: _ex(num_samples=-4), ValueError, NUM_ARG),
    ("expectation_num_samples_float", lambda: _ex(num_samples=4.0), TypeError, NUM_ARG),
    ("expectation_with_state_num_samples_zero", lambda: _ews(num_samples=0), ValueError, NUM_ARG),
    ("adaptive_max_samples_zero", lambda: _ad(max_samples=0), ValueError, r"max_samples"),
    ("adaptive_max_samples_float", lambda: _ad(max_samples=8.0), TypeError, r"max_samples"),
    ("adaptive_min_samples_negative", lambda: _ad(min_samples=-1), ValueError, r"min_samples"),
    ("adaptive_target_stderr_zero", lambda: _ad(target_stderr=0.0), ValueError,
     r"target_stderr"),
    ("adaptive_target_stderr_string", lambda: _ad(target_stderr="0.1"), TypeError,
     r"target_stderr"),
    ("finite_difference_num_samples_zero", lambda: _fd(num_samples=0), ValueError, NUM_ARG),
    ("finite_difference_num_samples_float", lambda: _fd(num_samples=4.5), TypeError, NUM_ARG),
    ("finite_difference_step_zero", lambda: _fd(step=0.0), ValueError, r"step"),
    ("importance_num_samples_zero", lambda: _is(num_samples=0), ValueError, NUM_ARG),
    ("importance_num_samples_float", lambda: _is(num_samples=4.0), TypeError, NUM_ARG),
    ("importance_key_without_num_samples", lambda: _is(num_samples=None), BAD, NUM_ARG),
    ("importance_neither_samples_nor_key", lambda: _is(key=None), BAD, r"`?samples`?|`?key`?"),
    ("auto_num_samples_zero", lambda: _auto(num_samples=0), ValueError, NUM_ARG),
    ("auto_repeats_zero", lambda: _auto(repeats=0), ValueError, r"repeats"),
    ("auto_candidate_not_an_estimator", lambda: _auto(candidates=["score_function"]), TypeError,
     r"candidates"),
    ("arm_odd_num_samples", lambda: _eg(num_samples=3, estimator=sg.arm()), ValueError,
     r"`num_samples`=3 must be a multiple of 2"),
    ("disarm_one_sample", lambda: _eg(num_samples=1, estimator=sg.disarm()), ValueError, NUM_ARG),
    ("rloo_not_a_multiple", lambda: _eg(num_samples=6, estimator=sg.rloo(4)), ValueError,
     r"`num_samples`=6 must be a multiple of 4"),
    ("vimco_not_a_multiple_expectation", lambda: _ex(num_samples=6, estimator=sg.vimco(4)),
     ValueError, r"`num_samples`=6 must be a multiple of 4"),
    ("enumerate_not_a_multiple_of_support", lambda: _eg(num_samples=6, estimator=sg.enumerate()),
     ValueError, r"`num_samples`=6"),
    ("indecater_not_a_multiple", lambda: _eg(num_samples=6, estimator=sg.indecater()),
     ValueError, r"`num_samples`=6"),
    ("measure_valued_not_a_multiple",
     lambda: _eg(f=sq, family=sg.families.normal(), theta=NORMAL, num_samples=8,
                 estimator=sg.measure_valued()), ValueError, r"`num_samples`=8"),
    ("rloo_group_size_one", lambda: sg.rloo(1), ValueError, r"group_size"),
    ("rloo_group_size_float", lambda: sg.rloo(4.0), TypeError, r"group_size"),
    ("vimco_num_particles_one", lambda: sg.vimco(1), ValueError, r"num_particles"),
    ("vimco_num_particles_traced", lambda: jax.jit(lambda k: sg.vimco(k).name)(2), TypeError,
     r"num_particles"),
    # --- chunk_size: zero, negative, float, at every entry point that takes it
    ("expectation_chunk_size_zero", lambda: _ex(chunk_size=0), ValueError, CHUNK_ARG),
    ("expectation_chunk_size_float", lambda: _ex(chunk_size=2.0), TypeError, CHUNK_ARG),
    ("expectation_with_state_chunk_size_negative", lambda: _ews(chunk_size=-1), ValueError,
     CHUNK_ARG),
    ("from_samples_chunk_size_zero", lambda: _fs(chunk_size=0), ValueError, CHUNK_ARG),
    ("from_samples_chunk_size_float", lambda: _fs(chunk_size=1.5), TypeError, CHUNK_ARG),
    ("adaptive_chunk_size_zero", lambda: _ad(chunk_size=0), ValueError, CHUNK_ARG),
    ("adaptive_chunk_size_float", lambda: _ad(chunk_size=2.0), TypeError, CHUNK_ARG),
    ("finite_difference_chunk_size_zero", lambda: _fd(chunk_size=0), ValueError, CHUNK_ARG),
    ("finite_difference_chunk_size_negative", lambda: _fd(chunk_size=-2), ValueError, CHUNK_ARG),
    ("finite_difference_chunk_size_float", lambda: _fd(chunk_size=2.0), TypeError, CHUNK_ARG),
    ("importance_chunk_size_zero", lambda: _is(chunk_size=0), ValueError, CHUNK_ARG),
    ("importance_chunk_size_float", lambda: _is(chunk_size=2.0), TypeError, CHUNK_ARG),
    # --- nan_policy and devices
    ("expectation_nan_policy_unknown", lambda: _ex(nan_policy="ignore"), ValueError,
     r"`nan_policy` must be"),
    ("expectation_with_state_nan_policy_none", lambda: _ews(nan_policy=None), ValueError,
     r"`nan_policy` must be"),
    ("from_samples_nan_policy_upper_case", lambda: _fs(nan_policy="RAISE"), ValueError,
     r"`nan_policy` must be"),
    ("expectation_devices_negative", lambda: _ex(devices=-1), ValueError, r"`devices`"),
    ("expectation_devices_too_many", lambda: _ex(devices=4096), ValueError, r"`devices`"),
    ("expectation_with_state_devices_unknown", lambda: _ews(devices="tpus"), ValueError,
     r"`devices`"),
    ("estimate_grad_devices_float", lambda: _eg(devices=1.0), TypeError, r"`devices`"),
    # --- keys
    ("expectation_key_int", lambda: _ex(key=0), TypeError, r"`key` must be a JAX PRNG key"),
    ("adaptive_key_none", lambda: _ad(key=None), TypeError, r"`key`"),
    ("finite_difference_key_int", lambda: _fd(key=1), TypeError, r"`key`"),
    ("importance_key_int", lambda: _is(key=3), TypeError, r"`key`"),
    ("legacy_rbg_key_data", lambda: _eg(key=jax.random.key_data(jax.random.key(0, impl="rbg"))),
     TypeError, r"`key`"),
    # --- estimator x family: refused by name, never a silent zero
    ("arm_categorical", lambda: _eg(f=cat_f, family=sg.families.categorical(), theta=CAT,
                                    estimator=sg.arm()), TypeError, r"arm"),
    ("disarm_normal", lambda: _eg(f=sq, family=sg.families.normal(), theta=NORMAL,
                                  estimator=sg.disarm()), TypeError, r"disarm"),
    ("rebar_normal", lambda: _eg(f=sq, family=sg.families.normal(), theta=NORMAL,
                                 estimator=sg.rebar(learn=False)), TypeError, r"rebar"),
    ("relax_categorical", lambda: _eg(f=cat_f, family=sg.families.categorical(), theta=CAT,
                                      estimator=sg.relax(), state=sg.relax().init(CAT)),
     TypeError, r"relax"),
    ("gumbel_softmax_normal", lambda: _eg(f=sq, family=sg.families.normal(), theta=NORMAL,
                                          estimator=sg.gumbel_softmax(0.5)),
     TypeError, r"gumbel_softmax"),
    ("measure_valued_categorical",
     lambda: _eg(f=cat_f, family=sg.families.categorical(), theta=CAT,
                 estimator=sg.measure_valued()), TypeError, r"measure_valued|weak"),
    ("enumerate_normal", lambda: _eg(f=sq, family=sg.families.normal(), theta=NORMAL,
                                     estimator=sg.enumerate()), TypeError, r"enumerate"),
    ("indecater_normal", lambda: _eg(f=sq, family=sg.families.normal(), theta=NORMAL,
                                     estimator=sg.indecater()), TypeError, r"(?i)indecater"),
    ("pathwise_poisson", lambda: _eg(family=sg.families.poisson(), theta=ZERO2,
                                     estimator=sg.pathwise()), TypeError, r"pathwise"),
    ("from_samples_arm", lambda: _fs(estimator=sg.arm()), TypeError, r"given samples"),
    ("from_samples_gumbel_softmax", lambda: _fs(estimator=sg.gumbel_softmax(0.5)), TypeError,
     r"given samples"),
    ("expectation_relax_stateful", lambda: _ex(estimator=sg.relax()), ValueError,
     r"is stateful"),
    # ARM takes control variates (ARM applied to h on the same draws, minus grad E[h]: see
    # test_with_control_variates_arm_exact); what is refused here is the misuse in the case, a
    # `mean` returning a vector (sigmoid of all logits) for the scalar h = x[0]
    ("with_control_variates_arm",
     lambda: _eg(num_samples=8, estimator=sg.control_variates.with_control_variates(
         sg.arm(), sg.control_variates.control_variate(lambda x, t: x[0], jax.nn.sigmoid))),
     ValueError, r"(?s)arm.*`mean\(theta\)` must return a scalar"),
    ("with_control_variates_h_vector",
     lambda: _eg(num_samples=8, estimator=sg.control_variates.with_control_variates(
         sg.arm(), sg.control_variates.control_variate(lambda x, t: x,
                                                       lambda t: jax.nn.sigmoid(t[0])))),
     ValueError, r"`h\(x, theta\)` must return a scalar"),
    ("gumbel_softmax_temperature_zero", lambda: sg.gumbel_softmax(0.0), ValueError,
     r"temperature"),
    ("rebar_temperature_nan", lambda: sg.rebar(temperature=float("nan")), ValueError,
     r"temperature"),
    ("relax_hidden_zero", lambda: sg.relax(hidden=0), ValueError, r"hidden"),
    ("enumerate_max_support_zero", lambda: sg.enumerate(max_support=0), ValueError,
     r"max_support"),
    ("qmc_block_size_one", lambda: sg.sampling.qmc(block_size=1), ValueError, r"block_size"),
    ("antithetic_estimator_string", lambda: sg.sampling.antithetic("score"), TypeError,
     r"estimator"),
    # --- a score that is identically zero, draws that ignore the key, a structurally zero path
    ("log_prob_ignores_theta", lambda: _eg(f=sq, family=_user(log_prob=_lp_no_theta),
                                           theta=ZERO2), BAD, r"log_prob"),
    ("log_prob_stops_gradient", lambda: _eg(f=sq, family=_user(log_prob=_lp_stopped),
                                            theta=ZERO2), BAD, r"log_prob"),
    ("log_prob_ignores_a_leaf",
     lambda: _eg(f=sq, family=_user(log_prob=_lp_loc_only, sample=_sample_loc_scale),
                 theta=NORMAL), BAD, r"(?s)log_prob.*scale|scale.*log_prob"),
    ("expectation_log_prob_ignores_theta",
     lambda: jax.grad(lambda t: _ex(f=sq, family=_user(log_prob=_lp_no_theta), theta=t,
                                    nan_policy=P))(ZERO2), BAD, r"log_prob"),
    ("sample_ignores_key", lambda: _eg(f=sq, family=_user(sample=_sample_keyless), theta=ZERO2),
     BAD, r"sample"),
    ("pathwise_sample_ignores_key",
     lambda: _eg(f=sq, family=_user(sample=_sample_keyless), theta=ZERO2,
                 estimator=sg.pathwise()), BAD, r"sample"),
    ("adaptive_sample_ignores_key",
     lambda: _ad(f=sq, family=_user(sample=_sample_keyless), theta=ZERO2), BAD, r"sample"),
    ("pathwise_f_piecewise_constant",
     lambda: _eg(f=_step, family=sg.families.normal(), theta=NORMAL, estimator=sg.pathwise()),
     BAD, r"(?s)\bf\b.*differentiable|differentiable.*\bf\b"),
    # --- jax.hessian of a first-order-only estimator: refused, naming the estimator
    ("hessian_arm", lambda: _hessian(sg.arm()), BAD, r"arm"),
    ("hessian_disarm", lambda: _hessian(sg.disarm()), BAD, r"disarm"),
    ("hessian_indecater", lambda: _hessian(sg.indecater()), BAD, r"(?i)indecater"),
    ("hessian_measure_valued", lambda: _hessian(sg.measure_valued(), n=6), BAD,
     r"measure_valued"),
]


def test_catalogue_ids_unique_and_large():
    ids = ([c[0] for c in ERRORS] + [c[0] for c in NONFINITE] + [c[0] for c in RAISE_ONLY])
    assert len(ids) == len(set(ids))
    assert len(ids) >= 100


@pytest.mark.parametrize("thunk,exc,pattern", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_refused_naming_the_argument(thunk, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        jax.block_until_ready(thunk())
    assert type(info.value) in (exc if isinstance(exc, tuple) else (exc,))


# ---------------------------------------------------------------------------------------------
# (c) Non-finite answers: counted under "propagate" and raised under the default "raise".


def _nan_at_11(b):
    """bern_f, NaN at the support point (1, 1) (probability 0.22 per draw)."""
    return jnp.where(b[0] * b[1] == 1, jnp.nan, bern_f(b))


def _nan_inside(x):
    """Finite on {0, 1}^2, NaN strictly inside: REBAR/RELAX evaluate f at relaxed points."""
    inside = (x[0] > 0) & (x[0] < 1)
    return jnp.where(inside, jnp.nan, bern_f(x))


def _minus_inf_at_1(b):
    """A log-weight of -inf for draws with b[0] = 1 (VIMCO)."""
    return jnp.where(b[0] == 1, -jnp.inf, bern_f(b))


NORMAL_SCALE0 = {"loc": jnp.asarray([0.3, -0.2]), "scale": jnp.asarray([1.0, 0.0])}
BERN_NAN = jnp.asarray([jnp.nan, 0.3])


def _lp_truncated(theta, x):
    """A normal truncated to x[0] > -0.5 whose sampler is not truncated: -inf at some draws."""
    return _lp_normal(theta, x) + jnp.log((x[0] > -0.5).astype(x.dtype))


# (id, run(nan_policy) -> something with num_nonfinite)
NONFINITE = [
    # f non-finite at some draws, through estimators that evaluate f at other points too
    ("score_f_nan", lambda p: _eg(f=_nan_at_11, num_samples=16, nan_policy=p)),
    ("arm_f_nan", lambda p: _eg(f=_nan_at_11, num_samples=16, estimator=sg.arm(), nan_policy=p)),
    ("enumerate_f_nan", lambda p: _eg(f=_nan_at_11, estimator=sg.enumerate(), nan_policy=p)),
    ("indecater_f_nan", lambda p: _eg(f=_nan_at_11, num_samples=16, estimator=sg.indecater(),
                                      nan_policy=p)),
    ("measure_valued_f_nan", lambda p: _eg(f=_nan_at_11, num_samples=18,
                                           estimator=sg.measure_valued(), nan_policy=p)),
    ("rloo_f_nan", lambda p: _eg(f=_nan_at_11, num_samples=16, estimator=sg.rloo(4),
                                 nan_policy=p)),
    ("from_samples_f_nan", lambda p: _fs(f=_nan_at_11, nan_policy=p)),
    # f finite on the support, NaN where a relaxation evaluates it
    ("rebar_f_nan_inside", lambda p: _eg(f=_nan_inside, num_samples=8,
                                         estimator=sg.rebar(learn=False), nan_policy=p)),
    ("gumbel_softmax_f_nan_inside", lambda p: _eg(f=_nan_inside, num_samples=8,
                                                  estimator=sg.gumbel_softmax(0.5),
                                                  nan_policy=p)),
    # a surrogate term: VIMCO with a particle at log-weight -inf
    ("vimco_log_weight_minus_inf", lambda p: _eg(f=_minus_inf_at_1, num_samples=16,
                                                 estimator=sg.vimco(4), nan_policy=p)),
    # the score: a normal with scale 0 in one coordinate
    ("score_normal_scale_zero",
     lambda p: _eg(f=sq, family=sg.families.normal(), theta=NORMAL_SCALE0, num_samples=8,
                   nan_policy=p)),
    ("score_loo_normal_scale_zero",
     lambda p: _eg(f=sq, family=sg.families.normal(), theta=NORMAL_SCALE0, num_samples=8,
                   estimator=sg.score_function(sg.baselines.leave_one_out()), nan_policy=p)),
    ("from_samples_normal_scale_zero",
     lambda p: _fs(jnp.asarray([[0.1, -0.2], [0.4, -0.2]]), f=sq, family=sg.families.normal(),
                   theta=NORMAL_SCALE0, nan_policy=p)),
    # log_prob -inf at a drawn sample (a family whose sampler leaves its support)
    ("score_log_prob_minus_inf_at_draws",
     lambda p: _eg(f=sq, family=_user(log_prob=_lp_truncated), theta=ZERO2, num_samples=16,
                   nan_policy=p)),
    # given samples outside the family's support: log p = -inf there
    ("from_samples_bernoulli_two", lambda p: _fs(jnp.asarray([[2.0, 0.0], [0.0, 1.0]]),
                                                 nan_policy=p)),
    ("from_samples_bernoulli_half", lambda p: _fs(jnp.asarray([[0.5, 0.0], [0.0, 1.0]]),
                                                  nan_policy=p)),
    ("from_samples_bernoulli_negative", lambda p: _fs(jnp.asarray([[-1.0, 0.0], [0.0, 1.0]]),
                                                      nan_policy=p)),
    ("from_samples_categorical_too_large",
     lambda p: _fs(jnp.asarray([[5], [1]], jnp.int32), f=cat_f,
                   family=sg.families.categorical(), theta=CAT, nan_policy=p)),
    ("from_samples_categorical_negative",
     lambda p: _fs(jnp.asarray([[-1], [1]], jnp.int32), f=cat_f,
                   family=sg.families.categorical(), theta=CAT, nan_policy=p)),
    ("from_samples_poisson_negative",
     lambda p: _fs(jnp.asarray([[-1.0, 0.0], [2.0, 1.0]]), family=sg.families.poisson(),
                   theta=ZERO2, nan_policy=p)),
    # non-finite theta
    ("score_theta_nan", lambda p: _eg(theta=BERN_NAN, num_samples=8, nan_policy=p)),
    ("pathwise_theta_inf",
     lambda p: _eg(f=sq, family=sg.families.normal(), num_samples=8, estimator=sg.pathwise(),
                   theta={"loc": jnp.asarray([jnp.inf, 0.0]), "scale": jnp.ones(2)},
                   nan_policy=p)),
    ("from_samples_theta_nan", lambda p: _fs(theta=BERN_NAN, nan_policy=p)),
    ("importance_weighted_proposal_theta_nan",
     lambda p: _eg(num_samples=8, estimator=sg.importance.importance_weighted(bern(), BERN_NAN),
                   nan_policy=p)),
]


@pytest.mark.parametrize("run", [c[1] for c in NONFINITE], ids=[c[0] for c in NONFINITE])
def test_nonfinite_is_counted_and_raised(run):
    r = run(P)
    assert int(np.max(np.asarray(r.num_nonfinite))) > 0, "a non-finite answer was not counted"
    with pytest.raises(NONFINITE_ERROR, match=NONFINITE_MSG):
        jax.block_until_ready(run("raise"))


# Entry points that have no count to read (expectation's gradient) or no nan_policy argument
# (adaptive, finite differences, importance): under their default they must raise.
RAISE_ONLY = [
    ("expectation_grad_f_nan", lambda: jax.grad(lambda t: _ex(f=_nan_at_11, theta=t,
                                                              num_samples=16))(BERN)),
    ("expectation_grad_normal_scale_zero",
     lambda: jax.grad(lambda t: _ex(f=sq, family=sg.families.normal(), theta=t,
                                    num_samples=8))(NORMAL_SCALE0)),
    ("expectation_grad_theta_nan", lambda: jax.grad(lambda t: _ex(theta=t, num_samples=8))(
        BERN_NAN)),
    ("expectation_vimco_minus_inf",
     lambda: jax.grad(lambda t: _ex(f=_minus_inf_at_1, theta=t, num_samples=16,
                                    estimator=sg.vimco(4)))(BERN)),
    ("expectation_with_state_f_nan",
     lambda: jax.grad(lambda t: _ews(f=_nan_at_11, theta=t, num_samples=16)[0])(BERN)),
    ("adaptive_f_nan", lambda: _ad(f=_nan_at_11, max_samples=16, chunk_size=8)),
    ("adaptive_normal_scale_zero",
     lambda: _ad(f=sq, family=sg.families.normal(), theta=NORMAL_SCALE0, max_samples=16,
                 chunk_size=8)),
    ("finite_difference_f_nan",
     lambda: _fd(f=lambda x: jnp.where(x[0] > 0, jnp.nan, sq(x)), num_samples=8)),
    ("finite_difference_theta_nan",
     lambda: _fd(theta={"loc": jnp.asarray([jnp.nan, 0.0]), "scale": jnp.ones(2)})),
    ("importance_f_nan", lambda: _is(f=_nan_at_11, num_samples=16)),
    ("importance_proposal_theta_nan", lambda: _is(proposal_theta=BERN_NAN, num_samples=8)),
    ("devices_all_f_nan", lambda: _eg(f=_nan_at_11, num_samples=16, devices="all")),
]


@pytest.mark.parametrize("thunk", [c[1] for c in RAISE_ONLY], ids=[c[0] for c in RAISE_ONLY])
def test_nonfinite_raises_by_default(thunk):
    with pytest.raises(NONFINITE_ERROR, match=NONFINITE_MSG):
        jax.block_until_ready(thunk())


def test_caught_error_under_devices_all_does_not_come_back():
    """A NaN caught under devices="all" raises once; the next, clean call is not affected."""
    with pytest.raises(NONFINITE_ERROR, match=NONFINITE_MSG):
        jax.block_until_ready(_eg(f=_nan_at_11, num_samples=16, devices="all"))
    r = _eg(num_samples=16, devices="all")
    jax.block_until_ready(r.grad)
    assert np.all(np.isfinite(np.asarray(r.grad))) and int(r.num_nonfinite) == 0
    jax.block_until_ready(_eg(num_samples=16))  # nor on a later call without devices


# ---------------------------------------------------------------------------------------------
# (b) Correct answers under adversarial but legitimate input.

# f + a large constant: for estimators whose estimate is invariant to a constant in f, the
# gradient and its standard error must not change, and the value must move by the constant.
# bern_f's values are exactly representable next to 1e6 in float32, so only the library's own
# arithmetic can lose them. One compiled program per estimator (the offset is an argument).
_LOO = sg.baselines.leave_one_out
OFFSET_CASES = [
    ("score_leave_one_out", lambda: sg.score_function(_LOO()), 64),
    ("score_batch_mean", lambda: sg.score_function(sg.baselines.batch_mean()), 64),
    ("score_optimal", lambda: sg.score_function(sg.baselines.optimal()), 64),
    ("rloo", lambda: sg.rloo(4), 64),
    # vimco is not centred: its gradient ignores a constant in f, but its per-draw Hessian does
    # not (cross terms s_j s_k^T), so it is left out of the offset promise (docs/reliability.md).
    ("arm", sg.arm, 64),
    ("disarm", sg.disarm, 64),
    ("enumerate", sg.enumerate, 8),
    ("indecater", sg.indecater, 64),
    ("measure_valued", sg.measure_valued, 63),
    ("antithetic_optimal",
     lambda: sg.sampling.antithetic(sg.score_function(sg.baselines.optimal())), 64),
]


@pytest.mark.parametrize("make,n", [c[1:] for c in OFFSET_CASES], ids=[c[0] for c in OFFSET_CASES])
def test_constant_offset_in_f_changes_nothing(make, n):
    est = make()
    run = jax.jit(lambda c: _eg(f=lambda b: bern_f(b) + c, num_samples=n, estimator=est,
                                nan_policy=P))
    r0, r1 = run(jnp.float32(0.0)), run(jnp.float32(1e6))
    # the value itself is a float32 near 1e6: exact to its resolution, 1/16
    np.testing.assert_allclose(np.float64(r1.value) - 1e6, r0.value, atol=0.0625)
    np.testing.assert_allclose(r1.grad, r0.grad, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(r1.stderr, r0.stderr, rtol=1e-2, atol=1e-4)
    assert np.all(np.asarray(r0.stderr) > 0) or make is sg.enumerate


def test_constant_offset_expectation_agrees_with_estimate_grad():
    """jax.grad of expectation and estimate_grad use the same draws: the same gradient."""
    est = sg.score_function(_LOO())
    g = jax.jit(jax.grad(lambda t, c: _ex(f=lambda b: bern_f(b) + c, theta=t, num_samples=64,
                                          estimator=est, nan_policy=P)))
    r0 = _eg(num_samples=64, estimator=est, nan_policy=P)
    np.testing.assert_allclose(g(BERN, jnp.float32(1e6)), r0.grad, rtol=1e-3, atol=1e-3)


def test_constant_offset_pathwise_normal():
    run = jax.jit(lambda c: _eg(f=lambda x: sq(x) + c, family=sg.families.normal(),
                                theta=NORMAL, num_samples=64, estimator=sg.pathwise(),
                                nan_policy=P))
    r0, r1 = run(jnp.float32(0.0)), run(jnp.float32(1e6))
    np.testing.assert_allclose(r1.value - 1e6, r0.value, atol=0.1)
    for k in ("loc", "scale"):
        np.testing.assert_allclose(r1.grad[k], r0.grad[k], rtol=1e-5)
        np.testing.assert_allclose(r1.stderr[k], r0.stderr[k], rtol=1e-5)


@pytest.mark.statistical
def test_large_offset_leave_one_out_unbiased():
    """f + 1e8 in float32 is exactly representable for these f values (multiples of 8: bern_f
    takes 0, 1, -2 and 0.5, so 16 * bern_f takes 0, 16, -32 and 8)."""
    f = lambda b: 16.0 * bern_f(b) + 1e8  # noqa: E731
    r = _eg(f=f, num_samples=1024, estimator=sg.score_function(_LOO()), nan_policy=P)
    value, grad = bern_exact(BERN, lambda b: 16.0 * bern_f(b))
    assert np.all(np.asarray(r.stderr) > 0)
    stats_util.assert_unbiased(r.grad, r.stderr, grad, what="loo gradient, f + 1e8")
    stats_util.assert_unbiased(r.value - 1e8, r.value_stderr, value, atol=8.0,
                               what="value, f + 1e8")


# Low-precision f with float32 theta: statistics in at least float32, answers right.
# f = 256 * bern_f is exact in float16/bfloat16 (256, -512, 384, 0), and its squares (up to
# 262 144) and sums over 1024 draws lie past float16's largest value (65 504): counts, sums and
# sums of squares kept in f's dtype overflow.
def _f16(b):
    return (256.0 * bern_f(b)).astype(jnp.float16)


def _bf16(b):
    return (256.0 * bern_f(b)).astype(jnp.bfloat16)


@pytest.mark.statistical
@pytest.mark.parametrize("f", [_f16, _bf16], ids=["float16", "bfloat16"])
def test_low_precision_f(f):
    r = _eg(f=f, num_samples=1024, estimator=sg.score_function(_LOO()), nan_policy=P)
    value, grad = bern_exact(BERN, lambda b: 256.0 * bern_f(b))
    assert int(r.num_nonfinite) == 0
    se = np.asarray(r.stderr, np.float64)
    assert np.all(np.isfinite(se)) and np.all(se > 0)
    assert np.isfinite(float(r.value_stderr)) and float(r.value_stderr) > 0
    # atol: f's own rounding is exact here; the gradient is returned in f's precision at worst
    stats_util.assert_unbiased(np.asarray(r.grad, np.float64), se, grad, atol=1.0,
                               what="gradient, low-precision f")
    stats_util.assert_unbiased(np.asarray(r.value, np.float64), r.value_stderr, value, atol=1.0,
                               what="value, low-precision f")


@pytest.mark.slow  # 2048 draws through a bfloat16 VJP: ~4 s on the 2-core machine
@pytest.mark.statistical
def test_bfloat16_f_pathwise():
    """An f returning bfloat16 with float32 theta through the sampler (a VJP across dtypes)."""
    r = _eg(f=lambda x: sq(x).astype(jnp.bfloat16), family=sg.families.normal(), theta=NORMAL,
            num_samples=2048, estimator=sg.pathwise(), nan_policy=P)
    _, grad = normal_exact(NORMAL)
    for k in ("loc", "scale"):
        stats_util.assert_unbiased(np.asarray(r.grad[k], np.float64),
                                   np.asarray(r.stderr[k], np.float64), grad[k], atol=2e-2,
                                   what=f"pathwise bfloat16 f, {k}")


# float64
def test_float64_enumerate_exact_with_offset(x64):
    """float64 all the way; f + 1e12 is exact in float64 for these values, so the enumerated
    gradient must be exact too (a constant in f contributes nothing)."""
    theta = jnp.asarray([0.3, -0.5], jnp.float64)
    run = jax.jit(lambda c: _eg(f=lambda b: bern_f(b) + c, theta=theta, num_samples=4,
                                estimator=sg.enumerate(), nan_policy=P))
    value, grad = bern_exact(theta)
    for c in (0.0, 1e12):
        r = run(jnp.float64(c))
        assert r.grad.dtype == jnp.float64 and r.value.dtype == jnp.float64
        np.testing.assert_allclose(r.value - c, value, rtol=1e-10, atol=1e-4)
        np.testing.assert_allclose(r.grad, grad, rtol=1e-10)


# theta as dict, tuple and NamedTuple (a user family of independent Bernoullis over the leaves)
class Logits(NamedTuple):
    a: jax.Array
    b: jax.Array


def _tree_bern():
    def log_prob(th, x):
        return sum(jnp.sum(x[i] * jax.nn.log_sigmoid(t) + (1 - x[i]) * jax.nn.log_sigmoid(-t))
                   for i, t in enumerate(jax.tree_util.tree_leaves(th)))

    def sample(th, key):
        ts = jax.tree_util.tree_leaves(th)
        keys = jax.random.split(key, len(ts))
        return tuple(jax.random.bernoulli(k, jax.nn.sigmoid(t)).astype(t.dtype)
                     for k, t in zip(keys, ts))

    return sg.Family(log_prob=log_prob, sample=sample, reparameterized=False)


@pytest.mark.statistical
@pytest.mark.parametrize("theta", [
    {"a": jnp.asarray(0.3), "b": jnp.asarray(-0.5)},
    (jnp.asarray(0.3), jnp.asarray(-0.5)),
    Logits(jnp.asarray(0.3), jnp.asarray(-0.5)),
], ids=["dict", "tuple", "namedtuple"])
def test_theta_pytrees(theta):
    f = lambda x: bern_f(jnp.stack(x))  # noqa: E731
    r = _eg(f=f, family=_tree_bern(), theta=theta, num_samples=1024,
            estimator=sg.score_function(_LOO()), nan_policy=P)
    assert jax.tree_util.tree_structure(r.grad) == jax.tree_util.tree_structure(theta)
    assert type(r.grad) is type(theta) and type(r.stderr) is type(theta)
    _, grad = bern_exact(BERN)
    got = np.asarray(jax.tree_util.tree_leaves(r.grad))
    se = np.asarray(jax.tree_util.tree_leaves(r.stderr))
    stats_util.assert_unbiased(got, se, grad, what="gradient over a pytree theta")


# Typed keys of other PRNG implementations: chunking must not change the result, the key must.
@pytest.mark.parametrize("impl,est_id", [("rbg", "score_leave_one_out"), ("unsafe_rbg", "arm"),
                                         ("rbg", "pathwise")])
def test_other_prng_impl_chunk_invariant(impl, est_id):
    est = {"score_leave_one_out": sg.score_function(_LOO()), "arm": sg.arm(),
           "pathwise": sg.pathwise()}[est_id]
    fam, theta, f = ((sg.families.normal(), NORMAL, sq) if est_id == "pathwise"
                     else (bern(), BERN, bern_f))
    run = jax.jit(lambda k, c: _eg(f=f, family=fam, theta=theta, key=k, num_samples=24,
                                   estimator=est, nan_policy=P, chunk_size=c),
                  static_argnums=1)
    key = jax.random.key(7, impl=impl)
    ref = run(key, None)
    for c in (5,):
        got = run(key, c)
        for a, b in zip(jax.tree_util.tree_leaves((got.value, got.grad, got.stderr)),
                        jax.tree_util.tree_leaves((ref.value, ref.grad, ref.stderr))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    other = run(jax.random.key(8, impl=impl), None)
    assert not np.allclose(other.value, ref.value), "the draws do not depend on the key"


def test_other_prng_impl_expectation_chunk_invariant():
    key = jax.random.key(3, impl="unsafe_rbg")
    grad = jax.jit(jax.grad(lambda t, c: _ex(theta=t, key=key, num_samples=24, chunk_size=c,
                                             estimator=sg.score_function(_LOO()),
                                             nan_policy=P)), static_argnums=1)
    np.testing.assert_allclose(grad(BERN, 5), grad(BERN, None), rtol=1e-5, atol=1e-6)
    r = _eg(key=key, num_samples=24, estimator=sg.score_function(_LOO()), nan_policy=P)
    np.testing.assert_allclose(grad(BERN, None), r.grad, rtol=1e-5, atol=1e-6)


def test_hessian_enumerate_exact_at_every_chunk_size():
    """sg.enumerate is exact to every order: its Hessian is the enumerated one, chunked or not."""
    def exact_value(t):
        p = jax.nn.sigmoid(t)
        pts = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=2)))
        probs = jnp.prod(jnp.where(pts == 1, p, 1 - p), axis=1)
        return jnp.sum(probs * jax.vmap(bern_f)(pts))

    want = jax.hessian(exact_value)(BERN)
    h = jax.jit(jax.hessian(lambda t, c: _ex(theta=t, num_samples=12, chunk_size=c,
                                             estimator=sg.enumerate(), nan_policy=P)),
                static_argnums=1)
    for c in (1, 2, None):
        np.testing.assert_allclose(h(BERN, c), want, rtol=1e-5, atol=1e-6)


def test_hessian_score_function_chunk_invariant():
    """DiCE Hessian of the leave-one-out score function: the same draws give the same Hessian
    whatever the chunking (issue 15 item 1)."""
    h = jax.jit(jax.hessian(lambda t, c: _ex(f=bern_sq, theta=t, num_samples=28, chunk_size=c,
                                             estimator=sg.score_function(_LOO()),
                                             nan_policy=P)), static_argnums=1)
    np.testing.assert_allclose(h(BERN, 7), h(BERN, None), rtol=1e-4, atol=1e-6)


@pytest.mark.statistical
def test_pathwise_normal_scale_zero_is_right():
    """Pathwise needs no score: a scale of 0 is a point mass, and d/dloc E[x^2] = 2 loc there."""
    r = _eg(f=sq, family=sg.families.normal(), theta=NORMAL_SCALE0, num_samples=256,
            estimator=sg.pathwise(), nan_policy=P)
    _, grad = normal_exact(NORMAL_SCALE0)
    assert int(r.num_nonfinite) == 0
    np.testing.assert_allclose(r.grad["loc"][1], 2 * NORMAL_SCALE0["loc"][1], rtol=1e-6)
    for k in ("loc", "scale"):
        stats_util.assert_unbiased(r.grad[k], r.stderr[k], grad[k], atol=1e-6,
                                   what=f"pathwise at scale 0, {k}")


def test_adaptive_stateful_matches_estimate_grad():
    """Run to its cap, the adaptive estimate is estimate_grad's at the same draws, new state
    included (RELAX's learning step)."""
    est = sg.relax()
    state = est.init(BERN)
    a = _ad(target_stderr=1e-12, max_samples=32, chunk_size=8, estimator=est, state=state)
    r = _eg(num_samples=32, chunk_size=8, estimator=est, state=state, nan_policy=P)
    assert not bool(a.reached_target)
    np.testing.assert_allclose(a.estimate.grad, r.grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.estimate.stderr, r.stderr, rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(a.estimate.state), jax.tree_util.tree_leaves(r.state)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_auto_does_not_pick_a_structurally_zero_gradient():
    """For a step function f, pathwise's gradient is zero by construction (and its variance 0,
    the lowest): auto must not choose it."""
    fam = _user()
    rep = _auto(f=_step, family=fam, theta=ZERO2, num_samples=32,
                candidates=[sg.score_function(), sg.pathwise()])
    assert rep.name != sg.pathwise().name


def test_with_control_variates_arm_exact():
    """ARM with the control variate h = x[0] (E[h] = sigmoid(theta[0])) and f = h, coefficient 1:
    the estimate is grad E[h] exactly, with no noise left (on the same draws ARM(f) - ARM(h)
    cancels)."""
    cv = sg.control_variates.control_variate(lambda x, t: x[0], lambda t: jax.nn.sigmoid(t[0]))
    est = sg.control_variates.with_control_variates(sg.arm(), cv, coefficient=1.0)
    r = _eg(f=lambda b: b[0], num_samples=8, estimator=est, nan_policy=P)
    p = _sigmoid(BERN[0])
    np.testing.assert_allclose(r.grad, [p * (1 - p), 0.0], rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # 1536 draws of IndeCateR over 3 categories: ~10 s on the 2-core machine
@pytest.mark.statistical
def test_categorical_indecater_unbiased_with_offset():
    r = _eg(f=lambda x: cat_f(x) + 1e6, family=sg.families.categorical(), theta=CAT,
            num_samples=3 * 512, estimator=sg.indecater(), nan_policy=P)
    value, grad = cat_exact(CAT, CAT_VALUES)
    stats_util.assert_unbiased(r.grad, r.stderr, grad, atol=1e-3, what="indecater, f + 1e6")
    assert np.all(np.asarray(r.stderr) > 0)


def test_grad_of_estimate_grad_value_is_the_gradient_estimate():
    """The value is a mean of stop-gradient f values: its derivative was silently zero. It is
    now the gradient estimate itself (first order)."""
    g = jax.grad(lambda t: _eg(theta=t, nan_policy=P).value)(BERN)
    r = _eg(theta=BERN, nan_policy=P)
    np.testing.assert_allclose(g, r.grad, rtol=1e-6)
    assert np.all(np.abs(np.asarray(g)) > 0)
