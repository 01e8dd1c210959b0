"""Fill the "Latest default-suite results" section of benchmarks/README.md from a bench run.

Usage::

    scoregrad bench --suite default --out bench-out
    python benchmarks/update_readme.py bench-out [--note "what to know about this run"]

Copies the two plots to ``benchmarks/default-suite/`` and replaces everything from the heading
``## Latest default-suite results`` to the next ``## `` heading (or the end) with the run's
machine, versions, commit, timing and tables. Files are replaced atomically.
"""

from __future__ import annotations

import json
import pathlib
import sys

from scoregrad.bench.report import atomic_write, markdown_table

HEADING = "## Latest default-suite results"
HERE = pathlib.Path(__file__).resolve().parent
PLOTS = ("variance_vs_samples.png", "work_normalized_variance.png")


def section(res: dict, note: str = "") -> str:
    meta, settings, summary = res["meta"], res["settings"], res["summary"]
    machine = meta["machine"]
    lines = [
        HEADING, "",
        f"`scoregrad bench --suite {settings['suite']}` ({settings['dtype']}, R = "
        f"{settings['replicates']} replicates, N = {settings['samples']}), run once on "
        f"{meta['timestamp']}: scoregrad {meta['scoregrad_version']}, jax {meta['jax_version']} "
        f"(jaxlib {meta['jaxlib_version']}), commit `{meta['git_commit']}`"
        f"{' plus uncommitted changes' if meta['git_dirty'] else ''}; {machine['platform']}, "
        f"{machine['cpu_count']} CPUs, devices {machine['devices']}.",
        "",
        f"{summary['ok']} cells measured, {summary['skipped']} skipped, {summary['error']} failed, "
        f"in {summary.get('wall_seconds', '?')} s wall ({summary.get('cpu_seconds', '?')} s CPU).",
        "",
    ]
    if note:
        lines += [note, ""]
    lines += [
        "Times (and so var×s and ranks) depend on the machine and its load; bias, variance and SE "
        "ratio do not.",
        "",
    ]
    lines += [f"![{p}](default-suite/{p})\n" for p in PLOTS]
    lines.append(markdown_table(res["cells"]))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    note = ""
    if len(argv) == 3 and argv[1] == "--note":
        note, argv = argv[2], argv[:1]
    if len(argv) != 1:
        print("usage: python benchmarks/update_readme.py BENCH_OUT_DIR [--note TEXT]",
              file=sys.stderr)
        return 2
    out = pathlib.Path(argv[0])
    res = json.loads((out / "results.json").read_text())
    dest = HERE / "default-suite"
    dest.mkdir(exist_ok=True)
    for p in PLOTS:
        atomic_write(dest / p, (out / p).read_bytes())
    readme = HERE / "README.md"
    text = readme.read_text()
    start = text.index(HEADING)
    nxt = text.find("\n## ", start + len(HEADING))
    rest = text[nxt + 1:] if nxt >= 0 else ""
    atomic_write(readme, (text[:start] + section(res, note) + ("\n" + rest if rest else "")).encode())
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
