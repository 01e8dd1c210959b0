r"""Policy-gradient losses for sequence policies (language-model RL), in one configurable form.

The *sequence-policy form*: for each of G prompts, K completions were sampled; ``logp[g, i, t]``
is the log-probability of token t of completion i under the current policy (differentiable in
its parameters), ``mask[g, i, t]`` is 1 on real tokens and 0 on padding, ``rewards[g, i]`` is the
completion's reward. ``old_logp`` (behaviour policy, the policy that sampled) and ``ref_logp``
(reference policy, for a KL penalty) have the shape of ``logp`` and are held fixed. Arrays of
shape ``(K, T)`` / ``(K,)`` are one group (G = 1).

Every loss returns a **loss to minimise**: minus a surrogate objective whose gradient is the
method's ascent direction. So ``-jax.grad(loss)`` is the update direction the method follows, and
for the unbiased ones $\mathbb E[-\nabla \text{loss}] = \nabla_\theta \mathbb E[R]$ (minus
$\beta\nabla\mathrm{KL}$ with a penalty). Advantages, baselines and normalisers never carry a
gradient. Without ``old_logp`` the behaviour policy is the current one: ratios are
$\exp(\log p - \mathrm{stop\_gradient}(\log p)) = 1$ at the point, with the gradient of $\log p$.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from scoregrad._src.lm_rl.kl import KL_ESTIMATORS, kl_estimate

_BASELINES = ("none", "mean", "loo")
_SCALES = ("none", "group_std", "batch")
_RATIOS = ("none", "token", "sequence", "sequence_mean")
_AGGREGATIONS = ("token", "sequence", "constant")
_KL_IN = ("loss", "reward", "reward_to_go")


class LossConfig(NamedTuple):
    r"""The options of :func:`sequence_loss`; the named losses are presets of it.

    Attributes:
        baseline: ``"none"``; ``"mean"`` (group mean, the completion's own reward included);
            ``"loo"`` (mean of the group's *other* rewards, RLOO).
        scale: ``"none"``; ``"group_std"`` (divide by the group's reward standard deviation,
            GRPO); ``"batch"`` (whiten over every valid token of the batch: subtract the token
            mean, divide by the token standard deviation, REINFORCE++).
        ddof: degrees of freedom of the group standard deviation (1 as ``torch.std``).
        eps: added to a standard deviation before dividing (a constant group gives advantage 0).
        ratio: ``"none"`` (on-policy surrogate $A\log p$, no ``old_logp`` allowed);
            ``"token"`` (PPO: $\rho_t = p_t/\mu_t$ per token); ``"sequence"`` ($\rho_i =
            p(o_i)/\mu(o_i)$, the exact importance weight); ``"sequence_mean"`` (GSPO: $\rho_i =
            (p(o_i)/\mu(o_i))^{1/|o_i|}$).
        clip_low, clip_high: clip range $[1 - \epsilon_{\rm low}, 1 + \epsilon_{\rm high}]$ of
            the ratio in $\min(\rho A, \mathrm{clip}(\rho) A)$; ``None`` for no clipping.
        aggregation: ``"token"`` (sum over every valid token of the batch / their number, DAPO);
            ``"sequence"`` (per-completion sum, divided by $|o_i|$ if ``length_norm``, then the
            mean over completions); ``"constant"`` (per-completion sum / ``normaliser``, then
            the mean: Dr. GRPO). Sequence-level ratios always average over completions.
        length_norm: divide each completion's token sum by its length $|o_i|$ (GRPO).
        normaliser: the constant of ``"constant"`` aggregation; ``None`` is T, the padded length.
        kl_coef: $\beta$ of the KL-to-reference penalty (0: none).
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see :func:`kl_estimate`).
        kl_in: ``"loss"`` (add $\beta\cdot$ the aggregated per-token estimate to the loss, with
            its gradient); ``"reward"`` (subtract $\beta\sum_t k_t$ from each completion's reward,
            no gradient, before the baseline); ``"reward_to_go"`` (token t's advantage gets
            $-\beta\sum_{s\ge t} k_s$, REINFORCE++).
    """

    baseline: str = "none"
    scale: str = "none"
    ddof: int = 1
    eps: float = 1e-6
    ratio: str = "none"
    clip_low: float | None = None
    clip_high: float | None = None
    aggregation: str = "sequence"
    length_norm: bool = False
    normaliser: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in: str = "loss"


def _choice(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}.")


def _check_config(c: LossConfig, k: int) -> None:
    _choice(c.baseline, _BASELINES, "baseline")
    _choice(c.scale, _SCALES, "scale")
    _choice(c.ratio, _RATIOS, "ratio")
    _choice(c.aggregation, _AGGREGATIONS, "aggregation")
    _choice(c.kl_estimator, KL_ESTIMATORS, "kl_estimator")
    _choice(c.kl_in, _KL_IN, "kl_in")
    if c.baseline == "loo" and k < 2:
        raise ValueError(f"baseline='loo' needs K >= 2 completions per prompt; got K = {k}.")
    if c.scale == "group_std" and k <= c.ddof:
        raise ValueError(f"scale='group_std' with ddof={c.ddof} needs K > {c.ddof}; got K = {k}.")
    if c.ratio.startswith("sequence") and c.kl_in == "reward_to_go":
        raise ValueError("kl_in='reward_to_go' gives per-token advantages; a sequence-level "
                         f"ratio ({c.ratio!r}) needs one advantage per completion: use "
                         "kl_in='reward' or 'loss'.")
    if c.normaliser is not None and c.normaliser <= 0:
        raise ValueError(f"normaliser must be positive; got {c.normaliser!r}.")


def _shapes(logp, mask, rewards, old_logp, ref_logp) -> tuple[
        jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    logp = jnp.asarray(logp)
    if logp.ndim not in (2, 3) or not jnp.issubdtype(logp.dtype, jnp.floating):
        raise ValueError("logp must be a float array of shape (K, T) or (G, K, T); got "
                         f"{logp.dtype}{logp.shape}.")
    squeeze = logp.ndim == 2
    lead = (1,) if squeeze else ()
    out: list[jax.Array | None] = [logp.reshape(lead + logp.shape)]
    for name, arr, shape in (("mask", mask, logp.shape), ("rewards", rewards, logp.shape[:-1]),
                             ("old_logp", old_logp, logp.shape),
                             ("ref_logp", ref_logp, logp.shape)):
        if arr is None:
            out.append(None)
            continue
        arr = jnp.asarray(arr)
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, matching logp {logp.shape}; "
                             f"got {arr.shape}.")
        out.append(jax.lax.stop_gradient(arr.reshape(lead + arr.shape)).astype(logp.dtype))
    lp, m, r, old, ref = out
    return cast(jax.Array, lp), cast(jax.Array, m), cast(jax.Array, r), old, ref


def _group_std(r, ddof):
    k = r.shape[-1]
    return jnp.sqrt(jnp.sum((r - r.mean(-1, keepdims=True)) ** 2, -1, keepdims=True) / (k - ddof))


def _advantages(rewards, mask, c: LossConfig, kl_tok):
    """Per-token advantages (G, K, T), without gradient."""
    r = rewards
    kl_tok = None if kl_tok is None else jax.lax.stop_gradient(kl_tok * mask)
    if c.kl_in == "reward" and kl_tok is not None:
        r = r - c.kl_coef * kl_tok.sum(-1)
    k = r.shape[-1]
    if c.baseline == "mean":
        a = r - r.mean(-1, keepdims=True)
    elif c.baseline == "loo":
        a = (r - r.mean(-1, keepdims=True)) * (k / (k - 1))  # r_i - mean of the others
    else:
        a = r
    if c.scale == "group_std":
        a = a / (_group_std(r, c.ddof) + c.eps)
    a = jnp.broadcast_to(a[..., None], mask.shape)
    if c.kl_in == "reward_to_go" and kl_tok is not None:
        a = a - c.kl_coef * jnp.flip(jnp.cumsum(jnp.flip(kl_tok, -1), -1), -1)
    if c.scale == "batch":
        n = jnp.maximum(mask.sum(), 1.0)
        mean = jnp.sum(a * mask) / n
        std = jnp.sqrt(jnp.sum((a - mean) ** 2 * mask) / n)
        a = (a - mean) / (std + c.eps)
    return jax.lax.stop_gradient(a)


def _aggregate(x, mask, c: LossConfig, length_norm):
    if c.aggregation == "token":
        return jnp.sum(x * mask) / jnp.maximum(mask.sum(), 1.0)
    per_seq = jnp.sum(x * mask, -1)
    if c.aggregation == "constant":
        per_seq = per_seq / (x.shape[-1] if c.normaliser is None else c.normaliser)
    elif length_norm:
        per_seq = per_seq / jnp.maximum(mask.sum(-1), 1.0)
    return per_seq.mean()


def _clipped(rho, adv, c: LossConfig):
    if c.clip_low is None and c.clip_high is None:
        return rho * adv
    lo = -jnp.inf if c.clip_low is None else 1.0 - c.clip_low
    hi = jnp.inf if c.clip_high is None else 1.0 + c.clip_high
    return jnp.minimum(rho * adv, jnp.clip(rho, lo, hi) * adv)


def sequence_loss(logp: ArrayLike, mask: ArrayLike, rewards: ArrayLike, *,
                  config: LossConfig | None = None, old_logp: ArrayLike | None = None,
                  ref_logp: ArrayLike | None = None) -> jax.Array:
    r"""The loss (minus the surrogate objective) of a sequence policy under ``config``.

    Args:
        logp: token log-probabilities under the current policy, ``(K, T)`` or ``(G, K, T)``.
        mask: 1 on real tokens, 0 on padding, same shape.
        rewards: one reward per completion, ``(K,)`` or ``(G, K)``.
        config: the method's options (:class:`LossConfig`, or a preset from :data:`PRESETS`);
            ``None``: ``LossConfig()``, plain REINFORCE.
        old_logp: behaviour-policy token log-probabilities (off-policy reuse); ``None`` for
            on-policy (ratios are 1 at the point, gradients as of $\log p$).
        ref_logp: reference-policy token log-probabilities; needed iff ``config.kl_coef != 0``.

    Returns:
        A scalar loss; ``-jax.grad`` of it (through ``logp``) is the method's update direction.

    Raises:
        ValueError: bad shapes or options, a missing ``ref_logp``, or ``old_logp`` with
            ``ratio="none"``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from scoregrad import lm_rl as lm
        >>> logp = jnp.log(jnp.array([[0.5, 0.5], [0.5, 1.0]]))
        >>> mask = jnp.array([[1.0, 1.0], [1.0, 0.0]])
        >>> float(lm.sequence_loss(logp, mask, jnp.array([1.0, 0.0]),
        ...                        config=lm.PRESETS["rloo"]))  # -(1 * log .25 - 1 * log .5) / 2
        0.3466
    """
    lp, mask, rewards, old, ref = _shapes(logp, mask, rewards, old_logp, ref_logp)
    c = LossConfig() if config is None else config
    _check_config(c, lp.shape[-2])
    kl_tok = None
    if c.kl_coef != 0.0:
        if ref is None:
            raise ValueError(f"kl_coef={c.kl_coef} needs ref_logp (reference-policy token "
                             "log-probabilities, the shape of logp).")
        kl_tok = kl_estimate(lp, ref, c.kl_estimator) * mask
    adv = _advantages(rewards, mask, c, kl_tok)
    if c.ratio == "none":
        if old is not None:
            raise ValueError("ratio='none' is the on-policy surrogate A*log p and ignores "
                             "old_logp; for off-policy reuse choose ratio='sequence' (exact "
                             "importance weight) or 'token' (PPO).")
        objective = _aggregate(adv * lp, mask, c, c.length_norm)
    else:
        old = jax.lax.stop_gradient(lp) if old is None else old
        if c.ratio == "token":
            rho = jnp.exp((lp - old) * mask)
            objective = _aggregate(_clipped(rho, adv, c), mask, c, c.length_norm)
        else:
            log_rho = jnp.sum((lp - old) * mask, -1)
            if c.ratio == "sequence_mean":
                log_rho = log_rho / jnp.maximum(mask.sum(-1), 1.0)
            objective = _clipped(jnp.exp(log_rho), adv[..., 0], c).mean()
    loss = -objective
    if kl_tok is not None and c.kl_in == "loss":
        length_norm = c.length_norm if not c.ratio.startswith("sequence") else True
        loss = loss + c.kl_coef * _aggregate(kl_tok, mask, c, length_norm)
    return loss
