"""Outputs of ``scoregrad bench``: metadata, the table, JSON, PNG plots and report.md (atomic)."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
import tempfile

import jax
import numpy as np

import scoregrad

SCHEMA_VERSION = 1
COLUMNS = ("estimator", "N", "bias ± SE", "max z", "variance", "SE ratio", "time/est",
           "var×s", "rank", "note")


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


def _row(c: dict) -> list[str]:
    if c["status"] != "ok":
        return [c["estimator"], str(c["num_samples"]), "—", "—", "—", "—", "—", "—", "—",
                f"{c['status']}: {c['reason']}"]
    note = "BIASED" if c["biased"] else ""
    return [
        c["estimator"], str(c["num_samples"]),
        f"{_g(c['bias_norm'], 2)} ± {_g(c['bias_se_norm'], 2)}", _g(c["bias_z_max"], 2),
        _g(c["variance"]), _g(c["stderr_ratio"], 2), _time(c["seconds"]),
        _g(c["work_normalized_variance"]), str(c.get("rank", "—")), note,
    ]


def _by_problem(cells: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(c["problem"], []).append(c)
    for g in groups.values():
        g.sort(key=lambda c: (c["num_samples"], c.get("rank", 10**6), c["estimator"]))
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


def markdown_table(cells: list[dict]) -> str:
    """A markdown table per problem."""
    out = []
    for problem, group in _by_problem(cells).items():
        out.append(f"\n### `{problem}`\n")
        out.append("| " + " | ".join(COLUMNS) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        out.extend("| " + " | ".join(_row(c)) + " |" for c in group)
    return "\n".join(out) + "\n"


def write_json(out_dir: pathlib.Path, payload: dict) -> pathlib.Path:
    path = pathlib.Path(out_dir) / "results.json"
    atomic_write(path, (json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n").encode())
    return path


def write_report(out_dir: pathlib.Path, payload: dict, plots: list[str]) -> pathlib.Path:
    """report.md: settings, machine, the tables, and the plots embedded."""
    meta, settings = payload["meta"], payload["settings"]
    lines = [
        "# scoregrad bench report", "",
        f"- suite: `{settings['suite']}`; replicates per cell: {settings['replicates']}; "
        f"sample budgets: {settings['samples']}; dtype: {settings['dtype']}",
        f"- scoregrad {meta['scoregrad_version']}, jax {meta['jax_version']}, "
        f"commit `{meta['git_commit']}`{' (dirty)' if meta['git_dirty'] else ''}",
        f"- machine: {meta['machine']['platform']}, {meta['machine']['cpu_count']} CPUs, "
        f"devices {meta['machine']['devices']}; {meta['timestamp']}",
        f"- cells: {payload['summary'].get('ok', 0)} ok, {payload['summary'].get('skipped', 0)} "
        f"skipped, {payload['summary'].get('error', 0)} failed; "
        f"{payload['summary'].get('wall_seconds', '?')} s wall, "
        f"{payload['summary'].get('cpu_seconds', '?')} s CPU", "",
        "Per cell: **bias** = ‖mean of R estimates − exact gradient‖ ± its standard error; "
        "**max z** = the largest per-coordinate |bias|/SE (BIASED when > 5); **variance** = "
        "trace of the covariance of one estimate; **SE ratio** = the estimator's own reported "
        "standard error over the empirical spread (1 is honest); **time/est** = median seconds "
        "per estimate (`estimate_grad` with standard errors, jitted, after warm-up); "
        "**var×s** = work-normalized variance; **rank** by var×s within (problem, N). "
        "Keys are common random numbers across estimators.", "",
    ]
    lines += [f"![{p}]({p})\n" for p in plots]
    lines.append("## Results")
    lines.append(markdown_table(payload["cells"]))
    if payload["not_applicable"]:
        lines.append("\n## Not applicable\n")
        lines += [f"- `{s['estimator']}` on `{s['problem']}`: {s['reason']}"
                  for s in payload["not_applicable"]]
    path = pathlib.Path(out_dir) / "report.md"
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path
