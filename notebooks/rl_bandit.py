# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Policy gradients: REINFORCE on a bandit (and CartPole)
#
# A 10-armed Gaussian bandit with a softmax policy. Its expected return
# $J(\theta) = \sum_a \pi_a \mu_a$ and policy gradient $\pi \odot (\mu - J)$ are exact, so we can
# see the estimators' error and variance directly. Code: `scoregrad.examples.rl`.

# %%
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt

import scoregrad as sg
from scoregrad.examples import rl

SMOKE = os.environ.get("SCOREGRAD_SMOKE") == "1"
FIGURES = os.environ.get("SCOREGRAD_FIGURES", "figures")


def save(fig, name):
    """Jupyter shows a figure inline; run as a script, the notebook saves it as FIGURES/name.png."""
    if "ipykernel" not in sys.modules:
        os.makedirs(FIGURES, exist_ok=True)
        fig.savefig(os.path.join(FIGURES, f"{name}.png"), dpi=110, bbox_inches="tight")
        print("saved", os.path.join(FIGURES, f"{name}.png"))


NUM_STEPS = 10 if SMOKE else 300
bandit = rl.make_bandit(10, key=jax.random.key(0))
print("arm means", bandit.means)

# %% [markdown]
# ## The estimate against the exact gradient

# %%
theta = jnp.linspace(-1.0, 1.0, 10)
exact = rl.exact_policy_gradient(theta, bandit)
estimators = {
    "REINFORCE": sg.score_function(),
    "RLOO": sg.score_function(sg.baselines.leave_one_out()),
}
for name, est in estimators.items():
    r = rl.policy_gradient(theta, bandit, jax.random.key(1), num_samples=4096, estimator=est)
    z = jnp.max(jnp.abs(r.grad - exact) / r.stderr)
    print(f"{name:10s} max |error|/SE = {float(z):.2f}, mean per-draw variance "
          f"{float(jnp.mean(r.variance)):.4f}")
    assert z <= 5.0, name  # every coordinate within 5 standard errors of the exact gradient

# %% [markdown]
# ## Learning curves
# REINFORCE with no baseline, with leave-one-out (RLOO), with a moving average of past returns,
# and with a learned value baseline (`sg.baselines.learned`, its parameter fitted after each
# step by the `fit` it returns), all with Adam, 16 pulls a step, averaged over independent
# seeds (the band is ± 2 standard errors of that mean).
#
# A baseline removes the part of the reward that is common to all actions. This bandit's arm
# means are standard normal, so the mean return starts near 0 and there is little to remove:
# the variances above are close, and on the left the four curves coincide. On the right every
# reward is shifted by +5 (a typical all-positive reward: the same optimal arm and the same
# exact gradient); now REINFORCE's variance grows with the shift and it learns visibly slower,
# while the baselines, which subtract the shift, are not affected (RLOO exactly, the moving
# average and the learned value once they have tracked it).

# %%
SEEDS = 2 if SMOKE else 8
SHIFT = 5.0
curves, learned_phi = {}, {}
for shift in (0.0, SHIFT):
    shifted = bandit._replace(means=bandit.means + shift)
    learned, fit = rl.learned_bandit_baseline()
    runs = {
        "REINFORCE": (sg.score_function(), None),
        "RLOO": (sg.score_function(sg.baselines.leave_one_out()), None),
        "moving average": (sg.score_function(sg.baselines.moving_average(0.9)), None),
        "learned": (learned, fit),
    }
    for name, (est, fit_baseline) in runs.items():
        def one_seed(key, est=est, fit_baseline=fit_baseline, shifted=shifted):
            return rl.train_bandit(shifted, key, num_steps=NUM_STEPS, num_samples=16,
                                   estimator=est, fit_baseline=fit_baseline, learning_rate=0.05)

        res = jax.vmap(one_seed)(jax.random.split(jax.random.key(2), SEEDS))
        curves[shift, name] = res.curve - shift  # the return of the unshifted bandit
        if name == "learned":
            learned_phi[shift] = float(jnp.mean(res.state.params))
print("learned baseline's final parameter (mean over seeds):",
      {s: round(v, 3) for s, v in learned_phi.items()})

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
styles = {"REINFORCE": ("C0", "-"), "RLOO": ("C1", "--"), "moving average": ("C2", "-."),
          "learned": ("C3", ":")}
for ax, shift in zip(axes, (0.0, SHIFT)):
    for name, (color, ls) in styles.items():
        c = curves[shift, name]
        mean, se = jnp.mean(c, 0), jnp.std(c, 0, ddof=1) / jnp.sqrt(SEEDS)
        ax.plot(mean, color=color, ls=ls, lw=1.8, label=name)
        ax.fill_between(jnp.arange(len(mean)), mean - 2 * se, mean + 2 * se, color=color,
                        alpha=0.15, lw=0)
    ax.axhline(float(bandit.means.max()), color="k", ls=":", lw=1, label="best arm")
    ax.set(xlabel="step", title=f"rewards shifted by +{shift:g}" if shift else "rewards as they are")
axes[0].set(ylabel="exact expected return (unshifted)")
axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
fig.suptitle(f"10-armed bandit, mean of {SEEDS} seeds")
fig.tight_layout()
save(fig, "rl_bandit_1")
if not SMOKE:  # the text's claims, checked: no difference unshifted, REINFORCE slower shifted
    early = {k: jnp.mean(c[:, 25:100], axis=1) for k, c in curves.items()}  # per seed

    def gap(shift, a, b):
        d = early[shift, a] - early[shift, b]
        return float(jnp.mean(d)), float(jnp.std(d, ddof=1) / jnp.sqrt(SEEDS))

    for shift in (0.0, SHIFT):
        d, se = gap(shift, "RLOO", "REINFORCE")
        print(f"shift {shift:g}: RLOO minus REINFORCE, mean return over steps 25-100: "
              f"{d:.3f} ± {se:.3f}")
    assert abs(gap(0.0, "RLOO", "REINFORCE")[0]) <= 5 * gap(0.0, "RLOO", "REINFORCE")[1] + 0.05
    assert gap(SHIFT, "RLOO", "REINFORCE")[0] > 3 * gap(SHIFT, "RLOO", "REINFORCE")[1]
    assert abs(learned_phi[SHIFT] - learned_phi[0.0] - SHIFT) < 1.0  # the baseline did train

# %% [markdown]
# ## CartPole (gymnax, optional)
# Episodes are rolled out with `lax.scan` inside the family's sampler; the score is the sum of the
# policy's log-probabilities. Skipped in smoke mode and when gymnax is not installed
# (`pip install 'scoregrad[rl]'`).

# %%
if not SMOKE and importlib.util.find_spec("gymnax") is not None:
    res = rl.train_cartpole(jax.random.key(3), num_steps=60, num_samples=16, max_steps=200)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(res.curve)
    ax.set(xlabel="step", ylabel="mean episode return", title="CartPole, REINFORCE + RLOO")
    fig.tight_layout()
    save(fig, "rl_bandit_2")
