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
import sys

import jax
import matplotlib.pyplot as plt
import numpy as np

from scoregrad.examples import finance

jax.config.update("jax_enable_x64", True)
SMOKE = os.environ.get("SCOREGRAD_SMOKE") == "1"
FIGURES = os.environ.get("SCOREGRAD_FIGURES", "figures")


def save(fig, name):
    """Jupyter shows a figure inline; run as a script, the notebook saves it as FIGURES/name.png."""
    if "ipykernel" not in sys.modules:
        os.makedirs(FIGURES, exist_ok=True)
        fig.savefig(os.path.join(FIGURES, f"{name}.png"), dpi=110, bbox_inches="tight")
        print("saved", os.path.join(FIGURES, f"{name}.png"))


N, REPS = (500, 8) if SMOKE else (10_000, 50)
theta = finance.make_theta(spot=100.0, vol=0.2, rate=0.05)

# %% [markdown]
# ## European call and digital call against the closed forms
# Means and standard errors over `REPS` independent replicates of `N` draws each. Every unbiased
# estimate is asserted to agree with the closed form within 5 standard errors.

# %%
rows, refused = [], {}
for product, kind in ((finance.european_call(100.0, 1.0), "call"),
                      (finance.digital_call(100.0, 1.0), "digital")):
    exact = finance.black_scholes_greeks(theta, strike=100.0, maturity=1.0, kind=kind)
    for method in finance.METHODS:
        try:
            mean, se = finance.mc_greeks_replicated(product, theta, jax.random.key(0),
                                                    num_samples=N, num_replicates=REPS,
                                                    method=method)
        except ValueError as err:  # pathwise through a step function: refused, not zero
            refused[(kind, method)] = str(err).split(":")[0]
            continue
        for g in finance.GREEKS:
            rows.append((kind, method, g, float(exact[g]), float(mean[g]), float(se[g])))
print(f"{'option':8s}{'method':18s}{'greek':7s}{'exact':>11s}{'MC':>11s}{'SE':>10s}")
for kind, method, g, ex, m, s in rows:
    print(f"{kind:8s}{method:18s}{g:7s}{ex:11.4g}{m:11.4g}{s:10.2g}")
for (kind, method), msg in refused.items():
    print(f"{kind:8s}{method:18s}refused: {msg}")

# %% [markdown]
# The likelihood ratio is right for every Greek of both options, gamma included (`jax.hessian`
# of `sg.expectation`). Pathwise gets the call's first-order Greeks with the lowest variance but
# returns **zero** for the call's gamma: the payoff's second derivative is zero almost
# everywhere, and the kink at the strike is invisible to differentiation along paths. Mixed
# (pathwise first order, then likelihood ratio for gamma) fixes the call's gamma. For the
# digital, pathwise (and so mixed) would return zero for delta, vega and gamma; scoregrad
# refuses it (`ValueError`: the payoff's derivative in the draw is structurally zero) rather
# than return a wrong zero. The cell below checks all of this.

# %%
for kind, method, g, ex, m, s in rows:
    biased = method == "pathwise" and g == "gamma"
    if biased:
        assert m == 0.0, (kind, method, g, m)
    else:
        assert abs(m - ex) <= 5 * s + 1e-8 * max(1.0, abs(ex)), (kind, method, g, m, ex, s)
assert set(refused) == {("digital", "pathwise"), ("digital", "mixed")}, refused
print("every unbiased estimate agrees with the closed form within 5 SE;",
      "pathwise gamma of the call is exactly 0; pathwise on the digital is refused")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
labels, ses = [], []
for kind, method, g, ex, _mean, s in rows:
    if kind == "call" and g in ("delta", "gamma") and not (method == "pathwise" and g == "gamma"):
        labels.append(f"{g}\n{method}")
        ses.append(s * np.sqrt(REPS) / max(abs(ex), 1e-12))
bars = ax.bar(range(len(ses)), ses, color=["C0" if "delta" in lb else "C1" for lb in labels])
ax.bar_label(bars, fmt="%.3f", fontsize=8)
ax.set_xticks(range(len(ses)), labels, fontsize=8)
ax.set(ylabel=f"relative SD of one estimate\n({N:,} draws)", ylim=(0, 1.15 * max(ses)),
       title="European call (pathwise gamma is 0: not shown)")
fig.tight_layout()
save(fig, "finance_greeks_1")

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
    if name == "geometric":  # the closed form: every Greek within 5 SE
        for g in finance.GREEKS:
            assert abs(float(mean[g] - exact[g])) <= 5 * float(se[g]) + 1e-8, (g, mean[g], exact[g])
print("geometric exact", {g: f"{float(v):.4f}" for g, v in exact.items()})
