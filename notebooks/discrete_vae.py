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
# # A discrete VAE: Bernoulli latents and the estimator menu
#
# Binarized 8×8 digits from scikit-learn, a linear encoder $q(z\mid x)$ and decoder
# $p(x\mid z)$ with 16 Bernoulli latents. The encoder's gradient goes through binary draws, so it
# needs the score function or one of its discrete-specific successors; we compare the training
# ELBO against wall-clock time, and the variance of the encoder gradient. Every estimator spends
# the same number of evaluations of f per step (`num_samples` counts them). Code:
# `scoregrad.examples.vae`.

# %%
import os
import sys

import jax
import matplotlib.pyplot as plt
import numpy as np

from scoregrad.examples import vae

SMOKE = os.environ.get("SCOREGRAD_SMOKE") == "1"
FIGURES = os.environ.get("SCOREGRAD_FIGURES", "figures")


def save(fig, name):
    """Jupyter shows a figure inline; run as a script, the notebook saves it as FIGURES/name.png."""
    if "ipykernel" not in sys.modules:
        os.makedirs(FIGURES, exist_ok=True)
        fig.savefig(os.path.join(FIGURES, f"{name}.png"), dpi=110, bbox_inches="tight")
        print("saved", os.path.join(FIGURES, f"{name}.png"))


NUM_STEPS, LATENT = (3, 4) if SMOKE else (2000, 16)
data = vae.load_digits()
estimators = vae.default_estimators()
if SMOKE:
    estimators = {k: estimators[k] for k in ("RLOO", "DisARM") if k in estimators}
print(data.shape, list(estimators))

# %%
results = {}
for name, est in estimators.items():
    results[name] = vae.train(data, jax.random.key(0), estimator=est, num_steps=NUM_STEPS,
                              batch_size=32, num_samples=8, latent_dim=LATENT,
                              learning_rate=1e-2)
    r = results[name]
    print(f"{name:15s} ELBO first {float(r.elbo[:10].mean()):8.3f}  last "
          f"{float(r.elbo[-10:].mean()):8.3f}   {1e3 * r.seconds_per_step:6.2f} ms/step")

# %%
def smooth(c, w=50):
    w = max(1, min(w, len(c)))
    return np.convolve(np.asarray(c), np.ones(w) / w, mode="valid")


STYLES = dict(zip(estimators, [("C0", "-"), ("C1", "--"), ("C2", "-."), ("C3", ":"),
                               ("C4", "-"), ("C5", "--"), ("C6", "-.")]))
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for name, r in results.items():
    c = smooth(r.elbo)
    color, ls = STYLES[name]
    axes[0].plot(np.arange(len(c)), c, color=color, ls=ls, lw=1.5, label=name)
    axes[1].plot(r.seconds_per_step * np.arange(len(c)), c, color=color, ls=ls, lw=1.5,
                 label=name)
axes[0].set(xlabel="step", ylabel="training ELBO per digit (smoothed)")
axes[1].set(xlabel="seconds (this machine)")
axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
fig.tight_layout()
save(fig, "discrete_vae_1")

# %% [markdown]
# Every estimator but plain REINFORCE raises the ELBO. REINFORCE's **falls**, and that is not
# bias: it is unbiased, but here $f$ is the log joint of the whole minibatch (about −800 nats),
# and with no baseline each draw's score is multiplied by that large negative number, so its
# encoder gradient has over a thousand times the variance of RLOO's (measured below). Adam
# takes steps of about the learning rate whatever the gradient's scale, so the encoder takes
# steps of fixed size in directions that are mostly noise; its weights drift, the codes become
# uninformative and the ELBO gets worse. A baseline (RLOO) removes the common part of $f$ at no
# extra cost. At the same number of evaluations of f, ARM and DisARM do no better than RLOO
# here; REBAR and RELAX (nearly the same curve) cut the variance by another order of
# magnitude and reach a higher ELBO, at two to three times the cost per step.
# Gumbel-softmax's gradient is biased (it differentiates a relaxation of the
# discrete objective); on this small model that bias costs less than the others' variance.

# %% [markdown]
# ## Gradient variance at the trained parameters
# Variance of the encoder-gradient estimate over independent keys (summed over the encoder's
# weights), each estimator measured at its own trained parameters and state (RELAX/REBAR with
# their trained control variates). Gumbel-softmax is low-variance but **biased**.

# %%
variances = {
    name: float(vae.gradient_variance(r.params, data[:32], jax.random.key(1),
                                      estimator=estimators[name], num_samples=8,
                                      num_replicates=8 if SMOKE else 64, state=r.state))
    for name, r in results.items()
}
fig, ax = plt.subplots(figsize=(6, 3))
ax.barh(list(variances), list(variances.values()))
ax.set(xscale="log", xlabel="encoder-gradient variance")
fig.tight_layout()
save(fig, "discrete_vae_2")
for name, v in variances.items():
    print(f"{name:15s} encoder-gradient variance {v:.4g}")
