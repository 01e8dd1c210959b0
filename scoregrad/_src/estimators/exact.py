"""Exact and enumeration-based estimators: full enumeration, and IndeCateR for categoricals."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src.base import Estimator, Plan, UnitOut, estimator
from scoregrad._src.family import require


def _plan(name, unit, draws_per_unit) -> Plan:
    # indecater's surrogate misses the cross-coordinate second derivatives: first order only.
    return Plan(unit, draws_per_unit=draws_per_unit, max_order=1 if name == "indecater" else None,
                shift_invariant=True)


def support_size(family, theta) -> int:
    """The number of points of the family's finite support at theta (from shapes only).

    Raises ``TypeError`` naming ``capabilities.support`` if the family declares no finite support.
    """
    support = require(
        family, "support", "enumerate()",
        "It is continuous or has an infinite support (no finite support): use a sampling "
        "estimator such as sg.score_function() instead.",
    )
    caps = family.capabilities
    if caps.support_size is not None:
        return int(caps.support_size(theta))
    return int(jax.tree_util.tree_leaves(jax.eval_shape(support, theta))[0].shape[0])


def enumerate(max_support: int = 4096) -> Estimator:
    r"""Exact expectation and gradient by enumerating a small finite support.

    .. math::
       \mathbb{E}_{p(x;\theta)}[f(x;\theta)] = \sum_{x \in \mathcal X} p(x;\theta)\, f(x;\theta),

    differentiated exactly. Each unit evaluates f at all :math:`S = |\mathcal X|` support points
    (``family.capabilities.support``, e.g. the built-in bernoulli and categorical, or adapted
    discrete distributions), so ``num_samples`` (evaluations of f) must be a multiple of S;
    ``num_samples=S`` is the natural choice (more units repeat the same exact sum). The key is
    not used.

    * **Bias / variance**: exact; zero variance (the reference other estimators are tested
      against).
    * **Needs from f**: nothing. **From the family**: a finite support of at most
      ``max_support`` points; a family without one raises ``TypeError``, a larger one
      ``ValueError``.
    * **Derivative order**: all orders. The surrogate is the exact sum, so ``jax.hessian`` of
      :func:`scoregrad.expectation` is the exact Hessian.

    Args:
      max_support: the largest support enumerated (default 4096).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> r = sg.estimate_grad(lambda x: jnp.sum(x), sg.families.bernoulli(), jnp.zeros(2),
      ...                      jax.random.key(0), num_samples=4, estimator=sg.enumerate())
      >>> r.value, r.grad
      (Array(1., dtype=float32), Array([0.25, 0.25], dtype=float32))
    """
    if isinstance(max_support, bool) or not isinstance(max_support, (int, np.integer)):
        raise TypeError(f"enumerate(max_support=...) must be a Python int; got {max_support!r}.")
    if max_support < 1:
        raise ValueError(f"enumerate(max_support=...) must be >= 1; got {max_support}.")

    def bind(target):
        s = support_size(target.family, target.theta)
        if s > max_support:
            raise ValueError(
                f"enumerate(): family {target.family.name!r} at this theta has a support of {s} "
                f"points, more than max_support={max_support}. Raise sg.enumerate(max_support=...) "
                "if you can afford it, or use a sampling estimator."
            )

        def unit(model, params, draws, state):
            del draws, state  # no randomness: the exact sum
            points = jax.lax.stop_gradient(model.family.capabilities.support(params.theta))
            # f was traced for the sampler's draws: give it the support in their dtypes
            points = jax.tree_util.tree_map(lambda p, st: p.astype(st.dtype), points,
                                            target.x_struct)
            lp = jax.vmap(lambda p: model.eval_log_prob(params, p))(points)
            fv = jax.vmap(lambda p: model.eval_f(params, p))(points)
            total = jnp.sum(jnp.exp(lp).astype(fv.dtype) * fv)
            return UnitOut(total[None], jax.lax.stop_gradient(total)[None])

        return _plan("enumerate", unit, s)

    return estimator("enumerate", bind)


def _table(logits, categorical: bool):
    """Per-coordinate log-probabilities ``(D, K)`` of a factorized discrete family."""
    if not categorical:
        flat = jnp.reshape(logits, (-1,))
        return jnp.stack([jax.nn.log_sigmoid(-flat), jax.nn.log_sigmoid(flat)], axis=1)
    k = jnp.shape(logits)[-1]
    return jax.nn.log_softmax(jnp.reshape(logits, (-1, k)), axis=-1)


def _replaced(x, num_values):
    """``(D, K, *x.shape)``: x with coordinate d set to value k."""
    flat = x.reshape(-1)
    d = flat.shape[0]
    vals = jnp.arange(num_values).astype(x.dtype)
    eye = jnp.eye(d, dtype=bool)[:, None, :]
    rows = jnp.where(eye, vals[None, :, None], flat[None, None, :])
    return rows.reshape((d, num_values) + x.shape)


def _logits(family):
    """``(logits_fn, categorical)`` from the family's capabilities, else ``TypeError``."""
    caps = family.capabilities
    if caps.bernoulli_logits is not None:
        return caps.bernoulli_logits, False
    if caps.categorical_logits is not None:
        return caps.categorical_logits, True
    raise TypeError(
        "indecater() needs family.capabilities.categorical_logits or bernoulli_logits "
        "(independent discrete coordinates parameterized by logits, e.g. "
        "sg.families.categorical() or an adapted numpyro/distrax one); family "
        f"{family.name!r} has none. Use sg.score_function() for other families."
    )


def _indecater_cost(family, theta) -> int:
    logits_of, categorical = _logits(family)
    shape = jax.eval_shape(logits_of, theta).shape
    if not categorical:
        return 2 * math.prod(shape)
    return shape[-1] * math.prod(shape[:-1])


def indecater() -> Estimator:
    r"""IndeCateR: Rao-Blackwellized gradients for independent categorical (or Bernoulli) latents.

    For a factorized :math:`p(x;\theta) = \prod_d p_d(x_d;\theta_d)` and one draw :math:`x`,

    .. math::
       \hat g = \sum_{d=1}^{D}\sum_{k=1}^{K} \nabla_\theta\, p_d(k;\theta_d)\;
                f(x_1, \dots, x_{d-1}, k, x_{d+1}, \dots, x_D),

    i.e. coordinate d is summed out exactly while the others keep their sampled values.
    Unbiased because :math:`x_{-d}` is independent of :math:`x_d`. Each unit costs
    :math:`D \cdot K` evaluations of f (``num_samples`` must be a multiple of it); the value is
    the mean of f at the units' draws.

    * **Bias**: unbiased. **Needs from f**: nothing (any scalar). **From the family**:
      ``capabilities.categorical_logits`` (logits ``(..., K)``) or ``bernoulli_logits`` (K = 2):
      the built-in or adapted categorical / bernoulli; others raise ``TypeError``.
    * **Derivative order**: first order. The surrogate
      ``f(x) + sum_{d,k} (p_dk - stop_gradient(p_dk)) * stop_gradient(f_dk)`` gives the
      within-coordinate second derivatives but not the cross-coordinate ones, so ``jax.hessian``
      of :func:`scoregrad.expectation` is **not** correct for D > 1.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> r = sg.estimate_grad(lambda x: jnp.sum(x == 1).astype(jnp.float32),
      ...                      sg.families.categorical(), jnp.zeros((2, 3)), jax.random.key(0),
      ...                      num_samples=60, estimator=sg.indecater())
      >>> r.grad.shape
      (2, 3)

    References:
      De Smet, Sansone and Zuidberg Dos Martires, "Differentiable Sampling of Categorical
      Distributions Using the CatLog-Derivative Trick", NeurIPS 2023.
    """

    def unit(model, params, draws, state):
        del state
        x = draws.sample()
        logits_of, categorical = _logits(model.family)
        logp = _table(logits_of(params.theta), categorical)
        d, k = logp.shape
        points = _replaced(jnp.asarray(x), k)
        fv = jax.vmap(jax.vmap(lambda p: model.eval_f(params, p)))(points)
        first = jnp.reshape(x, (-1,))[0].astype(jnp.int32)
        f_x = fv[0, first]
        probs = jnp.exp(logp).astype(fv.dtype)
        grad_part = jnp.sum((probs - jax.lax.stop_gradient(probs)) * jax.lax.stop_gradient(fv))
        return UnitOut((f_x + grad_part)[None], jax.lax.stop_gradient(f_x)[None])

    def bind(target):
        return _plan("indecater", unit, _indecater_cost(target.family, target.theta))

    return estimator("indecater", bind)

