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


class _Draws(NamedTuple):
    """How draws are made: the typed key (None for given samples), its kind, the key the user's
    sampler receives, the form of one draw, and the closure-converted sampler."""

    key: Optional[jax.Array]
    legacy: bool
    user_key: Any
    x_struct: Any
    sample: Callable
    consts: list


def _draw_form(family, theta, key, samples) -> _Draws:
    treedef = jax.tree_util.tree_structure(theta)
    if samples is not None:
        draw = validation.draw_struct(family, theta)
        if draw is not None:
            validation.check_samples(samples, draw)
        x_struct = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                                          samples)
        return _Draws(None, False, None, x_struct, family.sample, [])
    # rbg/unsafe_rbg keys become threefry keys here (engine.counter_key): draws then depend on
    # (key, i) only, whatever the chunking or device count. A legacy uint32 key belongs to the
    # default implementation, and the sampler receives its raw data: it keeps that
    # implementation (with rbg as the default, chunk invariance then rests on its vmap).
    legacy = validation.is_legacy_key(key)
    typed_key = validation.normalize_key(key)
    if not legacy:
        typed_key = engine.counter_key(typed_key)
    user_key = jax.random.key_data(typed_key) if legacy else typed_key
    x_struct = validation.traced_struct(
        family.sample, (theta, user_key), "family.sample(theta, key)",
        f"Check that it accepts theta of structure {treedef} and a PRNG key.",
    )
    sample_c, consts = jax.closure_convert(family.sample, theta, user_key)
    return _Draws(typed_key, legacy, user_key, x_struct, sample_c, consts)


def _trace_user(f, family, theta, x_struct, plan, name):
    """``f`` and ``log_prob`` traced (scalar floats, else an error naming the fix) and
    closure-converted: ``(f_c, f_consts, lp_c, lp_consts, f_dtype)``."""
    lp_fix = (
        f"Check that family.log_prob(theta, x) accepts theta of structure "
        f"{jax.tree_util.tree_structure(theta)} and the draws that family.sample returns."
    )
    lp_struct = validation.traced_struct(family.log_prob, (theta, x_struct), "family.log_prob(theta, x)", lp_fix)
    validation.check_scalar_float(
        lp_struct, "family.log_prob(theta, x)",
        "It must return the log-density of ONE draw; sum over independent coordinates, e.g. "
        "`jnp.sum(logpdf(x, ...))`.",
    )
    fx_struct = x_struct if plan.f_input is None else plan.f_input(x_struct, theta)
    f_struct = validation.traced_struct(
        f, (fx_struct,), "f(x)",
        "f must accept one draw x as the family samples it"
        + ("." if plan.f_input is None else f" (as {name} passes it: {fx_struct})."),
    )
    validation.check_scalar_float(
        f_struct, "f(x)", "f must return one scalar per draw; reduce it, e.g. `jnp.sum(...)`."
    )
    f_c, f_consts = jax.closure_convert(f, fx_struct)
    lp_c, lp_consts = jax.closure_convert(family.log_prob, theta, x_struct)
    return f_c, f_consts, lp_c, lp_consts, jax.tree_util.tree_leaves(f_struct)[0].dtype


def _bound(f, family, theta, key, samples, estimator, where):
    """The checked arguments, how draws are made, and the estimator bound to them."""
    est = _check_common(f, family, estimator, where)
    validation.check_theta(theta)
    if family.check_theta is not None:
        family.check_theta(theta)
    dr = _draw_form(family, theta, key, samples)
    return est, dr, binding.bind(est, Target(family, theta, dr.x_struct, dr.legacy))


def output_shape(f, family, theta, key, estimator, where, samples=None) -> tuple:
    """The shape of ``f``'s value on one draw (``()`` for a scalar f), checked floating point.

    Binds the estimator first (its f may see a relaxed draw: ``Plan.f_input``), so the draw f
    receives is the one the estimator passes. Errors are :func:`prepare`'s.
    """
    _, dr, plan = _bound(f, family, theta, key, samples, estimator, where)
    fx_struct = dr.x_struct if plan.f_input is None else plan.f_input(dr.x_struct, theta)
    f_struct = validation.traced_struct(f, (fx_struct,), "f(x)",
                             "f must accept one draw x as the family samples it.")
    validation.check_float_array(f_struct, "f(x)")
    return tuple(jax.tree_util.tree_leaves(f_struct)[0].shape)


def _num_units(num_samples, plan, who: str, name: str, per_sample: int = 0) -> int:
    """Units to run: evaluations of f / draws per unit, or (``per_sample``: given samples per
    unit) given samples / samples per unit."""
    k = per_sample or plan.draws_per_unit
    n = validation.check_num_samples(num_samples, minimum=plan.min_units * k, multiple_of=k,
                                     who=who, name="samples" if per_sample else name)
    return n // k


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
    est, dr, plan = _bound(f, family, theta, key, samples, estimator, where)
    if samples is None:  # checked before tracing f: the error names num_samples first
        _num_units(num_samples, plan, est.name, num_samples_name)
    f_c, f_consts, lp_c, lp_consts, f_dtype = _trace_user(f, family, theta, dr.x_struct, plan,
                                                          est.name)
    model = Model(f_c, lp_c, dr.sample, family, dr.legacy)
    dependence.check_model(family, theta, dr.user_key, dr.x_struct, f, est.name,
                           draws_key=samples is None)
    params = Params(theta, tuple(f_consts), tuple(lp_consts), tuple(dr.consts))
    bound = binding.resolve(est, plan, model, params, dr.x_struct, dr.key)
    if samples is not None and bound.needs_key:
        raise TypeError(
            f"{est.name} draws its own samples (it differentiates through the sampler, draws "
            "noise of its own, or couples several draws per unit) and cannot use given samples; "
            "call sg.estimate_grad with a key."
        )
    num_units = _num_units(num_samples, plan, est.name, num_samples_name,
                           bound.samples_per_unit if samples is not None else 0)
    chunk = policy.chunk_size or engine.auto_chunk_size(
        num_units, *engine.elements_per_unit(dr.x_struct, theta, bound))
    return Problem(model, bound, params, dr.key, num_units, min(chunk, num_units),
                   stats.stats_dtype(f_dtype), policy, f_dtype)


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


def nan_if_none_kept(prob: Problem, fs: FStats, x):
    """``x``, or NaN where nan_policy="drop" dropped every unit (never a zero that looks
    exact)."""
    return jnp.where(fs.units < 1, jnp.nan, x) if prob.nan_policy == "drop" else x


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
