r"""Language-model RL losses (RLOO, GRPO, Dr. GRPO, DAPO, GSPO, REINFORCE++, PPO clip) and
their exact bias on an enumerable toy.

``import scoregrad.lm_rl as lm``. Losses take token log-probabilities ``(K, T)`` or
``(G, K, T)``, a mask and one reward per completion, and return a **loss to minimise** (minus
the surrogate objective): ``-jax.grad`` of it is the method's update direction. See
``docs/lm-rl.md`` for the formulas and the exact bias table.
"""

from scoregrad._src.lm_rl.exact import expected_grad, multisets, true_grad
from scoregrad._src.lm_rl.kl import KL_ESTIMATORS, kl_estimate
from scoregrad._src.lm_rl.losses import LossConfig, sequence_loss
from scoregrad._src.lm_rl.presets import (
    PRESETS,
    config,
    dapo_loss,
    dr_grpo_loss,
    grpo_loss,
    gspo_loss,
    ppo_clip_loss,
    reinforce_loss,
    reinforce_pp_loss,
    rloo_loss,
)
from scoregrad._src.lm_rl.table import (
    TABLE_ROWS,
    Row,
    bias_row,
    bias_table,
    default_problem,
    markdown,
    verdict,
)
from scoregrad._src.lm_rl.toy import (
    Toy,
    expected_reward,
    init_params,
    kl,
    make_toy,
    sample,
    seq_logp,
    token_logp,
)

__all__ = [
    "KL_ESTIMATORS",
    "LossConfig",
    "PRESETS",
    "Row",
    "TABLE_ROWS",
    "Toy",
    "bias_row",
    "bias_table",
    "config",
    "dapo_loss",
    "default_problem",
    "dr_grpo_loss",
    "expected_grad",
    "expected_reward",
    "grpo_loss",
    "gspo_loss",
    "init_params",
    "kl",
    "kl_estimate",
    "make_toy",
    "markdown",
    "multisets",
    "ppo_clip_loss",
    "reinforce_loss",
    "reinforce_pp_loss",
    "rloo_loss",
    "sample",
    "seq_logp",
    "sequence_loss",
    "token_logp",
    "true_grad",
    "verdict",
]
