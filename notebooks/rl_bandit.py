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

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt

import scoregrad as sg
from scoregrad.examples import rl

SMOKE = os.environ.get("SCOREGRAD_SMOKE") == "1"
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

# %% [markdown]
# ## Learning curves
# REINFORCE with no baseline, with leave-one-out (RLOO), with a moving average of past returns,
# and with a learned value baseline (`sg.baselines.learned`), all with Adam and 16 pulls a step.

# %%
learned, fit = rl.learned_bandit_baseline()
runs = {
    "REINFORCE": (sg.score_function(), None),
    "RLOO": (sg.score_function(sg.baselines.leave_one_out()), None),
    "moving average": (sg.score_function(sg.baselines.moving_average(0.9)), None),
    "learned": (learned, fit),
}
curves = {}
for name, (est, fit_baseline) in runs.items():
    res = rl.train_bandit(bandit, jax.random.key(2), num_steps=NUM_STEPS, num_samples=16,
                          estimator=est, fit_baseline=fit_baseline, learning_rate=0.05)
    curves[name] = res.curve

fig, ax = plt.subplots(figsize=(6, 3.5))
for name, c in curves.items():
    ax.plot(c, label=name)
ax.axhline(float(bandit.means.max()), color="k", ls=":", label="best arm")
ax.set(xlabel="step", ylabel="exact expected return", title="10-armed bandit")
ax.legend()
fig.tight_layout()

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
