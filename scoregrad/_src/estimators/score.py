"""The score-function (REINFORCE, likelihood-ratio) estimator."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from scoregrad._src import baselines as _baselines
from scoregrad._src.base import Baseline, Estimator, FStats, Plan, UnitOut, magic_box


def score_function(baseline: Optional[Baseline] = None) -> Estimator:
    r"""The score-function estimator, with an optional baseline.

    .. math::
       \nabla_\theta\, \mathbb{E}_{p(x;\theta)}[f(x;\theta)] \approx \frac1N \sum_{i=1}^N
       \big(f(x_i;\theta) - b_i\big)\, \nabla_\theta \log p(x_i;\theta)
       + \nabla_\theta f(x_i;\theta), \qquad x_i \sim p(\cdot;\theta).

    * **Bias**: unbiased (for any baseline built from other or past draws).
    * **Needs from f**: nothing — f may be discontinuous, non-differentiable, a black box in JAX.
      The pathwise term :math:`\nabla_\theta f` flows when f closes over theta in
      :func:`scoregrad.expectation`.
    * **Needs from the family**: a differentiable ``log_prob``; any sampler (discrete is fine).
    * **Derivative order**: all orders. The surrogate is DiCE's
      :math:`\frac1N\sum_i \boxdot(\log p_i) f_i + (1 - \boxdot(\log p_i))\, b_i`, so
      ``jax.hessian`` of :func:`scoregrad.expectation` is an unbiased Hessian estimate.

    Args:
      baseline: a :mod:`scoregrad.baselines` baseline, or ``None`` for none.

    Returns:
      An :class:`~scoregrad.Estimator`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> theta = {"loc": jnp.zeros(2), "scale": jnp.ones(2)}
      >>> est = sg.score_function(baseline=sg.baselines.leave_one_out())
      >>> r = sg.estimate_grad(lambda x: jnp.sum(x**2), sg.families.normal(), theta,
      ...                      jax.random.key(0), num_samples=4096, estimator=est)
      >>> bool(jnp.all(jnp.abs(r.grad["scale"] - 2.0) < 5 * r.stderr["scale"]))
      True

    References:
      Williams, "Simple statistical gradient-following algorithms for connectionist reinforcement
      learning", 1992. Glynn, "Likelihood ratio gradient estimation for stochastic systems", 1990.
      Foerster et al., "DiCE: The Infinitely Differentiable Monte Carlo Estimator", 2018.
    """
    if baseline is None:
        baseline = _baselines.none()
    if not isinstance(baseline, Baseline):
        raise TypeError(
            f"score_function(baseline=...) must be a scoregrad baseline such as "
            f"sg.baselines.leave_one_out(), or None; got {type(baseline).__name__}."
        )

    def unit(model, params, draws, state):
        x = draws.sample()  # the engine draws ahead (presample): this returns its draw
        f = model.eval_f(params, x)
        box = magic_box(model.eval_log_prob(params, x))
        f_sg = jax.lax.stop_gradient(f)
        if baseline.uses_draw:
            feats = baseline.features(f_sg, state, x)
        else:
            feats = baseline.features(f_sg, state)
        terms = jnp.concatenate([(box * f)[None], (1.0 - box) * feats.astype(box.dtype)])
        return UnitOut(terms, f_sg[None])

    def weights(fstats: FStats, state, num_units):
        w = baseline.weights(fstats, state, num_units)
        return jnp.concatenate([jnp.ones((1,), fstats.mean.dtype), w.astype(fstats.mean.dtype)])

    name = "score_function" if baseline.name == "none" else f"score_function[{baseline.name}]"
    plan = Plan(
        unit=unit,
        weights=weights,
        min_units=baseline.min_samples,
        fitted=tuple(1 + i for i in baseline.fitted),
        shift_invariant=baseline.shift_invariant,
        # leave_one_out's and optimal's first feature is the constant 1: term 1 is -score.
        shift_term=1 if baseline.shift_invariant else None,
    )
    return Estimator(name, lambda theta: baseline.init(_dtype_of(theta)), lambda target: plan,
                     baseline.update)


def _dtype_of(theta):
    leaves = jax.tree_util.tree_leaves(theta)
    return jnp.result_type(*leaves) if leaves else jnp.result_type(float)
