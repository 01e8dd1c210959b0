"""Binding an estimator to a problem: its :class:`Plan`, and what is derived from it.

``bind(est, target)`` calls the estimator's own ``bind`` (checks, shape-dependent sizes, wrappers)
and returns the :class:`~scoregrad._src.base.Plan`. :func:`resolve` then derives, by tracing the
unit once (``jax.eval_shape``, no FLOPs), what the contract does not let an estimator declare:

* ``num_terms``: the length of the unit's ``terms``;
* ``needs_key``: the unit asks :class:`~scoregrad._src.base.Draws` for fresh randomness beyond
  a given draw (pathwise, relaxations, coupled pairs), so given samples are refused;
* ``presample``: one family draw per unit and nothing else, so the engine draws a chunk's
  samples ahead of the units (double-buffered);
* ``stateful``: ``init(theta)`` has leaves.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from scoregrad._src.base import Draws, Estimator, FStats, Model, NeedsKey, Params, Plan, Target

PyTree = Any


class Bound(NamedTuple):
    """An estimator bound to one problem: its plan and what is derived from it."""

    name: str
    plan: Plan
    init: Callable
    update: Callable
    num_terms: int
    needs_key: bool
    presample: bool
    stateful: bool
    samples_per_unit: int = 1  # given samples one unit reads (K for a group, else 1)

    def __getattr__(self, name: str) -> Any:
        """The plan's fields, read through (``unit``, ``draws_per_unit``, ``min_units``,
        ``fitted``, ``num_folds``, ``learn``, ``max_order``, ``shift_invariant``, ...)."""
        if name.startswith("_") or name not in Plan._fields:
            raise AttributeError(name)
        return getattr(self.plan, name)

    def weights(self, fstats: FStats, state, num_units) -> jax.Array:
        if self.plan.weights is None:
            return jnp.ones((self.num_terms,), fstats.mean.dtype)
        return self.plan.weights(fstats, state, num_units)


def bind(est: Estimator, target: Target) -> Plan:
    """``est.bind(target)``, checked to return a :class:`Plan`."""
    plan = est.bind(target)
    if not isinstance(plan, Plan):
        raise TypeError(f"estimator {est.name}: bind(target) must return a scoregrad Plan; "
                        f"got {type(plan).__name__}.")
    return plan


def _given(x_struct, k: int):
    """Zeros of one unit's given draw (``k`` draws stacked for ``k > 1``)."""
    lead = () if k == 1 else (k,)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(lead + tuple(s.shape), s.dtype), x_struct)


class _Probe(Draws):
    """Draws for tracing a unit once: family draws are zeros of the draw's form (given samples
    may have another dtype than the sampler's draws), noise is drawn; requests are recorded."""

    def __init__(self, model, params, key, x_struct):
        super().__init__(model, params, key=key)
        self._form = x_struct

    def sample(self, num=None):
        self._stream("sample()" if num is None else f"sample(num={num})")
        return _given(self._form, 1 if num is None else num)

    def rsample(self):
        self._stream("rsample()")
        return _given(self._form, 1)


def resolve(est: Estimator, plan: Plan, model, params, x_struct, key) -> Bound:
    """The :class:`Bound` estimator: ``plan`` with its derived properties (trace time)."""
    def probe(draws_of):
        return jax.eval_shape(lambda p: plan.unit(model, p, draws_of(p), est.init(p.theta)), params)

    seen: list = []

    def keyed(p):
        draws = _Probe(model, p, key=jax.random.key(0) if key is None else key, x_struct=x_struct)
        seen.append(draws)
        return draws

    out = probe(keyed)
    asked = seen[-1].requests
    # Presample: the unit's only randomness is one family draw, which the engine then makes
    # for a whole chunk ahead of the units. Given samples: one per unit, or a group's K.
    presample = asked == ["sample()"]
    k = 1
    if len(asked) == 1 and asked[0].startswith("sample(num="):
        k = int(asked[0][len("sample(num="):-1])
    try:
        probe(lambda p: Draws(model, p, x=_given(x_struct, k)))
        needs_key = False
    except NeedsKey:
        needs_key = True
    terms = out.terms
    if terms.ndim != 1:
        raise ValueError(f"estimator {est.name}: a unit's terms must have shape (K,); got "
                         f"{terms.shape}.")
    stateful = bool(jax.tree_util.tree_leaves(jax.eval_shape(est.init, params.theta)))
    return Bound(est.name, plan, est.init, est.update, int(terms.shape[0]), needs_key,
                 presample=presample, stateful=stateful, samples_per_unit=k)


def _stand_in(family, theta, legacy: bool) -> Model:
    """The family's model with a stand-in integrand (K and the derived properties do not
    depend on f)."""
    leaves = jax.tree_util.tree_leaves(theta)
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    return Model(lambda x: jnp.zeros((), dtype), family.log_prob, family.sample, family, legacy)


def num_terms(plan: Plan, target: Target, init: Callable) -> int:
    """K of ``plan``'s unit, from shapes only, for wrappers that append terms inside ``bind``.

    The unit is traced on the target's family with a stand-in integrand (K does not depend on f).
    """
    model, key = _stand_in(target.family, target.theta, target.legacy_key), jax.random.key(0)
    out = jax.eval_shape(lambda th: plan.unit(model, Params(th), Draws(model, Params(th), key=key),
                                              init(th)), target.theta)
    return int(out.terms.shape[0])


def bind_public(estimator: Estimator, family, theta) -> Bound:
    """``scoregrad.bind``: the estimator bound to ``family`` and ``theta`` (shapes only).

    Returns the :class:`Bound` estimator: its :class:`Plan` (``.plan``; ``draws_per_unit``,
    ``min_units``, ...) and what is derived from it (``num_terms``, ``needs_key``,
    ``presample``, ``stateful``), traced with a stand-in integrand. Raises what the estimator
    raises for this family (``TypeError`` naming the missing capability).

    Examples:
      >>> import jax.numpy as jnp
      >>> import scoregrad as sg
      >>> b = sg.bind(sg.measure_valued(), sg.families.normal(),
      ...             {"loc": jnp.zeros(3), "scale": jnp.ones(3)})
      >>> b.draws_per_unit, b.num_terms, b.needs_key
      (10, 1, True)
    """
    key = jax.random.key(0)
    x_struct = jax.eval_shape(family.sample, theta, key)
    plan = bind(estimator, Target(family, theta, x_struct, False))
    return resolve(estimator, plan, _stand_in(family, theta, False), Params(theta), x_struct, key)


def contracted(bound: Bound, w: jax.Array, keep: tuple = ()) -> Bound:
    """``bound`` with its terms contracted by the fixed weights ``w`` into one last term, after
    the terms ``keep`` (for diagnostics), so one reverse pass differentiates them all (weights
    known before the pass, e.g. from a value pass over the same draws)."""
    unit = bound.plan.unit

    def weighted(model, params, draws, state):
        out = unit(model, params, draws, state)
        t = out.terms
        return out._replace(terms=jnp.concatenate([t[jnp.asarray(keep, jnp.int32)],
                                                   jnp.dot(w.astype(t.dtype), t)[None]]))

    plan = bound.plan._replace(unit=weighted, weights=None,
                               shift_term=1 if bound.shift_term is not None and keep else None)
    return bound._replace(plan=plan, num_terms=len(keep) + 1)
