"""Array-valued f: the expectation of every entry, and its Jacobian, in one pass over the draws.

``sg.expectation`` and ``sg.estimate_grad(_from_samples)`` of an f whose value on one draw is an
array of shape ``S`` run the scalar engine under ``jax.vmap`` over the entry index ``j``, with
``f_j(x) = f(x).ravel()[j]``, the same key and the same chunks. ``vmap`` batches only what
depends on ``j``: the draws, f itself and the log-densities are computed once per unit and shared
by every entry (common random numbers across entries), while each unit's surrogate and its
gradient are batched over the entries. There is one pass over the draws, not one per entry;
memory per chunk grows by a factor ``|S|`` and stays independent of ``num_samples``. Each entry
keeps its estimator's own statistics: a fitted baseline or control variate is fitted per entry,
and ``nan_policy="drop"`` drops a unit from entry ``j`` when ``f_j`` (or its surrogate) is not
finite there.

``jax.jacrev`` / ``jax.jacfwd`` of the vector ``sg.expectation`` are the estimator's Jacobian
(shape ``S + theta``), and ``jax.hessian`` of one entry is that entry's DiCE Hessian; results of
``estimate_grad`` carry a leading ``S`` on every field (``grad``, ``stderr``, ...), the layout of
``jax.jacrev``. Stateful estimators are refused: their state would be one per entry.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from scoregrad._src import policy
from scoregrad._src.results import GradEstimate


def _entry(f: Callable, j) -> Callable:
    return lambda x: jnp.reshape(f(x), (-1,))[j]


def _size(shape: tuple, where: str) -> int:
    m = math.prod(shape)
    if m == 0:
        raise ValueError(f"{where}: f returns an empty array (shape {shape}); it must return at "
                         "least one value per draw.")
    return m


def _refuse_stateful(where: str) -> None:
    raise ValueError(
        f"{where}: f returns an array, and the estimator is stateful (a moving-average or "
        "learned baseline, a learned control variate: its state would be one per entry of f). "
        "Use a stateless estimator (e.g. sg.score_function(sg.baselines.leave_one_out()) or "
        "sg.rloo(k)) or a scalar f."
    )


def expectation(call: Callable, f: Callable, shape: tuple, where: str) -> jax.Array:
    """``call(scalar_f)`` (the scalar :func:`~scoregrad.expectation`) for every entry of f."""
    m = _size(shape, where)
    if m == 1:  # one entry: the scalar engine itself (no vmap)
        return jnp.reshape(call(lambda x: jnp.reshape(f(x), ())), shape)
    try:
        values = jax.vmap(lambda j: call(_entry(f, j)))(jnp.arange(m))
    except jax.errors.JaxRuntimeError as err:
        # Eagerly the entries' host check surfaces wrapped (as under jit); unwrap it so that
        # `except FloatingPointError` catches it, as for a scalar f.
        found = re.search(r"(\w+: \d+ evaluation\(s\) of f.*?to keep them\.)", str(err), re.S)
        if found is None:
            raise
        raise FloatingPointError(found.group(1)) from err
    return values.reshape(shape)


def estimate(call: Callable, f: Callable, shape: tuple, nan_policy: str, state: Any,
             where: str) -> GradEstimate:
    """``call(scalar_f, nan_policy)`` (a scalar ``estimate_grad``) for every entry of f, as one
    :class:`GradEstimate` whose fields lead with ``shape``.

    Under ``nan_policy="raise"`` the entries run with ``"propagate"`` and the summed count is
    checked once after, so an eager call raises ``FloatingPointError`` as for a scalar f.
    """
    m = _size(shape, where)
    if jax.tree_util.tree_leaves(state):
        _refuse_stateful(where)
    inner = "propagate" if nan_policy == "raise" else nan_policy
    meta: dict = {}

    def one(fj):
        r = call(fj, inner)
        meta["stateful"] = meta.get("stateful", False) or bool(jax.tree_util.tree_leaves(r.state))
        meta["num_samples"] = r.num_samples
        return r._replace(num_samples=jnp.zeros(()), state=())

    if m == 1:  # one entry: the scalar engine itself (no vmap), given a leading axis of 1
        res = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None],
                                     one(lambda x: jnp.reshape(f(x), ())))
    else:
        res = jax.vmap(lambda j: one(_entry(f, j)))(jnp.arange(m))
    if meta.get("stateful"):
        _refuse_stateful(where)

    def lead(a):
        return jnp.reshape(a, shape + jnp.shape(a)[1:])

    count = lead(res.num_nonfinite)
    count = policy.check_count(policy.RunPolicy(nan_policy), count, where)

    def tree(t):
        return jax.tree_util.tree_map(lambda a: policy.guard_count(lead(a), count), t)

    return GradEstimate(
        value=tree(res.value), value_stderr=tree(res.value_stderr), grad=tree(res.grad),
        stderr=tree(res.stderr), variance=tree(res.variance), snr=tree(res.snr),
        num_samples=meta["num_samples"], num_nonfinite=count, state=(),
        variance_reduction=tree(res.variance_reduction),
    )
