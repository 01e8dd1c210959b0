r"""Multi-sample estimators: RLOO with K draws per group, and VIMCO for log-mean-exp objectives.

A unit is a group of K draws (``Draws.sample(num=K)``): draw ``k`` of the group with unit key
``u`` uses the key ``fold_in(u, k)``. With given samples
(:func:`scoregrad.estimate_grad_from_samples`) a group is K consecutive samples, so the samples
must be i.i.d. and their number a multiple of K.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src.base import Estimator, Plan, UnitOut, fixed, magic_box


def _check_k(k, name: str, arg: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name}({arg}=...) must be a Python int >= 2; got {k!r}.")
    k = operator.index(k)
    if k < 2:
        raise ValueError(
            f"{name}({arg}=...) must be at least 2 (each draw's baseline uses the others); got {k}."
        )
    return k


def _group_eval(model, params, xs):
    f = jax.vmap(lambda x: model.eval_f(params, x))(xs)
    lp = jax.vmap(lambda x: model.eval_log_prob(params, x))(xs)
    return f, lp


def _estimator(name, unit, k, shift_invariant=False, not_unbiased=None) -> Estimator:
    return fixed(name, Plan(unit, draws_per_unit=k, shift_invariant=shift_invariant,
                            not_unbiased=not_unbiased))


def rloo(group_size: int) -> Estimator:
    r"""REINFORCE leave-one-out with K draws per group (RLOO-K).

    For each group of K draws, draw k's baseline is the mean of f over the group's other draws:

    .. math::
       \hat g = \frac1K \sum_{k=1}^K \Big(f(x_k) - \frac1{K-1}\sum_{j\ne k} f(x_j)\Big)
                \nabla_\theta \log p(x_k;\theta),

    averaged over the ``num_samples / K`` groups. With one f for the whole batch,
    ``sg.score_function(baseline=sg.baselines.leave_one_out())`` (the whole batch as one group)
    has no larger variance; ``rloo(K)`` is the RL/RLHF form (Kool et al. 2019; Ahmadian et al.
    2024) where the group is the i.i.d. unit, so the reported standard errors are exact over
    independent groups, and the cost per group is fixed.

    * **Bias**: unbiased (each baseline is independent of the draw it multiplies).
    * **Needs from f**: nothing (any scalar). **From the family**: a differentiable
      ``log_prob``; any sampler.
    * **Derivative order**: all orders. The surrogate is DiCE's
      :math:`\frac1K\sum_k \boxdot_k f_k + (1 - \boxdot_k)\,\perp b_k`, so ``jax.hessian`` of
      :func:`scoregrad.expectation` is an unbiased Hessian estimate.

    Args:
      group_size: K >= 2 draws per group; ``num_samples`` must be a multiple of K.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> r = sg.estimate_grad(lambda x: jnp.sum((x - 0.45) ** 2), sg.families.bernoulli(),
      ...                      jnp.zeros(1), jax.random.key(0), num_samples=4000,
      ...                      estimator=sg.rloo(4))
      >>> bool(jnp.abs(r.grad[0] - 0.025) < 5 * r.stderr[0])
      True

    References:
      Kool, van Hoof and Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", 2019.
      Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
      from Human Feedback in LLMs", 2024.
    """
    k = _check_k(group_size, "rloo", "group_size")

    def unit(model, params, draws, state):
        del state
        xs = draws.sample(num=k)  # the group's K draws (given: K consecutive samples)
        f, lp = _group_eval(model, params, xs)
        f_sg = jax.lax.stop_gradient(f)
        base = (jnp.sum(f_sg) - f_sg) / (k - 1)
        box = magic_box(lp)
        term = jnp.mean(box * f + (1.0 - box) * base)
        return UnitOut(term[None], f_sg)

    return _estimator(f"rloo({k})", unit, k, shift_invariant=True)


def _loo_log_mean_exp(f: jax.Array) -> jax.Array:
    r""":math:`\hat L_{-k}`: log-mean-exp with :math:`f_k` replaced by the mean of the others."""
    k = f.shape[0]
    others_mean = (jnp.sum(f) - f) / (k - 1)
    rows = jnp.where(jnp.eye(k, dtype=bool), others_mean[:, None], f[None, :])
    return jax.nn.logsumexp(rows, axis=1) - jnp.log(k)


def vimco(num_particles: int) -> Estimator:
    r"""VIMCO: the multi-sample estimator for log-mean-exp objectives (Mnih and Rezende 2016).

    **What f is**: the log of a non-negative weight, :math:`f(x) = \log w(x)`; in variational
    inference :math:`f(x) = \log p(y, x) - \log q(x;\theta)` with the family as :math:`q`
    (write f closing over theta inside :func:`scoregrad.expectation`; that direct dependence is
    differentiated too). **The objective** is the K-sample bound

    .. math::
       \mathcal L_K(\theta) = \mathbb{E}_{x_{1..K} \sim p(\cdot;\theta)}\Big[\hat L\Big],\qquad
       \hat L = \log \frac1K \sum_{k=1}^K e^{f(x_k)},

    and **the value** returned (``expectation``, ``estimate_grad(...).value``) is the mean of
    :math:`\hat L` over the ``num_samples / K`` groups — an unbiased estimate of
    :math:`\mathcal L_K`, *not* the mean of f. The gradient is

    .. math::
       \hat g = \sum_k \big(\hat L - \hat L_{-k}\big)\nabla_\theta \log p(x_k;\theta)
              + \sum_k \tilde w_k \nabla_\theta f(x_k),

    with :math:`\tilde w_k = e^{f_k}/\sum_j e^{f_j}` and :math:`\hat L_{-k}` the log-mean-exp
    with :math:`f_k` replaced by the arithmetic mean of the other :math:`f_j` (the geometric mean
    of their weights), which depends only on the other draws.

    * **Bias**: unbiased for :math:`\nabla\mathcal L_K`.
    * **Needs from f**: a finite log-weight (log-sum-exp keeps it stable); differentiable only
      where it depends on theta directly. **From the family**: a differentiable ``log_prob``.
    * **Derivative order**: all orders. The surrogate is
      :math:`\boxdot(\sum_k \log p_k)\,\hat L + \sum_k (1 - \boxdot_k)\perp\hat L_{-k}` (DiCE with
      baselines independent of their draw), so ``jax.hessian`` of :func:`scoregrad.expectation`
      is an unbiased estimate of :math:`\nabla^2 \mathcal L_K`.

    Args:
      num_particles: K >= 2 draws per group; ``num_samples`` must be a multiple of K.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> v = sg.expectation(lambda x: jnp.sum(x), sg.families.bernoulli(), jnp.zeros(1),
      ...                    jax.random.key(0), num_samples=8, estimator=sg.vimco(4))
      >>> v.shape
      ()

    References:
      Mnih and Rezende, "Variational Inference for Monte Carlo Objectives", ICML 2016.
      Burda, Grosse and Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
    """
    k = _check_k(num_particles, "vimco", "num_particles")

    def unit(model, params, draws, state):
        del state
        xs = draws.sample(num=k)  # the group's K draws (given: K consecutive samples)
        f, lp = _group_eval(model, params, xs)
        value = jax.nn.logsumexp(f) - jnp.log(k)
        base = jax.lax.stop_gradient(_loo_log_mean_exp(f))
        box_k = magic_box(lp)
        term = magic_box(jnp.sum(lp)) * value + jnp.sum((1.0 - box_k) * base)
        return UnitOut(term[None], jax.lax.stop_gradient(value)[None])

    # Not shift_invariant: a constant added to f leaves VIMCO's gradient unchanged but adds
    # c * (box(sum lp) - sum box_k) to the surrogate, whose second derivative (the cross terms
    # s_j s_k^T) is not zero per draw: centring f would change its Hessian.
    return _estimator(f"vimco({k})", unit, k, not_unbiased=(
        f"vimco({k}) estimates the gradient of the log-mean-exp bound, not of E[f]"))
