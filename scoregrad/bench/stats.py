r"""Statistics of ``scoregrad bench`` cells: bias test, standard-error honesty, ranks with ties.

Every decision here is a deterministic function of the replicate estimates (never of timings),
so two runs that produce bitwise the same estimates produce the same flags, ranks and
recommendations.

* **Bias.** With R independent replicate estimates :math:`\hat g_r` of a P-coordinate gradient
  :math:`g`, coordinate j's statistic :math:`t_j = \sqrt{R}\,(\bar g_j - g_j) / s_j` follows
  Student's t with R − 1 degrees of freedom when the estimator is unbiased (for estimates that
  are means of many draws, approximately). The cell is tested with the largest :math:`|t_j|`
  against the Bonferroni threshold :math:`t_{R-1}^{-1}(1 - \alpha / 2P)`, so an unbiased
  estimator is flagged with probability at most :math:`\alpha` = :data:`ALPHA` whatever R and P.
  The reported p-value is the Bonferroni one, :math:`\min(1, 2P\,\Pr[T_{R-1} > \max_j |t_j|])`.
* **Standard-error honesty.** The SE ratio :math:`\sqrt{\text{mean reported SE}^2 /
  \text{empirical variance}}` is 1 for an honest estimator; the empirical trace of the variance
  from R replicates has at least R − 1 degrees of freedom, so the ratio is flagged when it falls
  outside :math:`[\sqrt{\chi^2_{R-1}(\alpha/2)/(R-1)},\ \sqrt{\chi^2_{R-1}(1-\alpha/2)/(R-1)}]`
  (conservative: a trace of several coordinates has more degrees of freedom).
* **Ranks** by the variance times the evaluations of f of one estimate (:func:`rank`), with
  ties: an estimator's rank is 1 + the number of estimators that are *significantly* better
  (one-sided F test with (R − 1, R − 1) degrees of freedom at level :data:`RANK_ALPHA`), so two
  estimators whose difference is within the replicates' noise share a rank.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats as _st

#: Family-wise false-alarm rate of the bias flag and of the SE-ratio flag, per cell.
ALPHA = 1e-3
#: Level of the one-sided F test that separates two ranks.
RANK_ALPHA = 0.01
#: Ulps (of the gradient's scale, in the estimates' dtype) allowed for rounding in the bias check.
BIAS_ROUNDING = 64


def bias_threshold(replicates: int, num_params: int, alpha: float = ALPHA) -> float:
    """The |t| above which a cell is flagged: Student t, R − 1 dof, Bonferroni over coordinates.

    Examples:
      >>> round(bias_threshold(100, 1), 2), round(bias_threshold(8, 20), 1)
      (3.39, 8.8)
    """
    return float(_st.t.isf(alpha / (2 * num_params), replicates - 1))


def bias_p_value(t_max: float, replicates: int, num_params: int) -> float:
    """Bonferroni p-value of the largest |t| over ``num_params`` coordinates."""
    if not math.isfinite(t_max):
        return 0.0
    return float(min(1.0, 2 * num_params * _st.t.sf(t_max, replicates - 1)))


def stderr_ratio_bounds(replicates: int, alpha: float = ALPHA) -> tuple[float, float]:
    """The interval of SE ratios consistent with honest standard errors (chi-square, R − 1 dof)."""
    dof = replicates - 1
    lo = _st.chi2.ppf(alpha / 2, dof) / dof
    hi = _st.chi2.isf(alpha / 2, dof) / dof
    # ratio = sqrt(claimed / empirical) and empirical / true ~ chi2 / dof
    return float(math.sqrt(1 / hi)), float(math.sqrt(1 / lo))


def bias_atol(exact: np.ndarray, eps: float) -> float:
    """Rounding allowance of a bias check: ``BIAS_ROUNDING`` ulps of the gradient's scale.

    A zero-variance estimator (DisARM on a symmetric Bernoulli toy, enumeration) has SE 0, and
    float32 arithmetic alone moves its mean by a few ulps; that is not bias.
    """
    return BIAS_ROUNDING * eps * (float(np.abs(exact).max()) + 1.0)


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def bias_test(g: np.ndarray, exact: np.ndarray, eps: float) -> dict:
    """The bias statistics of replicate estimates ``g`` (R, P) against ``exact`` (P,).

    ``bias_flag`` is ``"biased"`` when the largest |t| is above :func:`bias_threshold` and the
    offset exceeds the rounding allowance, ``"rounding"`` when |t| is above it but every offset
    is within the allowance (float rounding of a (nearly) zero-variance estimator: shown, not
    hidden), and ``None`` otherwise.
    """
    r, p = g.shape
    bias = g.mean(0) - exact
    se = np.sqrt(g.var(0, ddof=1) / r)
    atol = bias_atol(exact, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, np.abs(bias) / se, np.where(bias == 0, 0.0, np.inf))
    t_max = float(t.max())
    thr = bias_threshold(r, p)
    above = t > thr
    flag = None
    if np.any(above & (np.abs(bias) > atol)):
        flag = "biased"
    elif np.any(above):
        flag = "rounding"
    return {"bias_t_max": _finite(t_max), "bias_t_infinite": not math.isfinite(t_max),
            "bias_p": bias_p_value(t_max, r, p), "bias_threshold": thr, "bias_atol": atol,
            "bias_flag": flag, "biased": flag == "biased",
            "bias_max_abs": float(np.abs(bias).max())}


def stderr_check(s: np.ndarray, total_var: float, replicates: int) -> dict:
    """SE ratio (reported over empirical) and whether it is outside the honest interval."""
    claimed = float(np.mean(s**2, axis=0).sum())
    lo, hi = stderr_ratio_bounds(replicates)
    if total_var > 0:
        ratio = math.sqrt(claimed / total_var)
        off = not (lo <= ratio <= hi)
    else:
        ratio, off = None, claimed > 0  # an exact estimator that claims an error, or vice versa
    return {"stderr_ratio": _finite(ratio) if ratio is not None else None,
            "stderr_bounds": [lo, hi], "stderr_off": bool(off)}


def significantly_lower(a: float, b: float, replicates: int, alpha: float = RANK_ALPHA) -> bool:
    """Whether variance-cost ``a`` is significantly below ``b`` (one-sided F, (R-1, R-1) dof)."""
    if a == b:
        return False
    if a == 0.0:
        return True
    if b == 0.0:
        return False
    dof = replicates - 1
    return b / a > float(_st.f.isf(alpha, dof, dof))


def rank(results: list[dict]) -> None:
    """Adds ``rank`` within each (problem, budget) to the ok cells (1 = best, ties share a rank).

    The key is ``var_x_n``, the variance of one estimate times its evaluations of f, a pure
    function of the estimates. Rank = 1 + the number of cells in the group significantly below
    (:func:`significantly_lower`); ``tied_with`` lists the group's cells not significantly
    different from it.
    """
    groups: dict[Any, list] = {}
    for c in results:
        if c["status"] == "ok" and c.get("var_x_n") is not None:
            groups.setdefault((c["problem"], c.get("budget", c["num_samples"])), []).append(c)
    for group in groups.values():
        for c in group:
            c["rank"] = 1 + sum(significantly_lower(o["var_x_n"], c["var_x_n"],
                                                    min(o["replicates"], c["replicates"]))
                                for o in group if o is not c)
        for c in group:
            c["tied_with"] = sorted(
                o["estimator"] for o in group if o is not c
                and not significantly_lower(o["var_x_n"], c["var_x_n"], c["replicates"])
                and not significantly_lower(c["var_x_n"], o["var_x_n"], c["replicates"]))
