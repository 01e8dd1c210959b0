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
# # Sequential programs: causal credit (DiCE reward-to-go)
#
# A program that draws in steps and pays a cost at every step: scored as one draw, every cost is
# multiplied by the score of the whole trajectory, including the draws made *after* it was paid
# (pure noise). Causal credit (`scoregrad.programs`) scores each cost only with the draws at or
# before its step: the same expectation, less variance, and DiCE-correct derivatives of every
# order. See docs/programs.md for the formulas.

# %%
import itertools
import os
import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import scoregrad as sg
import scoregrad.programs as sp

SMOKE = os.environ.get("SCOREGRAD_SMOKE") == "1"
FIGURES = os.environ.get("SCOREGRAD_FIGURES", "figures")


def save(fig, name):
    """Jupyter shows a figure inline; run as a script, the notebook saves it as FIGURES/name.png."""
    if "ipykernel" not in sys.modules:
        os.makedirs(FIGURES, exist_ok=True)
        fig.savefig(os.path.join(FIGURES, f"{name}.png"), dpi=110, bbox_inches="tight")
        print("saved", os.path.join(FIGURES, f"{name}.png"))


# %% [markdown]
# ## A three-step Markov chain, checked by enumeration
#
# $P(x_t = 1) = \sigma(a_t + b\,x_{t-1})$; the cost at step $t$ reads only $x_{\le t}$. With
# $2^3$ trajectories the exact gradient is a sum, so the estimate can be checked against it.

# %%
T = 3


def prev(x):
    return jnp.concatenate([jnp.zeros(1), x[:-1]])


def sample(theta, key):
    def step(x_prev, inp):
        a, k = inp
        x = jax.random.bernoulli(k, jax.nn.sigmoid(a + theta["b"] * x_prev)).astype(jnp.float32)
        return x, x
    return jax.lax.scan(step, jnp.float32(0), (theta["a"], jax.random.split(key, T)))[1]


def log_prob(theta, x):
    logit = theta["a"] + theta["b"] * prev(x)
    return x * jax.nn.log_sigmoid(logit) + (1 - x) * jax.nn.log_sigmoid(-logit)


def cost(x):
    return (x - 0.3 * jnp.arange(T)) ** 2 + 0.7 * x * prev(x)


prog = sp.program(log_prob, sample, cost, num_steps=T)
theta = {"a": jnp.array([0.2, -0.4, 0.5]), "b": jnp.array(0.8)}
paths = jnp.array(list(itertools.product([0.0, 1.0], repeat=T)))


def exact(th):
    p = jnp.exp(jax.vmap(lambda x: log_prob(th, x).sum())(paths))
    return jnp.sum(p * jax.vmap(lambda x: cost(x).sum())(paths))


truth = jax.grad(exact)(theta)
N = 4_000 if SMOKE else 20_000
results = {}
for name, est in [("whole program", sg.score_function()),
                  ("causal", prog.estimator()),
                  ("causal + leave-one-out", prog.estimator(sp.leave_one_out()))]:
    r = sg.estimate_grad(prog.f, prog.family, theta, jax.random.key(0), num_samples=N,
                         estimator=est)
    results[name] = r
    z = max(float(jnp.max(jnp.abs(r.grad[k] - truth[k]) / r.stderr[k])) for k in ("a", "b"))
    print(f"{name:24s} d/da {np.round(np.asarray(r.grad['a']), 3)}  exact "
          f"{np.round(np.asarray(truth['a']), 3)}  max |error|/SE {z:.2f}  "
          f"mean variance {float(jnp.mean(r.variance['a'])):.3f}")
    assert z <= 5.0, name  # within 5 standard errors of the exact gradient
# same draws (key 0): causal credit removes the later draws' noise from the earlier costs
assert float(jnp.sum(results["causal"].variance["a"])) < float(
    jnp.sum(results["whole program"].variance["a"]))

# %% [markdown]
# ## Variance against the length of the program
#
# The iterated prisoner's dilemma between two memory-one agents (`sp.iterated_prisoners_dilemma`):
# the per-game variance of $\partial V_1/\partial\theta$ under whole-program REINFORCE and under
# causal credit, on the same games, as the number of rounds $T$ grows. The ratio grows with $T$:
# a round's cost is no longer multiplied by the scores of all later rounds.

# %%
LENGTHS = (5, 20) if SMOKE else (10, 50, 150)
GAMES = 256 if SMOKE else 1024
game = {"agent1": 0.5 * jax.random.normal(jax.random.key(1), (5,)),
        "agent2": 0.5 * jax.random.normal(jax.random.key(2), (5,))}
ratios = []
for length in LENGTHS:
    p1, _ = sp.iterated_prisoners_dilemma(length, discount=0.96)
    whole = sg.estimate_grad(p1.f, p1.family, game, jax.random.key(3), num_samples=GAMES)
    causal = sg.estimate_grad(p1.f, p1.family, game, jax.random.key(3), num_samples=GAMES,
                              estimator=p1.estimator())
    ratio = float(jnp.sum(whole.variance["agent1"]) / jnp.sum(causal.variance["agent1"]))
    ratios.append(ratio)
    print(f"T = {length:4d}: total variance, whole / causal = {ratio:.1f}")
assert ratios[-1] > ratios[0] > 1.0  # causal credit helps, more for longer programs

fig, ax = plt.subplots(figsize=(5, 3.2))
ax.plot(LENGTHS, ratios, "o-")
ax.set_xlabel("rounds T")
ax.set_ylabel("variance ratio, whole / causal")
ax.set_title("agent 1's gradient, same games")
ax.grid(alpha=0.3)
save(fig, "programs_variance_vs_T")

# %% [markdown]
# ## LOLA's cross-derivative
#
# Agent 1 differentiating through agent 2's learning step needs
# $\partial^2 V_1/\partial\theta_1\partial\theta_2$: `jax.hessian` of `sg.expectation` with causal
# credit gives an unbiased estimate (checked against enumeration of every trajectory in
# `tests/test_programs.py`). On a two-round game it is checked here against the exact value.

# %%
p1, _ = sp.iterated_prisoners_dilemma(2)
acts = jnp.array(list(itertools.product([0, 1], repeat=4)), jnp.int32).reshape(-1, 2, 2)


def exact_v1(th):
    one = lambda a: sp.Steps(a, jnp.ones(2, jnp.float32))  # noqa: E731 - one trajectory
    lp = jax.vmap(lambda a: p1.family.log_prob(th, one(a)))(acts)
    return jnp.sum(jnp.exp(lp) * jax.vmap(lambda a: p1.f(one(a)))(acts))


H = 64 if SMOKE else 256


def hess_block(key):
    def v1(th):
        return sg.expectation(p1.f, p1.family, th, key, num_samples=H, estimator=p1.estimator())
    return jax.hessian(v1)(game)["agent1"]["agent2"]


blocks = jax.jit(jax.vmap(hess_block))(jax.random.split(jax.random.key(4), 40 if SMOKE else 100))
mean, se = jnp.mean(blocks, 0), jnp.std(blocks, 0, ddof=1) / np.sqrt(blocks.shape[0])
true_block = jax.hessian(exact_v1)(game)["agent1"]["agent2"]
z = float(jnp.max(jnp.abs(mean - true_block) / (se + 1e-12)))
print("exact d2V1/dth1 dth2, first row:", np.round(np.asarray(true_block[0]), 4))
print("estimate (mean of replicates): ", np.round(np.asarray(mean[0]), 4))
print(f"max |error|/SE over the block: {z:.2f}")
assert z <= 5.0
