"""PNG plots of ``scoregrad bench`` results (matplotlib, Agg, no pyplot global state).

Every estimator keeps one colour and one marker across all panels and both figures (assigned in
registry order, so they are the same from run to run); the legend is one figure legend outside
the panels; estimators with zero variance (exact, e.g. enumeration) cannot sit on a log axis, so
they are drawn on a floor line at the bottom of their panel, hollow, and labelled.
"""

from __future__ import annotations

import io
import math
import pathlib
import textwrap

from scoregrad.bench.report import atomic_write

_MARKERS = "osD^v<>pPX*hH8d"


def _figure(num_panels: int, panel_h: float = 3.2, cols_max: int = 3, extra_h: float = 0.0):
    from matplotlib.figure import Figure

    cols = min(cols_max, max(1, num_panels))
    rows = math.ceil(num_panels / cols)
    fig = Figure(figsize=(4.6 * cols, panel_h * rows + 0.8 + extra_h), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, path: pathlib.Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write(path, buf.getvalue())


def _log_ticks(ax, axis: str) -> None:
    """Log axis with labelled ticks: decades when the range spans several, else 1-2-5 steps
    (every integer step when it spans less than a decade, evenly spaced values when it spans a
    fraction of one), so every panel has several."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    a = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    decades = math.log10(max(hi, 1e-300) / max(lo, 1e-300))
    if decades < 0.6:  # too narrow for log steps: evenly spaced values
        a.set_major_locator(MaxNLocator(nbins=4))
        a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    elif decades < 2.5:
        subs = tuple(range(1, 10)) if decades < 1.0 else (1.0, 2.0, 5.0)
        a.set_major_locator(LogLocator(base=10, subs=subs))
        a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    else:
        a.set_major_locator(LogLocator(base=10, numticks=8))
    a.set_minor_formatter(NullFormatter())


def _ok(cells):
    return [c for c in cells if c["status"] == "ok" and c["variance"] is not None]


def _problems(cells):
    return list(dict.fromkeys(c["problem"] for c in cells))


def styles(names: list[str]) -> dict[str, tuple]:
    """One distinct (colour, marker) per estimator name, in the given order.

    Colours come from tab20, tab20b and tab20c (60 distinct colours) reordered so that
    neighbours differ strongly; markers cycle independently, so (colour, marker) pairs never
    repeat.
    """
    from matplotlib import colormaps

    palette = []
    for cmap in ("tab20", "tab20b", "tab20c"):
        cs = list(getattr(colormaps[cmap], "colors", []))  # a ListedColormap of 20 colours
        palette += list(cs[0::2]) + list(cs[1::2])  # dark shades first, then light ones
    return {n: (palette[i % len(palette)], _MARKERS[i % len(_MARKERS)])
            for i, n in enumerate(names)}


def _names(cells):
    try:
        from scoregrad.bench.registry import estimator_names

        order = {n: i for i, n in enumerate(estimator_names())}
    except Exception:  # noqa: BLE001 - plotting must not fail on a registry problem
        order = {}
    names = list(dict.fromkeys(c["estimator"] for c in cells))
    return sorted(names, key=lambda n: (order.get(n, len(order)), names.index(n)))


def _legend(fig, handles: dict, title: str) -> None:
    if not handles:
        return
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", fontsize=7,
               title=title, title_fontsize=8, ncol=4, frameon=False)


def variance_vs_samples(cells, path: pathlib.Path) -> None:
    """One panel per problem: variance of one estimate against the sample budget (log-log)."""
    from matplotlib.lines import Line2D

    cells = _ok(cells)
    probs, style = _problems(cells), styles(_names(cells))
    fig, axes = _figure(max(1, len(probs)), extra_h=0.2 * math.ceil(len(style) / 4) + 0.4)
    handles: dict[str, Line2D] = {}
    for ax, prob in zip(axes, probs, strict=False):
        mine = [c for c in cells if c["problem"] == prob]
        positive = [c["variance"] for c in mine if c["variance"] > 0]
        floor = min(positive) / 10 if positive else 1.0
        zero_names = []
        for est, (color, marker) in style.items():
            pts = sorted((c["num_samples"], c["variance"]) for c in mine if c["estimator"] == est)
            if not pts:
                continue
            pos = [(n, v) for n, v in pts if v > 0]
            zero = [(n, floor) for n, v in pts if v <= 0]
            if pos:
                ax.plot(*zip(*pos, strict=True), marker=marker, color=color, ms=5, lw=1.2)
            if zero:
                ax.plot(*zip(*zero, strict=True), marker=marker, color=color, ms=7, lw=0,
                        mfc="none", mew=1.5)
                zero_names.append(est)
            handles.setdefault(est, Line2D([], [], color=color, marker=marker, ms=5))
        ax.set_xscale("log")
        ax.set_yscale("log")
        title = prob
        if zero_names:
            ax.axhline(floor, color="0.5", lw=0.8, ls=":")
            ax.set_ylim(bottom=floor / 3)
            title += "\n" + textwrap.fill("zero variance (hollow, on the dotted floor): "
                                           + ", ".join(zero_names), 60)
        ax.margins(x=0.08)
        _log_ticks(ax, "x")
        _log_ticks(ax, "y")
        ax.set_title(title, fontsize=9 if title == prob else 7)
        ax.set_xlabel("num_samples (evaluations of f)", fontsize=8)
        ax.set_ylabel("variance (trace)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    _legend(fig, handles, "estimator")
    fig.suptitle("Variance of one gradient estimate vs sample budget (lower is better)")
    _save(fig, path)


def work_normalized(cells, path: pathlib.Path) -> None:
    """One panel per problem: variance × evaluations of f per estimator at the largest budget."""
    cells = [c for c in _ok(cells) if c.get("var_x_n") is not None]
    probs, style = _problems(cells), styles(_names(cells))
    most = max((sum(1 for c in cells if c["problem"] == p
                    and c["budget"] == max(d["budget"] for d in cells if d["problem"] == p))
                for p in probs), default=1)
    fig, axes = _figure(max(1, len(probs)), panel_h=max(2.4, 0.22 * most + 1.2))
    for ax, prob in zip(axes, probs, strict=False):
        mine = [c for c in cells if c["problem"] == prob]
        budget = max(c["budget"] for c in mine)
        mine = sorted((c for c in mine if c["budget"] == budget),
                      key=lambda c: (c["var_x_n"], c["estimator"]))
        raw = [c["var_x_n"] for c in mine]
        positive = [v for v in raw if v > 0]
        # Zero-variance estimators (enumeration, exact couplings) are drawn as a short hatched
        # bar at a floor (a decade below the smallest positive value) and labelled "= 0".
        floor = min(positive) / 10 if positive else 1.0
        labels = []
        for c, v in zip(mine, raw, strict=True):
            tags = [t for t, on in (("= 0", v <= 0), ("biased", c.get("bias_flag") == "biased"
                                                     or not c.get("unbiased_by_design", True)))
                    if on]
            labels.append(c["estimator"] + (f" ({', '.join(tags)})" if tags else ""))
        vals = [v if v > 0 else floor for v in raw]
        left = floor / 3
        ax.barh(range(len(mine)), [v - left for v in vals], left=left,
                       color=[style[c["estimator"]][0] for c in mine],
                       hatch=["//" if v <= 0 else None for v in raw], edgecolor="0.3", lw=0.4)
        ax.set_yticks(range(len(mine)), labels)
        ax.set_xscale("log")
        ax.set_xlim(left, max(vals) * 3)
        _log_ticks(ax, "x")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{prob} (N ≈ {budget})", fontsize=9)
        ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.supxlabel("variance × evaluations of f per estimate (lower is better; "
                  "hatched: zero variance, drawn at a floor)", fontsize=9)
    fig.suptitle("Work-normalized variance per estimator at the largest budget")
    _save(fig, path)


def write_plots(cells, out_dir: pathlib.Path) -> list[str]:
    """Writes both plots; returns their file names."""
    out_dir = pathlib.Path(out_dir)
    variance_vs_samples(cells, out_dir / "variance_vs_samples.png")
    work_normalized(cells, out_dir / "work_normalized_variance.png")
    return ["variance_vs_samples.png", "work_normalized_variance.png"]
