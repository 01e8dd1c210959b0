"""Outputs of ``scoregrad bench``: metadata, the table, JSON, PNG plots and report.md (atomic)."""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import tempfile

import jax
import numpy as np

import scoregrad

SCHEMA_VERSION = 1
COLUMNS = ("estimator", "N", "max |t|", "p (bias)", "variance", "SE ratio", "time/est (IQR)",
           "var×N", "var×s", "rank", "note")


def atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, then ``os.replace``\\ s it."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0o600; give the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _git(*args: str) -> str | None:
    root = pathlib.Path(scoregrad.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def metadata() -> dict:
    """Machine, versions, git commit and a UTC timestamp."""
    import jaxlib

    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "scoregrad_version": scoregrad.__version__,
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
        },
    }


def _g(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def _time(seconds) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def _timing(c: dict) -> str:
    """Median and interquartile range of the per-estimate time."""
    if c.get("seconds") is None:
        return "—"
    q25, q75 = c.get("seconds_q25"), c.get("seconds_q75")
    spread = "" if q25 is None or q75 is None else f" (IQR {_time(q75 - q25)})"
    return _time(c["seconds"]) + spread


def _t(c: dict) -> str:
    return "∞" if c.get("bias_t_infinite") else _g(c.get("bias_t_max"), 2)


def notes(c: dict) -> list[str]:
    """The flags of a cell, in words."""
    out = []
    if c.get("bias_flag") == "biased":
        out.append(f"BIASED (max |t| above {c['bias_threshold']:.3g})")
    elif c.get("bias_flag") == "rounding":
        out.append(f"|t| above {c['bias_threshold']:.3g} but within rounding "
                   f"({c['bias_atol']:.2g})")
    if not c.get("unbiased_by_design", True):
        out.append("biased by design")
    if c.get("stderr_off"):
        lo, hi = c["stderr_bounds"]
        out.append(f"SE RATIO OFF (honest: {lo:.2g}–{hi:.2g})")
    if c.get("variance") == 0.0:
        out.append("zero variance")
    if c.get("num_samples") != c.get("budget", c.get("num_samples")):
        out.append(f"ran at N={c['num_samples']} (its multiple)")
    return out


def _n(c: dict) -> str:
    return str(c["num_samples"])


def _row(c: dict) -> list[str]:
    if c["status"] != "ok":
        return [c["estimator"], _n(c), "—", "—", "—", "—", "—", "—", "—", "—",
                f"{c['status']}: {c['reason']}"]
    return [
        c["estimator"], _n(c), _t(c), _g(c["bias_p"], 2), _g(c["variance"]),
        _g(c["stderr_ratio"], 2), _timing(c), _g(c["var_x_n"]),
        _g(c["work_normalized_variance"]), str(c.get("rank", "—")), "; ".join(notes(c)),
    ]


def _by_problem(cells: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(c["problem"], []).append(c)
    for g in groups.values():
        g.sort(key=lambda c: (c.get("budget", c["num_samples"]), c.get("rank", 10**6),
                              c.get("var_x_n") if c.get("var_x_n") is not None else math.inf,
                              c["estimator"]))
    return groups


def text_table(cells: list[dict]) -> str:
    """A fixed-width table per problem, for the terminal."""
    out = []
    for problem, group in _by_problem(cells).items():
        rows = [list(COLUMNS)] + [_row(c) for c in group]
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        out.append(f"\n== {problem} ==")
        for j, r in enumerate(rows):
            out.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)).rstrip())
            if j == 0:
                out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    """A table cell's text with its pipes escaped (``max |t|``)."""
    return text.replace("|", "\\|")


def markdown_table(cells: list[dict]) -> str:
    """A markdown table per problem and budget."""
    out = []
    for problem, group in _by_problem(cells).items():
        out.append(f"\n### `{problem}`\n")
        out.append("| " + " | ".join(map(_md_cell, COLUMNS)) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        out.extend("| " + " | ".join(map(_md_cell, _row(c))) + " |" for c in group)
    return "\n".join(out) + "\n"


def _eligible(c: dict) -> bool:
    return (c["status"] == "ok" and c.get("var_x_n") is not None
            and c.get("unbiased_by_design", True) and c.get("bias_flag") != "biased")


def recommend(cells: list[dict]) -> list[dict]:
    """One recommendation per (problem, budget): the best-ranked eligible estimator.

    Eligible: measured, unbiased by design and not flagged BIASED. The choice is a deterministic
    function of the estimates (rank, then variance × evaluations, then name); timings only add a
    note when another eligible estimator is faster per unit of accuracy beyond the timings'
    interquartile ranges on this machine.
    """
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        if c["status"] == "ok":
            groups.setdefault((c["problem"], c.get("budget", c["num_samples"])), []).append(c)
    recs = []
    for (problem, budget), group in groups.items():
        ok = sorted((c for c in group if _eligible(c)),
                    key=lambda c: (c["rank"], c["var_x_n"], c["estimator"]))
        excluded = sorted(c["estimator"] for c in group if not _eligible(c))
        if not ok:
            recs.append({"problem": problem, "budget": budget, "estimator": None,
                         "why": "no unbiased estimator measured", "sure": "—",
                         "excluded": excluded})
            continue
        best, rest = ok[0], ok[1:]
        tied = [c["estimator"] for c in rest if c["estimator"] in best.get("tied_with", [])]
        why = f"variance {_g(best['variance'])} at N={best['num_samples']}"
        if best["variance"] == 0.0:
            why = f"exact (zero variance) at N={best['num_samples']}"
        if rest and not tied:
            r = rest[0]
            ratio = (r["var_x_n"] / best["var_x_n"]) if best["var_x_n"] else math.inf
            why += (f"; {_g(ratio, 2)}× lower variance × evaluations than {r['estimator']}"
                    if math.isfinite(ratio) else f"; {r['estimator']} is not exact")
        if tied and best["variance"] == 0.0:
            sure = (f"equally exact: {', '.join(tied[:4])}{' …' if len(tied) > 4 else ''} "
                    "(zero variance too)")
        elif tied:
            sure = (f"tied with {len(tied)} (differences within replicate noise): "
                    + ", ".join(tied[:4]) + (" …" if len(tied) > 4 else ""))
        elif rest:
            sure = "significantly better than every other unbiased estimator (F test, 1%)"
        else:
            sure = "the only unbiased estimator measured"
        if best.get("stderr_off"):
            sure += "; its reported SE is off (see table)"
        recs.append({"problem": problem, "budget": budget, "estimator": best["estimator"],
                     "why": why, "sure": sure, "time": _timing(best),
                     "faster": _faster(best, rest), "excluded": excluded})
    return recs


def _faster(best: dict, rest: list[dict]) -> str | None:
    """An eligible estimator with lower variance × seconds than ``best`` beyond the spread."""
    def bounds(c):
        if c.get("seconds_q25") is None or c.get("seconds_q75") is None or c["variance"] is None:
            return None
        return c["variance"] * c["seconds_q25"], c["variance"] * c["seconds_q75"]

    b = bounds(best)
    if b is None:
        return None
    wins = [c for c in rest if (cb := bounds(c)) is not None and cb[1] < b[0]]
    if not wins:
        return None
    w = min(wins, key=lambda c: (c["work_normalized_variance"], c["estimator"]))
    return (f"{w['estimator']} reaches the same accuracy in less time on this machine "
            f"(var×s {_g(w['work_normalized_variance'])} vs {_g(best['work_normalized_variance'])}"
            ", beyond the timings' IQR)")


def recommendation_markdown(recs: list[dict]) -> str:
    """The summary table of :func:`recommend`."""
    lines = ["| problem | N | use | why | how sure | time/est (IQR) |", "|---|---|---|---|---|---|"]
    for r in recs:
        use = f"`{r['estimator']}`" if r["estimator"] else "—"
        why = r["why"] + (f". Timing: {r['faster']}" if r.get("faster") else "")
        lines.append(f"| `{r['problem']}` | {r['budget']} | {use} | {_md_cell(why)} | "
                     f"{_md_cell(r['sure'])} | {r.get('time', '—')} |")
    return "\n".join(lines) + "\n"


def write_json(out_dir: pathlib.Path, payload: dict) -> pathlib.Path:
    path = pathlib.Path(out_dir) / "results.json"
    atomic_write(path, (json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n").encode())
    return path


LEGEND = (
    "Per cell, from R independent replicate estimates (keys shared across estimators: common "
    "random numbers): **max |t|** = the largest over the P gradient coordinates of "
    "|mean − exact| / (SD/√R), Student t with R − 1 degrees of freedom for an unbiased "
    "estimator; **p (bias)** = its Bonferroni p-value over the P coordinates (small = evidence "
    "of bias); the note says **BIASED** when max |t| exceeds the Bonferroni threshold "
    "t⁻¹(1 − α/2P; R − 1), α = {alpha} (an unbiased estimator is flagged at most once in "
    "{inv_alpha:.0f} cells), or that |t| is above it while the offset is within float rounding. "
    "**variance** = trace of the covariance of one estimate; **SE ratio** = the estimator's own "
    "reported standard error over the empirical spread (1 is honest; SE RATIO OFF outside the "
    "chi-square interval with R − 1 dof at level α); **time/est** = median seconds per estimate "
    "over the timing repeats, with the interquartile range (`estimate_grad` with standard "
    "errors, jitted, after warm-up); **var×N** = variance × evaluations of f, the work-normalized "
    "variance in a deterministic cost unit; **var×s** = variance × median seconds (machine- and "
    "load-dependent, for information); **rank** within (problem, N) by var×N, 1 + the number of "
    "estimators significantly lower (one-sided F test, 1%): equal ranks are ties. An estimator "
    "that draws in units of several samples runs at the nearest multiple of its unit to N (the "
    "note says so); var×N compares it fairly.")


def _not_applicable(skipped: list[dict]) -> list[str]:
    by_est: dict[str, list[str]] = {}
    why: dict[str, str] = {}
    for s in skipped:
        by_est.setdefault(s["estimator"], []).append(s["problem"])
        why[s["estimator"]] = s["reason"]
    return [f"- `{e}` ({why[e]}): " + ", ".join(f"`{p}`" for p in probs)
            for e, probs in by_est.items()]


def _compile_line(summary: dict) -> list[str]:
    """Where the time went: compiling each cell's program once vs running it jitted."""
    if summary.get("compile_seconds_median") is None:
        return []
    comp, run = summary["compile_seconds_median"], summary["estimate_seconds_median"]
    return [f"- compile vs run: tracing and compiling a cell's program took a median "
            f"{comp:.3g} s ({summary.get('compile_threads', '?')} compile threads; compile phase "
            f"{summary.get('compile_phase_seconds', '?')} s, measure phase "
            f"{summary.get('measure_phase_seconds', '?')} s); one jitted estimate a median "
            f"{_time(run)}, {comp / run:,.0f}× less: compiling is paid once per program under "
            "`jax.jit`, and by any call that traces again."]


def report_markdown(payload: dict, plots: list[str]) -> str:
    """report.md: the recommendation, the plots, then settings, the tables and the rest."""
    from scoregrad.bench import stats

    meta, settings, summary = payload["meta"], payload["settings"], payload["summary"]
    recs = recommend(payload["cells"])
    lines = [
        "# scoregrad bench report", "",
        "## Recommendation", "",
        "Per problem and sample budget N (evaluations of f per estimate), the unbiased estimator "
        "with the lowest variance × evaluations of f, decided from the estimates alone (never "
        "from a timing, so identical runs give identical recommendations); *how sure* says "
        "whether it beats every other unbiased estimator beyond the replicates' noise or is tied. "
        "Estimators biased by design or flagged BIASED are never recommended.", "",
        recommendation_markdown(recs), "",
    ]
    lines += [f"![{p}]({p})\n" for p in plots]
    lines += [
        "## Settings", "",
        f"- suite: `{settings['suite']}`; replicates per cell R = {settings['replicates']}; "
        f"sample budgets: {settings['samples']}; dtype: {settings['dtype']}",
        f"- scoregrad {meta['scoregrad_version']}, jax {meta['jax_version']}, "
        f"commit `{meta['git_commit']}`{' (dirty)' if meta['git_dirty'] else ''}",
        f"- machine: {meta['machine']['platform']}, {meta['machine']['cpu_count']} CPUs, "
        f"devices {meta['machine']['devices']}; {meta['timestamp']}",
        f"- cells: {summary.get('ok', 0)} ok, {summary.get('error', 0)} failed; "
        f"{summary.get('wall_seconds', '?')} s wall, {summary.get('cpu_seconds', '?')} s CPU",
        *_compile_line(summary), "",
        "## Results", "",
        LEGEND.format(alpha=stats.ALPHA, inv_alpha=1 / stats.ALPHA),
        markdown_table(payload["cells"]),
    ]
    if payload["not_applicable"]:
        lines.append("\n## Not applicable\n")
        lines += _not_applicable(payload["not_applicable"])
    return "\n".join(lines) + "\n"


def write_report(out_dir: pathlib.Path, payload: dict, plots: list[str]) -> pathlib.Path:
    """Writes report.md and report.html (one self-contained file, plots embedded)."""
    out_dir = pathlib.Path(out_dir)
    md = report_markdown(payload, plots)
    path = out_dir / "report.md"
    atomic_write(path, md.encode())
    atomic_write(out_dir / "report.html", _html(md, out_dir).encode())
    return path


def _inline(text: str) -> str:
    import html
    import re

    text = html.escape(text.replace("\\|", "|"), quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _html(md: str, out_dir: pathlib.Path) -> str:
    """A minimal markdown-to-HTML rendering of the report, images embedded as data URIs."""
    import base64
    import re

    body: list[str] = []
    table: list[list[str]] = []

    def flush():
        if table:
            head, rows = table[0], table[2:]
            body.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(v)}</td>" for v in r) + "</tr>"
                                  for r in rows) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append([v.strip() for v in line.strip()[1:-1].split(" | ")])
            continue
        flush()
        if m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line):
            img = out_dir / m.group(2)
            data = base64.b64encode(img.read_bytes()).decode() if img.exists() else ""
            body.append(f'<p><img alt="{m.group(1)}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;font-size:14px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:2px 6px;text-align:left}img{max-width:100%}")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>scoregrad bench report"
            f"</title><style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")
