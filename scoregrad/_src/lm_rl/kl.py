r"""Per-token estimators of KL(p || p_ref) from draws of p (Schulman's k1, k2, k3).

With a token drawn from the current policy $p$ and $r = p_{\rm ref}/p$ at that token:

$$k_1 = -\log r, \qquad k_2 = \tfrac12 (\log r)^2, \qquad k_3 = (r - 1) - \log r.$$

Values: $\mathbb E_p[k_1] = \mathbb E_p[k_3] = \mathrm{KL}(p\,\|\,p_{\rm ref})$ exactly, and
$\mathbb E_p[k_2]$ only to second order in $\log r$. Summed over the tokens of a completion, the
expected sum of $k_1$ or $k_3$ is the sequence-level KL (chain rule of KL).

Gradients when the estimator is *differentiated as a loss term* (gradient through $p$ both in
$\log p$ and in $r$; draws held fixed), for one categorical distribution:

* $\mathbb E_p[\nabla k_1] = \mathbb E_p[\nabla \log p] = 0$: $k_1$ as a loss does nothing on
  average.
* $\nabla k_2 = \log(p/p_{\rm ref})\,\nabla\log p$, so $\mathbb E_p[\nabla k_2] =
  \nabla\,\mathrm{KL}(p\,\|\,p_{\rm ref})$.
* $\nabla k_3 = (1 - r)\nabla\log p$, so $\mathbb E_p[\nabla k_3] = -\sum_x p_{\rm ref}(x)
  \nabla\log p(x) = \nabla\,\mathrm{KL}(p_{\rm ref}\,\|\,p)$: the *reverse* KL's gradient.

For sequences the per-token loss terms also miss the dependence of later states on earlier
tokens, so none of the three, summed over tokens, gives $\nabla\,\mathrm{KL}$ of the sequence
distribution in general; the estimator $k_1$ placed in the *reward* (stop-gradient, multiplied
by the score) does. ``tests/test_lm_rl.py`` checks each statement by exact enumeration.

References:
    J. Schulman, "Approximating KL divergence", blog post, 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

KL_ESTIMATORS = ("k1", "k2", "k3")
"""The per-token KL estimators :func:`kl_estimate` accepts."""


def kl_estimate(logp: ArrayLike, ref_logp: ArrayLike, estimator: str = "k3") -> jax.Array:
    r"""Per-token estimate of KL(p || p_ref) at tokens drawn from p.

    Args:
        logp: log-probabilities of the drawn tokens under the current policy p (differentiable).
        ref_logp: their log-probabilities under the reference policy (held fixed).
        estimator: ``"k1"`` ($-\log r$), ``"k2"`` ($\frac12(\log r)^2$) or ``"k3"``
            ($r - 1 - \log r$), with $r = p_{\rm ref}/p$.

    Returns:
        The elementwise estimate, same shape as ``logp``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from scoregrad import lm_rl as lm
        >>> float(lm.kl_estimate(jnp.log(0.5), jnp.log(0.25), "k1"))  # log 2
        0.6931
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}; got {estimator!r}.")
    log_r = jnp.asarray(ref_logp) - jnp.asarray(logp)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    return jnp.expm1(log_r) - log_r
