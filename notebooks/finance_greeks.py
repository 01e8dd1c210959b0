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
# # Greeks by likelihood ratio, pathwise and mixed estimators
#
# Under Black–Scholes, Greeks are derivatives of $e^{-rT}\mathbb E_\theta[h(S)]$ with respect to
# $\theta = (S_0, \sigma, r)$. The likelihood-ratio method is the score function; gamma comes
# from `jax.hessian` of `sg.expectation` (DiCE). Code: `scoregrad.examples.finance`.

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np

from scoregrad.examples import finance

jax.config.update("jax_enable_x64", True)
SMOKE = os.environ.get("SCOREGRAD_SMOKE") == "1"
N, REPS = (500, 4) if SMOKE else (10_000, 50)
theta = finance.make_theta(spot=100.0, vol=0.2, rate=0.05)

# %% [markdown]
# ## European call and digital call against the closed forms

# %%
rows = []
for product, kind in ((finance.european_call(100.0, 1.0), "call"),
                      (finance.digital_call(100.0, 1.0), "digital")):
    exact = finance.black_scholes_greeks(theta, strike=100.0, maturity=1.0, kind=kind)
    for method in finance.METHODS:
        mean, se = finance.mc_greeks_replicated(product, theta, jax.random.key(0), num_samples=N,
                                                num_replicates=REPS, method=method)
        for g in finance.GREEKS:
            rows.append((kind, method, g, float(exact[g]), float(mean[g]), float(se[g])))
print(f"{'option':8s}{'method':18s}{'greek':7s}{'exact':>10s}{'MC':>10s}{'SE':>9s}")
for kind, method, g, ex, m, s in rows:
    print(f"{kind:8s}{method:18s}{g:7s}{ex:10.4f}{m:10.4f}{s:9.4f}")

# %% [markdown]
# Pathwise gets the call's first-order Greeks with the lowest variance, but returns **zero** for
# the digital's delta and vega and for gamma (the payoff's derivative is flat almost everywhere;
# its mass at the strike is invisible to differentiation along paths). The likelihood ratio is
# right everywhere; mixed (pathwise, then likelihood ratio for gamma) fixes the call's gamma.

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
labels, ses = [], []
for kind, method, g, ex, _mean, s in rows:
    if kind == "call" and g in ("delta", "gamma"):
        labels.append(f"{g}\n{method}")
        ses.append(s * np.sqrt(REPS) / max(abs(ex), 1e-12))
ax.bar(range(len(ses)), ses)
ax.set_xticks(range(len(ses)), labels, fontsize=7)
ax.set(yscale="log", ylabel="relative SD per estimate", title="European call")
fig.tight_layout()

# %% [markdown]
# ## Asian options: geometric (closed form) and arithmetic

# %%
geo = finance.asian_call(100.0, 1.0, 12, "geometric")
arith = finance.asian_call(100.0, 1.0, 12, "arithmetic")
exact = finance.geometric_asian_greeks(theta, strike=100.0, maturity=1.0, num_steps=12)
for name, product in (("geometric", geo), ("arithmetic", arith)):
    mean, se = finance.mc_greeks_replicated(product, theta, jax.random.key(1), num_samples=N,
                                            num_replicates=REPS, method="mixed")
    print(name, {g: f"{float(mean[g]):.4f} ± {float(se[g]):.4f}" for g in finance.GREEKS})
print("geometric exact", {g: f"{float(v):.4f}" for g, v in exact.items()})
