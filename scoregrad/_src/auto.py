r"""Estimator auto-selection by work-normalized variance on a pilot batch.

:func:`auto` runs every applicable candidate on the same pilot problem (same key: common random
numbers), measures the variance of its estimate, drops candidates whose estimate disagrees with
the plain score function (a sign of bias, e.g. pathwise on a piecewise-constant f), and picks
the lowest work-normalized variance :math:`\mathrm{tr}\,\mathrm{Var}[\hat g] \times c`, where the
cost :math:`c` of one estimate is

* ``cost="evaluations"`` (default): the number of evaluations of f, ``num_samples``. Every
  estimator spends exactly ``num_samples`` evaluations of f per estimate (the library's
  contract), so at a given pilot size this ranks by variance alone. The choice is a pure
  function of the inputs and the key: the same call picks the same estimator on every machine
  and under any load.
* ``cost="time"`` (opt-in): the median wall time of ``repeats`` jitted calls (after compilation).
  Timings vary from run to run, so the choice is made with their spread: candidates whose
  interval ``tr Var x [q25, q75]`` of seconds overlaps the best one's are tied, and the tie goes
  to the lowest variance. Use it to account for estimators whose evaluations of f are more
  expensive (pathwise differentiates f; control variates evaluate a surrogate), knowing that
  the result may change with the machine and its load.

References:
  Glynn and Whitt, Operations Research, 1992. Mohamed et al., JMLR 2020, §8 (choosing an
  estimator).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from scoregrad._src import problem
from scoregrad._src.base import Estimator
from scoregrad._src.binding import bind_public

PyTree = Any
_Z_DISAGREE = 6.0
_COSTS = ("evaluations", "time")


class AutoRow(NamedTuple):
    """One candidate's measurement (numbers are NaN when not applicable or not measured).

    Attributes:
      name: the estimator's name.
      applicable: it ran, agrees with the score function and has a finite variance.
      note: why it is excluded, if it is.
      seconds: median wall time of one jitted estimate over the timing repeats
        (``cost="time"`` only; NaN otherwise).
      seconds_iqr: interquartile range of those timings (NaN when not timed).
      total_variance: trace of the covariance of the estimate.
      cost: the cost of one estimate in the chosen unit (evaluations of f, or seconds).
      work_normalized_variance: ``total_variance * cost``.
      max_z: largest per-coordinate |difference| from the score function, in combined SEs.
    """

    name: str
    applicable: bool
    note: str
    seconds: float
    seconds_iqr: float
    total_variance: float
    cost: float
    work_normalized_variance: float
    max_z: float


class AutoReport(NamedTuple):
    """Result of :func:`auto`: the chosen estimator, every candidate's row, and why.

    ``str(report)`` prints a readable table. ``cost`` is the cost model used.
    """

    estimator: Any
    name: str
    rows: tuple
    reason: str
    cost: str = "evaluations"

    def __str__(self) -> str:
        unit = "f evals" if self.cost == "evaluations" else "ms (IQR)"
        head = f"{'estimator':<44} {unit:>16} {'tr Var':>11} {'WNV':>11}  note"
        lines = [head, "-" * len(head)]
        for r in sorted(self.rows, key=lambda r: (not r.applicable, r.work_normalized_variance)):
            mark = "*" if r.name == self.name else " "
            c = (f"{r.cost:16.0f}" if self.cost == "evaluations"
                 else f"{r.seconds * 1e3:8.3g} ({r.seconds_iqr * 1e3:.2g})".rjust(16))
            lines.append(f"{mark}{r.name:<43} {c} {r.total_variance:11.4g} "
                         f"{r.work_normalized_variance:11.4g}  {r.note}")
        return "\n".join(lines + ["", self.reason])


def default_candidates(family, num_samples: int, theta=None) -> list:
    """Score function (plain, leave-one-out, optimal), pathwise where the family allows it,
    antithetic / QMC designs for families with ``capabilities.inverse_cdf``, and for discrete
    families RLOO(4) and, for Bernoulli logits, DisARM, for categorical logits the unordered-set
    estimator (a joint support of at most 4096 values) and ARSM (3 or 4 categories)."""
    from scoregrad import (
        arsm,
        baselines,
        disarm,
        pathwise,
        rloo,
        sampling,
        score_function,
        unordered_set,
    )

    cands = [score_function(), score_function(baselines.leave_one_out()),
             score_function(baselines.optimal())]
    caps = family.capabilities
    if caps.discrete and num_samples % 4 == 0:
        cands.append(rloo(4))
    if caps.bernoulli_logits is not None and num_samples % 2 == 0:
        cands.append(disarm())
    if caps.categorical_logits is not None and theta is not None:
        for est in (unordered_set(4), arsm()):
            try:  # applicable at this theta's shapes, and num_samples a multiple of its cost
                b = bind_public(est, family, theta)
            except (TypeError, ValueError):
                continue
            if num_samples % b.draws_per_unit == 0 and num_samples >= b.draws_per_unit * b.min_units:
                cands.append(est)
    designable = family.capabilities.inverse_cdf is not None  # antithetic / QMC need it
    if family.reparameterized is not False:
        cands.append(pathwise())
    if designable:
        cands.append(sampling.antithetic(score_function(baselines.optimal())))
        if num_samples % 64 == 0:
            cands.append(sampling.qmc(score_function(), block_size=64))
    if designable and family.reparameterized is True and family.capabilities.continuous:
        cands.append(sampling.antithetic(pathwise()))
        if num_samples % 64 == 0:
            cands.append(sampling.qmc(pathwise(), block_size=64))
    return cands


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])


def _measure(f, family, theta, key, num_samples, est, repeats):
    """(result, median seconds, IQR of seconds, trace of the variance); seconds NaN if repeats=0."""
    from scoregrad._src.api import estimate_grad
    from scoregrad._src.diagnostics import diagnostics

    fn = jax.jit(lambda th, k: estimate_grad(f, family, th, k, num_samples=num_samples,
                                             estimator=est))
    result = jax.block_until_ready(fn(theta, key))  # compile (and warm up)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(theta, key))
        times.append(time.perf_counter() - t0)
    if times:
        q25, med, q75 = np.percentile(times, [25, 50, 75])
    else:
        q25 = med = q75 = math.nan
    return result, float(med), float(q75 - q25), float(diagnostics(result).total_variance)


def _check(cost: str, repeats: int) -> None:
    if cost not in _COSTS:
        raise ValueError(f"auto(cost=...) must be one of {_COSTS}; got {cost!r}.")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"auto(repeats=...) must be a positive int; got {repeats!r}.")
    if cost == "time" and repeats < 3:
        raise ValueError("auto(cost='time') needs repeats >= 3 to measure the timing spread; "
                         f"got repeats={repeats}.")


def auto(f: Callable, family, theta: PyTree, key: jax.Array, *, num_samples: int = 1024,
         candidates: Sequence | None = None, cost: str = "evaluations",
         repeats: int = 5) -> AutoReport:
    """Measures candidate estimators on a pilot batch and picks the cheapest per accuracy.

    Every candidate estimates the gradient with ``num_samples`` evaluations of f and the same
    key. A candidate that raises ``TypeError``/``ValueError`` (not applicable: e.g. pathwise on a
    discrete family) is listed with the reason. A candidate whose estimate differs from the
    plain score function's by more than 6 combined standard errors in some coordinate is
    listed as disagreeing (biased for this f) and not chosen. Among the rest the lowest
    work-normalized variance (trace of the variance × the cost of one estimate) wins; exact
    ties go to the earlier candidate.

    With the default ``cost="evaluations"`` the cost of every candidate is ``num_samples``
    evaluations of f, so the choice is the lowest variance and is reproducible: it depends only
    on the arguments and the key, never on timings. ``cost="time"`` uses the median of
    ``repeats`` wall-time measurements instead and treats candidates whose work-normalized
    variances overlap within the timings' interquartile range as tied (the tie goes to the
    lower variance); its choice can change with the machine and its load.

    Args:
      f, family, theta, key: the problem, as in :func:`scoregrad.estimate_grad`.
      num_samples: pilot size (evaluations of f per candidate).
      candidates: estimators to compare (default :func:`default_candidates`).
      cost: ``"evaluations"`` (default, deterministic) or ``"time"`` (measured, opt-in).
      repeats: timing repeats for ``cost="time"`` (at least 3; ignored otherwise).

    Returns:
      An :class:`AutoReport`; ``report.estimator`` is ready to use.

    Raises:
      ValueError: no candidates, an unknown ``cost``, too few ``repeats`` for ``cost="time"``,
        or no candidate produced a finite estimate consistent with the score function.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> rep = sg.auto(lambda x: jnp.sum(x**2), sg.families.normal(),
      ...               {"loc": jnp.ones(2), "scale": jnp.ones(2)}, jax.random.key(0),
      ...               num_samples=256, candidates=[sg.score_function(), sg.pathwise()])
      >>> rep.name
      'pathwise'
    """
    from scoregrad import score_function

    _check(cost, repeats)
    if problem.output_shape(f, family, theta, key, None, "auto"):
        raise ValueError(
            "auto: f must return a scalar; got an array. auto ranks estimators of one scalar "
            "objective: pass the objective you optimise (e.g. a weighted sum of f's outputs), "
            "or choose the estimator for the array-valued f yourself (docs/vector-f.md)."
        )
    cands = list(default_candidates(family, num_samples, theta) if candidates is None
                 else candidates)
    if not cands:
        raise ValueError("auto(candidates=...) must name at least one estimator.")
    for i, est in enumerate(cands):
        if not isinstance(est, Estimator):
            raise TypeError(
                f"auto(candidates=...): `candidates[{i}]` must be an estimator such as "
                f"sg.score_function() or sg.pathwise(); got {type(est).__name__} {est!r}."
            )
    timed = repeats if cost == "time" else 0
    ref, *_ = _measure(f, family, theta, key, num_samples, score_function(), 0)
    g_ref, s_ref = _flat(ref.grad), _flat(ref.stderr)
    rows, ests = [], []
    for est in cands:
        name = getattr(est, "name", repr(est))
        try:
            res, sec, iqr, tv = _measure(f, family, theta, key, num_samples, est, timed)
        except (TypeError, ValueError) as err:
            rows.append(AutoRow(name, False, f"not applicable: {err}"[:160], *(math.nan,) * 6))
            ests.append(est)
            continue
        z = np.abs(_flat(res.grad) - g_ref) / np.sqrt(_flat(res.stderr) ** 2 + s_ref**2 + 1e-300)
        max_z = float(np.max(z))
        c = float(num_samples) if cost == "evaluations" else sec
        wnv = tv * c
        ok = bool(np.isfinite(wnv)) and max_z <= _Z_DISAGREE
        note = "" if ok else (f"disagrees with the score function (max z = {max_z:.1f}): biased "
                              "for this f?" if np.isfinite(wnv) else "non-finite variance")
        rows.append(AutoRow(name, ok, note, sec, iqr, tv, c, wnv, max_z))
        ests.append(est)
    ok_rows = [i for i, r in enumerate(rows) if r.applicable]
    if not ok_rows:
        raise ValueError("auto: no candidate produced a finite, consistent estimate:\n"
                         + "\n".join(f"  {r.name}: {r.note}" for r in rows))
    best = min(ok_rows, key=lambda i: (rows[i].work_normalized_variance, i))
    tied: list[int] = []
    if cost == "time":
        tied = [i for i in ok_rows if i != best and _overlap(rows[i], rows[best])]
        best = min([best, *tied], key=lambda i: (rows[i].total_variance, i))
    return AutoReport(ests[best], rows[best].name, tuple(rows),
                      _reason(rows[best], rows, cost, [rows[i].name for i in tied]), cost)


def _overlap(a: AutoRow, b: AutoRow) -> bool:
    """Whether the work-normalized variances overlap within the timings' interquartile ranges."""
    lo = lambda r: r.total_variance * (r.seconds - r.seconds_iqr / 2)  # noqa: E731
    hi = lambda r: r.total_variance * (r.seconds + r.seconds_iqr / 2)  # noqa: E731
    return lo(a) <= hi(b) and lo(b) <= hi(a)


def _reason(best: AutoRow, rows, cost: str, tied: list[str]) -> str:
    others = sorted((r for r in rows if r.applicable and r.name != best.name),
                    key=lambda r: r.work_normalized_variance)
    per = (f"{best.cost:.0f} evaluations of f per estimate, the same for every candidate"
           if cost == "evaluations" else
           f"median {best.seconds * 1e3:.3g} ms per estimate, IQR {best.seconds_iqr * 1e3:.2g} ms")
    text = (f"picked {best.name}: work-normalized variance {best.work_normalized_variance:.3g} "
            f"(trace of the estimate's variance {best.total_variance:.3g} x {per})")
    if tied:
        text += (f"; tied within the timing spread with {', '.join(tied)}, "
                 "the tie going to the lowest variance")
    elif others:
        r = others[0]
        ratio = r.work_normalized_variance / max(best.work_normalized_variance, 1e-300)
        text += f", {ratio:.3g}x lower than the runner-up {r.name}"
    skipped = [r.name for r in rows if not r.applicable]
    if skipped:
        text += f"; excluded: {', '.join(skipped)}"
    return text + "."
