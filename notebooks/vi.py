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
# # Black-box variational inference
#
# A mean-field Gaussian $q(w;\theta)$ fitted by maximizing the ELBO
# $\mathbb E_q[\log p(\mathcal D, w)] + \mathcal H[q]$ (entropy in closed form). The score
# function needs only the log joint as a black box; pathwise needs its gradient. Code:
# `scoregrad.examples.vi`; data: scikit-learn's bundled diabetes and breast-cancer sets.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt

import scoregrad as sg
from scoregrad.examples import vi

jax.config.update("jax_enable_x64", True)
SMOKE = os.environ.get("SCOREGRAD_SMOKE") == "1"
NUM_STEPS = 20 if SMOKE else 1500

# %% [markdown]
# ## (a) Conjugate Bayesian linear regression: everything is exact
# The ELBO, its gradient and the mean-field optimum are closed form, so each estimator's error
# can be read off against the truth.

# %%
data = vi.load_diabetes()
log_joint = lambda w: vi.linreg_log_joint(w, data)  # noqa: E731
theta = {"loc": jnp.zeros(10), "scale": jnp.full(10, 0.3)}
exact = jax.grad(vi.linreg_elbo_exact)(theta, data)
estimators = {
    "score function": sg.score_function(),
    "score function + RLOO": sg.score_function(sg.baselines.leave_one_out()),
    "score function + delta-method CV": sg.control_variates.with_control_variates(
        sg.score_function(), sg.control_variates.delta_method(log_joint, order=2)),
    "pathwise": sg.pathwise(),
}
variances = {}
for name, est in estimators.items():
    r = vi.elbo_grad(log_joint, theta, jax.random.key(0), num_samples=1000, estimator=est)
    err = jnp.max(jnp.abs(r.grad["loc"] - exact["loc"]) / r.stderr["loc"])
    variances[name] = float(jnp.mean(r.variance["loc"]))
    print(f"{name:34s} max |err|/SE (loc) {float(err):5.2f}  mean variance {variances[name]:.3g}")

# %% [markdown]
# The log joint is quadratic in $w$; the second-order delta-method control variate keeps the
# diagonal of its Hessian, so it removes the linear and diagonal parts of the noise and leaves the
# off-diagonal coupling of $X^\top X$. Pathwise is lower still. Rao-Blackwellization
# (`sg.control_variates.rao_blackwell`) does not apply here: the likelihood couples all
# coordinates of $w$, so f is not a sum of per-coordinate terms.

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.barh(list(variances), [max(v, 1e-30) for v in variances.values()])
ax.set(xscale="log", xlabel="per-draw variance of the loc gradient")
fig.tight_layout()

# %%
opt = vi.linreg_optimum(data)
best = float(vi.linreg_elbo_exact(opt, data))
fig, ax = plt.subplots(figsize=(6, 3.5))
FIT_WITH = ("pathwise",) if SMOKE else ("score function + RLOO", "pathwise")
for name in FIT_WITH:
    res = vi.fit(log_joint, vi.init_params(10), jax.random.key(1), num_steps=NUM_STEPS,
                 num_samples=16, estimator=estimators[name], learning_rate=0.02)
    ax.plot(res.elbo, label=name, alpha=0.8)
    gap = best - float(vi.linreg_elbo_exact(vi.to_theta(res.params), data))
    print(f"{name}: final exact ELBO gap to the optimum {gap:.3f}")
ax.axhline(best, color="k", ls=":", label="optimum (closed form)")
ax.set(xlabel="step", ylabel="sampled ELBO", ylim=(best - 400, best + 50))
ax.legend()
fig.tight_layout()

# %% [markdown]
# ## (b) Bayesian logistic regression on breast-cancer data

# %%
bc = vi.load_breast_cancer()
log_joint_bc = lambda w: vi.logistic_log_joint(w, bc)  # noqa: E731
fig, ax = plt.subplots(figsize=(6, 3.5))
for name in FIT_WITH:
    est = estimators[name]
    res = vi.fit(log_joint_bc, vi.init_params(31), jax.random.key(2), num_steps=NUM_STEPS,
                 num_samples=16, estimator=est, learning_rate=0.02)
    ax.plot(res.elbo, label=name, alpha=0.8)
ax.set(xlabel="step", ylabel="sampled ELBO", ylim=(-600, 0))
ax.legend()
fig.tight_layout()
