r"""ARM and DisARM: antithetic, coupled-pair gradient estimators for Bernoulli latents.

Both draw one uniform vector :math:`u \sim U(0,1)^d` per unit and evaluate f at the antithetic
pair

.. math::
   b = 1[u < \sigma(\phi)], \qquad \tilde b = 1[1 - u < \sigma(\phi)],

both exact :math:`\mathrm{Bernoulli}(\sigma(\phi))` draws (coordinates independent). A unit is the
pair, so it costs two evaluations of f: ``num_samples`` counts evaluations and must be even
(``num_samples / 2`` pairs).

References:
  Yin and Zhou, "ARM: Augment-REINFORCE-Merge Gradient for Stochastic Binary Networks", ICLR 2019.
  Dong, Mnih and Tucker, "DisARM: An Antithetic Gradient Estimator for Binary Latent Variables",
  NeurIPS 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scoregrad._src.base import Estimator, Plan, UnitOut, estimator
from scoregrad._src.estimators.relaxed import make_check

sg_ = jax.lax.stop_gradient


def antithetic_pair(logits: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""The coupled pair :math:`(b, \tilde b) = (1[u < \sigma(\phi)], 1[1-u < \sigma(\phi)])`."""
    p = jax.nn.sigmoid(logits)
    dtype = jnp.result_type(logits)
    return (u < p).astype(dtype), (1.0 - u < p).astype(dtype)


def arm_gradient(logits, u, f_b, f_bt) -> jax.Array:
    r"""ARM for one pair: :math:`(f(\tilde b) - f(b))\,(u - \tfrac12)` (per coordinate)."""
    del logits
    return (f_bt - f_b).astype(u.dtype) * (u - 0.5)


def disarm_gradient(logits, u, f_b, f_bt) -> jax.Array:
    r"""DisARM for one pair.

    .. math::
       \hat g_j = \tfrac12\,\big(f(b) - f(\tilde b)\big)\,(-1)^{\tilde b_j}\,
                  1[b_j \ne \tilde b_j]\,\sigma(|\phi_j|).
    """
    b, bt = antithetic_pair(logits, u)
    sign = 1.0 - 2.0 * bt
    diff = (f_b - f_bt).astype(u.dtype)
    return 0.5 * diff * sign * jnp.abs(b - bt) * jax.nn.sigmoid(jnp.abs(logits))


def _check(who):
    def check(model, theta, x_struct):
        caps = model.family.capabilities
        if caps.bernoulli_logits is None and caps.categorical_logits is not None:
            raise TypeError(
                f"{who} is defined here for Bernoulli families only. For categorical latents "
                "use sg.arsm() (categorical ARM), sg.unordered_set(k), sg.rloo(k) or "
                "sg.score_function(baseline=sg.baselines.leave_one_out())."
            )
        make_check(who, categorical=False)(model, theta, x_struct)

    return check


def _make(name: str, gradient) -> Estimator:
    check = _check(f"{name}()")

    def bind(target):
        check(target, target.theta, target.x_struct)
        draw_dtype = jax.tree_util.tree_leaves(target.x_struct)[0].dtype  # f gets the draws' dtype

        def unit(model, params, draws, state):
            del state
            # capabilities.bernoulli_logits (checked at bind); the gradient in the logits
            # reaches theta through it (the chain rule of the parameterization)
            th = model.family.capabilities.bernoulli_logits(params.theta)
            logits = sg_(th)
            u = draws.uniform(jnp.shape(th), jnp.result_type(th))
            b, bt = antithetic_pair(logits, u)
            f_b = model.eval_f(params, b.astype(draw_dtype))
            f_bt = model.eval_f(params, bt.astype(draw_dtype))
            g = sg_(gradient(logits, u, sg_(f_b), sg_(f_bt)))
            # value: the pair's mean of f (f's own dependence on theta flows); gradient: + g.
            term = 0.5 * (f_b + f_bt) + jnp.sum(g * (th - logits)).astype(f_b.dtype)
            return UnitOut(term[None], sg_(jnp.stack([f_b, f_bt])))

        return Plan(unit, draws_per_unit=2, max_order=1, shift_invariant=True)

    return estimator(name, bind)


_COMMON = r"""
    * **Bias**: unbiased for any f (no differentiability needed) and every logit.
    * **Needs from f**: only its values at binary points: a black box is fine. An f that closes
      over theta also gets its direct gradient (in :func:`scoregrad.expectation`).
    * **Needs from the family**: ``family.capabilities.bernoulli_logits`` (the built-in
      :func:`scoregrad.families.bernoulli`, or an adapted numpyro/distrax Bernoulli; logits of
      any shape); categorical raises TypeError (use :func:`scoregrad.arsm`), other families too. ``num_samples`` must be even: it counts evaluations of f, two per pair.
    * **Derivative order**: first order only. The surrogate is
      ``mean(f) + <stop_gradient(g), theta - stop_gradient(theta)>``, so ``jax.hessian`` of
      :func:`scoregrad.expectation` is **not** a Hessian estimate.
"""


def arm() -> Estimator:
    r"""The ARM (Augment-REINFORCE-Merge) estimator for Bernoulli logits.

    .. math::
       \hat g = \frac{2}{N} \sum_{i=1}^{N/2} \big(f(\tilde b_i) - f(b_i)\big)\,
       \big(u_i - \tfrac12\big), \quad b_i = 1[u_i < \sigma(\phi)],\
       \tilde b_i = 1[1 - u_i < \sigma(\phi)].
    {common}
    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> r = sg.estimate_grad(lambda b: jnp.sum((b - 0.45) ** 2), sg.families.bernoulli(),
      ...                      jnp.zeros(2), jax.random.key(0), num_samples=2000,
      ...                      estimator=sg.arm())
      >>> bool(jnp.all(jnp.abs(r.grad - 0.025) < 5 * r.stderr))
      True

    References:
      Yin and Zhou, ICLR 2019.
    """
    return _make("arm", arm_gradient)


def disarm() -> Estimator:
    r"""The DisARM estimator: ARM with the uniform noise integrated out given the pair.

    .. math::
       \hat g_j = \frac{2}{N}\sum_{i=1}^{N/2} \tfrac12\big(f(b_i) - f(\tilde b_i)\big)
       (-1)^{\tilde b_{ij}}\, 1[b_{ij} \ne \tilde b_{ij}]\, \sigma(|\phi_j|).

    It is :math:`\mathbb E[\hat g_{ARM} \mid b, \tilde b]`, so its variance never exceeds ARM's
    (Rao-Blackwellization), and it is zero when the pair agrees.
    {common}
    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> r = sg.estimate_grad(lambda b: jnp.sum((b - 0.45) ** 2), sg.families.bernoulli(),
      ...                      jnp.zeros(2), jax.random.key(0), num_samples=2000,
      ...                      estimator=sg.disarm())
      >>> bool(jnp.all(jnp.abs(r.grad - 0.025) < 5 * r.stderr))
      True

    References:
      Dong, Mnih and Tucker, NeurIPS 2020.
    """
    return _make("disarm", disarm_gradient)


if arm.__doc__:  # None under python -OO
    arm.__doc__ = arm.__doc__.replace("{common}", _COMMON)
if disarm.__doc__:  # None under python -OO
    disarm.__doc__ = disarm.__doc__.replace("{common}", _COMMON)
