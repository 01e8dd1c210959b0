"""CartPole (gymnax) with an MLP policy: reward-to-go + per-step baselines vs trajectory REINFORCE.

Two measurements, both with the estimators of ``scoregrad.examples.rl_programs.METHODS`` on the
same sequential program (``rp.cartpole_program``):

1. **Gradient variance per coordinate at a fixed theta**: R independent estimates, each from
   N episodes; every method estimates from the SAME episodes (common random numbers). Two
   thetas: the MLP at initialization (short episodes) and after a few training iterations
   (longer ones). Stateful baselines are warmed up at that theta first (moving average: 20
   batches; value function: 300 regression steps).
2. **Return curves against environment steps**: an Adam loop per method and seed (seeds
   vmapped), the mean return of each iteration's episodes against the live environment steps
   consumed so far.

Writes benchmarks/results/cartpole_causal.md and cartpole_causal.png.

    python benchmarks/cartpole_causal.py            # about 5 minutes on 2 CPU cores
    python benchmarks/cartpole_causal.py --quick    # fewer replicates and seeds (a smoke run)
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import jax
import numpy as np
from _meta import commit, machine  # benchmarks/ is sys.path[0] when run as a script

import scoregrad as sg
from scoregrad.examples import rl_programs as rp

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_MD = os.path.join(HERE, "results", "cartpole_causal.md")
OUT_PNG = os.path.join(HERE, "results", "cartpole_causal.png")
BUDGET = 40_000  # environment steps on the curves' x-axis
LABELS = {
    "reinforce": "trajectory REINFORCE",
    "reinforce_loo": "trajectory REINFORCE + leave-one-out",
    "causal": "reward-to-go",
    "causal_loo": "reward-to-go + per-step leave-one-out",
    "causal_moving_average": "reward-to-go + per-step moving average",
    "causal_value": "reward-to-go + learned V(s_t, t)",
}


def warmed_methods(prog, theta, key, num_episodes):
    """Every method at theta, stateful baselines warmed up on fresh episodes at theta."""
    methods = {}
    for name in rp.METHODS:
        m = rp.make_method(name, prog, theta, num_episodes=num_episodes,
                           value_key=jax.random.fold_in(key, 99))
        if name == "causal_moving_average":
            step = jax.jit(lambda st, k, m=m: sg.estimate_grad_from_samples(
                prog.f, prog.family, theta, rp.rollouts(prog, theta, k, num_episodes),
                estimator=m.estimator, state=st).state)
            st = m.state
            for i in range(20):
                st = step(st, jax.random.fold_in(key, 1000 + i))
            m = m._replace(state=st)
        if name == "causal_value":
            assert m.fit is not None

            @jax.jit
            def fit(st, k, m=m):
                steps = rp.rollouts(prog, theta, k, 64)
                return m.fit(st, steps.x, -steps.x["alive"])

            st = m.state
            for i in range(300):
                st, loss = fit(st, jax.random.fold_in(key, 2000 + i))
            m = m._replace(state=st)
        methods[name] = m
    return methods


def ratio_and_se(a, b):
    """var(a)/var(b) summed over coordinates (paired replicates), with a delta-method SE."""
    da, db = (a - a.mean(0)) ** 2, (b - b.mean(0)) ** 2
    sa, sb = da.sum(1), db.sum(1)
    r = sa.mean() / sb.mean()
    return r, (sa - r * sb).std(ddof=1) / np.sqrt(len(sa)) / sb.mean()


def variance_table(prog, theta, key, num_episodes, num_replicates):
    methods = warmed_methods(prog, theta, key, num_episodes)
    t0 = time.perf_counter()
    g = rp.gradient_samples(prog, theta, jax.random.fold_in(key, 7), methods,
                            num_episodes=num_episodes, num_replicates=num_replicates)
    secs = time.perf_counter() - t0
    ret = float(g.pop("returns").mean())
    var = {k: v.var(0, ddof=1) for k, v in g.items()}
    base = var["reinforce"]
    keep = base > 1e-12 * base.max()  # coordinates with any variance
    rows = []
    for name in rp.METHODS:
        per = base[keep] / var[name][keep]
        tot, tot_se = ratio_and_se(g["reinforce"], g[name])
        tot_l, tot_l_se = ratio_and_se(g["reinforce_loo"], g[name])
        rows.append((name, float(var[name].sum()), tot, tot_se, np.median(per), np.min(per),
                     np.max(per), tot_l, tot_l_se))
    return ret, int(keep.sum()), rows, secs


def curves(prog, methods, num_seeds, num_iters, num_episodes, lr):
    out = {}
    for name in methods:
        f = jax.jit(jax.vmap(lambda k, name=name: rp.train(
            prog, name, k, num_iters=num_iters, num_episodes=num_episodes, learning_rate=lr)))
        t0 = time.perf_counter()
        c = f(jax.random.split(jax.random.key(100), num_seeds))
        out[name] = (np.asarray(c.returns), np.asarray(c.env_steps))
        print(f"  {name}: final mean return {out[name][0][:, -5:].mean():.1f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def steps_to(returns, env_steps, level):
    """Per seed, environment steps until the iteration's mean return first reaches ``level``
    (NaN if never)."""
    out = []
    for r, s in zip(returns, env_steps):
        hit = np.nonzero(r >= level)[0]
        out.append(s[hit[0]] if len(hit) else np.nan)
    return np.array(out)


def plot(curve_data, path, max_steps):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    grid = np.linspace(0, BUDGET, 200)
    for i, (name, (ret, steps)) in enumerate(curve_data.items()):
        interp = np.stack([np.interp(grid, s, r) for r, s in zip(ret, steps)])
        mean = interp.mean(0)
        se = interp.std(0, ddof=1) / np.sqrt(len(interp))
        color = f"C{i}"
        ax.plot(grid, mean, color=color, label=LABELS[name],
                linestyle="--" if name.startswith("reinforce") else "-")
        ax.fill_between(grid, mean - se, mean + se, color=color, alpha=0.15)
    ax.set_xlabel("environment steps (live steps of the episodes drawn)")
    ax.set_ylabel(f"mean episode return (max {max_steps})")
    ax.set_title(f"CartPole, MLP 4-32-2 policy, Adam: mean over {len(ret)} seeds (band: ± 1 SE)")
    ax.set_xlim(0, BUDGET)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t_all = time.perf_counter()
    T = args.max_steps
    n_eps, reps = 16, (60 if args.quick else 400)
    seeds, iters, n_train, lr = (3, 30, 8, 1e-2) if args.quick else (10, 80, 8, 1e-2)
    prog = rp.cartpole_program(T)
    theta0 = rp.init_mlp(jax.random.key(0), (4, 32, 2))
    warm = jax.jit(lambda k: rp.train(prog, "reinforce_loo", k, num_iters=12, num_episodes=16,
                                      theta=theta0))(jax.random.key(5))
    thetas = {"initial MLP": theta0, "after 12 training iterations": warm.theta}

    lines = [
        "# CartPole: reward-to-go with per-step baselines vs trajectory-level REINFORCE",
        "",
        f"`python benchmarks/cartpole_causal.py` on {datetime.date.today().isoformat()}, "
        f"commit {commit()}, {{machine}}; total {{total}}.",
        "",
        f"gymnax CartPole-v1, episodes cut at T = {T} steps; policy: an MLP 4-32-2 (tanh), "
        "a list of `{w, b}` layers in plain JAX; the program's per-step log-probability is "
        "the action's log-probability and its per-step cost is minus the reward, both 0 "
        "after the episode ends (`scoregrad/examples/rl_programs.py`). Trajectory REINFORCE "
        "is `sg.score_function()` on the same program; reward-to-go is "
        "`program.estimator(baseline)`.",
        "",
        "## 1. Gradient variance at a fixed theta",
        "",
        f"{reps} independent estimates per method, each from {n_eps} episodes; every method "
        "uses the same episodes in each replicate (common random numbers). Moving average "
        "warmed up for 20 batches at theta, value function fitted for 300 steps (64 "
        "episodes each) at theta. Columns: total variance (sum over the coordinates of the "
        "variance of the batch-mean gradient); the variance ratio REINFORCE / method on the "
        "total with its delta-method SE (paired replicates); the per-coordinate ratio "
        "var(REINFORCE) / var(method): median, min and max over coordinates; and the total "
        "ratio against REINFORCE with the leave-one-out baseline.",
        "",
    ]
    for label, theta in thetas.items():
        print(f"variance at theta = {label}", flush=True)
        ret, ncoord, rows, secs = variance_table(prog, theta, jax.random.key(3), n_eps, reps)
        lines += [f"### theta = {label} (mean return {ret:.1f})", "",
                  f"{ncoord} coordinates; estimation took {secs:.0f} s.", "",
                  "| method | total variance | REINFORCE / method (total) | per-coordinate "
                  "median | min | max | REINFORCE+LOO / method (total) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, tv, r, se, med, lo, hi, rl, rlse in rows:
            lines.append(f"| {LABELS[name]} | {tv:.4g} | {r:.2f} ± {se:.2f} | {med:.2f} | "
                         f"{lo:.2f} | {hi:.2f} | {rl:.2f} ± {rlse:.2f} |")
            print(f"  {name}: total {tv:.4g}, ratio {r:.2f}±{se:.2f}, per-coord median "
                  f"{med:.2f} [{lo:.2f}, {hi:.2f}], vs LOO {rl:.2f}", flush=True)
        lines.append("")

    print("training curves", flush=True)
    data = curves(prog, rp.METHODS, seeds, iters, n_train, lr)
    budgets = [BUDGET // 4, BUDGET // 2, BUDGET]
    lines += [
        "## 2. Return against environment steps",
        "",
        f"Adam (learning rate {lr}), {n_train} episodes per iteration, {iters} iterations, "
        f"{seeds} seeds (same seeds for every method: the same initial MLP per seed). "
        "Environment steps: the live steps of every episode drawn so far (the figure "
        f"shows the first {BUDGET:,}). "
        "![return curves](cartpole_causal.png)",
        "",
        "Mean return at equal environment-step budgets: each seed's curve interpolated at "
        "the budget, mean ± SE over seeds (a run that used fewer steps in all, only some "
        "runs of plain REINFORCE that never learned, holds its last return).",
        "",
        "| method | " + " | ".join(f"return at {b:,.0f} steps" for b in budgets)
        + " | last 5 iterations | env steps used "
        f"| seeds reaching {0.95 * T:.0f} | median env steps to reach it |",
        "|---|" + "---:|" * (len(budgets) + 4),
    ]
    for name, (ret, steps) in data.items():
        hit = steps_to(ret, steps, 0.95 * T)
        med = np.nanmedian(hit) if np.isfinite(hit).any() else float("nan")
        at = np.stack([[np.interp(b, s, r) for r, s in zip(ret, steps)] for b in budgets])
        cells = " | ".join(f"{a.mean():.1f} ± {a.std(ddof=1) / np.sqrt(len(a)):.1f}" for a in at)
        lines.append(f"| {LABELS[name]} | {cells} | {ret[:, -5:].mean():.1f} "
                     f"| {steps[:, -1].mean():,.0f} | {np.isfinite(hit).sum()}/{len(hit)} "
                     f"| {med:,.0f} |")
    lines.append("")
    total = time.perf_counter() - t_all
    text = "\n".join(lines).replace("{machine}", machine()).replace(
        "{total}", f"{total / 60:.1f} minutes")
    print(text)
    if not args.no_write:
        os.makedirs(os.path.dirname(OUT_MD), exist_ok=True)
        with open(OUT_MD, "w") as fh:
            fh.write(text)
        plot(data, OUT_PNG, T)
        print(f"wrote {OUT_MD} and {OUT_PNG}")


if __name__ == "__main__":
    main()
