r"""Greeks by Monte Carlo under Black–Scholes: likelihood ratio, pathwise and mixed.

Under Black–Scholes the asset follows geometric Brownian motion,
:math:`S_t = S_0 \exp\big((r - \sigma^2/2)t + \sigma W_t\big)`, and an option paying
:math:`h(S)` at maturity :math:`T` is worth :math:`V(\theta) = e^{-rT}\,\mathbb E_\theta[h(S)]`
with :math:`\theta = (S_0, \sigma, r)` = ``{"spot", "vol", "rate"}``. Its Greeks are derivatives
of an expectation whose *distribution* depends on :math:`\theta` — the setting of the
score-function estimator, which finance calls the **likelihood-ratio (LR)** method
(Broadie & Glasserman 1996):

* **Likelihood ratio** (``sg.score_function()``): needs only the density of :math:`S`, so it
  prices Greeks of discontinuous payoffs (the digital option) and second derivatives (gamma,
  through ``jax.hessian`` of :func:`scoregrad.expectation`, which is DiCE-correct).
* **Pathwise** (``sg.pathwise()``): differentiates the payoff along the simulated path. Lower
  variance when the payoff is Lipschitz (call, Asian), but **wrong** for the digital's delta
  (the payoff's derivative is zero almost everywhere) and for any gamma of a kinked payoff.
* **Mixed** (pathwise, then likelihood ratio): first-order Greeks pathwise; gamma as the
  likelihood-ratio derivative of the pathwise delta, valid for Lipschitz payoffs.

Every Monte Carlo Greek here is checked in the tests against a closed form: Black–Scholes for
the call and the digital, and the geometric-average Asian option (log-normal average).

References:
  Broadie and Glasserman, "Estimating Security Price Derivatives Using Simulation", Management
  Science 1996. Glasserman, "Monte Carlo Methods in Financial Engineering", 2003, ch. 7.
  Black and Scholes, "The Pricing of Options and Corporate Liabilities", 1973. Kemna and Vorst,
  "A pricing method for options based on average asset values", 1990.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

import scoregrad as sg

__all__ = [
    "METHODS",
    "Product",
    "asian_call",
    "black_scholes_greeks",
    "black_scholes_price",
    "digital_call",
    "european_call",
    "geometric_asian_greeks",
    "geometric_asian_price",
    "make_theta",
    "mc_greeks",
    "mc_greeks_replicated",
]

METHODS = ("likelihood_ratio", "pathwise", "mixed")
GREEKS = ("price", "delta", "vega", "rho", "gamma")


class Product(NamedTuple):
    """An option: the law of what it depends on, and its (undiscounted) payoff.

    Attributes:
      family: the law of the simulated state (terminal price, or a price path) given theta
        ``{"spot", "vol", "rate"}``; its sampler is reparameterized (``spot * exp(...)``).
      payoff: ``payoff(x) -> scalar``, the amount paid at maturity.
      maturity: T in years.
      name: a label.
    """

    family: sg.Family
    payoff: Callable[[jax.Array], jax.Array]
    maturity: float
    name: str


def make_theta(spot: float = 100.0, vol: float = 0.2, rate: float = 0.05, dtype=None) -> dict:
    """Black–Scholes parameters as the dict of scalars every function here takes.

    Examples:
      >>> from scoregrad.examples import finance
      >>> sorted(finance.make_theta())
      ['rate', 'spot', 'vol']
    """
    dtype = dtype or jnp.result_type(float)
    return {k: jnp.asarray(v, dtype) for k, v in (("spot", spot), ("vol", vol), ("rate", rate))}


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number; got {value!r}.")
    return float(value)


def _terminal_family(maturity: float) -> sg.Family:
    def sample(theta, key):
        z = jax.random.normal(key, (), jnp.result_type(theta["spot"]))
        drift = (theta["rate"] - 0.5 * theta["vol"] ** 2) * maturity
        return theta["spot"] * jnp.exp(drift + theta["vol"] * jnp.sqrt(maturity) * z)

    def log_prob(theta, s):
        mean = jnp.log(theta["spot"]) + (theta["rate"] - 0.5 * theta["vol"] ** 2) * maturity
        return norm.logpdf(jnp.log(s), mean, theta["vol"] * jnp.sqrt(maturity)) - jnp.log(s)

    return sg.Family(log_prob=log_prob, sample=sample, reparameterized=True, name="lognormal")


def european_call(strike: float, maturity: float) -> Product:
    """A European call paying ``max(S_T - strike, 0)`` at ``maturity``."""
    strike, maturity = _check_positive("strike", strike), _check_positive("maturity", maturity)
    return Product(
        _terminal_family(maturity), lambda s: jnp.maximum(s - strike, 0.0), maturity, "call"
    )


def digital_call(strike: float, maturity: float) -> Product:
    """A cash-or-nothing digital call paying 1 if ``S_T > strike``: pathwise fails on it."""
    strike, maturity = _check_positive("strike", strike), _check_positive("maturity", maturity)
    return Product(
        _terminal_family(maturity), lambda s: (s > strike).astype(s.dtype), maturity, "digital"
    )


def _path_family(maturity: float, num_steps: int) -> sg.Family:
    dt = maturity / num_steps

    def increments_law(theta):
        return (theta["rate"] - 0.5 * theta["vol"] ** 2) * dt, theta["vol"] * jnp.sqrt(dt)

    def sample(theta, key):
        z = jax.random.normal(key, (num_steps,), jnp.result_type(theta["spot"]))
        mean, scale = increments_law(theta)
        return theta["spot"] * jnp.exp(jnp.cumsum(mean + scale * z))

    def log_prob(theta, path):
        mean, scale = increments_law(theta)
        logs = jnp.log(path)
        prev = jnp.concatenate([jnp.log(theta["spot"])[None], logs[:-1]])
        return jnp.sum(norm.logpdf(logs - prev, mean, scale) - logs)

    return sg.Family(log_prob=log_prob, sample=sample, reparameterized=True, name="gbm_path")


def asian_call(strike: float, maturity: float, num_steps: int, average: str = "arithmetic") -> Product:
    """An Asian call on the average of ``num_steps`` equally spaced prices (the last at T).

    Args:
      strike, maturity: the contract.
      num_steps: monitoring dates ``T/m, 2T/m, ..., T``.
      average: ``"arithmetic"`` (no closed form) or ``"geometric"`` (closed form:
        :func:`geometric_asian_price`).
    """
    strike, maturity = _check_positive("strike", strike), _check_positive("maturity", maturity)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive int; got {num_steps!r}.")
    if average == "arithmetic":
        payoff = lambda path: jnp.maximum(jnp.mean(path) - strike, 0.0)  # noqa: E731
    elif average == "geometric":
        payoff = lambda path: jnp.maximum(jnp.exp(jnp.mean(jnp.log(path))) - strike, 0.0)  # noqa: E731
    else:
        raise ValueError(f"`average` must be 'arithmetic' or 'geometric'; got {average!r}.")
    return Product(_path_family(maturity, num_steps), payoff, maturity, f"asian_{average}")


def _lognormal_call(mean, var, strike, discount):
    """discount * E[max(G - K, 0)] for log G ~ N(mean, var)."""
    sd = jnp.sqrt(var)
    d2 = (mean - jnp.log(strike)) / sd
    return discount * (jnp.exp(mean + 0.5 * var) * norm.cdf(d2 + sd) - strike * norm.cdf(d2))


def black_scholes_price(theta: dict, *, strike: float, maturity: float, kind: str = "call"):
    r"""The closed-form Black–Scholes price of a European ``"call"`` or a ``"digital"`` call.

    .. math:: C = S_0 N(d_1) - K e^{-rT} N(d_2), \qquad D = e^{-rT} N(d_2).
    """
    s, v, r = theta["spot"], theta["vol"], theta["rate"]
    mean, var = jnp.log(s) + (r - 0.5 * v**2) * maturity, v**2 * maturity
    discount = jnp.exp(-r * maturity)
    if kind == "call":
        return _lognormal_call(mean, var, strike, discount)
    if kind == "digital":
        return discount * norm.cdf((mean - jnp.log(strike)) / jnp.sqrt(var))
    raise ValueError(f"`kind` must be 'call' or 'digital'; got {kind!r}.")


def _greeks_of(price_fn: Callable[[dict], jax.Array], theta: dict) -> dict:
    grad = jax.grad(price_fn)(theta)
    gamma = jax.grad(lambda s: jax.grad(price_fn)({**theta, "spot": s})["spot"])(theta["spot"])
    return {"price": price_fn(theta), "delta": grad["spot"], "vega": grad["vol"],
            "rho": grad["rate"], "gamma": gamma}


def black_scholes_greeks(theta: dict, *, strike: float, maturity: float, kind: str = "call") -> dict:
    """Exact price, delta, vega, rho and gamma (automatic differentiation of the closed form).

    Examples:
      >>> from scoregrad.examples import finance
      >>> g = finance.black_scholes_greeks(finance.make_theta(), strike=100.0, maturity=1.0)
      >>> round(float(g["delta"]), 4)
      0.6368
    """
    return _greeks_of(
        lambda th: black_scholes_price(th, strike=strike, maturity=maturity, kind=kind), theta
    )


def geometric_asian_price(theta: dict, *, strike: float, maturity: float, num_steps: int):
    r"""Closed-form price of the geometric-average Asian call (Kemna & Vorst 1990).

    With monitoring dates :math:`t_j = jT/m`, :math:`\log G` is normal with mean
    :math:`\log S_0 + (r - \sigma^2/2)\,T(m+1)/(2m)` and variance
    :math:`\sigma^2 T (m+1)(2m+1)/(6m^2)`.
    """
    s, v, r, m = theta["spot"], theta["vol"], theta["rate"], num_steps
    mean = jnp.log(s) + (r - 0.5 * v**2) * maturity * (m + 1) / (2 * m)
    var = v**2 * maturity * (m + 1) * (2 * m + 1) / (6 * m**2)
    return _lognormal_call(mean, var, strike, jnp.exp(-r * maturity))


def geometric_asian_greeks(theta: dict, *, strike: float, maturity: float, num_steps: int) -> dict:
    """Exact Greeks of the geometric Asian call (automatic differentiation of its closed form)."""
    return _greeks_of(
        lambda th: geometric_asian_price(th, strike=strike, maturity=maturity, num_steps=num_steps),
        theta,
    )


def _price_fn(product: Product, estimator: sg.Estimator, key, num_samples: int):
    def price(theta, f=None):
        f = product.payoff if f is None else f
        discounted = lambda x: jnp.exp(-theta["rate"] * product.maturity) * f(x)  # noqa: E731
        return sg.expectation(discounted, product.family, theta, key,
                              num_samples=num_samples, estimator=estimator)

    return price


def _pathwise_spot_derivative(product: Product, theta: dict):
    """x -> d payoff / d spot along the path at fixed noise (every price is proportional to spot)."""
    spot = theta["spot"]
    return lambda x: jax.grad(lambda a: product.payoff(x * a / spot))(spot)


def mc_greeks(product: Product, theta: dict, key, *, num_samples: int,
              method: str = "likelihood_ratio") -> dict:
    r"""Monte Carlo price, delta, vega, rho and gamma of ``product`` from one key.

    Args:
      product: from :func:`european_call`, :func:`digital_call` or :func:`asian_call`.
      theta: ``{"spot", "vol", "rate"}`` (see :func:`make_theta`).
      key: a JAX PRNG key; every Greek uses the same draws (common random numbers).
      num_samples: draws per Greek.
      method: ``"likelihood_ratio"`` (score function; first order by ``jax.grad``, gamma by
        ``jax.hessian`` of :func:`scoregrad.expectation`), ``"pathwise"`` (zero gamma for
        kinked payoffs; refused with ``ValueError`` for discontinuous ones such as the digital,
        whose payoff has a structurally zero derivative), or ``"mixed"`` (pathwise first
        order; gamma as the likelihood-ratio derivative of the pathwise delta: unbiased for
        Lipschitz payoffs; refused for discontinuous payoffs like pathwise).

    Returns:
      A dict of scalars with keys ``price, delta, vega, rho, gamma``.

    Examples:
      >>> import jax
      >>> from scoregrad.examples import finance
      >>> g = finance.mc_greeks(finance.european_call(100.0, 1.0), finance.make_theta(),
      ...                       jax.random.key(0), num_samples=20_000)
      >>> abs(float(g["delta"]) - 0.6368) < 0.05
      True
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")
    lr = sg.score_function()
    first = _price_fn(product, lr if method == "likelihood_ratio" else sg.pathwise(), key, num_samples)
    grad = jax.grad(first)(theta)
    if method == "mixed":
        # gamma = d/dspot E[d payoff/d spot (pathwise)], the outer derivative by likelihood ratio.
        def pathwise_delta(s):
            th = {**theta, "spot": s}
            return _price_fn(product, lr, key, num_samples)(th, _pathwise_spot_derivative(product, th))

        gamma = jax.grad(pathwise_delta)(theta["spot"])
    else:
        gamma = jax.hessian(lambda s: first({**theta, "spot": s}))(theta["spot"])
    return {"price": first(theta), "delta": grad["spot"], "vega": grad["vol"],
            "rho": grad["rate"], "gamma": gamma}


def mc_greeks_replicated(product: Product, theta: dict, key, *, num_samples: int,
                         num_replicates: int, method: str = "likelihood_ratio"):
    """Independent replicates of :func:`mc_greeks` (vmapped over keys): means and standard errors.

    Returns:
      ``(mean, stderr)``, two dicts keyed like :func:`mc_greeks`.

    Examples:
      >>> import jax
      >>> from scoregrad.examples import finance
      >>> mean, se = finance.mc_greeks_replicated(
      ...     finance.digital_call(100.0, 1.0), finance.make_theta(), jax.random.key(0),
      ...     num_samples=1000, num_replicates=8)
      >>> bool(se["delta"] > 0)
      True
    """
    if isinstance(num_replicates, bool) or not isinstance(num_replicates, int) or num_replicates < 2:
        raise ValueError(f"`num_replicates` must be an int >= 2; got {num_replicates!r}.")
    keys = jax.random.split(key, num_replicates)
    one = lambda k, th: mc_greeks(product, th, k, num_samples=num_samples, method=method)  # noqa: E731
    reps = jax.jit(jax.vmap(one, in_axes=(0, None)))(keys, theta)
    mean = {k: jnp.mean(v) for k, v in reps.items()}
    stderr = {k: jnp.std(v, ddof=1) / jnp.sqrt(num_replicates) for k, v in reps.items()}
    return mean, stderr
