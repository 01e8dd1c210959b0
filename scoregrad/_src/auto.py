r"""Estimator auto-selection by measured work-normalized variance on a pilot batch.

:func:`auto` runs every applicable candidate on the same pilot problem, measures its variance
and wall time (eagerly, after compilation), drops candidates whose estimate disagrees with the
plain score function (a sign of bias, e.g. pathwise on a piecewise-constant f), and picks the
lowest work-normalized variance :math:`\mathrm{tr}\,\mathrm{Var}[\hat g] \times t`.

References:
  Glynn and Whitt, Operations Research, 1992. Mohamed et al., JMLR 2020, §8 (choosing an
  estimator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

PyTree = Any
_Z_DISAGREE = 6.0


class AutoRow(NamedTuple):
    """One candidate's measurement (``seconds``/variances are NaN when not applicable)."""

    name: str
    applicable: bool
    note: str
    seconds: float
    total_variance: float
    work_normalized_variance: float
    max_z: float


class AutoReport(NamedTuple):
    """Result of :func:`auto`: the chosen estimator, every candidate's row, and why.

    ``str(report)`` prints a readable table.
    """

    estimator: Any
    name: str
    rows: tuple
    reason: str

    def __str__(self) -> str:
        head = f"{'estimator':<44} {'ms/est':>9} {'tr Var':>11} {'WNV':>11}  note"
        lines = [head, "-" * len(head)]
        for r in sorted(self.rows, key=lambda r: (not r.applicable, r.work_normalized_variance)):
            mark = "*" if r.name == self.name else " "
            lines.append(f"{mark}{r.name:<43} {r.seconds * 1e3:9.3f} {r.total_variance:11.4g} "
                         f"{r.work_normalized_variance:11.4g}  {r.note}")
        return "\n".join(lines + ["", self.reason])


def default_candidates(family, num_samples: int) -> list:
    """Score function (plain, leave-one-out, optimal), pathwise where the family allows it, and
    antithetic / QMC designs for built-in families."""
    from scoregrad import baselines, pathwise, sampling, score_function

    cands = [score_function(), score_function(baselines.leave_one_out()),
             score_function(baselines.optimal())]
    kind = family.capabilities.get("kind") if family.capabilities is not None else None
    if family.reparameterized is not False:
        cands.append(pathwise())
    if kind in ("normal", "bernoulli", "categorical"):
        cands.append(sampling.antithetic(score_function(baselines.optimal())))
        if num_samples % 64 == 0:
            cands.append(sampling.qmc(score_function(), block_size=64))
    if kind == "normal":
        cands.append(sampling.antithetic(pathwise()))
        if num_samples % 64 == 0:
            cands.append(sampling.qmc(pathwise(), block_size=64))
    return cands


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])


def _measure(f, family, theta, key, num_samples, est, repeats):
    from scoregrad._src.diagnostics import timed_estimate

    t = timed_estimate(f, family, theta, key, num_samples=num_samples, estimator=est,
                       repeats=repeats)
    return t.result, t.seconds, float(t.diagnostics.total_variance)


def auto(f: Callable, family, theta: PyTree, key: jax.Array, *, num_samples: int = 1024,
         candidates: Sequence | None = None, repeats: int = 3) -> AutoReport:
    """Measures candidate estimators on a pilot batch and picks the cheapest per accuracy.

    Every candidate estimates the gradient with ``num_samples`` evaluations of f and the same
    key. A candidate that raises ``TypeError``/``ValueError`` (not applicable: e.g. pathwise on a
    discrete family) is listed with the reason. A candidate whose estimate differs from the
    plain score function's by more than 6 combined standard errors in some coordinate is
    listed as disagreeing (biased for this f) and not chosen. Among the rest the lowest
    work-normalized variance wins.

    Args:
      f, family, theta, key: the problem, as in :func:`scoregrad.estimate_grad`.
      num_samples: pilot size.
      candidates: estimators to compare (default :func:`default_candidates`).
      repeats: timing repeats (median).

    Returns:
      An :class:`AutoReport`; ``report.estimator`` is ready to use.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> rep = sg.auto(lambda x: jnp.sum(x**2), sg.families.normal(),
      ...               {"loc": jnp.ones(2), "scale": jnp.ones(2)}, jax.random.key(0),
      ...               num_samples=256, candidates=[sg.score_function(), sg.pathwise()], repeats=1)
      >>> rep.name
      'pathwise'
    """
    from scoregrad import score_function

    cands = list(default_candidates(family, num_samples) if candidates is None else candidates)
    if not cands:
        raise ValueError("auto(candidates=...) must name at least one estimator.")
    ref, *_ = _measure(f, family, theta, key, num_samples, score_function(), 1)
    g_ref, s_ref = _flat(ref.grad), _flat(ref.stderr)
    rows, best = [], None
    for est in cands:
        name = getattr(est, "name", repr(est))
        try:
            res, sec, tv = _measure(f, family, theta, key, num_samples, est, repeats)
        except (TypeError, ValueError) as err:
            rows.append(AutoRow(name, False, f"not applicable: {err}"[:160], *(math.nan,) * 4))
            continue
        z = np.abs(_flat(res.grad) - g_ref) / np.sqrt(_flat(res.stderr) ** 2 + s_ref**2 + 1e-300)
        max_z = float(np.max(z))
        wnv = tv * sec
        ok = bool(np.isfinite(wnv)) and max_z <= _Z_DISAGREE
        note = "" if ok else (f"disagrees with the score function (max z = {max_z:.1f}): biased "
                              "for this f?" if np.isfinite(wnv) else "non-finite variance")
        rows.append(AutoRow(name, ok, note, sec, tv, wnv, max_z))
        if ok and (best is None or wnv < best[1].work_normalized_variance):
            best = (est, rows[-1])
    if best is None:
        raise ValueError("auto: no candidate produced a finite, consistent estimate:\n"
                         + "\n".join(f"  {r.name}: {r.note}" for r in rows))
    return AutoReport(best[0], best[1].name, tuple(rows), _reason(best[1], rows))


def _reason(best: AutoRow, rows) -> str:
    others = sorted((r for r in rows if r.applicable and r.name != best.name),
                    key=lambda r: r.work_normalized_variance)
    text = (f"picked {best.name}: work-normalized variance {best.work_normalized_variance:.3g} "
            f"(trace of the estimate's variance {best.total_variance:.3g} x "
            f"{best.seconds * 1e3:.3g} ms per estimate)")
    if others:
        r = others[0]
        ratio = r.work_normalized_variance / max(best.work_normalized_variance, 1e-300)
        text += f", {ratio:.3g}x lower than the runner-up {r.name}"
    skipped = [r.name for r in rows if not r.applicable]
    if skipped:
        text += f"; excluded: {', '.join(skipped)}"
    return text + "."

