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
* **bernoulli_logits / categorical_logits** (ARM, DisARM, REBAR, RELAX, Gumbel-softmax,
  straight-through, IndeCateR, measure-valued) with **inverse_cdf**, **moments**, **cdf** and
  **relaxation** for numpyro's and distrax's Bernoulli and Categorical, whatever theta is (the
  logits are read from the distribution built from theta, so gradients flow through ``make``).
* **inverse_cdf**, **cdf**, **moments**, **log_prob_terms** where the distribution implements
  them (numpyro ``icdf``/``cdf``/``mean``/``variance``; distrax ``cdf``/``mean``/``variance``
  and the normal's quantile), for distributions without event dimensions.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src import families
from scoregrad._src.family import Capabilities, Family

PyTree = Any


def _joint_support(values: np.ndarray, batch_shape, dtype):
    """All combinations of per-element ``values`` over the batch: ``(K**n, *batch_shape)``."""
    n = math.prod(batch_shape)
    idx = np.array(list(itertools.product(range(len(values)), repeat=n)), dtype=np.int64)
    rows = np.asarray(values)[idx].reshape((-1,) + tuple(batch_shape))
    return jnp.asarray(rows, dtype)


def _support_fields(values, batch_shape, dtype) -> dict:
    k = len(values)
    n = math.prod(batch_shape)
    return {
        "support": lambda theta: _joint_support(values, batch_shape, dtype),
        "support_size": lambda theta: k**n,
    }


def _works(fn) -> bool:
    """Whether ``fn()`` traces (a distribution method may raise NotImplementedError)."""
    try:
        jax.eval_shape(fn)
    except (NotImplementedError, AttributeError, TypeError, ValueError):
        return False
    return True


def _generic_fields(make, d, struct, discrete: bool, icdf, cdf, moments) -> dict:
    """Capabilities read from the distribution's own methods, where it has them."""
    fields: dict = {"discrete": discrete, "continuous": not discrete}
    if tuple(d.event_shape) != ():
        return fields
    fields["log_prob_terms"] = lambda th, x: make(th).log_prob(x)
    u = jnp.full(struct.shape, 0.5, struct.dtype) if not discrete else None
    if icdf is not None and u is not None and _works(lambda: icdf(d, u)):
        fields["inverse_cdf"] = lambda th, u: icdf(make(th), u)
    if cdf is not None and _works(lambda: cdf(d, jnp.zeros(struct.shape, struct.dtype))):
        fields["cdf"] = lambda th, x: cdf(make(th), x)
    if moments is not None and _works(lambda: moments(d)):
        fields["moments"] = lambda th: moments(make(th))
    return fields


def _logit_capabilities(categorical: bool, make, d, struct, fields: dict) -> Capabilities:
    """Bernoulli/categorical distributions: the parameterization by logits, whatever theta is."""
    if not categorical:
        shape = tuple(d.batch_shape)
        logits = lambda th: jnp.broadcast_to(make(th).logits, shape)  # noqa: E731
        base = families.bernoulli_capabilities(logits, dtype=struct.dtype)
    else:
        shape = tuple(d.batch_shape) + (int(jnp.shape(d.logits)[-1]),)
        logits = lambda th: jnp.broadcast_to(make(th).logits, shape)  # noqa: E731
        base = families.categorical_capabilities(logits, dtype=struct.dtype)
    # the distribution's own per-coordinate log-probs and CDF where it has them; ours otherwise
    keep = {k: v for k, v in fields.items() if k in ("log_prob_terms",)}
    return dataclasses.replace(base, **keep)


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
      A Family whose :class:`~scoregrad.Capabilities` are read from the distribution:
      ``discrete``/``continuous``; ``support``/``support_size`` for enumerable ones;
      ``bernoulli_logits``/``categorical_logits`` (and ``inverse_cdf``, ``moments``, ...) for
      Bernoulli/Categorical; ``inverse_cdf``, ``cdf``, ``moments``, ``log_prob_terms`` where
      the distribution implements ``icdf``, ``cdf``, ``mean``/``variance`` (e.g. Normal).

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
    caps = _numpyro_capabilities(make, d)

    def log_prob(theta, x):
        return jnp.sum(make(theta).log_prob(x))

    def sample(theta, key):
        return make(theta).sample(key)

    return Family(
        log_prob=log_prob, sample=sample, reparameterized=bool(d.has_rsample),
        name=name or f"numpyro.{type(d).__name__}", capabilities=caps,
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
    caps = _distrax_capabilities(make, d, struct, discrete)

    def log_prob(theta, x):
        return jnp.sum(make(theta).log_prob(x))

    def sample(theta, key):
        return make(theta).sample(seed=key)

    return Family(
        log_prob=log_prob, sample=sample, reparameterized=reparameterized,
        name=name or f"distrax.{type(d).__name__}", capabilities=caps,
    )


def _numpyro_capabilities(make, d) -> Capabilities:
    import numpyro.distributions as nd

    struct = jax.eval_shape(lambda: d.sample(jax.random.key(0)))
    discrete = bool(d.support.is_discrete)
    fields = _generic_fields(
        make, d, struct, discrete, icdf=lambda dist, u: dist.icdf(u),
        cdf=lambda dist, x: dist.cdf(x), moments=lambda dist: (dist.mean, dist.variance),
    )
    if isinstance(d, (nd.BernoulliLogits, nd.BernoulliProbs)):
        return _logit_capabilities(False, make, d, struct, fields)
    if isinstance(d, (nd.CategoricalLogits, nd.CategoricalProbs)):
        return _logit_capabilities(True, make, d, struct, fields)
    if d.has_enumerate_support and d.event_shape == ():
        values = np.asarray(d.enumerate_support(expand=False)).reshape(-1)
        fields.update(_support_fields(values, d.batch_shape, struct.dtype))
    return Capabilities(**fields)


def _distrax_capabilities(make, d, struct, discrete: bool) -> Capabilities:
    try:
        import distrax
    except ImportError:  # pragma: no cover - a distrax-like object without distrax installed
        return Capabilities(discrete=discrete, continuous=not discrete)

    def icdf(dist, u):  # distrax has no quantile method; the normal's is known
        if not isinstance(dist, distrax.Normal):
            raise NotImplementedError
        return dist.loc + dist.scale * jax.scipy.special.ndtri(u)

    fields = _generic_fields(
        make, d, struct, discrete, icdf=icdf, cdf=lambda dist, x: dist.cdf(x),
        moments=lambda dist: (dist.mean(), dist.variance()),
    )
    if isinstance(d, distrax.Bernoulli):
        return _logit_capabilities(False, make, d, struct, fields)
    if isinstance(d, distrax.Categorical) and tuple(d.event_shape) == ():
        return _logit_capabilities(True, make, d, struct, fields)
    return Capabilities(**fields)
