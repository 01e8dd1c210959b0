r"""The exact bias table: for each loss and group size K, $\mathbb E[-\nabla\text{loss}]$
against the true gradient, on the enumerable toy (float64)."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from scoregrad._src.lm_rl import exact
from scoregrad._src.lm_rl import toy as toy_lib
from scoregrad._src.lm_rl.losses import sequence_loss
from scoregrad._src.lm_rl.presets import config

KL_COEF = 0.1


class Row(NamedTuple):
    """One row of :data:`TABLE_ROWS`: a label, a preset and the options that override it."""

    label: str
    preset: str
    options: dict


TABLE_ROWS: tuple[Row, ...] = (
    Row("REINFORCE", "reinforce", {}),
    Row("RLOO", "rloo", {}),
    Row("GRPO (std, 1/|o|)", "grpo", {}),
    Row("GRPO without std", "grpo", {"scale": "none"}),
    Row("GRPO without 1/|o|", "grpo", {"length_norm": False}),
    Row("Dr. GRPO (constant T)", "dr_grpo", {}),
    Row("DAPO (token mean)", "dapo", {}),
    Row("GSPO", "gspo", {}),
    Row("REINFORCE++ (batch whitening)", "reinforce_pp", {}),
    Row("PPO clip, LOO adv., token mean", "ppo_clip", {}),
    Row("PPO clip, LOO adv., sequence sum", "ppo_clip", {"aggregation": "sequence"}),
    Row("RLOO + k1 in reward", "rloo", {"kl_coef": KL_COEF, "kl_estimator": "k1",
                                        "kl_in": "reward"}),
    Row("RLOO + k1 reward-to-go", "rloo", {"kl_coef": KL_COEF, "kl_estimator": "k1",
                                           "kl_in": "reward_to_go"}),
    Row("RLOO + k3 in reward", "rloo", {"kl_coef": KL_COEF, "kl_estimator": "k3",
                                        "kl_in": "reward"}),
    Row("RLOO + k1 as loss", "rloo", {"kl_coef": KL_COEF, "kl_estimator": "k1"}),
    Row("RLOO + k2 as loss", "rloo", {"kl_coef": KL_COEF, "kl_estimator": "k2"}),
    Row("RLOO + k3 as loss", "rloo", {"kl_coef": KL_COEF, "kl_estimator": "k3"}),
    Row("GRPO + k3 as loss", "grpo", {"kl_coef": KL_COEF, "kl_estimator": "k3"}),
    Row("REINFORCE++ + k1 reward-to-go", "reinforce_pp", {"kl_coef": KL_COEF}),
)
"""The rows of the exact bias table (:func:`bias_table`): every named loss with its paper's
options, GRPO with each bias source removed, and KL-penalty variants (beta = 0.1)."""


def default_problem() -> tuple[toy_lib.Toy, Any, Any]:
    """The table's toy (V = 3, T = 3, 3 prompts, N = 15), its parameters and reference."""
    toy = toy_lib.make_toy()
    theta = toy_lib.init_params(toy, jax.random.key(0), 0.7)
    ref = toy_lib.init_params(toy, jax.random.key(1), 0.7)
    return toy, theta, ref


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _truth(toy, theta, ref, kl_coef):
    return jax.jit(lambda th: exact.true_grad(toy, th, ref=ref, kl_coef=kl_coef))(theta)


def bias_row(row: Row, k: int, toy: toy_lib.Toy, theta, ref, truth=None) -> dict:
    """One cell: the exact expected update of ``row`` with K = ``k`` against its target
    (``truth``, the target gradient, is computed when not given)."""
    cfg = config(row.preset, **row.options)
    loss = lambda lp, m, r, **kw: sequence_loss(lp, m, r, config=cfg, **kw)
    kl_coef = cfg.kl_coef
    idx, logc = exact.multisets(toy.tokens.shape[0], k)
    run = jax.jit(lambda th, idx, logc: exact._expected_grad(loss, toy, th, None,
                                                             ref if kl_coef else None, idx, logc))
    _, g = run(theta, idx, logc)
    if truth is None:
        truth = _truth(toy, theta, ref, kl_coef)
    g, t = _flat(g), _flat(truth)
    bias = float(np.linalg.norm(g - t))
    return {"loss": row.label, "preset": row.preset, "options": dict(row.options), "K": k,
            "bias": bias, "relative": bias / float(np.linalg.norm(t)),
            "cosine": float(g @ t / (np.linalg.norm(g) * np.linalg.norm(t))),
            "scale": float(g @ t / (t @ t)), "kl_coef": kl_coef}


def bias_table(rows: Sequence[Row] = TABLE_ROWS, ks: Sequence[int] = (2, 4, 8), *,
               problem: tuple | None = None) -> list[dict]:
    r"""The exact bias of every loss in ``rows`` for every K in ``ks``.

    For each cell: $g = \mathbb E[-\nabla_\theta\,\text{loss}]$ exactly (multiset enumeration
    over all K-tuples of completions per prompt, on-policy, averaged over prompts) and the
    target $t = \nabla_\theta\,(\mathbb E[R] - \beta\,\mathrm{KL}(p_\theta\|p_{\rm ref}))$
    ($\beta$ the row's ``kl_coef``, 0 without penalty). Reported: ``bias`` $\|g - t\|$,
    ``relative`` $\|g - t\|/\|t\|$, ``cosine`` of $g$ and $t$, and ``scale``
    $\langle g, t\rangle / \|t\|^2$ (a loss with cosine 1 and scale $c \ne 1$ is unbiased up to
    the constant factor $c$, e.g. Dr. GRPO's $(K-1)/(KT)$).

    Args:
        rows: the losses (:data:`TABLE_ROWS` by default).
        ks: group sizes; the default toy enumerates K = 8 (319 770 multisets per prompt) in a
            few seconds per row.
        problem: ``(toy, theta, ref)``; :func:`default_problem` by default.

    Returns:
        One dict per (row, K) with the keys above plus ``loss``, ``preset``, ``options``, ``K``.

    Float64 needs ``jax.enable_x64``; the table is computed in whatever precision is enabled.
    """
    toy, theta, ref = default_problem() if problem is None else problem
    truths: dict[float, Any] = {}
    cells = []
    for row in rows:
        kl_coef = config(row.preset, **row.options).kl_coef
        if kl_coef not in truths:
            truths[kl_coef] = _truth(toy, theta, ref, kl_coef)
        cells += [bias_row(row, k, toy, theta, ref, truths[kl_coef]) for k in ks]
    return cells


def verdict(cell: dict, tol: float = 1e-10) -> str:
    """``unbiased`` (relative bias < tol), ``scaled`` (cosine 1 to tol, another scale) or
    ``biased``."""
    if cell["relative"] < tol:
        return "unbiased"
    if 1.0 - cell["cosine"] < tol:
        return f"scaled ({cell['scale']:.4g})"
    return "biased"


def markdown(cells: Sequence[dict]) -> str:
    """The table as markdown: one line per (loss, K)."""
    lines = ["| loss | K | ‖E ĝ − ∇J‖ | relative | cosine | scale | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        label = c["loss"].replace("|", "\\|")
        lines.append(f"| {label} | {c['K']} | {c['bias']:.3e} | {c['relative']:.3e} | "
                     f"{c['cosine']:.6f} | {c['scale']:.4f} | {verdict(c)} |")
    return "\n".join(lines)
