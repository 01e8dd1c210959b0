"""The measure-valued (weak-derivative) estimator."""

from __future__ import annotations

from typing import cast

import jax
import jax.numpy as jnp

from scoregrad._src import weak_derivative as wd
from scoregrad._src.base import Estimator, Plan, UnitOut, estimator

_SUPPORTED = "normal (loc, scale), bernoulli, poisson, exponential, gamma (rate)"


def _identity(theta):
    return theta


def decomposition_of(family):
    """``(decomposition, param_map)``: the family's weak-derivative decomposition and the map
    from theta to the parameters it differentiates in (identity for
    ``capabilities.weak_derivative``; the logits for ``capabilities.bernoulli_logits``), or
    ``TypeError`` naming the capability."""
    caps = family.capabilities
    if caps.weak_derivative is not None:
        return caps.weak_derivative, _identity
    if caps.bernoulli_logits is not None:
        return wd.bernoulli, caps.bernoulli_logits
    raise TypeError(
        "measure_valued() needs family.capabilities.weak_derivative (a weak-derivative "
        "decomposition, see scoregrad._src.weak_derivative) or bernoulli_logits; family "
        f"{family.name!r} has none (no weak-derivative decomposition). Built in for "
        f"{_SUPPORTED}. Use sg.score_function() (any "
        "family) or sg.pathwise() (reparameterizable families)."
    )


def _cost(fn, param_map, family, theta) -> int:
    """1 + number of extra points: evaluations of f per unit (from shapes only)."""
    key = jax.random.key(0)
    x = jax.eval_shape(family.sample, theta, key)
    return 1 + int(jax.eval_shape(lambda t, x_, k: fn(param_map(t), x_, k), theta, x, key).points.shape[0])


def measure_valued() -> Estimator:
    r"""The measure-valued (weak-derivative) gradient estimator, with coupled parts.

    For each parameter coordinate :math:`\theta_j` a weak derivative
    :math:`\partial_{\theta_j} p = c_j\,(p^+_j - p^-_j)` (see
    :mod:`scoregrad._src.weak_derivative`) gives, from one draw :math:`x \sim p(\cdot;\theta)`,

    .. math::
       \hat g_j = c_j(\theta)\,\big(f(x^+_j) - f(x^-_j)\big),

    where :math:`x^\pm_j` equal :math:`x` in every other coordinate and share noise in coordinate
    :math:`j` (common random numbers). Supported families and parameters: the built-in
    normal (loc: Rayleigh/Weibull :math:`\mu \pm \sigma R`; scale: double-sided Maxwell vs the
    normal itself), bernoulli (logits; :math:`f(1) - f(0)`), poisson (log-rate;
    :math:`f(X+1) - f(X)`), exponential (rate; Exp vs Gamma(2)) and gamma (rate, with the
    concentration fixed via ``sg.families.gamma(concentration=...)``). Any other family or
    parameter (gamma's concentration, categorical, user families without
    ``capabilities.weak_derivative`` or ``bernoulli_logits``) raises ``TypeError`` at trace time — never a silent zero.

    * **Cost**: a unit is one draw and its coupled points: ``1 + E`` evaluations of f, with
      ``E = 3d`` for a normal of d coordinates (loc ±, scale +; the scale's negative part is the
      draw itself) and ``E = d`` for the others. ``num_samples`` counts evaluations of f, so it
      must be a multiple of ``1 + E`` (``draws_per_unit`` is fixed at trace time from theta's
      shapes); e.g. a 3-d normal needs multiples of 10.
    * **Value**: the mean of f over the units' draws :math:`x` (``num_samples / (1 + E)`` of
      them), not over the coupled points.
    * **Bias**: unbiased. **Needs from f**: nothing (f may be discontinuous: a step function is
      fine). **Needs from the family**: a weak-derivative decomposition (above). Draws its own
      samples: given samples are refused.
    * **Derivative order**: first order only. The surrogate is
      ``f(x) + sum_j stop_gradient(g_j) * (theta_j - stop_gradient(theta_j))``, so
      ``jax.hessian`` of :func:`scoregrad.expectation` is **not** correct (the weak-derivative
      part contributes zero second derivative). A direct dependence of f on theta (f closing over
      it) gets its pathwise term at the draw :math:`x`.

    Returns:
      An :class:`~scoregrad.Estimator`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> theta = {"loc": jnp.array([1.0]), "scale": jnp.array([1.0])}
      >>> r = sg.estimate_grad(lambda x: jnp.sum(x**2), sg.families.normal(), theta,
      ...                      jax.random.key(0), num_samples=4000,
      ...                      estimator=sg.measure_valued())
      >>> bool(jnp.abs(r.grad["loc"][0] - 2.0) < 5 * r.stderr["loc"][0])
      True

    References:
      Pflug, "Sampling derivatives of probabilities", Computing 1989. Heidergott and
      Vázquez-Abad, "Measure-valued differentiation for Markov chains", JOTA 2008. Mohamed,
      Rosca, Figurnov and Mnih, "Monte Carlo Gradient Estimation in Machine Learning", JMLR
      2020, §6.
    """
    def bind(target):
        fn, pmap = decomposition_of(target.family)
        cost = _cost(fn, pmap, target.family, target.theta)
        return Plan(_unit(fn, pmap), draws_per_unit=cost, max_order=1, shift_invariant=True)

    return estimator("measure_valued", bind)


def _unit(decomposition, param_map):
    def unit(model, params, draws, state):
        del state
        phi = param_map(params.theta)  # what the decomposition differentiates in
        x = draws.sample()
        parts = jax.lax.stop_gradient(decomposition(jax.lax.stop_gradient(phi), x, draws.key()))
        f_x = model.eval_f(params, x)
        frozen = jax.lax.stop_gradient(params)
        f_pts = jax.vmap(lambda p: model.eval_f(frozen, p))(parts.points)
        table = jnp.concatenate([jax.lax.stop_gradient(f_x)[None], f_pts])

        def leaf_term(th, plus, minus, coef):
            g = jax.lax.stop_gradient(coef * (table[plus] - table[minus])).astype(th.dtype)
            return jnp.sum(g * (th - jax.lax.stop_gradient(th)))

        extra = jax.tree_util.tree_map(leaf_term, phi, parts.plus, parts.minus, parts.coef)
        # theta has at least one leaf (validation.check_theta), so the sum is an array, not 0
        term = f_x + cast(jax.Array, sum(jax.tree_util.tree_leaves(extra))).astype(f_x.dtype)
        return UnitOut(term[None], jax.lax.stop_gradient(f_x)[None])

    return unit
