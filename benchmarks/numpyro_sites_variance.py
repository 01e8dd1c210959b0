"""Per-site estimators vs one score-function estimator for the whole guide (scoregrad.numpyro_sites).

Two NumPyro models with two latent layers, each with a guide:

* ``mixture``: a component k ~ Categorical(3) (discrete) over a 2-d mean z ~ Normal(mu_k, I)
  (continuous), five observations x_j ~ Normal(z, 0.5^2 I). Guide q(k) q(z | k).
* ``sbn``: a two-layer sigmoid belief network, h2 in {0,1}^2 -> h1 in {0,1}^3 -> x in {0,1}^4
  (observed). Guide q(h1 | x) q(h2 | h1). Every site is discrete: the per-site estimator differs
  from whole-guide REINFORCE only by its credit (log p(x | h1) and log q(h1) are not credited to
  h2's parameters).
* ``local_mixture``: 16 points x_i in a ``numpyro.plate``, each with its own component
  k_i ~ Categorical(3) (discrete, local) and global means mu ~ Normal(., I) (continuous).
  Guide q(mu) prod_i q(k_i | x_i) with logits W x_i + c. Compares per-element credit (the
  default: k_i credited with log p(x_i | k_i, mu) and log q(k_i), log p(k_i) only) with
  ``credit="site"`` (every k_i with all 16 points' costs).

For each, at theta drawn once (key 0, scale 0.5), the per-evaluation variance of each
coordinate of the negative-ELBO gradient (``N * stderr^2`` of ``estimate_grad`` with N = 20,000
evaluations of the model: per-unit variance times programs per unit) under:

* ``per-site``: ``ns.elbo(model, guide).estimator`` (pathwise where reparameterizable, score
  function with DiCE credit elsewhere);
* ``per-site + LOO``: the same with ``baseline=ns.leave_one_out()`` (batch-wide, per site);
* ``per-site + LOO(4)``: with ``baseline=ns.group_leave_one_out(4)``;
* ``whole score``: ``sg.score_function()`` on the same family and f (REINFORCE on log q of the
  whole guide);
* ``whole score + LOO``: ``sg.score_function(baseline=sg.baselines.leave_one_out())``;
* ``whole RLOO(4)``: ``sg.rloo(4)`` (the group baseline for the whole guide);
* for ``local_mixture`` instead of the group forms: ``site credit`` (+ ``LOO``),
  ``ns.elbo(..., credit="site")``: a plated site credited as a whole.

and the time of a jitted ``jax.grad`` of ``sg.expectation`` with N = 1,000 (median of 3 after
warm-up). Writes benchmarks/results/numpyro_sites_variance.md.

    python benchmarks/numpyro_sites_variance.py        # a few minutes on 2 cores (compiles)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from _meta import commit  # benchmarks/ is sys.path[0] when run as a script

import scoregrad as sg
import scoregrad.numpyro_sites as ns

N = 20_000
N_TIME = 1_000
OUT = os.path.join(os.path.dirname(__file__), "results", "numpyro_sites_variance.md")

# ------------------------------------------------------------------ mixture over a Gaussian mean
MU = jnp.array([[-2.0, 0.0], [0.0, 2.0], [2.0, -1.0]])
X_MIX = jnp.array([[0.3, 1.8], [-0.4, 2.5], [0.1, 1.2], [0.6, 2.2], [-0.2, 1.6]])


def mixture_model(x):
    k = numpyro.sample("k", dist.Categorical(probs=jnp.ones(3) / 3))
    z = numpyro.sample("z", dist.Normal(MU[k], 1.0).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)


def mixture_guide(x):
    k = numpyro.sample("k", dist.Categorical(logits=numpyro.param("phi", jnp.zeros(3))))
    m = numpyro.param("m", jnp.zeros((3, 2)))
    numpyro.sample("z", dist.Normal(m[k], jnp.exp(numpyro.param("s", jnp.zeros(2))))
                   .to_event(1))


# ------------------------------------------------------------------ sigmoid belief network
W2 = jnp.array([[1.5, -1.0], [-0.5, 2.0], [1.0, 1.0]])        # h2 (2) -> h1 (3)
W1 = jnp.array([[2.0, -1.0, 0.5], [-1.5, 1.0, 1.0], [0.5, 0.5, -2.0], [1.0, -1.0, 1.5]])
X_SBN = jnp.array([1.0, 0.0, 1.0, 1.0])


def sbn_model(x):
    h2 = numpyro.sample("h2", dist.Bernoulli(logits=jnp.zeros(2)).to_event(1))
    h1 = numpyro.sample("h1", dist.Bernoulli(logits=W2 @ h2 - 0.5).to_event(1))
    numpyro.sample("x", dist.Bernoulli(logits=W1 @ h1 - 1.0).to_event(1), obs=x)


def sbn_guide(x):
    h1 = numpyro.sample("h1", dist.Bernoulli(
        logits=numpyro.param("A", jnp.zeros((3, 4))) @ x + numpyro.param("c1", jnp.zeros(3))
    ).to_event(1))
    numpyro.sample("h2", dist.Bernoulli(
        logits=numpyro.param("B", jnp.zeros((2, 3))) @ h1 + numpyro.param("c2", jnp.zeros(2))
    ).to_event(1))


# ------------------------------------------------------------------ mixture with local components
MU_L = jnp.array([-2.0, 0.0, 2.0])
X_LOC = jnp.array([-2.3, -1.6, -0.2, 0.4, 1.9, 2.6, -1.9, 0.1, 2.2, 1.4,
                   -0.6, -2.8, 0.8, 2.1, -1.2, 0.3])


def local_model(x):
    mu = numpyro.sample("mu", dist.Normal(MU_L, 1.0).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        k = numpyro.sample("k", dist.Categorical(probs=jnp.ones(3) / 3))
        numpyro.sample("x", dist.Normal(mu[k], 0.5), obs=x)


def local_guide(x):
    numpyro.sample("mu", dist.Normal(numpyro.param("m", jnp.zeros(3)),
                                     jnp.exp(numpyro.param("s", jnp.zeros(3)))).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        logits = numpyro.param("W", jnp.zeros(3)) * x[:, None] + numpyro.param("c", jnp.zeros(3))
        numpyro.sample("k", dist.Categorical(logits=logits))


MODELS = {"mixture": (mixture_model, mixture_guide, X_MIX),
          "sbn": (sbn_model, sbn_guide, X_SBN),
          "local_mixture": (local_model, local_guide, X_LOC)}
# the ratio column: (numerator, denominator) estimator labels
RATIO = {"mixture": ("whole score + LOO", "per-site + LOO"),
         "sbn": ("whole score + LOO", "per-site + LOO"),
         "local_mixture": ("site credit + LOO", "per-site + LOO")}


def _theta(p):
    init = p.init_params()
    keys = jax.random.split(jax.random.key(0), len(init))
    return {n: 0.5 * jax.random.normal(k, jnp.shape(v)) for k, (n, v) in zip(keys, sorted(
        init.items()))}


def _flat(tree):
    names, vals = [], []
    for n in sorted(tree):
        a = np.asarray(tree[n]).ravel()
        vals.append(a)
        shape = np.shape(tree[n])
        names += [n if not shape else f"{n}{[int(j) for j in np.unravel_index(i, shape)]}"
                  for i in range(a.size)]
    return names, np.concatenate(vals)


def _median_time(fn, *args, reps=3):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _estimators(name, model, guide, x, p):
    loo = ns.elbo(model, guide, x, baseline=ns.leave_one_out())
    if name == "local_mixture":  # per-element (default) against whole-site credit
        site = ns.elbo(model, guide, x, credit="site")
        site_loo = ns.elbo(model, guide, x, credit="site", baseline=ns.leave_one_out())
        return {"per-site": (p.estimator, p.family),
                "per-site + LOO": (loo.estimator, loo.family),
                "site credit": (site.estimator, site.family),
                "site credit + LOO": (site_loo.estimator, site_loo.family),
                "whole score + LOO": (sg.score_function(
                    baseline=sg.baselines.leave_one_out()), p.family)}
    gloo = ns.elbo(model, guide, x, baseline=ns.group_leave_one_out(4))
    return {"per-site": (p.estimator, p.family),
            "per-site + LOO": (loo.estimator, loo.family),
            "per-site + LOO(4)": (gloo.estimator, gloo.family),
            "whole score": (sg.score_function(), p.family),
            "whole score + LOO": (sg.score_function(baseline=sg.baselines.leave_one_out()),
                                  p.family),
            "whole RLOO(4)": (sg.rloo(4), p.family)}


def run(name):
    model, guide, x = MODELS[name]
    p = ns.elbo(model, guide, x)
    theta = _theta(p)
    ests = _estimators(name, model, guide, x, p)
    f = p.f(theta)
    out = {}
    for label, (est, fam) in ests.items():
        r = jax.jit(lambda th, k, est=est, fam=fam: sg.estimate_grad(
            f, fam, th, k, num_samples=N, estimator=est))(theta, jax.random.key(1))
        names, se = _flat(r.stderr)
        _, g = _flat(r.grad)
        grad_fn = jax.jit(jax.grad(lambda th, k, est=est, fam=fam: sg.expectation(
            p.f(th), fam, th, k, num_samples=N_TIME, estimator=est)))
        out[label] = (N * se ** 2, g, _median_time(grad_fn, theta, jax.random.key(2)),
                      float(r.value))
        print(f"{name} {label}: value {float(r.value):.3f}, time {out[label][2] * 1e3:.1f} ms")
    return p.sites(theta), names, out


def _machine() -> str:
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.system()} {cpu}, {os.cpu_count()} cores, jax {jax.__version__}, "
            f"numpyro {numpyro.__version__}, device {dev.platform} ({dev.device_kind}), load "
            f"average at the end {load} (times are noisy when it exceeds the core count)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    lines = ["# Per-site estimators vs whole-guide REINFORCE (NumPyro programs)", "",
             f"`python benchmarks/numpyro_sites_variance.py` on "
             f"{datetime.date.today().isoformat()}, commit {commit()}, {_machine()}.", "",
             f"Per-evaluation variance (N * stderr^2 of `sg.estimate_grad`, N = {N:,} model "
             "evaluations, so estimators with groups of 4 programs per unit are compared at "
             "equal cost) of each coordinate of the negative-ELBO gradient at theta drawn once "
             "(key 0, scale 0.5); the ratio is whole-guide REINFORCE / per-site (for "
             "`local_mixture`: whole-site / per-element credit), both with the "
             "batch-wide leave-one-out baseline. Time: jitted `jax.grad` of `sg.expectation` at "
             f"N = {N_TIME:,}, median of 3 after warm-up. The models are in the script's "
             "docstring.", ""]
    for name in args.models:
        sites, names, out = run(name)
        labels = list(out)
        lines += [f"## {name}", "",
                  "Sites: " + ", ".join(f"`{n}`: {c}" for n, c in sites.items()) + ". "
                  f"Negative ELBO {out['per-site'][3]:.3f}. Time per gradient: "
                  + ", ".join(f"{lab} {out[lab][2] * 1e3:.1f} ms" for lab in labels) + ".", "",
                  "| coordinate | grad | " + " | ".join(f"var {lab}" for lab in labels)
                  + f" | {RATIO[name][0]} / {RATIO[name][1]} |",
                  "|---|---:|" + "---:|" * len(labels) + "---:|"]
        whole, per = out[RATIO[name][0]][0], out[RATIO[name][1]][0]
        live = per > 1e-12 * np.max(per)  # coordinates with zero gradient in every draw: "-"
        ratio = np.where(live, whole / np.where(live, per, 1.0), np.nan)
        for i, n in enumerate(names):
            r = f"{ratio[i]:.1f}" if live[i] else "-"
            lines.append(f"| {n} | {out['per-site'][1][i]:.3f} | "
                         + " | ".join(f"{out[lab][0][i]:.3g}" for lab in labels)
                         + f" | {r} |")
        rl = ratio[live]
        lines += ["", f"Over the {rl.size} coordinates that vary: median ratio "
                  f"{np.median(rl):.1f} (min {np.min(rl):.2f}, max {np.max(rl):.1f}).", ""]
        print(f"{name}: median ratio {np.median(rl):.1f}, min {np.min(rl):.2f}, "
              f"max {np.max(rl):.1f}")
    if not args.no_write:
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as fh:
            fh.write("\n".join(lines))
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
