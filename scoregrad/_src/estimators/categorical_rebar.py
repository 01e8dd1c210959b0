r"""Categorical REBAR and RELAX: the score function with a control variate at Gumbel relaxations.

For one categorical with log-probabilities :math:`\phi = \log\mathrm{softmax}(\text{logits})`
write :math:`b = \arg\max_i z_i`, :math:`z = \phi + G` with i.i.d. Gumbel noise, and draw
:math:`\tilde z \sim p(z \mid b)` with the conditional Gumbel reparameterization (Tucker et al.
2017, appendix; independent uniforms :math:`v`):

.. math::
   \tilde z_b = -\log(-\log v_b), \qquad
   \tilde z_i = -\log\Big(-\frac{\log v_i}{p_i} - \log v_b\Big)\quad (i \ne b).

For any control variate :math:`c_\omega(z)`,

.. math::
   \hat g = \big(f(b) - c_\omega(\tilde z)\big)\,\nabla_\phi \log p(b)
            + \nabla_\phi c_\omega(z) - \nabla_\phi c_\omega(\tilde z)

is unbiased. REBAR takes :math:`c(z) = \eta\, f(\mathrm{softmax}(z/\lambda))`; RELAX adds a
small network of the relaxed sample. With ``learn=True`` the control variate's parameters are
trained after each estimate to minimize :math:`\mathbb E\|\hat g\|^2` (the estimator state,
:class:`scoregrad.RelaxState`, threaded like an optax state); the estimate of a call uses the
state it was given.

**What f receives**: float arrays of theta's shape ``(..., K)``: one-hot vectors for the exact
draw and points of the simplex for the relaxations (as :func:`scoregrad.gumbel_softmax`); write
f for one-hot input, e.g. ``jnp.sum(y * values)``.

References:
  Tucker, Mnih, Maddison, Lawson and Sohl-Dickstein, "REBAR: Low-variance, unbiased gradient
  estimates for discrete latent variable models", NeurIPS 2017. Grathwohl, Choi, Wu, Roeder and
  Duvenaud, "Backpropagation through the Void: Optimizing control variates for black-box
  gradient estimation", ICLR 2018.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from scoregrad._src.base import Estimator, magic_box
from scoregrad._src.estimators.categorical import categorical_logits_struct
from scoregrad._src.estimators.rebar_relax import (
    check_hidden,
    check_optimizer,
    mlp_params,
    rebar_settings,
    relax_estimator,
)
from scoregrad._src.estimators.relaxed import check_temperature, f_input

sg_ = jax.lax.stop_gradient


def conditional_gumbel(log_p: jax.Array, onehot: jax.Array, v: jax.Array) -> jax.Array:
    r""":math:`\tilde z \sim p(\phi + G \mid \arg\max = b)` from uniforms ``v`` (last axis K),
    for normalized log-probabilities ``log_p``; differentiable in ``log_p`` with b fixed."""
    e = -jnp.log(v)  # Exp(1)
    e_b = jnp.sum(onehot * e, axis=-1, keepdims=True)
    others = -jnp.logaddexp(jnp.log(e) - log_p, jnp.log(e_b))
    return jnp.where(onehot > 0.5, -jnp.log(e_b), others)


def rebar_cv(omega, z, f_of):
    r""":math:`c(z) = \eta\, f(\mathrm{softmax}(z/\lambda))`, ``omega = {"eta", "log_temperature"}``."""
    return omega["eta"] * f_of(jax.nn.softmax(z / jnp.exp(omega["log_temperature"]), axis=-1))


def mlp_cv(omega, z, f_of):
    r"""RELAX's default: REBAR's plus :math:`\mathrm{MLP}_\rho(\mathrm{softmax}(z/\lambda))`."""
    y = jax.nn.softmax(z / jnp.exp(omega["log_temperature"]), axis=-1)
    net = omega["mlp"]
    h = jnp.tanh(y.reshape(-1) @ net["w1"] + net["b1"])
    return rebar_cv(omega, z, f_of) + (h @ net["w2"] + net["b2"]).astype(y.dtype)


def relax_surrogate(f_of, log_prob_of, cv, omega, logits, gumbel, v):
    """One unit's surrogate term (value f(b), gradient the estimate) and f(b) for given noise.

    ``f_of(y)`` evaluates f at a float ``(..., K)`` array, ``log_prob_of(b)`` the family's
    log-mass of the index draw b (its gradient is the score), ``cv(omega, z, f_of)`` the control
    variate.
    """
    log_p = jax.nn.log_softmax(logits, axis=-1)
    z = log_p + gumbel
    b = jnp.argmax(sg_(z), axis=-1)
    onehot = jax.nn.one_hot(b, logits.shape[-1], dtype=logits.dtype)
    zt = conditional_gumbel(log_p, onehot, v)
    fb = f_of(onehot)
    box = magic_box(log_prob_of(b))
    cz, czt = cv(omega, z, f_of), cv(omega, zt, f_of)
    if jnp.shape(cz) != () or not jnp.issubdtype(jnp.result_type(cz), jnp.floating):
        raise TypeError("categorical_relax(control_variate=...) must return a floating-point "
                        f"scalar; got shape {jnp.shape(cz)}. Reduce it, e.g. jnp.sum(...).")
    cz, czt = cz.astype(fb.dtype), czt.astype(fb.dtype)
    term = box * fb + (1.0 - box) * czt + (cz - sg_(cz)) - (czt - sg_(czt))
    return term, fb


def _unit_term(model, params, draws, cv, omega, draw):
    th = model.family.capabilities.categorical_logits(params.theta)  # checked at bind
    dtype = jnp.result_type(th)
    g = draws.gumbel(jnp.shape(th), dtype)
    v = jnp.maximum(draws.uniform(jnp.shape(th), dtype), jnp.finfo(dtype).tiny)
    return relax_surrogate(lambda y: model.eval_f(params, y),
                           lambda b: model.eval_log_prob(params, b.astype(draw)),
                           cv, omega, th, g, v)


def _estimator(name, cv, init_params, optimizer, learn: bool) -> Estimator:
    return relax_estimator(name, cv, init_params, optimizer, learn, unit_term=_unit_term,
                           check=lambda target: categorical_logits_struct(target, f"{name}()"),
                           label="categorical_relax_variance", f_input=f_input)


_COMMON = r"""
    * **Bias**: unbiased for every temperature, :math:`\eta` and control-variate parameters
      (tested statistically against the exact gradient).
    * **Needs from f**: defined and differentiable on the simplex: f receives float arrays of
      theta's shape ``(..., K)``, one-hot for the exact draw, ``softmax(z / lambda)`` for the
      control variate.
    * **Needs from the family**: ``family.capabilities.categorical_logits`` (built-in
      :func:`scoregrad.families.categorical` or adapted ones); others raise ``TypeError``
      naming it.
    * **Derivative order**: first order only (``max_order=1``): ``jax.hessian`` of
      :func:`scoregrad.expectation` raises ``ValueError``.
    * **Cost**: 3 evaluations of f per draw (at b, and the control variate at z and z~), counted
      as one sample; the learning step re-runs the draws with second-order autodiff.
"""


def categorical_rebar(temperature: float = 0.5, eta: float = 1.0, *, learn: bool = False,
                      optimizer: Optional[optax.GradientTransformation] = None) -> Estimator:
    r"""Categorical REBAR: control variate :math:`\eta\, f(\mathrm{softmax}(z/\lambda))`.

    With ``learn=False`` (default) :math:`\eta` and :math:`\lambda` are fixed and the estimator
    is stateless; with ``learn=True`` they are trained (``state = est.init(theta)``).
    {common}
    Args:
      temperature: initial (or fixed) :math:`\lambda > 0`.
      eta: initial (or fixed) control-variate scale.
      learn: train :math:`(\eta, \log\lambda)` after every estimate.
      optimizer: optax optimizer of the learning step (default ``optax.adam(1e-2)``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> f = lambda y: jnp.sum(y * jnp.arange(3.0))  # one-hot input
      >>> r = sg.estimate_grad(f, sg.families.categorical(), jnp.zeros(3), jax.random.key(0),
      ...                      num_samples=100, estimator=sg.categorical_rebar(0.5, 1.0))
      >>> r.grad.shape
      (3,)

    References:
      Tucker et al., NeurIPS 2017.
    """
    _, _, optimizer, init_params = rebar_settings(temperature, eta, learn, optimizer,
                                                  "categorical_rebar")
    return _estimator("categorical_rebar", rebar_cv, init_params, optimizer, learn)


def categorical_relax(*, temperature: float = 0.5, hidden: int = 16, seed: int = 0,
                      optimizer: Optional[optax.GradientTransformation] = None) -> Estimator:
    r"""Categorical RELAX: REBAR's control variate plus a learned one-hidden-layer network.

    :math:`c(z) = \eta f(y) + \mathrm{MLP}_\rho(y)`, :math:`y = \mathrm{softmax}(z/\lambda)`,
    with all of :math:`(\eta, \lambda, \rho)` trained after every estimate (always stateful:
    ``state = est.init(theta)``); the output layer starts at zero, so training starts at REBAR.
    {common}
    Args:
      temperature: initial :math:`\lambda`.
      hidden: hidden units of the network.
      seed: seeds the network's initial weights (deterministic).
      optimizer: optax optimizer of the learning step (default ``optax.adam(1e-2)``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> est, theta = sg.categorical_relax(), jnp.zeros((2, 3))
      >>> r = sg.estimate_grad(lambda y: jnp.sum(y[:, 0]), sg.families.categorical(), theta,
      ...                      jax.random.key(0), num_samples=64, estimator=est,
      ...                      state=est.init(theta))
      >>> r.grad.shape
      (2, 3)

    References:
      Grathwohl et al., ICLR 2018.
    """
    lam = check_temperature(temperature, "categorical_relax")
    hidden = check_hidden(hidden, "categorical_relax")
    optimizer = check_optimizer(optimizer, "categorical_relax")
    return _estimator("categorical_relax", mlp_cv,
                      lambda theta: mlp_params(theta, lam, hidden, seed), optimizer, True)


if categorical_rebar.__doc__:  # None under python -OO
    categorical_rebar.__doc__ = categorical_rebar.__doc__.replace("{common}", _COMMON)
if categorical_relax.__doc__:  # None under python -OO
    categorical_relax.__doc__ = categorical_relax.__doc__.replace("{common}", _COMMON)
