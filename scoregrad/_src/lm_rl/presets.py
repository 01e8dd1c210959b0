r"""The named losses: presets of :class:`LossConfig`, each as its paper describes it.

Every named loss has the signature ``(logp, mask, rewards, *, old_logp=None, ref_logp=None,
**options)``, where ``options`` override fields of its preset (``lm.grpo_loss(...,
scale="none")``), and returns a loss to minimise (see :func:`sequence_loss`).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.typing import ArrayLike

from scoregrad._src.lm_rl.losses import LossConfig, sequence_loss

PRESETS: dict[str, LossConfig] = {
    # Williams (1992): the score function of the sequence, no baseline.
    "reinforce": LossConfig(),
    # Kool, van Hoof and Welling (2019); Ahmadian et al. (2024): leave-one-out baseline.
    "rloo": LossConfig(baseline="loo"),
    # Shao et al. (2024), DeepSeekMath: (r - mean) / std, per-token clipped ratio (0.2), 1/|o_i|
    # per completion then the group mean; the paper's KL is k3 in the loss with beta = 0.04.
    "grpo": LossConfig(baseline="mean", scale="group_std", ratio="token", clip_low=0.2,
                       clip_high=0.2, aggregation="sequence", length_norm=True),
    # Liu et al. (2025), "Understanding R1-Zero-like training": no std, no 1/|o_i|; the token
    # sum is divided by a constant (the generation budget, here T).
    "dr_grpo": LossConfig(baseline="mean", ratio="token", clip_low=0.2, clip_high=0.2,
                          aggregation="constant"),
    # Yu et al. (2025), DAPO: token-level mean over the batch, clip-higher (0.2, 0.28).
    "dapo": LossConfig(baseline="mean", scale="group_std", ratio="token", clip_low=0.2,
                       clip_high=0.28, aggregation="token"),
    # Zheng et al. (2025), GSPO: length-normalised sequence ratio, sequence clip (3e-4, 4e-4).
    "gspo": LossConfig(baseline="mean", scale="group_std", ratio="sequence_mean",
                       clip_low=3e-4, clip_high=4e-4, aggregation="sequence", length_norm=True),
    # Hu (2025), REINFORCE++: no critic, no group baseline; token returns (KL to go in the
    # reward), whitened over the batch; PPO clip 0.2; token-mean aggregation (our choice).
    "reinforce_pp": LossConfig(scale="batch", ratio="token", clip_low=0.2, clip_high=0.2,
                               aggregation="token", kl_estimator="k1", kl_in="reward_to_go"),
    # Schulman et al. (2017), PPO's clipped ratio with an asymmetric range; advantages here from
    # the leave-one-out baseline (there is no critic), token-mean aggregation.
    "ppo_clip": LossConfig(baseline="loo", ratio="token", clip_low=0.2, clip_high=0.28,
                           aggregation="token"),
}
"""The named losses' configurations: ``PRESETS[name]`` is the :class:`LossConfig` of
``{name}_loss``, as its paper describes it."""


def config(name: str, **options: Any) -> LossConfig:
    """The preset ``name`` with some fields replaced, e.g. ``config("grpo", scale="none")``.

    Raises:
        ValueError: an unknown preset or option name.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(PRESETS)}.")
    bad = sorted(set(options) - set(LossConfig._fields))
    if bad:
        raise ValueError(f"unknown option(s) {bad} for {name}; the options are the fields of "
                         f"LossConfig: {LossConfig._fields}.")
    return PRESETS[name]._replace(**options)


# The arguments and return value every named loss shares: each docstring's ``{args}`` (so that
# help() and the API page show them in full; docs/griffe_docstrings.py renders the result).
_ARGS = """Args:
        logp: token log-probabilities under the current policy, ``(K, T)`` or ``(G, K, T)``.
        mask: 1 on real tokens, 0 on padding, same shape.
        rewards: ``(K,)`` or ``(G, K)``.
        old_logp: behaviour-policy token log-probabilities (off-policy); ``None``: on-policy.
        ref_logp: reference-policy token log-probabilities (needed with ``kl_coef``).
        **options: fields of :class:`LossConfig` overriding the preset.

    Returns:
        A scalar loss to minimise; ``-jax.grad`` of it is the method's update direction."""


def _run(name, logp, mask, rewards, old_logp, ref_logp, options) -> jax.Array:
    return sequence_loss(logp, mask, rewards, config=config(name, **options),
                         old_logp=old_logp, ref_logp=ref_logp)


def reinforce_loss(logp: ArrayLike, mask: ArrayLike, rewards: ArrayLike, *,
                   old_logp: ArrayLike | None = None, ref_logp: ArrayLike | None = None,
                   **options: Any) -> jax.Array:
    r"""REINFORCE on sequences (Williams 1992): $-\frac1K\sum_i r_i \log p(o_i)$.

    Unbiased on-policy: $\mathbb E[-\nabla\text{loss}] = \nabla\,\mathbb E[R]$ (exact in
    ``tests/test_lm_rl.py``); with ``ratio="sequence"`` also off-policy. Needs only reward values.

    {args}
    """
    return _run("reinforce", logp, mask, rewards, old_logp, ref_logp, options)


def rloo_loss(logp: ArrayLike, mask: ArrayLike, rewards: ArrayLike, *,
              old_logp: ArrayLike | None = None, ref_logp: ArrayLike | None = None,
              **options: Any) -> jax.Array:
    r"""RLOO (Kool et al. 2019; Ahmadian et al. 2024): REINFORCE with the leave-one-out baseline
    $\frac1{K-1}\sum_{j\ne i} r_j$, token sum per completion, no std scaling. Needs K >= 2.

    Unbiased on-policy for every K (and with ``ratio="sequence"`` off-policy); with
    ``kl_coef``, ``kl_estimator="k1"`` and ``kl_in="reward"`` (or ``"reward_to_go"``) unbiased
    for $\nabla(\mathbb E[R] - \beta\,\mathrm{KL}(p\,\|\,p_{\rm ref}))$.

    {args}

    Examples:
        >>> import jax.numpy as jnp
        >>> from scoregrad import lm_rl as lm
        >>> logp = jnp.log(jnp.array([[0.5, 0.5], [0.5, 1.0]]))
        >>> mask = jnp.array([[1.0, 1.0], [1.0, 0.0]])
        >>> float(lm.rloo_loss(logp, mask, jnp.array([1.0, 0.0])))
        0.3466
    """
    return _run("rloo", logp, mask, rewards, old_logp, ref_logp, options)


def grpo_loss(logp: ArrayLike, mask: ArrayLike, rewards: ArrayLike, *,
              old_logp: ArrayLike | None = None, ref_logp: ArrayLike | None = None,
              **options: Any) -> jax.Array:
    r"""GRPO (Shao et al. 2024): $A_i = (r_i - \bar r)/(\mathrm{std}(r) + \epsilon)$,
    per-token ratio clipped to $[0.8, 1.2]$, $\frac1{|o_i|}\sum_t$ per completion, then the
    group mean. The paper adds $\beta = 0.04$ times k3 as a loss term (``kl_coef=0.04``).

    **Biased** in direction, not only in scale: the std scaling and the $1/|o_i|$ each bias it
    (exact table in ``docs/lm-rl.md``).

    {args}
    """
    return _run("grpo", logp, mask, rewards, old_logp, ref_logp, options)


def dr_grpo_loss(logp: ArrayLike, mask: ArrayLike, rewards: ArrayLike, *,
                 old_logp: ArrayLike | None = None, ref_logp: ArrayLike | None = None,
                 **options: Any) -> jax.Array:
    r"""Dr. GRPO (Liu et al. 2025): GRPO without std scaling and without $1/|o_i|$; each
    completion's token sum is divided by a constant (``normaliser``, default T).

    Unbiased up to a constant: on-policy $\mathbb E[-\nabla\text{loss}] =
    \frac{K-1}{K\,C}\nabla\,\mathbb E[R]$ exactly (the group mean includes the completion's
    own reward).

    {args}
    """
    return _run("dr_grpo", logp, mask, rewards, old_logp, ref_logp, options)


def dapo_loss(logp: ArrayLike, mask: ArrayLike, rewards: ArrayLike, *,
              old_logp: ArrayLike | None = None, ref_logp: ArrayLike | None = None,
              **options: Any) -> jax.Array:
    r"""DAPO (Yu et al. 2025): group-normalised advantages, clip-higher ratio range
    $[1 - 0.2, 1 + 0.28]$, token-level mean over the batch ($1/\sum_i|o_i|$).

    **Biased** (std scaling; the token-count normaliser depends on the draws). Dynamic sampling
    is not part of the loss (see ``docs/lm-rl.md``).

    {args}
    """
    return _run("dapo", logp, mask, rewards, old_logp, ref_logp, options)


def gspo_loss(logp: ArrayLike, mask: ArrayLike, rewards: ArrayLike, *,
              old_logp: ArrayLike | None = None, ref_logp: ArrayLike | None = None,
              **options: Any) -> jax.Array:
    r"""GSPO (Zheng et al. 2025): sequence ratio $(p(o_i)/\mu(o_i))^{1/|o_i|}$ clipped to
    $[1 - 3\cdot10^{-4}, 1 + 4\cdot10^{-4}]$, group-normalised advantages, mean over
    completions.

    **Biased** (std scaling, length normalisation); on-policy its expected update equals GRPO's.

    {args}
    """
    return _run("gspo", logp, mask, rewards, old_logp, ref_logp, options)


def reinforce_pp_loss(logp: ArrayLike, mask: ArrayLike, rewards: ArrayLike, *,
                      old_logp: ArrayLike | None = None, ref_logp: ArrayLike | None = None,
                      **options: Any) -> jax.Array:
    r"""REINFORCE++ (Hu 2025): token returns $r_i - \beta\sum_{s\ge t}k_{1,s}$ (KL to go,
    when ``kl_coef`` > 0), whitened over every valid token of the batch, PPO clip 0.2, token
    mean.

    **Biased** (the batch whitening divides by a standard deviation of the draws).

    {args}
    """
    return _run("reinforce_pp", logp, mask, rewards, old_logp, ref_logp, options)


def ppo_clip_loss(logp: ArrayLike, mask: ArrayLike, rewards: ArrayLike, *,
                  old_logp: ArrayLike | None = None, ref_logp: ArrayLike | None = None,
                  **options: Any) -> jax.Array:
    r"""PPO's clipped ratio (Schulman et al. 2017), asymmetric range $[1 - 0.2, 1 + 0.28]$,
    leave-one-out advantages (no critic), token mean.

    On-policy the clip is inactive (same gradient as unclipped, for every sample); biased with
    the token mean, unbiased with ``aggregation="sequence"``. Off-policy the per-token ratio is
    biased; ``ratio="sequence"`` without clipping is not.

    {args}
    """
    return _run("ppo_clip", logp, mask, rewards, old_logp, ref_logp, options)


for _loss in (reinforce_loss, rloo_loss, grpo_loss, dr_grpo_loss, dapo_loss, gspo_loss,
              reinforce_pp_loss, ppo_clip_loss):
    if _loss.__doc__:  # None under python -OO
        _loss.__doc__ = _loss.__doc__.replace("{args}", _ARGS)
del _loss
