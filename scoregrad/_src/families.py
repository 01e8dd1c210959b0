"""Built-in families: thin layers over ``jax.random`` and ``jax.scipy.stats``."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src import weak_derivative as wd
from scoregrad._src.family import Capabilities, Family


def float_array(value, name: str, family: str):
    if isinstance(value, (list, tuple)):
        raise TypeError(
            f"{family}: {name} must be an array, not a {type(value).__name__} (a pytree of "
            "separate parameters); convert it with jnp.asarray(...)."
        )
    if not hasattr(value, "dtype") and not isinstance(value, (float, int)):
        raise TypeError(f"{family}: {name} must be an array; got {type(value).__name__}.")
    dtype = jnp.result_type(value)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{family}: {name} has dtype {dtype}; it must be floating point, "
            f"e.g. jnp.asarray({name}, jnp.float32)."
        )


def _check_normal(theta):
    if not isinstance(theta, dict) or set(theta) != {"loc", "scale"}:
        got = sorted(theta) if isinstance(theta, dict) else type(theta).__name__
        raise TypeError(
            "families.normal(): theta must be a dict {'loc': array, 'scale': array}; "
            f"got {got}."
        )
    float_array(theta["loc"], "theta['loc']", "families.normal()")
    float_array(theta["scale"], "theta['scale']", "families.normal()")
    if jnp.shape(theta["loc"]) != jnp.shape(theta["scale"]):
        raise ValueError(
            "families.normal(): theta['loc'] and theta['scale'] must have the same shape; got "
            f"{jnp.shape(theta['loc'])} and {jnp.shape(theta['scale'])}. Broadcast them first, "
            "e.g. jnp.broadcast_to(scale, loc.shape)."
        )


def _normal_sample(theta, key):
    loc, scale = theta["loc"], theta["scale"]
    eps = jax.random.normal(key, jnp.shape(loc), jnp.result_type(loc))
    return loc + scale * eps


def _normal_log_prob(theta, x):
    # Written with the reciprocal of scale (computed once per call, not per draw under vmap):
    # per-element divisions measured ~20% of a score-function step at d = 1000 on CPU.
    inv_scale = 1.0 / theta["scale"]
    z = (x - theta["loc"]) * inv_scale
    log_norm = jnp.sum(jnp.log(inv_scale)) - 0.5 * jnp.log(2 * jnp.pi) * jnp.size(z)
    return log_norm - 0.5 * jnp.sum(z * z)


def normal() -> Family:
    r"""Diagonal normal :math:`x \sim \mathcal N(\mathrm{loc}, \mathrm{diag}(\mathrm{scale}^2))`.

    theta is ``{"loc": array, "scale": array}`` of equal shapes with ``scale > 0``; a draw has
    loc's shape and dtype. The sampler is ``loc + scale * eps`` (reparameterized).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> fam = sg.families.normal()
      >>> x = fam.sample({"loc": jnp.zeros(3), "scale": jnp.ones(3)}, jax.random.key(0))
      >>> x.shape
      (3,)
    """
    return Family(
        log_prob=_normal_log_prob,
        sample=_normal_sample,
        reparameterized=True,
        name="normal",
        check_theta=_check_normal,
        capabilities=normal_capabilities(),
    )


def _check_logits(theta, who, min_ndim=0):
    if not hasattr(theta, "dtype") and not isinstance(theta, (float, list, tuple)):  # lists: below
        raise TypeError(
            f"families.{who}(): theta must be an array of logits; got {type(theta).__name__}."
        )
    float_array(theta, "theta (the logits)", f"families.{who}()")
    if jnp.ndim(theta) < min_ndim:
        raise ValueError(
            f"families.{who}(): theta must have a trailing axis of K categories; got shape "
            f"{jnp.shape(theta)}. Use e.g. jnp.zeros((K,))."
        )
    if min_ndim and jnp.shape(theta)[-1] < 1:
        raise ValueError(
            f"families.{who}(): theta must have a trailing axis of K >= 1 categories; got shape "
            f"{jnp.shape(theta)} (no categories to draw from). Use e.g. jnp.zeros((K,))."
        )


def _bernoulli_sample(logits, key):
    u = jax.random.uniform(key, jnp.shape(logits), jnp.result_type(logits))
    return (u < jax.nn.sigmoid(logits)).astype(jnp.result_type(logits))


def _bernoulli_log_prob_terms(logits, x):
    """Per-coordinate log-masses: x log sigma(l) + (1 - x) log sigma(-l), stable for any logit,
    and -inf where x is not 0 or 1 (outside the support: given samples are not clamped into it).

    Double where: the out-of-support coordinates are evaluated at x = 0, so nothing non-finite
    reaches the gradient of the in-support ones (and theirs is exactly the unmasked one).
    """
    x = jnp.asarray(x)
    inside = (x == 0) | (x == 1)
    xs = jnp.where(inside, x, jnp.zeros_like(x))
    terms = xs * jax.nn.log_sigmoid(logits) + (1 - xs) * jax.nn.log_sigmoid(-logits)
    return jnp.where(inside, terms, -jnp.inf)


def _bernoulli_log_prob(logits, x):
    return jnp.sum(_bernoulli_log_prob_terms(logits, x))


def _bernoulli_support(logits):
    shape = jnp.shape(logits)
    size = int(np.prod(shape, dtype=int))
    rows = np.array(list(itertools.product([0, 1], repeat=size)), dtype=np.float64)
    return jnp.asarray(rows.reshape((-1,) + tuple(shape)), jnp.result_type(logits))


def bernoulli() -> Family:
    r"""Independent Bernoullis with logits theta: :math:`P(x_j = 1) = \sigma(\theta_j)`.

    A draw has theta's shape and dtype with values in {0, 1}. The sampler is not differentiable
    (``reparameterized=False``): use the score function, or a relaxation for pathwise-style
    gradients.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> x = sg.families.bernoulli().sample(jnp.zeros(4), jax.random.key(0))
      >>> x.dtype, x.shape
      (dtype('float32'), (4,))
    """
    return Family(
        log_prob=_bernoulli_log_prob,
        sample=_bernoulli_sample,
        reparameterized=False,
        name="bernoulli",
        check_theta=lambda th: _check_logits(th, "bernoulli"),
        capabilities=bernoulli_capabilities(weak_derivative=wd.bernoulli),
    )


def _categorical_sample(logits, key):
    return jax.random.categorical(key, logits, axis=-1)


def _categorical_log_prob_terms(logits, x):
    """Per-categorical log-masses, shape ``logits.shape[:-1]``; -inf for an index outside
    ``[0, K)`` (a negative index must not wrap to the last category, nor one >= K be clipped
    or filled). Double where: such indices read category 0, so nothing non-finite reaches the
    gradient of the valid ones."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    x = jnp.asarray(x)
    k = jnp.shape(logits)[-1]
    idx = x.astype(jnp.int32)
    inside = (idx >= 0) & (idx < k) & (idx.astype(x.dtype) == x)  # a non-integer is outside
    idx = jnp.where(inside, idx, 0)
    picked = jnp.take_along_axis(logp, idx[..., None], axis=-1)[..., 0]
    return jnp.where(inside, picked, -jnp.inf)


def _categorical_log_prob(logits, x):
    return jnp.sum(_categorical_log_prob_terms(logits, x))


def _categorical_support(logits):
    shape = jnp.shape(logits)
    k, batch = shape[-1], shape[:-1]
    size = int(np.prod(batch, dtype=int))
    rows = np.array(list(itertools.product(range(k), repeat=size)), dtype=np.int32)
    return jnp.asarray(rows.reshape((-1,) + tuple(batch)))


def _identity(theta):
    return theta


def _normal_inverse_cdf(theta, u):
    return theta["loc"] + theta["scale"] * jax.scipy.special.ndtri(u)


def _normal_moments(theta):
    return theta["loc"], jnp.square(theta["scale"])


def _normal_log_prob_terms(theta, x):
    return jax.scipy.stats.norm.logpdf(x, theta["loc"], theta["scale"])


def _normal_cdf(theta, x):
    return jax.scipy.stats.norm.cdf(x, theta["loc"], theta["scale"])


def _relaxation(logits: Callable, categorical: bool) -> Callable:
    """``temperature -> Family``: the (binary) Concrete relaxation at ``logits(theta)``."""

    def relaxation(temperature) -> Family:
        from scoregrad._src.estimators import relaxed  # the estimators import the families

        base = (relaxed.relaxed_categorical if categorical else relaxed.relaxed_bernoulli)(temperature)
        return dataclasses.replace(
            base, log_prob=lambda th, y: base.log_prob(logits(th), y),
            sample=lambda th, key: base.sample(logits(th), key), check_theta=None,
        )

    return relaxation


def bernoulli_capabilities(logits: Callable = _identity, dtype=None, **extra) -> Capabilities:
    """The capabilities of independent Bernoullis with ``P(x_j = 1) = sigmoid(logits(theta)_j)``,
    draws of ``dtype`` (default: the logits' dtype). ``extra`` adds or overrides fields."""

    def as_draw(b, lg):
        return b.astype(jnp.result_type(lg) if dtype is None else dtype)

    def cdf(th, x):
        p0 = jax.nn.sigmoid(-logits(th))
        return jnp.where(x < 0, 0.0, jnp.where(x < 1, p0, 1.0)).astype(p0.dtype)

    fields = dict(
        discrete=True, continuous=False, bernoulli_logits=logits,
        support=lambda th: as_draw(_bernoulli_support(logits(th)), logits(th)),
        support_size=lambda th: 2 ** int(np.prod(jnp.shape(logits(th)), dtype=int)),
        inverse_cdf=lambda th, u: as_draw(u < jax.nn.sigmoid(logits(th)), logits(th)),
        moments=lambda th: (jax.nn.sigmoid(logits(th)),
                            jax.nn.sigmoid(logits(th)) * jax.nn.sigmoid(-logits(th))),
        log_prob_terms=lambda th, x: _bernoulli_log_prob_terms(logits(th), x),
        cdf=cdf, relaxation=_relaxation(logits, categorical=False),
    )
    return Capabilities(**{**fields, **extra})


def categorical_capabilities(logits: Callable = _identity, dtype=jnp.int32, **extra) -> Capabilities:
    """The capabilities of independent categoricals with logits ``logits(theta)`` of shape
    ``(..., K)`` and integer draws of ``dtype``. ``extra`` adds or overrides fields."""

    def inverse_cdf(th, u):
        cum = jnp.cumsum(jax.nn.softmax(logits(th), axis=-1), axis=-1)[..., :-1]
        return jnp.sum(u[..., None] > cum, axis=-1).astype(dtype)

    def cdf(th, x):
        cum = jnp.cumsum(jax.nn.softmax(logits(th), axis=-1), axis=-1)
        k = jnp.shape(cum)[-1]
        idx = jnp.clip(jnp.floor(x).astype(jnp.int32), 0, k - 1)
        picked = jnp.take_along_axis(cum, idx[..., None], axis=-1)[..., 0]
        return jnp.where(x < 0, 0.0, picked).astype(cum.dtype)

    def size(th):
        shape = jnp.shape(logits(th))
        return int(shape[-1]) ** int(np.prod(shape[:-1], dtype=int))

    fields = dict(
        discrete=True, continuous=False, categorical_logits=logits,
        support=lambda th: _categorical_support(logits(th)).astype(dtype),
        support_size=size, inverse_cdf=inverse_cdf, cdf=cdf,
        log_prob_terms=lambda th, x: _categorical_log_prob_terms(logits(th), x),
        relaxation=_relaxation(logits, categorical=True),
    )
    return Capabilities(**{**fields, **extra})


def normal_capabilities(**extra) -> Capabilities:
    """The capabilities of the built-in diagonal normal (theta = ``{"loc", "scale"}``)."""
    fields = dict(
        continuous=True, discrete=False, inverse_cdf=_normal_inverse_cdf, moments=_normal_moments,
        weak_derivative=wd.normal, log_prob_terms=_normal_log_prob_terms, cdf=_normal_cdf,
    )
    return Capabilities(**{**fields, **extra})


def categorical() -> Family:
    r"""Independent categoricals with logits theta of shape ``(..., K)``.

    A draw is an int32 array of shape ``theta.shape[:-1]`` with values in ``[0, K)``. Not
    reparameterized.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> x = sg.families.categorical().sample(jnp.zeros((2, 3)), jax.random.key(0))
      >>> x.shape, x.dtype
      ((2,), dtype('int32'))
    """
    return Family(
        log_prob=_categorical_log_prob,
        sample=_categorical_sample,
        reparameterized=False,
        name="categorical",
        check_theta=lambda th: _check_logits(th, "categorical", min_ndim=1),
        capabilities=categorical_capabilities(),
    )
