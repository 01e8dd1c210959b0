"""Structural dependence at trace time: which outputs of a user function can depend on an input.

A walk over the function's jaxpr, forward from the chosen inputs. It recurses into the sub-jaxprs
of ``jit``/``pjit``, ``closed_call``, ``custom_jvp_call`` and ``custom_vjp_call`` and treats
every other equation (``scan``, ``while``, ``cond``, ...) as making all its outputs depend on all
its inputs. It therefore over-approximates dependence: when it says "independent", no value of
the inputs can change the output. The API uses it only to refuse models that are provably wrong:

* a sampler whose draws do not depend on the key (every draw the same);
* a family whose sampler depends on a leaf of theta while the derivative of ``log_prob`` in that
  leaf is structurally zero (a ``log_prob`` that ignores theta or stops its gradient: the score
  would be zero and the estimate silently zero);
* for pathwise estimators, an f that reads the draw but whose derivative in it is structurally
  zero (a step function: the pathwise gradient of a discontinuous f is zero, not its gradient).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

PyTree = Any

_SUB_JAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _sub_jaxpr(eqn):
    for k in _SUB_JAXPR_KEYS:
        sub = eqn.params.get(k)
        if sub is None:
            continue
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns") and len(inner.invars) == len(eqn.invars):
            return inner
    return None


def _walk(jaxpr, marked_in: Sequence[bool]) -> list[bool]:
    """Per outvar of ``jaxpr``: may it depend on the invars flagged in ``marked_in``?"""
    marked = {v for v, m in zip(jaxpr.invars, marked_in) if m}

    def is_marked(v) -> bool:
        return not isinstance(v, jcore.Literal) and v in marked

    for eqn in jaxpr.eqns:
        ins = [is_marked(v) for v in eqn.invars]
        if not any(ins):
            continue
        sub = _sub_jaxpr(eqn)
        if sub is not None and len(sub.outvars) == len(eqn.outvars):
            outs = _walk(sub, ins)
        else:
            outs = [True] * len(eqn.outvars)
        marked.update(v for v, m in zip(eqn.outvars, outs) if m)
    return [is_marked(v) for v in jaxpr.outvars]


def may_depend(fn: Callable, args: Sequence[PyTree], which: Callable[[int, int], bool]) -> bool:
    """True unless no output of ``fn(*args)`` can depend on the leaves chosen by
    ``which(arg_index, leaf_index)``."""
    flat_args, tree = jax.tree_util.tree_flatten(list(args))
    sizes = [len(jax.tree_util.tree_leaves(a)) for a in args]
    chosen: list[bool] = []
    for a, n in enumerate(sizes):
        chosen += [which(a, j) for j in range(n)]

    def flat_fn(*leaves):
        return fn(*jax.tree_util.tree_unflatten(tree, list(leaves)))

    try:
        closed = jax.make_jaxpr(flat_fn)(*flat_args)
    except Exception:  # noqa: BLE001 - undecidable here: assume dependence (never refuse)
        return True
    return any(_walk(closed.jaxpr, chosen))


def _is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def abstract(tree: PyTree) -> PyTree:
    """Shape/dtype structs of ``tree``'s leaves (tracers under jit included)."""
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def tangent_may_depend(fn: Callable, primal: PyTree, leaf: int, others: Sequence = ()) -> bool:
    """True unless the derivative of ``fn(primal, *others)`` along leaf ``leaf`` of ``primal`` is
    structurally zero (the JVP's output cannot depend on that leaf's tangent)."""
    leaves, tree = jax.tree_util.tree_flatten(primal)
    if not _is_float(leaves[leaf]):
        return True

    def jvp_out(p, rest, t):
        p_leaves = jax.tree_util.tree_leaves(p)
        tangents = [t if i == leaf else
                    (jnp.zeros_like(x) if _is_float(x)
                     else jnp.zeros(jnp.shape(x), jax.dtypes.float0))
                    for i, x in enumerate(p_leaves)]
        return jax.jvp(lambda q: fn(q, *rest), (p,),
                       (jax.tree_util.tree_unflatten(tree, tangents),))[1]

    t = jax.ShapeDtypeStruct(jnp.shape(leaves[leaf]), jnp.result_type(leaves[leaf]))
    return may_depend(jvp_out, [abstract(primal), abstract(list(others)), t],
                      lambda a, j: a == 2)


def _leaf_of_theta(i: int) -> Callable[[int, int], bool]:
    return lambda a, j: a == 0 and j == i


def check_model(family, theta, key, x_struct, f, est_name: str, draws_key: bool) -> None:
    """Trace-time refusals of provably wrong models (see the module docstring)."""
    theta_a = abstract(theta)
    leaves = jax.tree_util.tree_leaves(theta_a)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(theta_a)]
    if draws_key and key is not None:
        if not may_depend(family.sample, [theta_a, abstract(key)], lambda a, j: a == 1):
            raise ValueError(
                "family.sample(theta, key) does not depend on `key`: every draw would be the "
                "same and the estimate would have no randomness. Draw with the key, e.g. "
                "`loc + scale * jax.random.normal(key, shape)`."
            )
    if "pathwise" not in est_name and key is not None:
        for i, leaf in enumerate(leaves):
            if not _is_float(leaf):
                continue
            if not may_depend(family.sample, [theta_a, abstract(key)], _leaf_of_theta(i)):
                continue  # theta leaf not used by the sampler: a zero score is right
            if not tangent_may_depend(family.log_prob, theta_a, i, [x_struct]):
                raise ValueError(
                    f"family.log_prob(theta, x) has a structurally zero derivative in theta"
                    f"{paths[i]}, but family.sample draws depend on it: the score would be zero "
                    f"and {est_name}'s gradient silently zero there. log_prob must be the "
                    "log-density of what sample draws, differentiable in theta (no "
                    "jax.lax.stop_gradient on theta, no constant density)."
                )
    if "pathwise" in est_name and f is not None and all(
            _is_float(x) for x in jax.tree_util.tree_leaves(x_struct)):
        x_a = abstract(x_struct)
        n_x = len(jax.tree_util.tree_leaves(x_a))
        reads_x = may_depend(f, [x_a], lambda a, j: True)
        if reads_x and not any(tangent_may_depend(f, x_a, j) for j in range(n_x)):
            raise ValueError(
                f"f(x) reads the draw but its derivative in x is structurally zero (a step "
                f"function, jnp.floor, a comparison): {est_name} differentiates through f, so "
                "its gradient would be zero. f must be differentiable for pathwise; use "
                "sg.score_function() for a discontinuous f."
            )
