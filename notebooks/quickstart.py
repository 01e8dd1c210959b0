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
# # Quickstart
#
# scoregrad estimates $\nabla_\theta\, \mathbb E_{p(x;\theta)}[f(x)]$ by Monte Carlo. You give it
# a family $p(x;\theta)$ (a log-density and a one-draw sampler) and an integrand $f$; it gives you
# an estimate with standard errors (`sg.estimate_grad`) or a differentiable expectation to put
# inside any loss (`sg.expectation`). Set `SCOREGRAD_SMOKE=1` to run a shrunken version.

# %%
import os
import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax

import scoregrad as sg

SMOKE = os.environ.get("SCOREGRAD_SMOKE") == "1"
FIGURES = os.environ.get("SCOREGRAD_FIGURES", "figures")


def save(fig, name):
    """Jupyter shows a figure inline; run as a script, the notebook saves it as FIGURES/name.png."""
    if "ipykernel" not in sys.modules:
        os.makedirs(FIGURES, exist_ok=True)
        fig.savefig(os.path.join(FIGURES, f"{name}.png"), dpi=110, bbox_inches="tight")
        print("saved", os.path.join(FIGURES, f"{name}.png"))


NUM_STEPS = 20 if SMOKE else 300

# %% [markdown]
# ## One estimate with diagnostics
# $f(x) = \sum_j x_j^2$ under $x \sim \mathcal N(\mu, \sigma^2)$ has
# $\nabla_\mu \mathbb E f = 2\mu$ and $\nabla_\sigma \mathbb E f = 2\sigma$.

# %%
theta = {"loc": jnp.array([1.0, -0.5]), "scale": jnp.array([1.0, 2.0])}
f = lambda x: jnp.sum(x**2)  # noqa: E731
for est in (sg.score_function(), sg.score_function(sg.baselines.leave_one_out()), sg.pathwise()):
    r = sg.estimate_grad(f, sg.families.normal(), theta, jax.random.key(0), num_samples=10_000,
                         estimator=est)
    print(f"{est.name:32s} grad loc {r.grad['loc']}  ± {r.stderr['loc']}")
    # the estimate agrees with the exact gradient within 5 of its own standard errors
    assert jnp.all(jnp.abs(r.grad["loc"] - 2 * theta["loc"]) <= 5 * r.stderr["loc"] + 1e-6), est.name
print("exact                            grad loc", 2 * theta["loc"])

# %% [markdown]
# ## An optax loop
# Fit Bernoulli logits so that draws match a target pattern. $f$ is a black box: no gradient of
# $f$ is needed, which is what the score function is for.

# %%
target = jnp.array([1.0, 0.0, 1.0, 1.0])
family = sg.families.bernoulli()
est = sg.score_function(baseline=sg.baselines.leave_one_out())


def loss(logits, key):
    return sg.expectation(lambda x: jnp.sum((x - target) ** 2), family, logits, key,
                          num_samples=64, estimator=est)


opt = optax.adam(0.1)
logits = jnp.zeros(4)
opt_state = opt.init(logits)
value_and_grad = jax.jit(jax.value_and_grad(loss))
curve = []
for step in range(NUM_STEPS):
    value, g = value_and_grad(logits, jax.random.fold_in(jax.random.key(1), step))
    updates, opt_state = opt.update(g, opt_state)
    logits = optax.apply_updates(logits, updates)
    curve.append(float(value))
print("probabilities", jax.nn.sigmoid(logits))

# %%
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(curve)
ax.set(xlabel="step", ylabel="E[f] (sampled)", title="score function + leave-one-out")
fig.tight_layout()
save(fig, "quickstart_1")

# %% [markdown]
# ## Second derivatives
# `jax.hessian` of `sg.expectation` is right for the score function (DiCE's magic box):
# for $x \sim \mathrm{Bernoulli}(\sigma(\theta))$ and $f(x) = x$, $\mathbb E f = \sigma(\theta)$,
# whose second derivative is $\sigma(1-\sigma)(1-2\sigma)$. Its standard error comes from
# independent replicates (`jax.vmap` over keys).

# %%
def mc_hessian(key):
    return jax.hessian(lambda t: sg.expectation(lambda x: jnp.sum(x), family, t, key,
                                                num_samples=20_000))(jnp.array([0.5]))[0, 0]


REPS = 8 if SMOKE else 16
hs = jax.jit(jax.vmap(mc_hessian))(jax.random.split(jax.random.key(2), REPS))
h, h_se = float(jnp.mean(hs)), float(jnp.std(hs, ddof=1) / jnp.sqrt(REPS))
s = jax.nn.sigmoid(0.5)
exact_h = float(s * (1 - s) * (1 - 2 * s))
print(f"MC hessian {h:.5f} ± {h_se:.5f}   exact {exact_h:.5f}")
assert abs(h - exact_h) <= 5 * h_se + 1e-6
