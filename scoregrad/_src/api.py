"""The top-level API: estimate_grad, expectation, expectation_with_state."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from scoregrad._src import engine, validation
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


class _Prepared(NamedTuple):
    model: Model
    est: Estimator
    params: Params
    key: Optional[jax.Array]
    num_units: int
    chunk: int
    dtype: Any


def _traced_struct(fn: Callable, args, what: str, fix: str):
    try:
        return jax.eval_shape(fn, *args)
    except (TypeError, KeyError, IndexError, AttributeError) as err:
        raise TypeError(f"{what} failed while tracing: {type(err).__name__}: {err}. {fix}") from err


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


def _prepare(f, family, theta, key, num_samples, estimator, chunk_size, where, samples=None):
    est = _check_common(f, family, estimator, where)
    validation.check_theta(theta)
    if family.check_theta is not None:
        family.check_theta(theta)
    n = validation.check_num_samples(
        num_samples,
        minimum=est.min_units * est.draws_per_unit,
        multiple_of=est.draws_per_unit,
        who=est.name,
    )
    chunk = validation.check_chunk_size(chunk_size)
    theta_treedef = jax.tree_util.tree_structure(theta)
    lp_fix = (
        f"Check that family.log_prob(theta, x) accepts theta of structure {theta_treedef} "
        "and the draws that family.sample returns."
    )
    if samples is None:
        typed_key = validation.normalize_key(key)
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
                f"{est.name} differentiates through the sampler and cannot use given samples; "
                "call sg.estimate_grad with a key."
            )
        x_struct = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), samples)
        sample_c, sample_consts = family.sample, []
    lp_struct = _traced_struct(family.log_prob, (theta, x_struct), "family.log_prob(theta, x)", lp_fix)
    validation.check_scalar_float(
        lp_struct, "family.log_prob(theta, x)",
        "It must return the log-density of ONE draw; sum over independent coordinates, e.g. "
        "`jnp.sum(logpdf(x, ...))`.",
    )
    f_struct = _traced_struct(f, (x_struct,), "f(x)", "f must accept one draw x as the family samples it.")
    validation.check_scalar_float(
        f_struct, "f(x)", "f must return one scalar per draw; reduce it, e.g. `jnp.sum(...)`."
    )
    f_c, f_consts = jax.closure_convert(f, x_struct)
    lp_c, lp_consts = jax.closure_convert(family.log_prob, theta, x_struct)
    model = Model(f_c, lp_c, sample_c, family, legacy)
    if est.check is not None:
        est.check(model, theta, x_struct)
    params = Params(theta, tuple(f_consts), tuple(lp_consts), tuple(sample_consts))
    num_units = n // est.draws_per_unit
    if chunk is None:
        chunk = engine.auto_chunk_size(num_units, engine.elements_per_unit(x_struct, theta, est))
    dtype = jax.tree_util.tree_leaves(f_struct)[0].dtype
    return _Prepared(model, est, params, typed_key, num_units, min(chunk, num_units), dtype)


def _finish(prep: _Prepared, out: engine.EngineOut, state) -> GradEstimate:
    est, u = prep.est, prep.num_units
    fs = out.fstats
    w = jax.lax.stop_gradient(est.weights(fs, state, u))
    mom = out.moments

    def leaf_grad(m):
        return jnp.tensordot(w.astype(m.dtype), m, axes=1)

    def leaf_var(c):
        wc = w.astype(c.dtype)
        v = jnp.einsum("k,l,kl...->...", wc, wc, c)
        return jnp.maximum(v, 0.0) / (u - 1) if u > 1 else jnp.full(v.shape, jnp.nan, v.dtype)

    grad = jax.tree_util.tree_map(leaf_grad, mom.mean)
    var = jax.tree_util.tree_map(leaf_var, mom.comoment)
    stderr = jax.tree_util.tree_map(lambda v: jnp.sqrt(v / u), var)
    snr = jax.tree_util.tree_map(lambda g, s: jnp.abs(g) / s, grad, stderr)
    fvar = fs.m2 / (fs.count - 1) if u * est.draws_per_unit > 1 else jnp.full((), jnp.nan, fs.m2.dtype)
    value_stderr = jnp.sqrt(fvar / fs.count)
    new_state = est.update(state, fs)
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
    )


def _init_state(est: Estimator, theta, state):
    if state is None:
        return est.init(theta)
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
    prep = _prepare(f, family, theta, key, num_samples, estimator, chunk_size, "estimate_grad")
    state = _init_state(prep.est, theta, state)
    out = engine.run(
        prep.model, prep.est, prep.params, state, num_units=prep.num_units,
        chunk_units=prep.chunk, mode="diag", dtype=prep.dtype, key=prep.key,
    )
    return _finish(prep, out, state)


def estimate_grad_from_samples(
    f: Callable[[PyTree], jax.Array],
    family: Family,
    theta: PyTree,
    samples: PyTree,
    *,
    estimator: Optional[Estimator] = None,
    state: Any = None,
    chunk_size: Optional[int] = None,
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
        raise ValueError("`samples` must be a pytree of arrays with a leading axis of draws.")
    n = int(leaves[0].shape[0])
    if any(a.shape[0] != n for a in leaves):
        raise ValueError(
            f"`samples` leaves disagree on the number of draws: {[a.shape[0] for a in leaves]}."
        )
    samples = jax.tree_util.tree_map(jnp.asarray, samples)
    prep = _prepare(
        f, family, theta, None, n, estimator, chunk_size, "estimate_grad_from_samples", samples
    )
    state = _init_state(prep.est, theta, state)
    out = engine.run(
        prep.model, prep.est, prep.params, state, num_units=prep.num_units,
        chunk_units=prep.chunk, mode="diag", dtype=prep.dtype, samples=samples,
    )
    return _finish(prep, out, state)


def _fstats_float(fs: FStats) -> FStats:
    return fs._replace(nonfinite=fs.nonfinite.astype(fs.mean.dtype))


def _surrogate(prep: _Prepared, state) -> tuple[jax.Array, FStats]:
    """Value = mean f, gradient (any order) = the estimator, via a custom JVP over the engine."""
    est, u = prep.est, prep.num_units
    impl = jax.random.key_impl(prep.key)
    run = lambda p, kd, st, mode: engine.run(  # noqa: E731
        prep.model, est, p, st, num_units=u, chunk_units=prep.chunk, mode=mode,
        dtype=prep.dtype, key=jax.random.wrap_key_data(kd, impl=impl),
    )

    @jax.custom_jvp
    def core(params, key_data, st):
        fs = run(params, key_data, st, "value").fstats
        return fs.mean, _fstats_float(fs)

    @core.defjvp
    def core_jvp(primals, tangents):
        params, key_data, st = primals
        dparams = tangents[0]
        out = run(params, key_data, st, "grad")
        fs = out.fstats
        w = jax.lax.stop_gradient(est.weights(fs, st, u))
        grads = jax.tree_util.tree_map(
            lambda g: jnp.tensordot(w.astype(g.dtype), g, axes=1) / u, out.grad_sums
        )
        dots = [
            jnp.vdot(g, dp).astype(fs.mean.dtype)
            for g, dp in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(dparams))
        ]
        tangent = sum(dots, jnp.zeros((), fs.mean.dtype))
        fsf = _fstats_float(fs)
        return (fs.mean, fsf), (tangent, jax.tree_util.tree_map(jnp.zeros_like, fsf))

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
      family, theta, key, num_samples, estimator, chunk_size: as in :func:`estimate_grad`.

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
    prep = _prepare(f, family, theta, key, num_samples, estimator, chunk_size, "expectation")
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
    prep = _prepare(f, family, theta, key, num_samples, estimator, chunk_size, "expectation_with_state")
    if state is None:
        raise ValueError(
            "expectation_with_state: `state` is None; start from state = estimator.init(theta)."
        )
    value, fs = _surrogate(prep, state)
    new_state = jax.lax.stop_gradient(prep.est.update(state, fs))
    return value, new_state
