"""The user's model: a family of distributions p(x; theta)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax

from scoregrad._src import validation

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    r"""A parametric family :math:`p(x;\theta)`, given by its log-density and a sampler.

    Args:
      log_prob: ``log_prob(theta, x) -> scalar``: the log-density (or log-mass) of one draw ``x``.
        ``theta`` and ``x`` may be any pytrees. It must be a pure JAX function: the score
        :math:`\nabla_\theta \log p(x;\theta)` is derived from it with ``jax.grad``.
      sample: ``sample(theta, key) -> x``: ONE draw. The library ``vmap``\ s it over per-sample
        keys, so sample ``i`` depends only on ``(key, i)``. A sampler written as
        ``loc + scale * eps`` is differentiable in ``theta`` and :func:`scoregrad.pathwise` may use
        it.
      reparameterized: whether ``sample`` is differentiable in ``theta`` so that pathwise
        estimators are valid. ``None`` (the default for user families) means "unknown": pathwise
        then only checks that draws are floating point.
      name: a label for reports.
      check_theta: optional ``check_theta(theta) -> None`` raising ``ValueError``/``TypeError``
        at trace time when ``theta`` does not have the form the family expects.
      capabilities: extra, read-only information that special estimators use (for example the
        finite support of a discrete family). Built-in families fill it; users rarely need to.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> fam = sg.Family(
      ...     log_prob=lambda th, x: jax.scipy.stats.norm.logpdf(x, th, 1.0).sum(),
      ...     sample=lambda th, key: th + jax.random.normal(key, jnp.shape(th)),
      ... )
      >>> r = sg.estimate_grad(lambda x: jnp.sum(x**2), fam, jnp.array([1.0]),
      ...                      jax.random.key(0), num_samples=1000)
      >>> r.grad.shape
      (1,)
    """

    log_prob: Callable[[PyTree, PyTree], jax.Array]
    sample: Callable[[PyTree, jax.Array], PyTree]
    reparameterized: Optional[bool] = None
    name: str = "family"
    check_theta: Optional[Callable[[PyTree], None]] = None
    capabilities: Any = None

    def __post_init__(self):
        validation.check_callable(self.log_prob, "log_prob", "Family")
        validation.check_callable(self.sample, "sample", "Family")
        if self.reparameterized not in (None, True, False):
            raise TypeError(
                f"Family(reparameterized=...) must be None, True or False; got {self.reparameterized!r}."
            )
        if self.check_theta is not None:
            validation.check_callable(self.check_theta, "check_theta", "Family")

    def __repr__(self) -> str:
        return f"Family(name={self.name!r}, reparameterized={self.reparameterized})"
