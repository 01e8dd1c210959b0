"""The top-level API: estimate_grad, estimate_grad_from_samples, expectation,
expectation_with_state. Each is prepare (:mod:`problem`) -> run (:mod:`engine`) -> summarize
(:mod:`results`), under one validated :class:`~scoregrad._src.policy.RunPolicy`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from scoregrad._src import (
    binding,
    chains,
    fitted,
    policy,
    problem,
    stats,
    surrogate,
    validation,
    vector,
)
from scoregrad._src.base import Estimator
from scoregrad._src.family import Family
from scoregrad._src.problem import Problem
from scoregrad._src.results import GradEstimate, per_unit_variance, summarize

PyTree = Any
__all__ = ["GradEstimate", "estimate_grad", "estimate_grad_from_samples", "expectation",
           "expectation_with_state"]


def _weighted(w, c):
    """``w^T C w`` over the two leading term axes of ``c`` (leaves may be 0-d)."""
    return jnp.tensordot(w, jnp.tensordot(w, c, axes=([0], [1])), axes=([0], [0]))


def _closures_not_differentiable(prob: Problem, where: str) -> Problem:
    """Differentiating through what f, log_prob or sample close over raises: estimate_grad's
    per-unit gradients are in theta only, so an f that closes over theta would lose its pathwise
    term (half the answer, silently). ``sg.expectation`` differentiates every closure."""
    msg = (f"{where}: f (or log_prob/sample) closes over a value being differentiated; "
           f"{where} estimates the gradient in theta only and would drop that path. Use "
           "jax.grad(lambda theta: sg.expectation(f, family, theta, key, ...)), which "
           "differentiates through what f closes over, or pass theta explicitly.")
    p = prob.params
    return prob._replace(params=p._replace(
        f=policy.refuse_derivatives(p.f, msg), log_prob=policy.refuse_derivatives(p.log_prob, msg),
        sample=policy.refuse_derivatives(p.sample, msg)))


def _estimate(prob: Problem, state, where: str, samples=None, batches=None) -> GradEstimate:
    """Run in mode "diag" (per-unit gradients to moments) and summarize, cross-fitted or not;
    with ``batches``, standard errors from batch means (correlated draws, :mod:`chains`)."""
    prob = _closures_not_differentiable(prob, where)
    est = run_est = prob.est  # run_est: the bound estimator the engine ran (its term layout)
    value_se = None
    if batches is not None:
        shifted, ref = problem.shifted(prob, prob.params, None, samples)
        grad, var, stderr, fs, mom, value_se = chains.estimate(shifted, state, samples, batches)
    elif fitted.routed(est):
        # Given samples offer no draw independent of the folds to centre on: the regularized
        # fit is exactly shift-invariant only away from degenerate folds.
        shifted, ref = (problem.shifted(prob, prob.params, prob.key) if samples is None
                        else (prob, jnp.zeros((), prob.dtype)))
        grad, var, stderr, fs, mom = fitted.estimate(shifted, state, samples)
    else:
        run_est, fs, mom, ref, w = _diag(prob, state, samples)
        grad = jax.tree_util.tree_map(lambda m: jnp.tensordot(w.astype(m.dtype), m, axes=1),
                                      mom.mean)
        var = jax.tree_util.tree_map(
            lambda c: per_unit_variance(_weighted(w.astype(c.dtype), c), mom.count),
            mom.comoment)
        stderr = None
    fs = surrogate.check(prob, fs, where)
    plain = jax.tree_util.tree_map(
        lambda c: per_unit_variance(stats.term0_comoment(c, ref, run_est.shift_term), mom.count),
        mom.comoment)
    fs = problem.unshift(fs, ref)
    grad = policy.guard_tree(grad, fs)
    grad = jax.tree_util.tree_map(lambda g: problem.nan_if_none_kept(prob, fs, g), grad)
    fs = fs._replace(mean=problem.nan_if_none_kept(prob, fs, fs.mean))
    res = summarize(
        fs=fs._replace(mean=_value_with_gradient(policy.guard(fs.mean, fs), grad, prob)),
        grad=grad,
        variance=var, n_units=mom.count, num_samples=prob.num_units * est.draws_per_unit,
        state=est.update(state, fs), plain_variance=plain,
        stderr=None if stderr is None else policy.guard_tree(stderr, fs),
    )
    return res if value_se is None else res._replace(value_stderr=value_se)


def _diag(prob: Problem, state, samples):
    """Mode "diag" and the terms' weights: ``(bound run, FStats, moments, ref, weights)``. With
    many weighted terms (a program's per-step baselines) a value pass over the same draws fixes
    the weights first, and the per-unit rows are term 0 (and the shift term) and the weighted
    sum, not one row per term."""
    est, w = prob.est, None
    fixed = surrogate.prepass_weights(prob, prob.params, state, key=prob.key, samples=samples)
    if fixed is not None:
        keep = (0,) if est.shift_term is None else (0, est.shift_term)
        est = binding.contracted(est, fixed, keep)
        w = jnp.zeros((len(keep) + 1,), fixed.dtype).at[-1].set(1)  # the weighted sum alone
    out, ref = surrogate.run(prob._replace(est=est), prob.params, state, "diag", key=prob.key,
                             samples=samples)
    assert out.moments is not None  # mode "diag"
    if w is None:
        w = jax.lax.stop_gradient(est.weights(out.fstats, state,
                                              problem.kept_units(prob, out.fstats)))
    return est, out.fstats, out.moments, ref, w


def _value_with_gradient(value, grad, prob: Problem):
    """The value (the mean of stop-gradient f values), whose derivative in theta is the gradient
    estimate itself rather than a silent zero: ``jax.grad`` of ``estimate_grad(...).value`` is
    ``estimate_grad(...).grad`` (first order; for an objective to differentiate at every order,
    use :func:`expectation`)."""
    theta = prob.params.theta
    probe = [jnp.vdot(jax.lax.stop_gradient(g), t - jax.lax.stop_gradient(t)).astype(value.dtype)
             for g, t in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(theta))]
    return value + sum(probe, jnp.zeros((), value.dtype))


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
      f: the integrand, ``f(x) -> scalar``, or an array of any shape ``S``: every field of the
        result (``value``, ``grad``, ``stderr``, ``num_nonfinite``, ...) then leads with ``S``
        (``grad`` is the Jacobian, laid out as ``jax.jacrev``'s), computed in one pass over the
        draws (see docs/vector-f.md; stateful estimators are refused). To differentiate an f
        that depends on theta, use :func:`expectation` under ``jax.grad``.
      family: a :class:`~scoregrad.Family`.
      theta: the parameters, a pytree of floating-point arrays.
      key: a ``jax.random.key`` or legacy ``jax.random.PRNGKey``.
      num_samples: evaluations of f to spend (static).
      estimator: default :func:`~scoregrad.score_function`.
      state: the estimator's state for stateful estimators (e.g. a moving-average baseline);
        ``None`` initializes it. The updated state is returned in the result.
      chunk_size: units per chunk; ``None`` picks a cache-sized chunk from the problem size.
      nan_policy: what to do when f, a surrogate term or a per-unit gradient (e.g. the score)
        is NaN or infinite for some draws: ``"raise"`` (default) raises when the result is
        computed: eagerly a ``FloatingPointError``; under jit/vmap a host check through
        ``jax.pure_callback`` whose ``JaxRuntimeError`` carries the ``FloatingPointError``
        message, so a NaN never reaches an optimizer silently; ``"drop"`` leaves those units out
        of every statistic and counts them in ``num_nonfinite`` (the estimate is then over the
        finite units: biased if non-finite values are not a null event); ``"propagate"`` keeps
        them (the gradient becomes non-finite) and counts them.
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
    where = "estimate_grad"
    run_policy = policy.make_policy(where, nan_policy, devices, chunk_size)
    shape = problem.output_shape(f, family, theta, key, estimator, where)
    if shape:
        return vector.estimate(
            lambda fj, nan: estimate_grad(fj, family, theta, key, num_samples=num_samples,
                                          estimator=estimator, state=state,
                                          chunk_size=chunk_size, nan_policy=nan, devices=devices),
            f, shape, nan_policy, state, where)
    prob = problem.prepare(f, family, theta, key, num_samples, estimator, where,
                           policy=run_policy)
    state = problem.init_state(prob.est, theta, state)
    res = _estimate(prob, state, where)
    return res._replace(state=problem.learn(prob, res.state))


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
    correlation: Optional[str] = None,
    num_batches: Optional[int] = None,
) -> GradEstimate:
    r"""Like :func:`estimate_grad`, for draws you already have (e.g. environment rollouts).

    ``samples`` is a pytree whose leaves have a leading axis of length N (the draws, assumed to be
    i.i.d. from ``p(x; theta)`` unless ``correlation`` says otherwise). Only estimators that do
    not draw noise of their own accept it (score function and its baselines, RLOO/VIMCO with K
    consecutive samples per group, IndeCateR); pathwise raises ``TypeError``.

    Draws from Markov chains (MCMC, variational Monte Carlo) are correlated, and i.i.d. standard
    errors are then too small. ``correlation="chains"``: the leaves have leading axes
    ``(chains, steps)`` (independent chains of equal length, at least 2), and standard errors
    come from the spread of the per-chain estimates; ``correlation="batch_means"``: one chain
    (leading axis: steps), standard errors from ``num_batches`` contiguous batch means (default:
    the divisor of N closest to :math:`\sqrt N`; each batch should be much longer than the autocorrelation
    time). ``value_stderr`` is computed the same way. The estimate itself is the plain mean
    (discard burn-in first).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> xs = jnp.array([[0.0], [1.0], [1.0], [0.0]])
      >>> r = sg.estimate_grad_from_samples(lambda x: jnp.sum(x), sg.families.bernoulli(),
      ...                                   jnp.zeros(1), xs)
      >>> float(r.grad[0])
      0.25
    """
    given = samples
    flat = chains.check(correlation, num_batches, samples)
    batches = None
    if flat is not None:
        samples, batches = flat
    n = validation.check_sample_leaves(samples)
    samples = jax.tree_util.tree_map(jnp.asarray, samples)
    where = "estimate_grad_from_samples"
    run_policy = policy.make_policy(where, nan_policy, None, chunk_size)
    shape = problem.output_shape(f, family, theta, None, estimator, where, samples)
    if shape:
        return vector.estimate(
            lambda fj, nan: estimate_grad_from_samples(
                fj, family, theta, given, estimator=estimator, state=state,
                chunk_size=chunk_size, nan_policy=nan, correlation=correlation,
                num_batches=num_batches),
            f, shape, nan_policy, state, where)
    prob = problem.prepare(f, family, theta, None, n, estimator, where, samples,
                           policy=run_policy)
    state = problem.init_state(prob.est, theta, state)
    return _estimate(prob, state, where, samples, batches)


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
      f: ``f(x) -> scalar``, or an array of shape ``S`` (then the result has shape ``S`` and
        ``jax.jacrev`` / ``jax.jacfwd`` of it are the estimator's Jacobian, in one pass over
        the draws; docs/vector-f.md); may close over theta (or anything else being
        differentiated).
      family, theta, key, num_samples, estimator, chunk_size, nan_policy, devices: as in
        :func:`estimate_grad` (with ``nan_policy="drop"`` the gradient averages over the finite
        draws).

    Returns:
      An array of f's shape and dtype (a scalar for a scalar f).

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
    where = "expectation"
    run_policy = policy.make_policy(where, nan_policy, devices, chunk_size)
    shape = problem.output_shape(f, family, theta, key, estimator, where)
    if shape:
        return vector.expectation(
            lambda fj: expectation(fj, family, theta, key, num_samples=num_samples,
                                   estimator=estimator, chunk_size=chunk_size,
                                   nan_policy=nan_policy, devices=devices),
            f, shape, where)
    prob = problem.prepare(f, family, theta, key, num_samples, estimator, where,
                           policy=run_policy)
    if prob.est.stateful:
        raise ValueError(
            f"expectation: estimator {prob.est.name} is stateful; use "
            "sg.expectation_with_state(f, family, theta, key, state, ...) and thread the state "
            "like an optax optimizer state (state = estimator.init(theta) to start)."
        )
    value, _ = surrogate.surrogate(prob, ())
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
    where = "expectation_with_state"
    run_policy = policy.make_policy(where, nan_policy, devices, chunk_size)
    if problem.output_shape(f, family, theta, key, estimator, where):
        raise ValueError(
            f"{where}: f returns an array; stateful estimators keep one state per objective. "
            "Use sg.expectation with a stateless estimator for an array-valued f, or one "
            "scalar f per call."
        )
    prob = problem.prepare(f, family, theta, key, num_samples, estimator, where,
                           policy=run_policy)
    if state is None:
        raise ValueError(
            "expectation_with_state: `state` is None; start from state = estimator.init(theta)."
        )
    state = problem.init_state(prob.est, theta, state)
    value, fs = surrogate.surrogate(prob, state)
    new_state = jax.lax.stop_gradient(problem.learn(prob, prob.est.update(state, fs)))
    return value, new_state
