r"""Per-plate-element DiCE credit for :mod:`scoregrad.numpyro_sites`.

Every site's log-density is kept with one axis per plate of the program (the *canonical* form:
axis ``i`` has the size of plate ``i`` where the site is in that plate, 1 elsewhere; every other
batch axis is summed). A score site ``s`` in plates :math:`P_s` and a cost ``c`` in plates
:math:`P_c` that ``s`` influences are linked through the plates ``K(s, c)`` kept elementwise:

.. math::
   K(s, c) = P_s \cap P_c \cap \bigcap_{t \in T(s, c)} P_t ,

with :math:`T(s, c)` the guide sites on a path from ``s`` to ``c`` (strictly downstream of ``s``,
upstream of or read by ``c``). Element ``j`` of ``c`` is boxed with the elements ``i`` of ``s``
that agree with ``j`` on ``K(s, c)``: ``s``'s log-density summed over its other plates and
broadcast over ``c``'s. A path through a site outside a plate mixes that plate's elements, so
the plate is not kept. Within a plate, the program must keep NumPyro's promise of conditional
independence (element ``i`` of a site reads element ``i`` of the sites in the same plate only),
as Pyro's ``TraceGraph_ELBO`` assumes.

Internal module API: :class:`Credit`, :func:`credit_of`, :func:`program_terms`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src.base import magic_box
from scoregrad._src.numpyro_sites_trace import Runner, choice

__all__ = ["Credit", "credit_of", "program_terms"]

Link = tuple[int, tuple[int, ...]]  # (score site index, canonical axes summed)


class Credit(NamedTuple):
    """Which score-site elements box each cost element (static, from one trace at bind time).

    Attributes:
      guide_sites, model_sites: the sample sites (sorted); the costs are the guide's log q of
        each guide site, then minus the model's log p of each model site.
      score: the score sites (sorted).
      plates: the canonical axes, ``(name, size)`` per plate; ``()`` for whole-site credit.
      links: per cost, ``(score index, axes summed)`` for each score site that influences it.
      score_shapes: the canonical shape of each score site's log-density.
    """

    guide_sites: tuple[str, ...]
    model_sites: tuple[str, ...]
    score: tuple[str, ...]
    plates: tuple[tuple[str, int], ...]
    links: tuple[tuple[Link, ...], ...]
    score_shapes: tuple[tuple[int, ...], ...]

    @property
    def num_elements(self) -> int:
        """The number of score-site elements (one baseline each)."""
        return int(sum(np.prod(s, dtype=int) for s in self.score_shapes))

    def dependence(self) -> np.ndarray:
        """``(costs, score sites)`` booleans: cost ``c`` depends on score site ``s``."""
        d = np.zeros((len(self.links), len(self.score)), dtype=bool)
        for ci, row in enumerate(self.links):
            for si, _ in row:
                d[ci, si] = True
        return d


def _plate_axes(shape: tuple, stack, plates) -> dict:
    """``{batch axis of the log-density: canonical axis}`` for the site's full-size plates."""
    pos = {name: i for i, (name, _) in enumerate(plates)}
    out = {}
    for frame in stack:
        ax = len(shape) + frame.dim
        if frame.name in pos and ax >= 0 and shape[ax] == frame.size:
            out[ax] = pos[frame.name]
    return out


def canonical(lp: jax.Array, stack, plates) -> jax.Array:
    """A log-density with one axis per plate (sizes from ``plates``, 1 where the site is not in
    the plate); its other batch axes are summed."""
    lp = jnp.asarray(lp)
    axes = _plate_axes(lp.shape, stack, plates)
    kept = sorted(axes)
    lp = jnp.sum(lp, axis=tuple(a for a in range(lp.ndim) if a not in axes))
    lp = jnp.transpose(lp, [int(i) for i in np.argsort([axes[a] for a in kept])])
    shape = [1] * len(plates)
    for a in kept:
        shape[axes[a]] = plates[axes[a]][1]
    return lp.reshape(shape)


def _canonical_shape(site, plates) -> tuple[int, ...]:
    shape = jax.eval_shape(lambda v: site["fn"].log_prob(v), site["value"]).shape
    axes = _plate_axes(tuple(shape), site["cond_indep_stack"], plates)
    out = [1] * len(plates)
    for i in axes.values():
        out[i] = plates[i][1]
    return tuple(out)


def _plate_table(traces) -> tuple[tuple[str, int], ...]:
    sizes: dict = {}
    for tr in traces:
        for n, s in tr.items():
            if s["type"] != "sample":
                continue
            for frame in s["cond_indep_stack"]:
                if sizes.setdefault(frame.name, frame.size) != frame.size:
                    raise ValueError(
                        f"sg.numpyro_sites: plate {frame.name!r} has size {sizes[frame.name]} at "
                        f"one site and {frame.size} at site {n!r}; the model and the guide must "
                        "use one size per plate name. Rename one of them or fix its size.")
    return tuple(sorted(sizes.items()))


def _ancestors(parents: dict) -> dict:
    """The transitive closure of the guide's direct dependence (``{site: set of sites}``)."""
    anc: dict = {}

    def visit(n):
        if n not in anc:
            out = set(parents[n])
            for p in parents[n]:
                out |= visit(p)
            anc[n] = out
        return anc[n]

    for n in parents:
        visit(n)
    return anc


def _links(direct, score, anc, axes, cost_axes, plates) -> tuple[Link, ...]:
    """The credit of one cost that reads the guide sites ``direct``."""
    up = set(direct)
    for d in direct:
        up |= anc[d]
    row = []
    for si, s in enumerate(score):
        if s not in up:
            continue
        keep = axes[s] & cost_axes
        for t in up:
            if s in anc[t]:  # t on a path from s to the cost
                keep &= axes[t]
        row.append((si, tuple(i for i in range(len(plates)) if i not in keep)))
    return tuple(row)


def credit_of(runner: Runner, theta, x_struct, per_element: bool) -> Credit:
    """The credit of every cost, from NumPyro's provenance tracking and the plates."""
    gtr, mtr, deps_q, deps_p = runner.direct_dependence(theta, x_struct)
    guide_sites = tuple(sorted(n for n, s in gtr.items() if s["type"] == "sample"))
    model_sites = tuple(sorted(n for n, s in mtr.items() if s["type"] == "sample"))
    score = tuple(n for n in guide_sites if choice(n, gtr[n]["fn"], runner.choices) == "score")
    plates = _plate_table((gtr, mtr)) if per_element else ()

    def ax(site):
        return frozenset(i for i, n in enumerate(_canonical_shape(site, plates)) if n > 1)

    axes = {n: ax(gtr[n]) for n in guide_sites}
    anc = _ancestors({n: set(deps_q[n]) - {n} for n in guide_sites})
    links = [_links(set(deps_q[n]) & set(guide_sites), score, anc, axes, axes[n], plates)
             for n in guide_sites]
    links += [_links(set(deps_p[n]) & set(guide_sites), score, anc, axes, ax(mtr[n]), plates)
              for n in model_sites]
    shapes = tuple(_canonical_shape(gtr[n], plates) for n in score)
    return Credit(guide_sites, model_sites, score, plates, tuple(links), shapes)


def _log_prob(site, scaled: bool) -> jax.Array:
    lp = site["fn"].log_prob(site["value"])
    if scaled and site.get("scale") is not None:
        lp = site["scale"] * lp
    return lp


def program_terms(credit: Credit, gtr, mtr):
    """One program's DiCE surrogate of the costs (value: their sum), and per score element its
    log q (unscaled: the draw's probability) and its stop-gradient downstream cost.

    Returns:
      ``(surrogate, log_q (E,), downstream (E,), total cost)`` for the ``E`` score elements.
    """
    pl = credit.plates
    costs = ([canonical(_log_prob(gtr[n], True), gtr[n]["cond_indep_stack"], pl)
              for n in credit.guide_sites]
             + [-canonical(_log_prob(mtr[n], True), mtr[n]["cond_indep_stack"], pl)
                for n in credit.model_sites])
    dtype = jnp.result_type(*costs) if costs else jnp.zeros(()).dtype
    lqs = [canonical(_log_prob(gtr[n], False), gtr[n]["cond_indep_stack"], pl).astype(dtype)
           for n in credit.score]
    down = [jnp.zeros(s, dtype) for s in credit.score_shapes]
    value = jnp.zeros((), dtype)
    for c, row in zip(costs, credit.links):
        c = c.astype(dtype)
        log_box = sum((jnp.sum(lqs[si], axis=a, keepdims=True) for si, a in row),
                      jnp.zeros((), dtype))
        value = value + jnp.sum(magic_box(log_box) * c)
        c_sg = jax.lax.stop_gradient(c)
        for si, a in row:
            down[si] = down[si] + jnp.sum(c_sg, axis=a, keepdims=True)
    flat = (lambda xs: jnp.concatenate([x.ravel() for x in xs]) if xs
            else jnp.zeros((0,), dtype))
    tot = sum((jnp.sum(jax.lax.stop_gradient(c)) for c in costs), jnp.zeros((), dtype))
    return value, flat(lqs), flat(down), tot
