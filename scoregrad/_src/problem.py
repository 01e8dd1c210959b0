"""Preparing a problem: the checks, tracing and binding that every entry point shares."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from scoregrad._src import binding, dependence, engine, stats, validation
from scoregrad._src.base import Estimator, FStats, Model, Params, Target
from scoregrad._src.binding import Bound
from scoregrad._src.estimators.score import score_function
from scoregrad._src.family import Family
from scoregrad._src.policy import RunPolicy

PyTree = Any


class Problem(NamedTuple):
    """A probared problem: the user's functions closure-converted, the bound estimator, the
    parameters, the key, the unit count and chunk, the statistics dtype and the run policy."""

    model: Model
    est: Bound
    params: Params
    key: Optional[jax.Array]
    num_units: int
    chunk: int
    dtype: Any  # of the statistics: f's, at least float32
    policy: RunPolicy
    f_dtype: Any  # f's own dtype

    @property
    def nan_policy(self) -> str:
        return self.policy.nan_policy

    @property
    def devices(self) -> Optional[tuple]:
        return self.policy.devices


def traced_struct(fn: Callable, args, what: str, fix: str):
    try:
        return jax.eval_shape(fn, *args)
    except (TypeError, KeyError, IndexError, AttributeError) as err:
        raise TypeError(f"{what} failed while tracing: {type(err).__name__}: {err}. {fix}") from err


def draw_struct(family, theta):
    """The form of one draw of ``family`` (None if its sampler cannot be traced here)."""
    try:
        return jax.eval_shape(family.sample, theta, jax.random.key(0))
    except Exception:  # noqa: BLE001 - a sampler that wants a legacy key, or none usable
        try:
            return jax.eval_shape(family.sample, theta, jax.random.PRNGKey(0))
        except Exception:  # noqa: BLE001
            return None


def _check_common(f, family, estimator, where):
    validation.check_callable(f, "f", where)
    if not isinstance(family, Family):
        raise TypeError(
            f"{where}: `family` must be a scoregrad.Family (e.g. sg.families.normal() or "
            f"sg.Family(log_prob=..., sample=...)); got {type(family).__name__}."
        )
    if estimator is None:
        estimator = score_function()
    if not isinstance(estimator, Estimator):
        raise TypeError(
            f"{where}: `estimator` must be a scoregrad estimator such as sg.score_function() or "
            f"sg.pathwise(); got {type(estimator).__name__}."
        )
    return estimator


def prepare(
    f, family, theta, key, num_samples, estimator, where, samples=None, *,
    policy: RunPolicy, num_samples_name: str = "num_samples",
) -> Problem:
    """Everything a run needs, checked at trace time (each error names the argument and fix).

    The estimator is bound to the family and the form of theta and of a draw first
    (``Estimator.bind``: its checks, wrappers applied inside), then ``num_samples`` is checked
    against what the plan needs (draws per unit, minimum units); the user's functions are
    traced and closure-converted, provably wrong models are refused (:mod:`dependence`), and
    what the contract derives (K, needs a key, presample, stateful) is derived
    (:func:`binding.resolve`).
    """
    est = _check_common(f, family, estimator, where)
    validation.check_theta(theta)
    if family.check_theta is not None:
        family.check_theta(theta)
    theta_treedef = jax.tree_util.tree_structure(theta)
    if samples is None:
        # rbg/unsafe_rbg keys become threefry keys here (engine.counter_key): draws then depend
        # on (key, i) only, whatever the chunking or device count.
        legacy = validation.is_legacy_key(key)
        # A legacy uint32 key belongs to the default implementation, and the sampler receives
        # its raw data: it keeps that implementation (with rbg as the default, chunk invariance
        # then rests on that implementation's vmap behaviour).
        typed_key = validation.normalize_key(key)
        if not legacy:
            typed_key = engine.counter_key(typed_key)
        user_key = jax.random.key_data(typed_key) if legacy else typed_key
        x_struct = traced_struct(
            family.sample, (theta, user_key), "family.sample(theta, key)",
            f"Check that it accepts theta of structure {theta_treedef} and a PRNG key.",
        )
        sample_c, sample_consts = jax.closure_convert(family.sample, theta, user_key)
    else:
        typed_key, legacy, user_key = None, False, None
        draw = draw_struct(family, theta)
        if draw is not None:
            validation.check_samples(samples, draw)
        x_struct = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), samples)
        sample_c, sample_consts = family.sample, []
    # The estimator bound to the family and theta's shapes (its checks, wrappers applied).
    plan = binding.bind(est, Target(family, theta, x_struct, legacy))
    if samples is None:
        n = validation.check_num_samples(
            num_samples, minimum=plan.min_units * plan.draws_per_unit,
            multiple_of=plan.draws_per_unit, who=est.name, name=num_samples_name,
        )
    lp_fix = (
        f"Check that family.log_prob(theta, x) accepts theta of structure {theta_treedef} "
        "and the draws that family.sample returns."
    )
    lp_struct = traced_struct(family.log_prob, (theta, x_struct), "family.log_prob(theta, x)", lp_fix)
    validation.check_scalar_float(
        lp_struct, "family.log_prob(theta, x)",
        "It must return the log-density of ONE draw; sum over independent coordinates, e.g. "
        "`jnp.sum(logpdf(x, ...))`.",
    )
    fx_struct = x_struct if plan.f_input is None else plan.f_input(x_struct, theta)
    f_struct = traced_struct(
        f, (fx_struct,), "f(x)",
        "f must accept one draw x as the family samples it"
        + ("." if plan.f_input is None else f" (as {est.name} passes it: {fx_struct})."),
    )
    validation.check_scalar_float(
        f_struct, "f(x)", "f must return one scalar per draw; reduce it, e.g. `jnp.sum(...)`."
    )
    f_c, f_consts = jax.closure_convert(f, fx_struct)
    lp_c, lp_consts = jax.closure_convert(family.log_prob, theta, x_struct)
    model = Model(f_c, lp_c, sample_c, family, legacy)
    dependence.check_model(family, theta, user_key, x_struct, f, est.name,
                           draws_key=samples is None)
    params = Params(theta, tuple(f_consts), tuple(lp_consts), tuple(sample_consts))
    bound = binding.resolve(est, plan, model, params, x_struct, typed_key)
    if samples is not None and bound.needs_key:
        raise TypeError(
            f"{est.name} draws its own samples (it differentiates through the sampler, draws "
            "noise of its own, or couples several draws per unit) and cannot use given samples; "
            "call sg.estimate_grad with a key."
        )
    est = bound
    if samples is None:
        num_units = n // est.draws_per_unit
    else:  # given samples: a unit reads one (a group: K consecutive ones)
        k = est.samples_per_unit
        n = validation.check_num_samples(num_samples, minimum=plan.min_units * k,
                                         multiple_of=k, who=est.name, name="samples")
        num_units = n // k
    chunk = policy.chunk_size
    if chunk is None:
        chunk = engine.auto_chunk_size(num_units, *engine.elements_per_unit(x_struct, theta, est))
    f_dtype = jax.tree_util.tree_leaves(f_struct)[0].dtype
    return Problem(
        model, est, params, typed_key, num_units, min(chunk, num_units),
        stats.stats_dtype(f_dtype), policy, f_dtype,
    )


def shifted(prob: Problem, params, key=None, samples=None) -> tuple[Problem, jax.Array]:
    """For a shift-invariant estimator, ``prob`` with f centred on a reference value, and it.

    The reference is the first finite f among 8 reference draws (unit 0's key folded with
    2^31 - 1 - j: independent of the estimate's draws), or among the first 8 given samples;
    stop-gradient. The estimate of a shift-invariant estimator does not depend on it in exact
    arithmetic; in floating point, centring keeps the sums of ``f * score`` and of the baseline's
    terms from cancelling when f carries a large constant. Other estimators: ``(prob, 0)``.
    """
    zero = jnp.zeros((), prob.dtype)
    if not prob.est.shift_invariant:
        return prob, zero
    if samples is not None:
        m = min(8, int(jax.tree_util.tree_leaves(samples)[0].shape[0]))
        xs = jax.tree_util.tree_map(lambda a: a[:m], samples)
    else:
        base = jax.random.fold_in(key, 0)
        keys = jax.vmap(lambda j: jax.random.fold_in(base, j))(
            jnp.uint32(2**31 - 1) - jnp.arange(8, dtype=jnp.uint32))
        xs = jax.vmap(lambda k: prob.model.draw(params, k))(keys)
    fx = jax.vmap(lambda x: prob.model.eval_f(params, x))(jax.lax.stop_gradient(xs))
    fx = jax.lax.stop_gradient(fx).astype(prob.dtype)
    ok = jnp.isfinite(fx)
    ref = jnp.where(jnp.any(ok), fx[jnp.argmax(ok)], 0).astype(prob.dtype)
    return prob._replace(model=prob.model._replace(f_shift=ref)), ref


def unshift(fs: FStats, ref) -> FStats:
    r = ref.astype(fs.mean.dtype)
    return fs._replace(mean=fs.mean + r, per=None if fs.per is None else fs.per + r)


def kept_units(prob: Problem, fs: FStats):
    """Units the estimate averages over: all of them, or (nan_policy="drop") the finite ones,
    as the engine counted them."""
    if prob.nan_policy == "drop":
        return jax.lax.stop_gradient(jnp.maximum(fs.units, 1.0))
    return prob.num_units


def learn(prob: Problem, state):
    """The estimator's learning step (e.g. RELAX's control variate) on this call's units."""
    if prob.est.learn is None or prob.key is None:
        return state
    params = jax.lax.stop_gradient(prob.params)
    return prob.est.learn(prob.model, params, prob.key, state, prob.num_units, prob.chunk)


def init_state(est, theta, state):
    if state is None:
        return est.init(theta)
    validation.check_state(state, est, theta)
    return state
