"""The user's model: a family of distributions p(x; theta)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax

from scoregrad._src import validation

PyTree = Any


_MISSING_FIX = {
    "support": "a finite support enumerator support(theta) -> points (stacked on axis 0)",
    "bernoulli_logits": "independent Bernoullis parameterized by logits: bernoulli_logits(theta) -> logits",
    "categorical_logits": "independent categoricals parameterized by logits: categorical_logits(theta) -> logits (..., K)",
    "inverse_cdf": "an inverse CDF inverse_cdf(theta, u) -> draw, u uniform on (0, 1) shaped like the draw",
    "relaxation": "a continuous relaxation relaxation(temperature) -> Family",
    "weak_derivative": "a weak-derivative decomposition weak_derivative(theta, x, key) -> WeakDerivative",
    "moments": "the mean and diagonal variance of the draw: moments(theta) -> (mean, variance)",
    "log_prob_terms": "per-coordinate log-densities log_prob_terms(theta, x) summing to log_prob",
    "cdf": "a CDF cdf(theta, x) -> P(X <= x) per coordinate",
}


@dataclasses.dataclass(frozen=True)
class Capabilities:
    r"""What a :class:`Family` can do beyond ``log_prob`` and ``sample``: typed, optional fields.

    Every field is ``None`` when the family does not have that capability. An estimator that needs
    one asks for it by name with :func:`require` and raises ``TypeError`` naming it when it is
    absent (never a silent fallback). Functions must be pure JAX functions of theta's shapes.

    Attributes:
      discrete: the draws are discrete (informational; ``None``: unknown).
      continuous: the draws are continuous (informational; ``None``: unknown).
      support: ``support(theta) -> points``: every point of a finite support, stacked on a
        leading axis (:func:`scoregrad.enumerate`).
      support_size: ``support_size(theta) -> int`` from shapes only (default: read from
        ``jax.eval_shape(support, theta)``).
      bernoulli_logits: ``bernoulli_logits(theta) -> logits``: the family is independent
        Bernoullis with :math:`P(x_j = 1) = \sigma(\mathrm{logits}_j)`, a draw shaped like the
        logits (ARM, DisARM, REBAR, RELAX, Gumbel-softmax, straight-through, IndeCateR,
        measure-valued).
      categorical_logits: ``categorical_logits(theta) -> logits`` of shape ``(..., K)``: the family
        is independent categoricals, an integer draw of shape ``logits.shape[:-1]``
        (Gumbel-softmax, straight-through, IndeCateR).
      inverse_cdf: ``inverse_cdf(theta, u) -> x``: a draw from uniform noise ``u`` on (0, 1) of the
        draw's shape (antithetic, stratified and QMC designs).
      relaxation: ``relaxation(temperature) -> Family``: a reparameterized continuous relaxation
        with the same theta.
      weak_derivative: ``weak_derivative(theta, x, key) -> WeakDerivative``
        (:func:`scoregrad.measure_valued`; see :mod:`scoregrad._src.weak_derivative`).
      moments: ``moments(theta) -> (mean, variance)``, each shaped like the draw (the delta-method
        control variate).
      log_prob_terms: ``log_prob_terms(theta, x) -> array`` of per-coordinate log-densities whose
        sum is ``log_prob(theta, x)`` (Rao-Blackwellization).
      cdf: ``cdf(theta, x) -> array``: :math:`P(X_j \le x_j)` per coordinate.

    For backward compatibility a mapping with these keys is accepted by ``Family(capabilities=)``
    (unknown keys such as the old ``"kind"`` are dropped), and ``caps["support"]``,
    ``"support" in caps`` and ``caps.get("support")`` read the fields.
    """

    discrete: Optional[bool] = None
    continuous: Optional[bool] = None
    support: Optional[Callable[[PyTree], PyTree]] = None
    support_size: Optional[Callable[[PyTree], int]] = None
    bernoulli_logits: Optional[Callable[[PyTree], jax.Array]] = None
    categorical_logits: Optional[Callable[[PyTree], jax.Array]] = None
    inverse_cdf: Optional[Callable[[PyTree, jax.Array], PyTree]] = None
    relaxation: Optional[Callable[[float], Any]] = None
    weak_derivative: Optional[Callable[..., Any]] = None
    moments: Optional[Callable[[PyTree], tuple]] = None
    log_prob_terms: Optional[Callable[[PyTree, PyTree], jax.Array]] = None
    cdf: Optional[Callable[[PyTree, PyTree], jax.Array]] = None

    @classmethod
    def from_mapping(cls, mapping) -> "Capabilities":
        """The record for an old-style mapping: known keys kept, others (``"kind"``) dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in mapping.items() if k in names})

    def __repr__(self) -> str:
        present = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        flags = [n for n in present if n in ("discrete", "continuous")]
        shown = [f"{n}={getattr(self, n)}" for n in flags] + [n for n in present if n not in flags]
        return f"Capabilities({', '.join(shown)})"

    # Backward-compatible mapping-style reads: caps["support"], "support" in caps, caps.get(...)
    def __getitem__(self, name: str):
        value = getattr(self, name, None) if isinstance(name, str) else None
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and getattr(self, name, None) is not None

    def get(self, name: str, default=None):
        value = getattr(self, name, None) if isinstance(name, str) else None
        return default if value is None else value


def require(family: "Family", name: str, who: str, hint: str = ""):
    """``family.capabilities.<name>``, or ``TypeError`` naming the capability ``who`` needs."""
    value = getattr(family.capabilities, name)
    if value is None:
        raise TypeError(
            f"{who} needs family.capabilities.{name} ({_MISSING_FIX[name]}); family "
            f"{family.name!r} has none.{' ' + hint if hint else ''}"
        )
    return value


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
      capabilities: a :class:`Capabilities` record: typed optional fields (``support``,
        ``bernoulli_logits``, ``categorical_logits``, ``inverse_cdf``, ``relaxation``,
        ``weak_derivative``, ``moments``, ``log_prob_terms``, ``cdf`` and the ``discrete`` /
        ``continuous`` flags), each ``None`` when absent. Estimators that need one ask for it by
        name and raise ``TypeError`` naming it (e.g. :func:`scoregrad.arm` needs
        ``bernoulli_logits``, :func:`scoregrad.enumerate` ``support``, the sampling designs
        ``inverse_cdf``). Built-in families and the numpyro/distrax adapters fill them; a
        mapping with the same keys is accepted and converted (unknown keys dropped).

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
    capabilities: Capabilities = Capabilities()

    def __post_init__(self):
        validation.check_callable(self.log_prob, "log_prob", "Family")
        validation.check_callable(self.sample, "sample", "Family")
        if self.reparameterized not in (None, True, False):
            raise TypeError(
                f"Family(reparameterized=...) must be None, True or False; got {self.reparameterized!r}."
            )
        if self.check_theta is not None:
            validation.check_callable(self.check_theta, "check_theta", "Family")
        caps = self.capabilities
        if caps is None:
            caps = Capabilities()
        elif isinstance(caps, Mapping):
            caps = Capabilities.from_mapping(caps)
        elif not isinstance(caps, Capabilities):
            raise TypeError(
                "Family(capabilities=...) must be a scoregrad.Capabilities record (or a mapping "
                f"of its fields); got {type(caps).__name__}."
            )
        object.__setattr__(self, "capabilities", caps)

    def __repr__(self) -> str:
        return f"Family(name={self.name!r}, reparameterized={self.reparameterized})"
