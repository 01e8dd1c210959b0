"""The top-level API: estimate_grad, expectation, expectation_with_state."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src import dependence, engine, fitted, validation
from scoregrad._src.base import Estimator, FStats, Model, Params
from scoregrad._src.estimators.score import score_function
from scoregrad._src.family import Family

PyTree = Any


class GradEstimate(NamedTuple):
    """The result of :func:`estimate_grad`.

    Attributes:
      value: the Monte Carlo mean of f.
      value_stderr: its standard error.
      grad: pytree like theta: the gradient estimate.
      stderr: pytree like theta: the standard error of each gradient coordinate,
        ``sqrt(variance / num_units)``.
      variance: pytree like theta: the per-unit variance of each gradient coordinate (the variance
        of one draw's contribution; a unit is one draw, or a coupled pair/group for estimators
        that draw several at once).
      snr: pytree like theta: signal-to-noise ratio ``|grad| / stderr``.
      num_samples: evaluations of f spent.
      num_nonfinite: how many evaluations of f were NaN or infinite (their contributions make
        ``grad`` non-finite: check this before an optimizer step).
      state: the estimator's new state (``()`` for stateless estimators).
      variance_reduction: pytree like theta: the variance of the estimator's term 0 alone on the
        same draws divided by ``variance`` (for score-function estimators term 0 is the plain
        REINFORCE estimator, so this is the factor its baselines/control variates gain; 1 for
        estimators without auxiliary terms). See :func:`scoregrad.diagnostics`.
    """

    value: jax.Array
    value_stderr: jax.Array
    grad: PyTree
    stderr: PyTree
    variance: PyTree
    snr: PyTree
    num_samples: int
    num_nonfinite: jax.Array
    state: Any
    variance_reduction: PyTree = None


class _Prepared(NamedTuple):
    model: Model
    est: Estimator
    params: Params
    key: Optional[jax.Array]
    num_units: int
    chunk: int
    dtype: Any
    nan_policy: str = "raise"
    devices: Optional[tuple] = None
    f_dtype: Any = None  # f's own dtype (``dtype`` is that of the statistics: >= float32)


def _traced_struct(fn: Callable, args, what: str, fix: str):
    try:
        return jax.eval_shape(fn, *args)
    except (TypeError, KeyError, IndexError, AttributeError) as err:
        raise TypeError(f"{what} failed while tracing: {type(err).__name__}: {err}. {fix}") from err


def _draw_struct(family, theta):
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


_NAN_POLICIES = ("raise", "drop", "propagate")


def _prepare(
    f, family, theta, key, num_samples, estimator, chunk_size, where, samples=None, *,
    nan_policy="raise", devices=None,
):
    est = _check_common(f, family, estimator, where)
    if nan_policy not in _NAN_POLICIES:
        raise ValueError(
            f"{where}: `nan_policy` must be one of {_NAN_POLICIES}; got {nan_policy!r}."
        )
    devices = engine.resolve_devices(devices)
    validation.check_theta(theta)
    if family.check_theta is not None:
        family.check_theta(theta)
    if est.specialize is not None:
        est = est.specialize(family, theta)
    if devices is not None and fitted.routed(est):
        raise ValueError(
            f"{where}: devices={len(devices)} is not supported by {est.name}: its cross-fitted "
            "per-coordinate coefficients run on one device. Use devices=None, or a baseline "
            "without fitting (leave_one_out, moving_average)."
        )
    if nan_policy == "drop" and fitted.routed(est):
        raise ValueError(
            f"{where}: nan_policy='drop' is not supported by {est.name}: its cross-fitted "
            "per-coordinate coefficients are fitted over all draws. Use nan_policy='raise' (the "
            "default) or 'propagate', or a baseline without fitting (leave_one_out, "
            "moving_average)."
        )
    n = validation.check_num_samples(
        num_samples,
        minimum=est.min_units * est.draws_per_unit,
        multiple_of=est.draws_per_unit,
        who=est.name,
        name="num_samples" if samples is None else "samples",
    )
    chunk = validation.check_chunk_size(chunk_size)
    theta_treedef = jax.tree_util.tree_structure(theta)
    lp_fix = (
        f"Check that family.log_prob(theta, x) accepts theta of structure {theta_treedef} "
        "and the draws that family.sample returns."
    )
    if samples is None:
        # rbg/unsafe_rbg keys become threefry keys here (engine.counter_key): draws then depend
        # on (key, i) only, whatever the chunking or device count.
        typed_key = engine.counter_key(validation.normalize_key(key))
        legacy = validation.is_legacy_key(key)
        user_key = jax.random.key_data(typed_key) if legacy else typed_key
        x_struct = _traced_struct(
            family.sample, (theta, user_key), "family.sample(theta, key)",
            f"Check that it accepts theta of structure {theta_treedef} and a PRNG key.",
        )
        sample_c, sample_consts = jax.closure_convert(family.sample, theta, user_key)
    else:
        typed_key, legacy, user_key = None, False, None
        if est.needs_key:
            raise TypeError(
                f"{est.name} draws its own samples (it differentiates through the sampler, or "
                "couples several draws per unit) and cannot use given samples; call "
                "sg.estimate_grad with a key."
            )
        draw = _draw_struct(family, theta)
        if draw is not None:
            validation.check_samples(samples, draw)
        x_struct = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), samples)
        sample_c, sample_consts = family.sample, []
    lp_struct = _traced_struct(family.log_prob, (theta, x_struct), "family.log_prob(theta, x)", lp_fix)
    validation.check_scalar_float(
        lp_struct, "family.log_prob(theta, x)",
        "It must return the log-density of ONE draw; sum over independent coordinates, e.g. "
        "`jnp.sum(logpdf(x, ...))`.",
    )
    fx_struct = x_struct if est.f_input is None else est.f_input(x_struct, theta)
    f_struct = _traced_struct(
        f, (fx_struct,), "f(x)",
        "f must accept one draw x as the family samples it"
        + ("." if est.f_input is None else f" (as {est.name} passes it: {fx_struct})."),
    )
    validation.check_scalar_float(
        f_struct, "f(x)", "f must return one scalar per draw; reduce it, e.g. `jnp.sum(...)`."
    )
    f_c, f_consts = jax.closure_convert(f, fx_struct)
    lp_c, lp_consts = jax.closure_convert(family.log_prob, theta, x_struct)
    model = Model(f_c, lp_c, sample_c, family, legacy)
    dependence.check_model(family, theta, user_key, x_struct, f, est.name,
                           draws_key=samples is None)
    if est.check is not None:
        est.check(model, theta, x_struct)
    params = Params(theta, tuple(f_consts), tuple(lp_consts), tuple(sample_consts))
    num_units = n // est.draws_per_unit
    if chunk is None:
        chunk = engine.auto_chunk_size(num_units, *engine.elements_per_unit(x_struct, theta, est))
    f_dtype = jax.tree_util.tree_leaves(f_struct)[0].dtype
    return _Prepared(
        model, est, params, typed_key, num_units, min(chunk, num_units),
        engine.stats_dtype(f_dtype), nan_policy, devices, f_dtype,
    )


def _raise_if_nonfinite(count, where: str):
    if count > 0:
        raise FloatingPointError(
            f"{where}: {int(count)} evaluation(s) of f, or units whose surrogate terms or "
            "gradients (e.g. the score, grad log_prob) were NaN or infinite. Fix f / log_prob for "
            "these draws, or pass nan_policy='drop' to leave those units out (counted in "
            "GradEstimate.num_nonfinite) or nan_policy='propagate' to keep them."
        )


def _apply_nan_policy(prep: _Prepared, fs: FStats, where: str) -> FStats:
    """With nan_policy="raise", routes the non-finite count through a host check.

    ``pure_callback`` with ``vmap_method="broadcast_all"`` is called once per batch under
    ``vmap`` (``jax.debug.callback`` would be unrolled per batch element); its result replaces
    the count, and :func:`_guard` ties outputs to it so the check is never dead code.
    """
    if prep.nan_policy != "raise":
        return fs
    if prep.devices is not None:  # pure_callback's host sharding does not lower under Shardy
        jax.debug.callback(lambda c: _raise_if_nonfinite(int(np.max(c)), where), fs.nonfinite)
        return fs

    def check(c):
        c = np.asarray(c)
        _raise_if_nonfinite(int(c.max()) if c.size else 0, where)
        return c

    checked = jax.pure_callback(
        check, jax.ShapeDtypeStruct(fs.nonfinite.shape, fs.nonfinite.dtype), fs.nonfinite,
        vmap_method="broadcast_all",
    )
    return fs._replace(nonfinite=checked)


def _guard(x, fs: FStats):
    """``x`` times 1, made data-dependent on the checked non-finite count."""
    return x * jnp.where(fs.nonfinite >= 0, 1, jnp.nan).astype(x.dtype)


def _shifted(prep: _Prepared, params, key=None, samples=None) -> tuple[_Prepared, jax.Array]:
    """For a shift-invariant estimator, ``prep`` with f centred on a reference value, and it.

    The reference is f at one draw (unit 0's key folded once more, or the first given sample),
    stop-gradient. The estimate of a shift-invariant estimator does not depend on it in exact
    arithmetic; in floating point, centring keeps the sums of ``f * score`` and of the baseline's
    terms from cancelling when f carries a large constant. Other estimators: ``(prep, 0)``.
    """
    zero = jnp.zeros((), prep.dtype)
    if not prep.est.shift_invariant:
        return prep, zero
    if samples is not None:
        x0 = jax.tree_util.tree_map(lambda a: a[0], samples)
    else:
        x0 = prep.model.draw(params, jax.random.fold_in(jax.random.fold_in(key, 0), 2**31 - 1))
    ref = jax.lax.stop_gradient(prep.model.eval_f(params, jax.lax.stop_gradient(x0)))
    ref = jnp.where(jnp.isfinite(ref), ref, 0).astype(prep.dtype)
    return prep._replace(model=prep.model._replace(f_shift=ref)), ref


def _unshift(fs: FStats, ref) -> FStats:
    return fs._replace(mean=fs.mean + ref.astype(fs.mean.dtype))


def _run(prep: _Prepared, params, state, mode, key=None, samples=None):
    """One engine pass with the call's chunking, NaN policy, devices and centring of f.

    Returns ``(EngineOut, ref)``: the statistics of f are those of ``f - ref`` (see
    :func:`_shifted`); add ``ref`` back to the mean for the value.
    """
    prep, ref = _shifted(prep, params, key, samples)
    out = engine.run(
        prep.model, prep.est, params, state, num_units=prep.num_units,
        chunk_units=prep.chunk, mode=mode, dtype=prep.dtype, key=key, samples=samples,
        nan_policy="drop" if prep.nan_policy == "drop" else "propagate", devices=prep.devices,
    )
    return out, ref


def _not_differentiable(prep: _Prepared, where: str) -> _Prepared:
    """``prep`` whose parameters raise when a caller differentiates through ``where``: its
    results (value, grad, stderr) are statistics of stop-gradient draws, whose derivative would
    be silently zero."""
    msg = (
        f"{where} is not differentiable: its results are statistics of the draws and their "
        "derivative in theta would be zero. To differentiate an expectation, use "
        "jax.grad(lambda theta: sg.expectation(f, family, theta, key, ...)); for the gradient "
        f"estimate itself, call {where} and use result.grad."
    )
    return prep._replace(params=refuse_derivatives(prep.params, msg))


def _kept_units(prep: _Prepared, fs: FStats):
    """Units the estimate averages over: all of them, or (nan_policy="drop") the finite ones,
    as the engine counted them."""
    if prep.nan_policy == "drop":
        return jax.lax.stop_gradient(jnp.maximum(fs.units, 1.0))
    return prep.num_units


def refuse_derivatives(tree, message: str):
    """``tree`` unchanged; differentiating through it raises ``ValueError(message)``."""

    @jax.custom_jvp
    def ident(t):
        return t

    @ident.defjvp
    def ident_jvp(primals, tangents):
        raise ValueError(message)

    return ident(tree)


def _finish(prep: _Prepared, out: engine.EngineOut, state, ref=0.0) -> GradEstimate:
    est, u = prep.est, prep.num_units
    fs = out.fstats
    w = jax.lax.stop_gradient(est.weights(fs, state, _kept_units(prep, fs)))
    mom = out.moments
    assert mom is not None  # callers run the engine in mode "diag", which returns the moments
    n = mom.count  # units kept: u, or fewer with nan_policy="drop"

    def per_unit(v):  # an unbiased per-unit variance from a co-moment sum; NaN below 2 units
        nn = n.astype(v.dtype)
        return jnp.where(nn > 1, jnp.maximum(v, 0.0) / jnp.maximum(nn - 1, 1), jnp.nan)

    def leaf_grad(m):
        return jnp.tensordot(w.astype(m.dtype), m, axes=1)

    def leaf_var(c):  # w^T C w over the two term axes (leaves may be 0-d: no einsum "...")
        wc = w.astype(c.dtype)
        return per_unit(jnp.tensordot(wc, jnp.tensordot(wc, c, axes=([0], [1])), axes=([0], [0])))

    grad = jax.tree_util.tree_map(lambda m: _guard(leaf_grad(m), fs), mom.mean)
    var = jax.tree_util.tree_map(leaf_var, mom.comoment)
    stderr = jax.tree_util.tree_map(lambda v: jnp.sqrt(v / n.astype(v.dtype)), var)
    snr = jax.tree_util.tree_map(lambda g, s: jnp.abs(g) / s, grad, stderr)
    fvar = jnp.where(fs.count > 1, fs.m2 / jnp.maximum(fs.count - 1, 1), jnp.nan)
    value_stderr = jnp.sqrt(fvar / fs.count)
    fs = _unshift(fs, jnp.asarray(ref))
    new_state = est.update(state, fs)
    plain = jax.tree_util.tree_map(
        lambda c, v: per_unit(engine.term0_comoment(c, ref, est.shift_term)) / v,
        mom.comoment, var)
    return GradEstimate(
        value=fs.mean,
        value_stderr=value_stderr,
        grad=grad,
        stderr=stderr,
        variance=var,
        snr=snr,
        num_samples=u * est.draws_per_unit,
        num_nonfinite=fs.nonfinite,
        state=new_state,
        variance_reduction=plain,
    )


def _routed(prep: _Prepared, state, samples=None, where: str = "estimate_grad") -> GradEstimate:
    """Estimators with cross-fitted per-coordinate coefficients (see ``fitted.routed``).

    The NaN policy applies as in the engine path ("drop" is refused by ``_prepare``): with
    "raise", a non-finite f raises instead of returning a NaN gradient.
    """
    # Given samples offer no draw independent of the folds to centre on: cross-fitting's
    # regularized fit is exactly shift-invariant only away from degenerate folds.
    shifted, ref = _shifted(prep, prep.params, prep.key) if samples is None else (
        prep, jnp.zeros((), prep.dtype))
    res = fitted.estimate(shifted, state, samples, ref)
    res = res._replace(value=res.value + ref.astype(res.value.dtype))
    if prep.nan_policy != "raise":
        return res
    zero = jnp.zeros((), res.value.dtype)
    fs = _apply_nan_policy(prep, FStats(zero, res.value, zero, res.num_nonfinite, zero), where)
    guard = lambda tree: jax.tree_util.tree_map(lambda a: _guard(a, fs), tree)  # noqa: E731
    return res._replace(value=_guard(res.value, fs), grad=guard(res.grad),
                        stderr=guard(res.stderr), num_nonfinite=fs.nonfinite)


def _learn(prep: _Prepared, state):
    """The estimator's learning step (e.g. RELAX's control variate) on this call's units."""
    if prep.est.learn is None or prep.key is None:
        return state
    params = jax.lax.stop_gradient(prep.params)
    return prep.est.learn(prep.model, params, prep.key, state, prep.num_units, prep.chunk)


def _init_state(est: Estimator, theta, state):
    if state is None:
        return est.init(theta)
    validation.check_state(state, est, theta)
    return state


def estimate_grad(
    f: Callable[[PyTree], jax.Array],
    family: Family,
    theta: PyTree,
    key: jax.Array,
    *,
    num_samples: int,
    estimator: Optional[Estimator] = None,
    state: Any = None,
    chunk_size: Optional[int] = None,
    nan_policy: str = "raise",
    devices: Any = None,
) -> GradEstimate:
    r"""Estimates :math:`\nabla_\theta \mathbb{E}_{p(x;\theta)}[f(x)]` with standard errors.

    Draws ``num_samples`` samples (sample ``i`` from ``fold_in(key, i)``) in chunks under
    ``lax.scan``; memory is bounded by ``chunk_size × (draw size + number of parameters)``,
    independent of ``num_samples``. Works under ``jax.jit`` (``num_samples`` static) and
    ``jax.vmap`` over ``theta`` or ``key``.

    Args:
      f: the integrand, ``f(x) -> scalar``. To differentiate an f that depends on theta, use
        :func:`expectation` under ``jax.grad``.
      family: a :class:`~scoregrad.Family`.
      theta: the parameters, a pytree of floating-point arrays.
      key: a ``jax.random.key`` or legacy ``jax.random.PRNGKey``.
      num_samples: evaluations of f to spend (static).
      estimator: default :func:`~scoregrad.score_function`.
      state: the estimator's state for stateful estimators (e.g. a moving-average baseline);
        ``None`` initializes it. The updated state is returned in the result.
      chunk_size: units per chunk; ``None`` picks a cache-sized chunk from the problem size.
      nan_policy: what to do when f (or a surrogate term) is NaN or infinite for some draws:
        ``"raise"`` (default) raises when the result is computed, eagerly and under jit/vmap (a
        host check through ``jax.pure_callback``; the error, a ``JaxRuntimeError``, carries the
        ``FloatingPointError`` message), so a NaN never reaches an optimizer silently;
        ``"drop"`` leaves those units out of every statistic and counts them in
        ``num_nonfinite`` (the estimate is then over the finite draws: biased if non-finite
        values are not a null event; refused with ``ValueError`` by cross-fitted estimators,
        i.e. the optimal baseline and optimal control-variate coefficients);
        ``"propagate"`` keeps them (the gradient becomes non-finite) and counts them.
      devices: ``None`` (one device), ``"all"`` (all local devices), an int, or a list of
        devices: units are split into contiguous ranges, one per device, under ``shard_map``.
        Unit ``i`` still draws from ``fold_in(key, i)``: the result equals the one-device result
        up to floating-point summation order.

    Returns:
      A :class:`GradEstimate`.

    Raises:
      TypeError, ValueError: at trace time, naming the faulty argument and the fix.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> theta = {"loc": jnp.array([1.0]), "scale": jnp.array([1.0])}
      >>> r = sg.estimate_grad(lambda x: jnp.sum(x**2), sg.families.normal(), theta,
      ...                      jax.random.key(0), num_samples=10_000)
      >>> r.grad["loc"].shape, r.stderr["loc"].shape
      ((1,), (1,))
    """
    prep = _prepare(
        f, family, theta, key, num_samples, estimator, chunk_size, "estimate_grad",
        nan_policy=nan_policy, devices=devices,
    )
    prep = _not_differentiable(prep, "estimate_grad")
    state = _init_state(prep.est, theta, state)
    if fitted.routed(prep.est):
        return _routed(prep, state)
    out, ref = _run(prep, prep.params, state, "diag", key=prep.key)
    out = out._replace(fstats=_apply_nan_policy(prep, out.fstats, "estimate_grad"))
    res = _finish(prep, out, state, ref)
    return res._replace(state=_learn(prep, res.state))


def estimate_grad_from_samples(
    f: Callable[[PyTree], jax.Array],
    family: Family,
    theta: PyTree,
    samples: PyTree,
    *,
    estimator: Optional[Estimator] = None,
    state: Any = None,
    chunk_size: Optional[int] = None,
    nan_policy: str = "raise",
) -> GradEstimate:
    r"""Like :func:`estimate_grad`, for draws you already have (e.g. environment rollouts).

    ``samples`` is a pytree whose leaves have a leading axis of length N (the draws, assumed to be
    i.i.d. from ``p(x; theta)``). Only estimators that do not re-draw (score function and its
    baselines) accept it; pathwise raises ``TypeError``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> xs = jnp.array([[0.0], [1.0], [1.0], [0.0]])
      >>> r = sg.estimate_grad_from_samples(lambda x: jnp.sum(x), sg.families.bernoulli(),
      ...                                   jnp.zeros(1), xs)
      >>> float(r.grad[0])
      0.25
    """
    leaves = jax.tree_util.tree_leaves(samples)
    if not leaves or any(jnp.ndim(a) < 1 for a in leaves):
        raise ValueError(
            "`samples` must be a pytree of arrays with a leading axis of draws; got "
            f"{type(samples).__name__}. Stack the draws, e.g. jnp.stack(draws)."
        )
    n = int(leaves[0].shape[0])
    if any(a.shape[0] != n for a in leaves):
        raise ValueError(
            f"`samples` leaves disagree on the number of draws: {[a.shape[0] for a in leaves]}."
        )
    samples = jax.tree_util.tree_map(jnp.asarray, samples)
    prep = _prepare(
        f, family, theta, None, n, estimator, chunk_size, "estimate_grad_from_samples", samples,
        nan_policy=nan_policy,
    )
    prep = _not_differentiable(prep, "estimate_grad_from_samples")
    state = _init_state(prep.est, theta, state)
    if fitted.routed(prep.est):
        return _routed(prep, state, samples, "estimate_grad_from_samples")
    out, ref = _run(prep, prep.params, state, "diag", samples=samples)
    out = out._replace(
        fstats=_apply_nan_policy(prep, out.fstats, "estimate_grad_from_samples")
    )
    return _finish(prep, out, state, ref)


def _fstats_float(fs: FStats) -> FStats:
    return fs._replace(nonfinite=fs.nonfinite.astype(fs.mean.dtype))


def _higher_order_message(est: Estimator) -> str:
    return (
        f"jax.hessian (or any second derivative) of sg.expectation with {est.name} is not "
        f"estimated: {est.name}'s surrogate is right at first order only (its second derivative "
        "would be zeros or a partial sum). Use sg.score_function(...) (DiCE, every order, "
        "baselines included), sg.rloo(k) or sg.pathwise() for Hessians."
    )


def _surrogate(prep: _Prepared, state) -> tuple[jax.Array, FStats]:
    """Value = mean f, gradient (any order) = the estimator, via a custom JVP over the engine."""
    est = prep.est
    assert prep.key is not None  # expectation* always pass a key (samples=None)
    impl = jax.random.key_impl(prep.key)

    def run(p, kd, st, mode):
        out, ref = _run(prep, p, st, mode, key=jax.random.wrap_key_data(kd, impl=impl))
        # The check sits on the pass's own statistics (not on the custom-JVP output), so
        # nested differentiation does not keep extra passes alive for it.
        return out._replace(fstats=_apply_nan_policy(prep, out.fstats, "expectation")), ref

    def primal_out(fs: FStats, ref):
        """(value, statistics of f itself): f was centred on ``ref`` in the engine."""
        fs = _unshift(fs, ref)
        return _guard(fs.mean, fs).astype(prep.f_dtype), _fstats_float(fs)

    @jax.custom_jvp
    def core(params, key_data, st):
        out, ref = run(params, key_data, st, "value")
        return primal_out(out.fstats, ref)

    @core.defjvp
    def core_jvp(primals, tangents):
        params, key_data, st = primals
        dparams = tangents[0]
        if est.max_order is not None:
            # First order is this rule; a second derivative differentiates the rule itself.
            params = refuse_derivatives(params, _higher_order_message(est))
        if fitted.routed(est):
            key = jax.random.wrap_key_data(key_data, impl=impl)
            shifted, ref = _shifted(prep, params, key)
            fs, tangent = fitted.jvp(shifted, params, key, st, dparams)
            fs = _apply_nan_policy(prep, fs, "expectation")
            value, fsf = primal_out(fs, ref)
            return (value, fsf), (
                _guard(tangent, fs).astype(value.dtype), jax.tree_util.tree_map(jnp.zeros_like, fsf))
        out, ref = run(params, key_data, st, "grad")
        fs = out.fstats
        denom = _kept_units(prep, fs)  # with nan_policy="drop": the finite units
        w = jax.lax.stop_gradient(est.weights(fs, st, denom))
        grads = jax.tree_util.tree_map(
            lambda g: jnp.tensordot(w.astype(g.dtype), g, axes=1) / denom, out.grad_sums
        )
        dots = [
            jnp.vdot(g, dp).astype(fs.mean.dtype)
            for g, dp in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(dparams))
        ]
        value, fsf = primal_out(fs, ref)
        tangent = _guard(sum(dots, jnp.zeros((), fs.mean.dtype)), fs).astype(value.dtype)
        return (value, fsf), (tangent, jax.tree_util.tree_map(jnp.zeros_like, fsf))

    value, fsf = core(prep.params, jax.random.key_data(prep.key), state)
    fs = fsf._replace(nonfinite=jax.lax.stop_gradient(fsf.nonfinite).astype(jnp.int32))
    return value, jax.lax.stop_gradient(fs)


def expectation(
    f: Callable[[PyTree], jax.Array],
    family: Family,
    theta: PyTree,
    key: jax.Array,
    *,
    num_samples: int,
    estimator: Optional[Estimator] = None,
    chunk_size: Optional[int] = None,
    nan_policy: str = "raise",
    devices: Any = None,
) -> jax.Array:
    r"""A differentiable Monte Carlo estimate of :math:`\mathbb{E}_{p(x;\theta)}[f(x)]`.

    Its value is the plain Monte Carlo mean of f over ``num_samples`` draws. ``jax.grad`` of it
    is the chosen estimator (including the pathwise term when f closes over theta), computed in
    one chunked pass with memory independent of ``num_samples``; ``jax.hessian`` of it is an
    unbiased Hessian estimate for the score function (DiCE), baselines included, and for
    pathwise. Use it inside any loss and optax loop.

    Stateful estimators (e.g. a moving-average baseline) need
    :func:`expectation_with_state`.

    Args:
      f: ``f(x) -> scalar``; may close over theta (or anything else being differentiated).
      family, theta, key, num_samples, estimator, chunk_size, nan_policy, devices: as in
        :func:`estimate_grad` (with ``nan_policy="drop"`` the gradient averages over the finite
        draws).

    Returns:
      A scalar with f's dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> def loss(theta, key):
      ...     return sg.expectation(lambda x: jnp.sum((x - 1.0) ** 2), sg.families.normal(),
      ...                           theta, key, num_samples=256)
      >>> theta = {"loc": jnp.zeros(2), "scale": jnp.ones(2)}
      >>> g = jax.grad(loss)(theta, jax.random.key(0))
      >>> sorted(g)
      ['loc', 'scale']
    """
    prep = _prepare(
        f, family, theta, key, num_samples, estimator, chunk_size, "expectation",
        nan_policy=nan_policy, devices=devices,
    )
    if prep.est.stateful:
        raise ValueError(
            f"expectation: estimator {prep.est.name} is stateful; use "
            "sg.expectation_with_state(f, family, theta, key, state, ...) and thread the state "
            "like an optax optimizer state (state = estimator.init(theta) to start)."
        )
    value, _ = _surrogate(prep, ())
    return value


def expectation_with_state(
    f: Callable[[PyTree], jax.Array],
    family: Family,
    theta: PyTree,
    key: jax.Array,
    state: Any,
    *,
    num_samples: int,
    estimator: Optional[Estimator] = None,
    chunk_size: Optional[int] = None,
    nan_policy: str = "raise",
    devices: Any = None,
) -> tuple[jax.Array, Any]:
    """:func:`expectation` for stateful estimators: returns ``(value, new_state)``.

    The gradient of ``value`` is the estimator's, using ``state`` (built only from past calls);
    ``new_state`` carries no gradient. Use ``jax.value_and_grad(loss, has_aux=True)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> est = sg.score_function(baseline=sg.baselines.moving_average(0.9))
      >>> theta = jnp.zeros(3)
      >>> state = est.init(theta)
      >>> def loss(theta, key, state):
      ...     return sg.expectation_with_state(lambda x: jnp.sum(x), sg.families.bernoulli(),
      ...                                      theta, key, state, num_samples=64, estimator=est)
      >>> (value, state), g = jax.value_and_grad(loss, has_aux=True)(theta, jax.random.key(0), state)
      >>> g.shape
      (3,)
    """
    prep = _prepare(
        f, family, theta, key, num_samples, estimator, chunk_size, "expectation_with_state",
        nan_policy=nan_policy, devices=devices,
    )
    if state is None:
        raise ValueError(
            "expectation_with_state: `state` is None; start from state = estimator.init(theta)."
        )
    state = _init_state(prep.est, theta, state)
    value, fs = _surrogate(prep, state)
    new_state = jax.lax.stop_gradient(_learn(prep, prep.est.update(state, fs)))
    return value, new_state
