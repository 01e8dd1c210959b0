r"""The named losses: presets of :class:`LossConfig`, each as its paper describes it.

Every named loss has the signature ``(logp, mask, rewards, *, old_logp=None, ref_logp=None,
**options)``, where ``options`` override fields of its preset (``lm.grpo_loss(...,
scale="none")``), and returns a loss to minimise (see :func:`sequence_loss`).
"""

from __future__ import annotations

from typing import Any, Callable

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


def _named(name: str) -> Callable[..., jax.Array]:
    preset = PRESETS[name]

    def loss(logp: ArrayLike, mask: ArrayLike, rewards: ArrayLike, *,
             old_logp: ArrayLike | None = None, ref_logp: ArrayLike | None = None,
             **options: Any) -> jax.Array:
        return sequence_loss(logp, mask, rewards, config=config(name, **options),
                             old_logp=old_logp, ref_logp=ref_logp)

    loss.__name__ = loss.__qualname__ = f"{name}_loss"
    loss.__doc__ = (f"The {name} loss: :func:`sequence_loss` with ``PRESETS[{name!r}]`` "
                    f"({preset}), fields overridden by ``options``.")
    return loss


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


reinforce_loss = _named("reinforce")
rloo_loss = _named("rloo")
grpo_loss = _named("grpo")
dr_grpo_loss = _named("dr_grpo")
dapo_loss = _named("dapo")
gspo_loss = _named("gspo")
reinforce_pp_loss = _named("reinforce_pp")
ppo_clip_loss = _named("ppo_clip")
