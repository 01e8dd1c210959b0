"""The exact bias table of the language-model RL losses (scoregrad.lm_rl), as markdown.

    python benchmarks/lm_rl_bias.py            # prints it, writes benchmarks/results/lm_rl_bias.md
    python benchmarks/lm_rl_bias.py --docs     # also replaces the table in docs/lm-rl.md

Every number is exact (multiset enumeration over all K-tuples of completions, float64): the
run is deterministic and its time is the only machine-dependent output. About a minute on 2 idle CPU
cores (two worker processes: compilation, one program per loss and K, dominates).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import multiprocessing
import os
import pathlib
import platform
import subprocess
import time

import jax

jax.config.update("jax_enable_x64", True)

import scoregrad  # noqa: E402
import scoregrad.lm_rl as lm  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "lm_rl_bias.md"
DOCS = ROOT / "docs" / "lm-rl.md"
KS = (2, 4, 8)
START, END = "<!-- lm_rl_bias:start -->", "<!-- lm_rl_bias:end -->"


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=ROOT, check=True).stdout.strip()
        paths = ["scoregrad/lm_rl.py", "scoregrad/_src/lm_rl", "benchmarks/lm_rl_bias.py"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths],
                               capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return rev + (" plus uncommitted changes to lm_rl" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _rows(rows) -> list:
    """Worker: the cells of some rows (each process compiles its own share)."""
    jax.config.update("jax_enable_x64", True)
    return lm.bias_table(rows, ks=KS)


def report(jobs: int = 2) -> str:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    toy, theta, ref = lm.default_problem()
    rows = list(lm.TABLE_ROWS)
    if jobs > 1:  # compilation dominates (one program per row and K): spread the rows
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            parts = list(pool.map(_rows, [rows[i::jobs] for i in range(jobs)]))
        by_row = {(c["loss"], c["K"]): c for part in parts for c in part}
        cells = [by_row[(r.label, k)] for r in rows for k in KS]
    else:
        cells = lm.bias_table(rows, ks=KS, problem=(toy, theta, ref))
    seconds = time.perf_counter() - t0
    truth = lm.true_grad(toy, theta)
    norm = float(sum((x**2).sum() for x in jax.tree.leaves(truth)) ** 0.5)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    head = (
        f"Exact bias of E[-grad loss] against the true gradient, `python benchmarks/lm_rl_bias.py`,"
        f" run {when}: scoregrad {scoregrad.__version__}, jax {jax.__version__}, commit "
        f"`{_commit()}`; {platform.platform()}, {os.cpu_count()} CPUs, device "
        f"{jax.devices()[0]}; {seconds:.0f} s with {jobs} worker process(es), "
        f"1-minute load average {load:.1f} at the start (other jobs on the machine slow it).\n\n"
        f"Toy: vocabulary 3 (two content tokens and EOS), at most 3 tokens, N = "
        f"{toy.tokens.shape[0]} completions, {toy.rewards.shape[0]} prompts with targets "
        f"{list(toy.targets)} and prefix-match partial-credit rewards; tabular softmax policy "
        f"(63 + 3 parameters, 0.7 * N(0, 1), key 0), reference policy the same with key 1; "
        f"on-policy; float64; multisets of K completions per prompt enumerated exactly "
        f"(K = 8: 319 770 per prompt). ‖∇J‖ = {norm:.4f} (J = mean over prompts of E[R]); rows "
        f"with a KL penalty (beta = {lm.TABLE_ROWS[-1].options['kl_coef']}) are compared with "
        f"∇(J - beta KL(p || p_ref)); in the columns ∇J is the row's target. scale = ⟨E ĝ, ∇J⟩ / ‖∇J‖²; verdict: unbiased "
        f"(relative bias < 1e-10), scaled (cosine 1 to 1e-10: unbiased up to that constant "
        f"factor) or biased.\n\n")
    return head + lm.markdown(cells) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", action="store_true", help="also update docs/lm-rl.md")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args()
    text = report(args.jobs)
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    if args.docs:
        page = DOCS.read_text()
        a, b = page.index(START) + len(START), page.index(END)
        DOCS.write_text(page[:a] + "\n" + text + page[b:])
        print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
