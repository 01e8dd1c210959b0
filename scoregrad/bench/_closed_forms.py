"""Closed-form values and gradients of the benchmark problems (float64 NumPy)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src import families as _fam
from scoregrad._src.family import Family

PyTree = Any


class Spec(NamedTuple):
    family: Family
    theta: PyTree
    f: Callable[[PyTree], jax.Array]
    value: float
    grad: PyTree
    differentiable_f: bool
    #: f also accepts the relaxed draw (a float in [0, 1] for Bernoulli; a point of the simplex,
    #: one-hot for an exact draw, for categorical) and is differentiable in it.
    relaxable: bool = False


def _norm_pdf(z: float) -> float:
    return math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _norm_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _normal_theta(d: int) -> dict:
    if d == 1:
        return {"loc": np.array([0.5]), "scale": np.array([1.0])}
    return {"loc": np.linspace(-1.0, 1.0, d), "scale": np.linspace(0.5, 1.5, d)}


def gauss_square(d: int, k: float) -> Spec:
    """sum_j (x_j - k)^2: E = sum (mu - k)^2 + s^2; d/dmu = 2(mu - k), d/ds = 2 s."""
    th = _normal_theta(d)
    mu, s = th["loc"], th["scale"]
    value = np.sum((mu - k) ** 2 + s**2)
    grad = {"loc": 2.0 * (mu - k), "scale": 2.0 * s}
    return Spec(_fam.normal(), th, lambda x: jnp.sum((x - k) ** 2), value, grad, True)


def gauss_exp(d: int, k: float) -> Spec:
    """sum_j exp(-k x_j^2): E = a^{-1/2} exp(-k mu^2 / a) with a = 1 + 2 k s^2."""
    th = _normal_theta(d)
    mu, s = th["loc"], th["scale"]
    a = 1.0 + 2.0 * k * s**2
    e = a**-0.5 * np.exp(-k * mu**2 / a)
    grad = {
        "loc": e * (-2.0 * k * mu / a),
        "scale": e * (-2.0 * k * s / a + 4.0 * k**2 * s * mu**2 / a**2),
    }
    return Spec(_fam.normal(), th, lambda x: jnp.sum(jnp.exp(-k * x**2)), np.sum(e), grad, True)


def gauss_cos(d: int, k: float) -> Spec:
    """sum_j cos(k x_j): E = cos(k mu) exp(-k^2 s^2 / 2)."""
    th = _normal_theta(d)
    mu, s = th["loc"], th["scale"]
    damp = np.exp(-0.5 * k**2 * s**2)
    grad = {"loc": -k * np.sin(k * mu) * damp, "scale": -(k**2) * s * np.cos(k * mu) * damp}
    value = np.sum(np.cos(k * mu) * damp)
    return Spec(_fam.normal(), th, lambda x: jnp.sum(jnp.cos(k * x)), value, grad, True)


def bernoulli_toy(t: float) -> Spec:
    """(b - t)^2, b ~ Bern(sigmoid(phi)) at phi = 0: gradient p (1 - p) (1 - 2 t)."""
    phi = np.zeros(1)
    p = 1.0 / (1.0 + np.exp(-phi))
    value = np.sum(p * (1 - t) ** 2 + (1 - p) * t**2)
    grad = p * (1 - p) * ((1 - t) ** 2 - t**2)
    return Spec(_fam.bernoulli(), phi, lambda b: jnp.sum((b - t) ** 2), value, grad, False, True)


def categorical_toy(k: int, t: float) -> Spec:
    """(x/(K-1) - t)^2 under softmax(theta): gradient p_k (f_k - E f), by enumeration."""
    logits = 0.5 * np.linspace(-1.0, 1.0, k)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    fk = (np.arange(k) / (k - 1) - t) ** 2
    value = float(p @ fk)

    def f(x):
        x = jnp.asarray(x)
        if x.ndim == 1:  # a one-hot or relaxed draw on the simplex: its (soft) category index
            xf = x @ jnp.arange(k, dtype=x.dtype)
        else:  # the category index itself, in the default float dtype (x64-aware)
            xf = x.astype(jnp.result_type(float))
        return jnp.sum((xf / (k - 1) - t) ** 2)

    return Spec(_fam.categorical(), logits, f, value, p * (fk - value), False, True)


def _bs_family(rate: float, maturity: float) -> Family:
    """x = log S_T = log S0 + (r - sigma^2/2) T + sigma W_T, drawn from the Brownian increment."""

    def loc_scale(theta):
        sigma, spot = theta["sigma"], theta["spot"]
        loc = jnp.log(spot) + (rate - 0.5 * sigma**2) * maturity
        return loc, sigma * math.sqrt(maturity)

    def log_prob(theta, x):
        loc, scale = loc_scale(theta)
        return jnp.sum(jax.scipy.stats.norm.logpdf(x, loc, scale))

    def sample(theta, key):
        loc, scale = loc_scale(theta)
        return loc + scale * jax.random.normal(key, (), jnp.result_type(theta["spot"]))

    return Family(log_prob=log_prob, sample=sample, reparameterized=True, name="black_scholes")


def black_scholes(digital: bool, strike: float, spot=100.0, rate=0.05, sigma=0.2, maturity=1.0):
    """Black-Scholes call or cash-or-nothing digital: price, delta (d/d spot), vega (d/d sigma)."""
    sq = sigma * math.sqrt(maturity)
    d1 = (math.log(spot / strike) + (rate + 0.5 * sigma**2) * maturity) / sq
    d2 = d1 - sq
    disc = math.exp(-rate * maturity)
    if digital:
        value = disc * _norm_cdf(d2)
        delta = disc * _norm_pdf(d2) / (spot * sq)
        vega = -disc * _norm_pdf(d2) * d1 / sigma
        log_k = math.log(strike)
        f = lambda x: disc * (x > log_k).astype(x.dtype)  # noqa: E731
    else:
        value = spot * _norm_cdf(d1) - strike * disc * _norm_cdf(d2)
        delta = _norm_cdf(d1)
        vega = spot * _norm_pdf(d1) * math.sqrt(maturity)
        f = lambda x: disc * jnp.maximum(jnp.exp(x) - strike, 0.0)  # noqa: E731
    theta = {"sigma": np.array(sigma), "spot": np.array(spot)}
    grad = {"sigma": np.array(vega), "spot": np.array(delta)}
    return Spec(_bs_family(rate, maturity), theta, f, value, grad, not digital)


def _blr_data(n: int, d: int, noise: float):
    kx, kw, ke = jax.random.split(jax.random.key(20240607), 3)
    x = np.asarray(jax.random.normal(kx, (n, d), jnp.float32), np.float64)
    w = np.asarray(jax.random.normal(kw, (d,), jnp.float32), np.float64)
    e = np.asarray(jax.random.normal(ke, (n,), jnp.float32), np.float64)
    return x, x @ w + noise * e


def blr_elbo(n: int = 50, d: int = 5, noise: float = 0.5, alpha: float = 1.0) -> Spec:
    r"""ELBO of y = X w + noise e, w ~ N(0, I/alpha), under q(w) = N(m, diag(s^2)).

    f(w) = log p(y, w) - log q_{theta0}(w) with theta0 frozen, so E_q[f] is the ELBO at theta0 and
    its gradient there is the ELBO gradient (E_q[grad log q] = 0).
    """
    x, y = _blr_data(n, d, noise)
    m, s = np.zeros(d), np.full(d, 0.5)
    col2 = np.sum(x**2, axis=0)
    resid = y - x @ m
    e_lik = -0.5 * n * math.log(2 * math.pi * noise**2) - (resid @ resid + col2 @ s**2) / (
        2 * noise**2
    )
    e_prior = -0.5 * d * math.log(2 * math.pi / alpha) - 0.5 * alpha * (m @ m + s @ s)
    entropy = np.sum(np.log(s)) + 0.5 * d * (1.0 + math.log(2 * math.pi))
    grad = {
        "loc": x.T @ resid / noise**2 - alpha * m,
        "scale": -s * col2 / noise**2 - alpha * s + 1.0 / s,
    }

    def f(w):
        r = y - x @ w
        lik = -0.5 * n * math.log(2 * math.pi * noise**2) - jnp.sum(r**2) / (2 * noise**2)
        prior = -0.5 * d * math.log(2 * math.pi / alpha) - 0.5 * alpha * jnp.sum(w**2)
        log_q = jnp.sum(jax.scipy.stats.norm.logpdf(w, m, s))
        return lik + prior - log_q

    theta = {"loc": m, "scale": s}
    return Spec(_fam.normal(), theta, f, e_lik + e_prior + entropy, grad, True)


def _bandit_family(sigma_r: float) -> Family:
    def sample(logits, key):
        k_arm, k_noise = jax.random.split(key)
        arm = jax.random.categorical(k_arm, logits)
        return {"arm": arm, "noise": jax.random.normal(k_noise, (), jnp.result_type(logits))}

    def log_prob(logits, x):
        logp = jax.nn.log_softmax(logits)[x["arm"]]
        return logp + jax.scipy.stats.norm.logpdf(x["noise"])

    return Family(log_prob=log_prob, sample=sample, reparameterized=False, name="bandit_policy")


def bandit(k: int, sigma_r: float = 0.5) -> Spec:
    """Softmax policy over K arms, reward r_a + sigma_r e: gradient p_a (r_a - sum_b p_b r_b)."""
    rewards = np.linspace(0.0, 1.0, k)
    logits = np.zeros(k)
    p = np.full(k, 1.0 / k)
    value = float(p @ rewards)

    def f(x):
        return jnp.asarray(rewards)[x["arm"]] + sigma_r * x["noise"]

    return Spec(_bandit_family(sigma_r), logits, f, value, p * (rewards - value), False)
