r"""Weak-derivative (measure-valued) decompositions of the built-in families.

For a parameter coordinate :math:`\theta_j` of a family :math:`p(x;\theta)`, a weak derivative is a
triple :math:`(c_j, p^+_j, p^-_j)` of a constant and two probability distributions with

.. math::
   \partial_{\theta_j} p(x;\theta) = c_j(\theta)\,\big(p^+_j(x) - p^-_j(x)\big),
   \qquad
   \partial_{\theta_j}\mathbb{E}_p[f] = c_j\big(\mathbb{E}_{p^+_j}[f] - \mathbb{E}_{p^-_j}[f]\big).

A decomposition is a function ``weak_derivative(theta, x, key) -> WeakDerivative`` where ``x`` is
ONE draw from ``p(x; theta)`` (drawn by the family's own sampler) and ``key`` is a fresh key for
any extra noise. It returns the coupled positive/negative points for every coordinate: all of them
share ``x`` in the other coordinates and share noise where the two parts allow it (common random
numbers), which is what makes the estimator's variance small. Both parts of coordinate ``j`` are
rows of the table ``[x, *points]``; ``plus``/``minus`` hold their row indices.

Families carry their decomposition in ``capabilities.weak_derivative`` (a
:class:`scoregrad.Capabilities` field): the built-in normal, bernoulli, poisson, exponential and
gamma fill it. A family with ``capabilities.bernoulli_logits`` and no decomposition of its own
(e.g. an adapted numpyro/distrax Bernoulli) gets :func:`bernoulli` in its logits.

References:
  Pflug, "Sampling derivatives of probabilities", Computing 1989. Heidergott and Vázquez-Abad,
  "Measure-valued differentiation for Markov chains", 2008. Mohamed, Rosca, Figurnov and Mnih,
  "Monte Carlo Gradient Estimation in Machine Learning", JMLR 2020, §6 and Table 1.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class WeakDerivative(NamedTuple):
    """Coupled weak-derivative points of one draw.

    Attributes:
      points: the extra evaluation points, stacked on a leading axis ``E``; each has the draw's
        shape. Row ``0`` of the evaluation table is the draw itself, row ``1 + e`` is
        ``points[e]``.
      plus: pytree like theta of int32 arrays (each leaf's shape): the table row of
        :math:`p^+_j` for each coordinate.
      minus: the same for :math:`p^-_j`.
      coef: pytree like theta: :math:`c_j(\\theta)` (including the chain rule of the
        parametrization).
    """

    points: jax.Array
    plus: PyTree
    minus: PyTree
    coef: PyTree


def replace_each(x: jax.Array, values: jax.Array) -> jax.Array:
    """``(n, *x.shape)``: row ``j`` is ``x`` with its ``j``-th (flat) coordinate set to ``values[j]``."""
    flat, vals = x.reshape(-1), jnp.broadcast_to(values, x.shape).reshape(-1).astype(x.dtype)
    n = flat.shape[0]
    rows = jnp.where(jnp.eye(n, dtype=bool), vals[None, :], flat[None, :])
    return rows.reshape((n,) + x.shape)


def _rows(shape, offset: int) -> jax.Array:
    """Row indices ``offset + j`` laid out in a leaf's shape."""
    n = math.prod(shape)
    return (offset + jnp.arange(n, dtype=jnp.int32)).reshape(shape)


def _zeros(shape) -> jax.Array:
    return jnp.zeros(shape, jnp.int32)


def normal(theta, x, key) -> WeakDerivative:
    r"""Diagonal normal ``{"loc", "scale"}`` (Mohamed et al. 2020, Table 1).

    * loc: :math:`c = 1/(\sigma\sqrt{2\pi})`, :math:`p^\pm = \mu \pm \sigma R` with ``R`` a
      standard Rayleigh draw shared by both parts (Weibull with shape 2).
    * scale: :math:`c = 1/\sigma`, :math:`p^+ = \mu + \sigma M` with ``M`` a standard double-sided
      Maxwell draw, :math:`p^- = \mathcal N(\mu, \sigma^2)` = the draw ``x`` itself. Coupled by
      ``M = sign(z) * sqrt(z^2 + a^2 + b^2)`` where ``z = (x - loc) / scale`` is the draw's own
      noise and ``a, b`` fresh normals.
    """
    loc, scale = theta["loc"], theta["scale"]
    shape, n = jnp.shape(loc), math.prod(jnp.shape(loc))
    z = (x - loc) / scale
    a, b = jax.random.normal(key, (2,) + tuple(shape), jnp.result_type(x))
    rayleigh = jnp.sqrt(a * a + b * b)
    maxwell = jnp.where(z >= 0, 1.0, -1.0) * jnp.sqrt(z * z + a * a + b * b)
    points = jnp.concatenate([
        replace_each(x, loc + scale * rayleigh),
        replace_each(x, loc - scale * rayleigh),
        replace_each(x, loc + scale * maxwell),
    ])
    plus = {"loc": _rows(shape, 1), "scale": _rows(shape, 1 + 2 * n)}
    minus = {"loc": _rows(shape, 1 + n), "scale": _zeros(shape)}
    coef = {"loc": 1.0 / (scale * math.sqrt(2 * math.pi)), "scale": 1.0 / scale}
    return WeakDerivative(points, plus, minus, coef)


def bernoulli(logits, x, key) -> WeakDerivative:
    r"""Bernoulli with logits: :math:`\partial_p \mathbb{E} f = f(1) - f(0)`, times
    :math:`\partial p/\partial \theta = \sigma(\theta)\sigma(-\theta)`. Coordinate ``j``'s other
    part is ``x`` with coordinate ``j`` flipped; no extra noise."""
    del key
    shape = jnp.shape(logits)
    flipped = _rows(shape, 1)
    one = jnp.asarray(x) > 0.5
    plus = jnp.where(one, 0, flipped).astype(jnp.int32)
    minus = jnp.where(one, flipped, 0).astype(jnp.int32)
    coef = jax.nn.sigmoid(logits) * jax.nn.sigmoid(-logits)
    return WeakDerivative(replace_each(x, 1 - x), plus, minus, coef)


def poisson(log_rate, x, key) -> WeakDerivative:
    r"""Poisson with log-rate: :math:`\partial_\lambda \mathbb{E} f = \mathbb{E}[f(X + 1) - f(X)]`
    (:math:`c = 1`, :math:`p^+ = X + 1`, :math:`p^- = X`, same ``X``), times
    :math:`\partial\lambda/\partial\theta = \lambda`."""
    del key
    shape = jnp.shape(log_rate)
    return WeakDerivative(replace_each(x, x + 1), _rows(shape, 1), _zeros(shape), jnp.exp(log_rate))


def exponential(rate, x, key) -> WeakDerivative:
    r"""Exponential with rate :math:`\lambda`: :math:`c = 1/\lambda`, :math:`p^+ = \mathrm{Exp}(\lambda)`
    (the draw ``x``), :math:`p^- = \mathrm{Gamma}(2, \lambda)` coupled as ``x + E/λ`` with a fresh
    standard exponential ``E``."""
    shape = jnp.shape(rate)
    extra = jax.random.exponential(key, shape, jnp.result_type(x)) / rate
    return WeakDerivative(replace_each(x, x + extra), _zeros(shape), _rows(shape, 1), 1.0 / rate)


def gamma_rate(concentration):
    r"""Gamma with fixed concentration :math:`\alpha` and rate :math:`\beta` in theta:
    :math:`c = \alpha/\beta`, :math:`p^+ = \mathrm{Gamma}(\alpha, \beta)` (the draw ``x``),
    :math:`p^- = \mathrm{Gamma}(\alpha + 1, \beta)` coupled as ``x + E/β``."""

    def decompose(theta, x, key) -> WeakDerivative:
        rate = theta["rate"]
        shape = jnp.shape(rate)
        extra = jax.random.exponential(key, shape, jnp.result_type(x)) / rate
        alpha = jnp.broadcast_to(jnp.asarray(concentration, jnp.result_type(rate)), shape)
        return WeakDerivative(
            replace_each(x, x + extra), {"rate": _zeros(shape)}, {"rate": _rows(shape, 1)},
            {"rate": alpha / rate},
        )

    return decompose


def gamma_unsupported(theta, x, key):
    """Gamma with the concentration in theta: no weak derivative is implemented for it."""
    del theta, x, key
    raise TypeError(
        "measure_valued() has no weak derivative for the gamma family's concentration (only for "
        "its rate). Fix the concentration with sg.families.gamma(concentration=alpha) so that "
        "theta is {'rate': ...}, or use sg.pathwise() (implicit reparameterization) or "
        "sg.score_function() for the concentration."
    )

