r"""Diagnostics of a gradient estimate: variance, standard error, SNR per coordinate and per
parameter block, variance-reduction factor, and work-normalized variance (variance × seconds).

The work-normalized variance :math:`\mathrm{tr}\,\mathrm{Var}[\hat g] \times t` (t the seconds one
estimate takes) does not depend on the number of samples (variance falls like 1/N while time grows
like N), so it ranks estimators by what one unit of accuracy costs.

References:
  Glynn and Whitt, "The asymptotic efficiency of simulation estimators", Operations Research,
  1992 (work-normalized variance). Mohamed et al., JMLR 2020, §3.3 and §8.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp

PyTree = Any


class Diagnostics(NamedTuple):
    """What :func:`diagnostics` reports.

    Attributes:
      variance: per coordinate, the variance of one unit's contribution.
      stderr: per coordinate, the standard error of the estimate.
      snr: per coordinate, ``|grad| / stderr``.
      snr_block: per leaf of theta (a parameter block), ``||grad|| / sqrt(sum stderr^2)``.
      variance_reduction: per coordinate, plain term-0 variance / the estimator's (see
        :attr:`scoregrad.GradEstimate.variance_reduction`); ``None`` when not available.
      variance_reduction_block: per leaf, the ratio of the summed variances.
      total_variance: ``sum stderr^2``, the trace of the estimate's covariance.
      seconds: time per estimate when measured (:func:`timed_estimate`), else ``None``.
      work_normalized_variance: ``total_variance * seconds``, else ``None``.
    """

    variance: PyTree
    stderr: PyTree
    snr: PyTree
    snr_block: PyTree
    variance_reduction: PyTree
    variance_reduction_block: PyTree
    total_variance: jax.Array
    seconds: float | None = None
    work_normalized_variance: jax.Array | None = None


def diagnostics(result, seconds: float | None = None) -> Diagnostics:
    """Diagnostics of a :class:`scoregrad.GradEstimate` (works under ``jax.jit``).

    Args:
      result: a :class:`scoregrad.GradEstimate`.
      seconds: time per estimate, for the work-normalized variance (measure it eagerly with
        :func:`timed_estimate`: wall time cannot be measured inside ``jit``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> est = sg.score_function(baseline=sg.baselines.leave_one_out())
      >>> r = sg.estimate_grad(lambda x: jnp.sum((x - 2.0) ** 2), sg.families.normal(),
      ...                      {"loc": jnp.zeros(3), "scale": jnp.ones(3)}, jax.random.key(0),
      ...                      num_samples=1000, estimator=est)
      >>> d = sg.diagnostics(r, seconds=1e-3)
      >>> sorted(d.snr_block), bool(d.variance_reduction_block["loc"] > 1.0)
      (['loc', 'scale'], True)
    """
    sq = jax.tree_util.tree_map(jnp.square, result.stderr)
    # theta has at least one leaf (validation.check_theta), so the sum is an array, not 0
    total = cast(jax.Array, sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(sq)))
    snr_block = jax.tree_util.tree_map(
        lambda g, s2: jnp.sqrt(jnp.sum(jnp.square(g))) / jnp.sqrt(jnp.sum(s2)), result.grad, sq
    )
    vr = getattr(result, "variance_reduction", None)
    vr_block = None
    if vr is not None:
        vr_block = jax.tree_util.tree_map(
            lambda r, v: jnp.sum(r * v) / jnp.sum(v), vr, result.variance
        )
    wnv = None if seconds is None else total * seconds
    return Diagnostics(result.variance, result.stderr, result.snr, snr_block, vr, vr_block,
                       total, seconds, wnv)


class Timed(NamedTuple):
    """Result of :func:`timed_estimate`: the estimate, seconds per call and its diagnostics."""

    result: Any
    seconds: float
    diagnostics: Diagnostics


def timed_estimate(f: Callable, family, theta: PyTree, key: jax.Array, *, num_samples: int,
                   estimator=None, repeats: int = 5, **kwargs) -> Timed:
    """Runs :func:`scoregrad.estimate_grad` under ``jit`` and times it eagerly.

    Compiles and warms up once, then reports the median wall time of ``repeats`` calls (each
    waited for with ``block_until_ready``), and :func:`diagnostics` with the work-normalized
    variance. Not jittable itself (it measures wall time).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> t = sg.timed_estimate(lambda x: jnp.sum(x**2), sg.families.normal(),
      ...                       {"loc": jnp.zeros(2), "scale": jnp.ones(2)}, jax.random.key(0),
      ...                       num_samples=256, repeats=2)
      >>> t.seconds > 0, bool(t.diagnostics.work_normalized_variance > 0)
      (True, True)
    """
    from scoregrad._src.api import estimate_grad

    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"timed_estimate(repeats=...) must be a positive int; got {repeats!r}.")
    fn = jax.jit(lambda th, k: estimate_grad(f, family, th, k, num_samples=num_samples,
                                             estimator=estimator, **kwargs))
    result = jax.block_until_ready(fn(theta, key))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = jax.block_until_ready(fn(theta, key))
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return Timed(result, seconds, diagnostics(result, seconds))
