r"""The per-site estimator of :mod:`scoregrad.numpyro_sites` as an engine :class:`Plan`.

Per program the surrogate is

.. math::
   S = \sum_{c} \sum_{j} \boxdot\big(L_c[j]\big)\, c[j]
       + \sum_{s} \sum_{i} \big(1 - \boxdot(\log q_s[i])\big)\, b_s[i] ,

over the elements ``j`` of every cost ``c`` and the elements ``i`` of every score site ``s``
(one element per site under whole-site credit), with :math:`L_c[j]` the log q of the score
elements that influence ``c[j]`` (:mod:`~scoregrad._src.numpyro_sites_credit`) and
:math:`b_s[i]` the baseline of element ``i``: 1, plus the mean downstream cost of the other
programs of the unit (group leave-one-out) or of the batch (leave-one-out).

Internal module API: :class:`SiteBaseline`, :func:`site_estimator`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from scoregrad._src.base import Estimator, Plan, Target, UnitOut, magic_box
from scoregrad._src.family import Family
from scoregrad._src.numpyro_sites_credit import Credit, credit_of, program_terms
from scoregrad._src.numpyro_sites_trace import Runner

__all__ = ["SiteBaseline", "site_estimator"]

_NOT_UNBIASED = (
    "the per-site estimator evaluates the guide and the model itself (its costs are the ELBO's "
    "per-site log-densities), so the unit applied to another integrand h does not estimate "
    "grad E[h]")


class SiteBaseline(NamedTuple):
    """A per-site baseline: ``group`` programs per unit; ``batch``: leave-one-out over the
    whole batch (weights from the engine's batch statistics)."""

    name: str
    group: int
    batch: bool = False


def _draw(model, params, draws, k: int, all_score: bool):
    """``k`` programs' guide draws (leading axis k)."""
    if all_score:  # nothing to differentiate through: the engine may presample
        x = draws.sample() if k == 1 else draws.sample(num=k)
    elif k == 1:
        x = draws.rsample()
    else:
        key = draws.key()
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
            key, jnp.arange(k, dtype=jnp.uint32))
        x = jax.vmap(lambda kk: model.draw(params, kk))(keys)
    return x if k > 1 else jax.tree_util.tree_map(lambda a: a[None], x)


def _unit(runner: Runner, credit: Credit, k: int, batch: bool):
    def unit(model, params, draws, state):
        xs = _draw(model, params, draws, k, len(credit.score) == len(credit.guide_sites))
        val, lq, down, tot = jax.vmap(
            lambda x: program_terms(credit, *runner.checked_traces(params.theta, x)))(xs)
        # Baseline terms (1 - box(log q_s[i])) b_s[i]: value 0, expectation 0 at every order
        # for b_s[i] independent of element i's draw. b = 1 cancels, at first order, the direct
        # derivative of the element's own cost log q_s[i] (its score, mean zero: what
        # TraceGraph_ELBO's stop_gradient drops), keeping every higher order unbiased.
        b = jnp.ones_like(down)
        if k > 1:
            b = b + (jnp.sum(down, axis=0, keepdims=True) - down) / (k - 1)
        d = 1 - magic_box(lq)
        per = val + jnp.sum(d * b, axis=1)
        if batch:  # k == 1: terms and f values for the batch-wide leave-one-out
            m = credit.num_elements + 1
            extra = jnp.concatenate([d[0], jnp.sum(d[0] * down[0])[None]])
            fvals = jnp.concatenate([m * down[0], (m * (tot[0] - jnp.sum(down[0])))[None]])
            return UnitOut(jnp.concatenate([per, extra.astype(per.dtype)]), fvals)
        return UnitOut(jnp.mean(per)[None], tot)

    return unit


def _batch_weights(num_elements: int):
    def weights(fstats, state, n):
        if fstats.per is None:
            raise ValueError("the engine passed no per-site statistics (FStats.per)")
        gbar = jnp.asarray(fstats.per)[:-1] / (num_elements + 1)
        n = jnp.asarray(n, gbar.dtype)
        return jnp.concatenate([jnp.ones((1,), gbar.dtype), n / (n - 1) * gbar,
                                (-1.0 / (n - 1))[None]])

    return weights


def site_estimator(runner: Runner, family: Family, baseline: SiteBaseline,
                   per_element: bool) -> Estimator:
    """The estimator of a :func:`~scoregrad.numpyro_sites.elbo` problem."""
    k = baseline.group
    name = "numpyro_sites" + ("" if k == 1 else f"[{baseline.name}]")
    name += "" if per_element else "[site credit]"

    def bind(target: Target) -> Plan:
        if target.family is not family:
            raise TypeError(
                f"{name}: this estimator belongs to the family of the sg.numpyro_sites.elbo(...) "
                "problem that built it; pass problem.family (and problem.f(theta)).")
        credit = credit_of(runner, target.theta, target.x_struct, per_element)
        batch = baseline.batch and bool(credit.score)
        unit = _unit(runner, credit, k, batch)
        if batch:
            return Plan(unit, weights=_batch_weights(credit.num_elements), min_units=2,
                        not_unbiased=_NOT_UNBIASED)
        return Plan(unit, draws_per_unit=k, not_unbiased=_NOT_UNBIASED)

    return Estimator(name, lambda theta: (), bind, lambda state, fstats: state)
