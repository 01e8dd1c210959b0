"""PNG plots of ``scoregrad bench`` results (matplotlib, Agg, no pyplot global state)."""

from __future__ import annotations

import io
import math
import pathlib

from scoregrad.bench.report import atomic_write


def _figure(num_panels: int):
    from matplotlib.figure import Figure

    cols = min(4, max(1, num_panels))
    rows = math.ceil(num_panels / cols)
    fig = Figure(figsize=(4.0 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, path: pathlib.Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write(path, buf.getvalue())


def _quiet_minor(ax) -> None:
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _ok(cells):
    return [c for c in cells if c["status"] == "ok" and c["variance"] is not None]


def _problems(cells):
    return list(dict.fromkeys(c["problem"] for c in cells))


def _styles(cells):
    names = list(dict.fromkeys(c["estimator"] for c in cells))
    markers = "osD^v<>pPX*h"
    return {n: (f"C{i % 10}", markers[i % len(markers)]) for i, n in enumerate(names)}


def variance_vs_samples(cells, path: pathlib.Path) -> None:
    """One panel per problem: variance of one estimate against the sample budget (log-log)."""
    cells = _ok(cells)
    probs, styles = _problems(cells), _styles(cells)
    fig, axes = _figure(max(1, len(probs)))
    for ax, prob in zip(axes, probs, strict=False):
        for est, (color, marker) in styles.items():
            pts = sorted((c["num_samples"], c["variance"]) for c in cells
                         if c["problem"] == prob and c["estimator"] == est)
            pts = [(n, v) for n, v in pts if v > 0]
            if pts:
                ax.plot(*zip(*pts, strict=False), marker=marker, color=color, label=est)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _quiet_minor(ax)
        ax.set_title(prob, fontsize=9)
        ax.set_xlabel("num_samples")
        ax.set_ylabel("variance (trace)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Variance of the gradient estimate vs sample budget")
    _save(fig, path)


def work_normalized(cells, path: pathlib.Path) -> None:
    """One panel per problem: variance × seconds per estimator at the largest sample budget."""
    cells = [c for c in _ok(cells) if c["work_normalized_variance"] is not None]
    probs, styles = _problems(cells), _styles(cells)
    fig, axes = _figure(max(1, len(probs)))
    for ax, prob in zip(axes, probs, strict=False):
        mine = [c for c in cells if c["problem"] == prob]
        n = max(c["num_samples"] for c in mine)
        mine = sorted((c for c in mine if c["num_samples"] == n),
                      key=lambda c: c["work_normalized_variance"])
        raw = [c["work_normalized_variance"] for c in mine]
        # Zero-variance estimators (enumeration, some exact couplings) and rounding-level values
        # are drawn at 1e-12 of the largest bar and labelled, so they do not stretch the log axis
        # to 1e-300 and flatten every other bar.
        tiny = max(max(raw), 1e-300) * 1e-12
        names = [c["estimator"] + (" (biased)" if c["biased"] else "")
                 + (" (≈0)" if v < tiny else "") for c, v in zip(mine, raw, strict=True)]
        vals = [max(v, tiny) for v in raw]
        ax.set_xscale("log")
        left = min(vals) / 3.0
        ax.barh(names, [v - left for v in vals], left=left,
                color=[styles[c["estimator"]][0] for c in mine])
        _quiet_minor(ax)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"{prob} (N={n})", fontsize=9)
        ax.set_xlabel("variance × seconds (lower is better)")
        ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.suptitle("Work-normalized variance per estimator")
    _save(fig, path)


def write_plots(cells, out_dir: pathlib.Path) -> list[str]:
    """Writes both plots; returns their file names."""
    out_dir = pathlib.Path(out_dir)
    variance_vs_samples(cells, out_dir / "variance_vs_samples.png")
    work_normalized(cells, out_dir / "work_normalized_variance.png")
    return ["variance_vs_samples.png", "work_normalized_variance.png"]
