"""The pathwise (reparameterization) estimator."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scoregrad._src import validation
from scoregrad._src.base import Estimator, Plan, UnitOut, fixed


def _check(target):
    fam, theta, x_struct = target.family, target.theta, target.x_struct
    if fam.reparameterized is False:
        raise TypeError(
            f"pathwise() needs a reparameterizable sampler, but family {fam.name!r} declares "
            "reparameterized=False (its draws are not differentiable in theta). Use "
            "sg.score_function() (any family), or a relaxation for discrete families."
        )
    for leaf in jax.tree_util.tree_leaves(x_struct):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"pathwise() needs draws that are differentiable in theta, but family "
                f"{fam.name!r} samples dtype {leaf.dtype}. Use sg.score_function() instead."
            )
    if fam.reparameterized is None:  # a user sampler: check that draws move with theta
        key = jax.random.PRNGKey(0) if target.legacy_key else jax.random.key(0)
        if validation.depends_differentiably(fam.sample, (theta, key), 0) is False:
            raise TypeError(
                f"pathwise() needs a sampler differentiable in theta, but the draws of family "
                f"{fam.name!r} have a zero derivative in theta (a stop_gradient, comparison, "
                "rounding or integer cast in `sample`). Write the sampler as a differentiable "
                "transform of parameter-free noise (e.g. loc + scale * eps), or use "
                "sg.score_function()."
            )


def pathwise() -> Estimator:
    r"""The pathwise (reparameterization) estimator.

    .. math::
       \nabla_\theta\, \mathbb{E}[f(x)] \approx \frac1N\sum_i \nabla_\theta f\big(g(\theta,
       \epsilon_i)\big), \qquad x_i = g(\theta, \epsilon_i) = \texttt{sample}(\theta, key_i).

    * **Bias**: unbiased when ``sample`` is a differentiable transformation of parameter-free
      noise and f is differentiable (almost everywhere, and Lipschitz).
    * **Needs from f**: differentiable in x. A step function gives a zero (wrong) gradient.
    * **Needs from the family**: a sampler differentiable in theta (``loc + scale * eps``); a
      family with ``reparameterized=False``, integer draws, or (for a user family) a sampler
      whose draws have a structurally zero derivative in theta raises ``TypeError``.
    * **Derivative order**: all orders (``jax.hessian`` differentiates through the sampler).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> theta = {"loc": jnp.ones(3), "scale": jnp.ones(3)}
      >>> r = sg.estimate_grad(lambda x: jnp.sum(x**2), sg.families.normal(), theta,
      ...                      jax.random.key(0), num_samples=1000, estimator=sg.pathwise())
      >>> bool(jnp.allclose(r.grad["loc"], 2.0, atol=5 * r.stderr["loc"].max()))
      True

    References:
      Kingma and Welling, "Auto-Encoding Variational Bayes", 2014. Mohamed et al., "Monte Carlo
      Gradient Estimation in Machine Learning", JMLR 2020, §5.
    """

    def unit(model, params, draws, state):
        del state
        x = draws.rsample()  # differentiable through the sampler: given draws are refused
        f = model.eval_f(params, x)
        return UnitOut(f[None], jax.lax.stop_gradient(f)[None])

    return fixed("pathwise", Plan(unit, shift_invariant=True), check=_check)
