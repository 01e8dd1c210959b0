r"""More built-in families: poisson, exponential, gamma, beta, dirichlet, multivariate normal.

Thin layers over ``jax.random`` and ``jax.scipy``. Parameters that must be positive (rates,
concentrations) are taken as given: pass them through e.g. ``jax.nn.softplus`` or ``jnp.exp`` of
an unconstrained parameter yourself; a non-positive value gives NaN log-densities, not an error.

The gamma, beta and dirichlet samplers of ``jax.random`` are differentiable in their
concentrations by implicit reparameterization (Figurnov et al. 2018), so these families declare
``reparameterized=True`` and :func:`scoregrad.pathwise` applies. Poisson draws are integers
(returned in theta's float dtype) and are not reparameterizable.

References:
  Figurnov, Mohamed and Mnih, "Implicit Reparameterization Gradients", NeurIPS 2018.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

from scoregrad._src import weak_derivative as wd
from scoregrad._src.families import float_array
from scoregrad._src.family import Capabilities, Family


def _caps(*, discrete: bool = False, **kw) -> Capabilities:
    return Capabilities(discrete=discrete, continuous=not discrete, **kw)


def _check_array(theta, who: str, what: str = "theta"):
    if isinstance(theta, dict):
        raise TypeError(f"families.{who}(): {what} must be an array; got a dict {sorted(theta)}.")
    float_array(theta, what, f"families.{who}()")


def _check_dict(theta, keys, who: str):
    if not isinstance(theta, dict) or set(theta) != set(keys):
        got = sorted(theta) if isinstance(theta, dict) else type(theta).__name__
        want = ", ".join(f"'{k}': array" for k in keys)
        raise TypeError(f"families.{who}(): theta must be a dict {{{want}}}; got {got}.")
    for k in keys:
        float_array(theta[k], f"theta['{k}']", f"families.{who}()")
    shapes = {k: jnp.shape(theta[k]) for k in keys}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"families.{who}(): the entries of theta must have the same shape; got {shapes}. "
            "Broadcast them first, e.g. jnp.broadcast_to(v, shape)."
        )


def _dtype(a):
    return jnp.result_type(a)


def poisson() -> Family:
    r"""Independent Poissons with log-rates theta: :math:`x_j \sim \mathrm{Poisson}(e^{\theta_j})`.

    A draw has theta's shape and (float) dtype with non-negative integer values. Not
    reparameterized; :func:`scoregrad.measure_valued` uses
    :math:`\partial_\lambda\mathbb{E}f = \mathbb{E}[f(X+1) - f(X)]`. Infinite support (no
    ``support`` capability).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> x = sg.families.poisson().sample(jnp.zeros(3), jax.random.key(0))
      >>> x.shape, x.dtype
      ((3,), dtype('float32'))
    """

    def sample(log_rate, key):
        rate = jnp.exp(log_rate)
        return jax.random.poisson(key, rate, jnp.shape(log_rate)).astype(_dtype(log_rate))

    def log_prob(log_rate, x):
        # -inf off the support (negative or non-integer counts, e.g. given samples); the double
        # where evaluates those at x = 0 so the in-support gradient stays exactly as it was
        x = jnp.asarray(x)
        inside = (x >= 0) & (x == jnp.floor(x))
        xs = jnp.where(inside, x, jnp.zeros_like(x))
        terms = xs * log_rate - jnp.exp(log_rate) - gammaln(xs + 1.0)
        return jnp.sum(jnp.where(inside, terms, -jnp.inf))

    return Family(
        log_prob=log_prob, sample=sample, reparameterized=False, name="poisson",
        check_theta=lambda th: _check_array(th, "poisson", "theta (the log-rates)"),
        capabilities=_caps(discrete=True, weak_derivative=wd.poisson),
    )


def exponential() -> Family:
    r"""Independent exponentials with rates theta (> 0): density :math:`\lambda e^{-\lambda x}`.

    theta is the **rate** (not its log), matching :func:`gamma`'s rate: exponential is gamma with
    concentration 1. The sampler ``E / rate`` is reparameterized; the measure-valued
    decomposition is :math:`c = 1/\lambda`, :math:`p^+ = \mathrm{Exp}(\lambda)`,
    :math:`p^- = \mathrm{Gamma}(2, \lambda)`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> x = sg.families.exponential().sample(jnp.ones(2), jax.random.key(0))
      >>> x.shape
      (2,)
    """

    def sample(rate, key):
        return jax.random.exponential(key, jnp.shape(rate), _dtype(rate)) / rate

    def log_prob(rate, x):
        # -inf for x < 0 (off the support); double where as in poisson
        x = jnp.asarray(x)
        inside = x >= 0
        xs = jnp.where(inside, x, jnp.zeros_like(x))
        return jnp.sum(jnp.where(inside, jnp.log(rate) - rate * xs, -jnp.inf))

    return Family(
        log_prob=log_prob, sample=sample, reparameterized=True, name="exponential",
        check_theta=lambda th: _check_array(th, "exponential", "theta (the rates)"),
        capabilities=_caps(weak_derivative=wd.exponential),
    )


def _gamma_log_prob(alpha, rate, x):
    return jnp.sum(alpha * jnp.log(rate) + (alpha - 1.0) * jnp.log(x) - rate * x - gammaln(alpha))


def gamma(concentration=None) -> Family:
    r"""Independent gammas with shape (concentration) :math:`\alpha` and rate :math:`\beta`.

    Density :math:`\beta^\alpha x^{\alpha-1} e^{-\beta x}/\Gamma(\alpha)`; both positive, taken as
    given. By default theta is ``{"concentration": array, "rate": array}`` of equal shapes. With
    ``concentration`` fixed here (an array broadcastable to the rate), theta is
    ``{"rate": array}``: this is the form :func:`scoregrad.measure_valued` supports
    (:math:`c = \alpha/\beta`, :math:`p^+ = \mathrm{Gamma}(\alpha,\beta)`,
    :math:`p^- = \mathrm{Gamma}(\alpha+1,\beta)`); it raises ``TypeError`` for a concentration
    in theta. The sampler ``jax.random.gamma(key, alpha) / rate`` is differentiable in both
    (implicit reparameterization for alpha).

    Args:
      concentration: ``None`` (theta holds it) or a fixed positive array.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> theta = {"concentration": jnp.full(2, 2.0), "rate": jnp.ones(2)}
      >>> sg.families.gamma().sample(theta, jax.random.key(0)).shape
      (2,)
    """
    if concentration is None:
        keys: tuple[str, ...] = ("concentration", "rate")
        alpha_of = lambda th: th["concentration"]  # noqa: E731
        decomposition = wd.gamma_unsupported
    else:
        float_array(concentration, "concentration", "families.gamma()")
        keys = ("rate",)
        alpha_of = lambda th: jnp.broadcast_to(  # noqa: E731
            jnp.asarray(concentration, _dtype(th["rate"])), jnp.shape(th["rate"]))
        decomposition = wd.gamma_rate(concentration)

    def sample(theta, key):
        rate = theta["rate"]
        return jax.random.gamma(key, alpha_of(theta), jnp.shape(rate), _dtype(rate)) / rate

    def log_prob(theta, x):
        return _gamma_log_prob(alpha_of(theta), theta["rate"], x)

    return Family(
        log_prob=log_prob, sample=sample, reparameterized=True, name="gamma",
        check_theta=lambda th: _check_dict(th, keys, "gamma"),
        capabilities=_caps(weak_derivative=decomposition),
    )


def beta() -> Family:
    r"""Independent betas, theta ``{"a": array, "b": array}`` (both > 0, equal shapes).

    Density :math:`x^{a-1}(1-x)^{b-1}/B(a,b)` on (0, 1). ``jax.random.beta`` is differentiable
    in ``a`` and ``b`` (through its gamma draws): reparameterized.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> x = sg.families.beta().sample({"a": jnp.ones(2), "b": jnp.ones(2)}, jax.random.key(0))
      >>> x.shape
      (2,)
    """

    def sample(theta, key):
        a = theta["a"]
        return jax.random.beta(key, a, theta["b"], jnp.shape(a), _dtype(a))

    def log_prob(theta, x):
        return jnp.sum(jax.scipy.stats.beta.logpdf(x, theta["a"], theta["b"]))

    return Family(
        log_prob=log_prob, sample=sample, reparameterized=True, name="beta",
        check_theta=lambda th: _check_dict(th, ("a", "b"), "beta"),
        capabilities=_caps(),
    )


def _check_dirichlet(theta):
    _check_array(theta, "dirichlet", "theta (the concentrations)")
    if jnp.ndim(theta) < 1 or jnp.shape(theta)[-1] < 2:
        raise ValueError(
            "families.dirichlet(): theta must have a trailing axis of K >= 2 concentrations; "
            f"got shape {jnp.shape(theta)}. Use e.g. jnp.ones((3,))."
        )


def dirichlet() -> Family:
    r"""Independent Dirichlets with concentrations theta of shape ``(..., K)`` (all > 0).

    A draw has theta's shape (points on the simplex along the last axis). Reparameterized
    through ``jax.random.dirichlet``'s gamma draws.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> x = sg.families.dirichlet().sample(jnp.ones(3), jax.random.key(0))
      >>> round(float(x.sum()), 5)
      1.0
    """

    def sample(alpha, key):
        return jax.random.dirichlet(key, alpha, jnp.shape(alpha)[:-1], _dtype(alpha))

    def log_prob(alpha, x):
        norm = gammaln(jnp.sum(alpha, -1)) - jnp.sum(gammaln(alpha), -1)
        return jnp.sum(norm) + jnp.sum((alpha - 1.0) * jnp.log(x))

    return Family(
        log_prob=log_prob, sample=sample, reparameterized=True, name="dirichlet",
        check_theta=_check_dirichlet,
        capabilities=_caps(),
    )


def _check_mvn(theta):
    keys = ("loc", "scale_tril")
    if not isinstance(theta, dict) or set(theta) != set(keys):
        got = sorted(theta) if isinstance(theta, dict) else type(theta).__name__
        raise TypeError(
            "families.multivariate_normal(): theta must be a dict {'loc': (d,) array, "
            f"'scale_tril': (d, d) array}}; got {got}."
        )
    for k in keys:
        float_array(theta[k], f"theta['{k}']", "families.multivariate_normal()")
    d = jnp.shape(theta["loc"])
    if len(d) != 1 or jnp.shape(theta["scale_tril"]) != (d[0], d[0]):
        raise ValueError(
            "families.multivariate_normal(): theta['loc'] must have shape (d,) and "
            f"theta['scale_tril'] shape (d, d); got {d} and {jnp.shape(theta['scale_tril'])}."
        )


def multivariate_normal() -> Family:
    r"""Multivariate normal :math:`\mathcal N(\mathrm{loc}, L L^\top)` with ``L = scale_tril``.

    theta is ``{"loc": (d,), "scale_tril": (d, d)}``; only the lower triangle of ``scale_tril`` is
    used (its strictly upper part gets zero gradient) and its diagonal must be positive. The
    sampler ``loc + L @ eps`` is reparameterized.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> theta = {"loc": jnp.zeros(2), "scale_tril": jnp.eye(2)}
      >>> sg.families.multivariate_normal().sample(theta, jax.random.key(0)).shape
      (2,)
    """

    def sample(theta, key):
        loc = theta["loc"]
        eps = jax.random.normal(key, jnp.shape(loc), _dtype(loc))
        return loc + jnp.tril(theta["scale_tril"]) @ eps

    def log_prob(theta, x):
        tril = jnp.tril(theta["scale_tril"])
        z = jax.scipy.linalg.solve_triangular(tril, x - theta["loc"], lower=True)
        d = z.shape[-1]
        log_det = jnp.sum(jnp.log(jnp.diagonal(tril)))
        return -0.5 * jnp.sum(z * z) - log_det - 0.5 * d * math.log(2 * math.pi)

    return Family(
        log_prob=log_prob, sample=sample, reparameterized=True, name="multivariate_normal",
        check_theta=_check_mvn,
        capabilities=_caps(),
    )
