r"""Families from numpyro and distrax distributions (optional extras: ``pip install scoregrad[adapters]``).

Both adapters take a function ``make(theta) -> distribution`` and an example theta (used once,
eagerly, to read the distribution's capabilities). The family's ``log_prob(theta, x)`` is the
distribution's log-density summed over its batch and event axes (one draw of the whole
distribution is one draw x), and ``sample(theta, key)`` is one draw of shape
``batch_shape + event_shape``. Capabilities carried over:

* **reparameterized**: numpyro's ``has_rsample``. Distrax has no such flag: integer draws mean
  ``False``, floating draws ``None`` (unknown: :func:`scoregrad.pathwise` then only checks that
  draws are floating point) unless you pass ``reparameterized=``.
* **discrete**: numpyro's ``support.is_discrete``; distrax: integer draws.
* **support** (for :func:`scoregrad.enumerate`): numpyro distributions with
  ``has_enumerate_support`` and ``distrax.Bernoulli``/``distrax.Categorical``: the joint support
  is every combination of the per-element values over the batch.
"""

from __future__ import annotations

import itertools
import math
import types
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src.family import Family

PyTree = Any


def _joint_support(values: np.ndarray, batch_shape, dtype):
    """All combinations of per-element ``values`` over the batch: ``(K**n, *batch_shape)``."""
    n = math.prod(batch_shape)
    idx = np.array(list(itertools.product(range(len(values)), repeat=n)), dtype=np.int64)
    rows = np.asarray(values)[idx].reshape((-1,) + tuple(batch_shape))
    return jnp.asarray(rows, dtype)


def _support_caps(values, batch_shape, dtype) -> dict:
    k = len(values)
    n = math.prod(batch_shape)
    return {
        "support": lambda theta: _joint_support(values, batch_shape, dtype),
        "support_size": lambda theta: k**n,
    }


def _check_make(make, where):
    if not callable(make):
        raise TypeError(
            f"{where}: `make` must be a function theta -> distribution, e.g. "
            f"lambda th: dist.Normal(th['loc'], th['scale']); got {type(make).__name__}."
        )


def from_numpyro(make: Callable[[PyTree], Any], example_theta: PyTree, *, name: Optional[str] = None) -> Family:
    r"""A :class:`scoregrad.Family` from a numpyro distribution built from theta.

    Args:
      make: ``make(theta) -> numpyro.distributions.Distribution`` (pure; theta any pytree).
      example_theta: a theta of the right shapes, used once to read the capabilities
        (``has_rsample`` -> ``reparameterized``, ``support.is_discrete``, enumerable support).
      name: a label (default: the distribution's class name).

    Returns:
      A Family; ``capabilities`` has ``kind="numpyro"``, ``discrete`` and, for enumerable
      distributions, ``support``/``support_size``.

    Raises:
      TypeError: if ``make`` is not callable or does not return a numpyro distribution.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import numpyro.distributions as dist
      >>> import scoregrad as sg
      >>> fam = sg.families.from_numpyro(lambda th: dist.Bernoulli(logits=th), jnp.zeros(2))
      >>> fam.reparameterized, fam.capabilities["support_size"](jnp.zeros(2))
      (False, 4)
    """
    _check_make(make, "from_numpyro")
    from numpyro.distributions import Distribution  # optional dependency

    d = make(example_theta)
    if not isinstance(d, Distribution):
        raise TypeError(
            f"from_numpyro: make(theta) must return a numpyro Distribution; got {type(d).__name__}."
        )
    discrete = bool(d.support.is_discrete)
    caps = {"kind": "numpyro", "discrete": discrete, "continuous": not discrete}
    if d.has_enumerate_support and d.event_shape == ():
        values = np.asarray(d.enumerate_support(expand=False)).reshape(-1)
        dtype = jax.eval_shape(lambda: d.sample(jax.random.key(0))).dtype
        caps.update(_support_caps(values, d.batch_shape, dtype))

    def log_prob(theta, x):
        return jnp.sum(make(theta).log_prob(x))

    def sample(theta, key):
        return make(theta).sample(key)

    return Family(
        log_prob=log_prob, sample=sample, reparameterized=bool(d.has_rsample),
        name=name or f"numpyro.{type(d).__name__}", capabilities=types.MappingProxyType(caps),
    )


def from_distrax(
    make: Callable[[PyTree], Any],
    example_theta: PyTree,
    *,
    reparameterized: Optional[bool] = None,
    name: Optional[str] = None,
) -> Family:
    r"""A :class:`scoregrad.Family` from a distrax distribution built from theta.

    Args:
      make: ``make(theta) -> distrax.Distribution`` (pure; theta any pytree).
      example_theta: a theta of the right shapes, used once to read the capabilities.
      reparameterized: override; default ``False`` for integer draws and ``None`` (unknown) for
        floating draws, since distrax does not declare it.
      name: a label (default: the distribution's class name).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> import distrax
      >>> fam = sg.families.from_distrax(lambda th: distrax.Normal(th, 1.0), jnp.zeros(2),
      ...                                reparameterized=True)
      >>> fam.sample(jnp.zeros(2), jax.random.key(0)).shape
      (2,)
    """
    _check_make(make, "from_distrax")
    d = make(example_theta)
    if not (hasattr(d, "log_prob") and hasattr(d, "sample") and hasattr(d, "batch_shape")):
        raise TypeError(
            f"from_distrax: make(theta) must return a distrax Distribution; got {type(d).__name__}."
        )
    struct = jax.eval_shape(lambda: d.sample(seed=jax.random.key(0)))
    discrete = not jnp.issubdtype(struct.dtype, jnp.floating)
    if reparameterized is None and discrete:
        reparameterized = False
    caps = {"kind": "distrax", "discrete": discrete, "continuous": not discrete}
    values = _distrax_values(d)
    if values is not None:
        caps.update(_support_caps(values, tuple(d.batch_shape), struct.dtype))

    def log_prob(theta, x):
        return jnp.sum(make(theta).log_prob(x))

    def sample(theta, key):
        return make(theta).sample(seed=key)

    return Family(
        log_prob=log_prob, sample=sample, reparameterized=reparameterized,
        name=name or f"distrax.{type(d).__name__}", capabilities=types.MappingProxyType(caps),
    )


def _distrax_values(d):
    """Per-element support values of distrax's finite discrete distributions, else None."""
    kind = type(d).__name__
    if kind == "Bernoulli":
        return np.array([0, 1])
    if kind == "Categorical" and tuple(d.event_shape) == ():
        return np.arange(int(d.num_categories))
    return None
