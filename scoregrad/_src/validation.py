"""Trace-time validation of user input, with messages that name the argument and the fix."""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_callable(obj: Any, name: str, where: str) -> None:
    if not callable(obj):
        raise TypeError(
            f"{where}: `{name}` must be callable; got {type(obj).__name__} ({obj!r:.60}). "
            f"Pass a function, e.g. `{name}=lambda ...: ...`."
        )


# Unit i draws from fold_in(key, i) with a 32-bit index (and the engine counts chunk offsets in
# int32): more units would overflow and repeat draws silently.
MAX_UNITS = 2**31 - 1


def check_num_samples(
    num_samples: Any, *, minimum: int = 1, multiple_of: int = 1, who: str = "",
    name: str = "num_samples",
) -> int:
    """num_samples must be a static Python int >= minimum, divisible by ``multiple_of``.

    ``name`` is the argument the count came from (``"samples"`` for given draws).
    """
    if isinstance(num_samples, jax.core.Tracer):
        raise TypeError(
            "`num_samples` is traced, but it fixes array shapes and must be a static Python int. "
            "Under jax.jit mark it static, e.g. `jax.jit(fn, static_argnames='num_samples')`, or "
            "close over a constant."
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise TypeError(
            f"`num_samples` must be a Python int; got {type(num_samples).__name__} ({num_samples!r}). "
            "Write e.g. `num_samples=1000`."
        )
    n = operator.index(num_samples)
    if n < minimum:
        extra = f" by {who}" if who else ""
        if name == "num_samples":
            raise ValueError(
                f"`num_samples` must be at least {minimum}{extra}; got {n}. Increase num_samples."
            )
        raise ValueError(
            f"`{name}` must hold at least {minimum} draws (leading axis) to be used{extra}; got "
            f"{n}. Pass more draws."
        )
    if n > MAX_UNITS * multiple_of:
        raise ValueError(
            f"`num_samples`={n} exceeds {MAX_UNITS * multiple_of}: sample i is drawn from "
            "fold_in(key, i) with a 32-bit index, so more would repeat draws. Average estimates "
            "from several independent keys instead."
        )
    if n % multiple_of:
        raise ValueError(
            f"`num_samples`={n} must be a multiple of {multiple_of} for {who} (it counts evaluations "
            f"of f, and each unit uses {multiple_of}); use e.g. num_samples={n - n % multiple_of or multiple_of}."
        )
    return n


def check_chunk_size(chunk_size: Any) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, jax.core.Tracer) or isinstance(chunk_size, bool) or not isinstance(
        chunk_size, (int, np.integer)
    ):
        raise TypeError(
            f"`chunk_size` must be None (automatic) or a static Python int; got {chunk_size!r}."
        )
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1; got {chunk_size}. Use None for automatic.")
    return int(chunk_size)


def _path(path) -> str:
    return "theta" + jax.tree_util.keystr(path)


def check_theta(theta: Any) -> None:
    """theta must be a non-empty pytree of floating-point arrays."""
    leaves = jax.tree_util.tree_leaves_with_path(theta)
    if not leaves:
        raise ValueError(
            "`theta` has no array leaves: there is nothing to differentiate. Pass the parameters, "
            "e.g. theta={'loc': jnp.zeros(3), 'scale': jnp.ones(3)}."
        )
    for path, leaf in leaves:
        if callable(leaf) and not hasattr(leaf, "dtype"):
            raise TypeError(f"`{_path(path)}` is a function; theta must hold arrays.")
        if not hasattr(leaf, "dtype") and (
            isinstance(leaf, bool) or not isinstance(leaf, (int, float, complex, np.number))
        ):
            raise TypeError(
                f"`{_path(path)}` is a {type(leaf).__name__} ({leaf!r:.40}); theta must be a pytree "
                "of floating-point arrays, e.g. jnp.asarray(value, jnp.float32)."
            )
        dtype = jnp.result_type(leaf) if not hasattr(leaf, "dtype") else leaf.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"`{_path(path)}` has dtype {dtype}; gradients need floating-point parameters. "
                f"Cast it, e.g. jnp.asarray(value, dtype=jnp.float32)."
            )


def normalize_key(key: Any) -> jax.Array:
    """Return a typed PRNG key array of shape () from a typed key or a legacy uint32 key."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        raise TypeError(
            f"`key` must be a JAX PRNG key, got the int {key}. Use jax.random.key({key}) "
            f"(or jax.random.PRNGKey({key}))."
        )
    if not hasattr(key, "dtype"):
        raise TypeError(
            f"`key` must be a JAX PRNG key; got {type(key).__name__}. Use jax.random.key(0)."
        )
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"`key` must be a single key (shape ()), got a key array of shape {key.shape}. "
                "To run over several keys, use jax.vmap."
            )
        return key
    if key.dtype == jnp.uint32 and key.ndim > 1:
        raise ValueError(
            f"`key` must be a single key, got a batch of legacy keys of shape {key.shape}. To run "
            "over several keys, use jax.vmap."
        )
    if key.dtype != jnp.uint32 or key.ndim != 1:
        raise TypeError(
            f"`key` must be a PRNG key: a typed key from jax.random.key(seed) or a legacy uint32 "
            f"key from jax.random.PRNGKey(seed); got an array of dtype {key.dtype} and shape "
            f"{key.shape}."
        )
    try:
        return jax.random.wrap_key_data(key)
    except (TypeError, ValueError):
        raise TypeError(
            f"`key` is a uint32 array of shape {key.shape}, not a legacy key of the default PRNG "
            "implementation (jax.random.PRNGKey(seed) has shape (2,)). Use jax.random.key(seed)."
        ) from None


def is_legacy_key(key: Any) -> bool:
    return hasattr(key, "dtype") and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def _describe(struct: Any) -> str:
    if struct is None:
        return "None"
    n = len(jax.tree_util.tree_leaves(struct))
    return f"a {type(struct).__name__} with {n} array(s) ({jax.tree_util.tree_structure(struct)})"


def _one_float_array(struct: Any, what: str, kind: str, dtype_kind: str, fix: str):
    """The one floating-point array leaf of ``struct`` (from eval_shape), else a TypeError."""
    leaves = jax.tree_util.tree_leaves(struct)
    is_leaf = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(struct))
    if len(leaves) != 1 or not is_leaf or not hasattr(leaves[0], "shape"):
        raise TypeError(f"{what} must return a single floating-point {kind}; got "
                        f"{_describe(struct)}. {fix}")
    if not jnp.issubdtype(leaves[0].dtype, jnp.floating):
        raise TypeError(
            f"{what} must return a floating-point {dtype_kind}; got dtype "
            f"{leaves[0].dtype}. Cast the result, e.g. `.astype(jnp.float32)`."
        )
    return leaves[0]


def check_float_array(struct: Any, what: str) -> None:
    """``struct`` (from eval_shape) must be one floating-point array (any shape)."""
    _one_float_array(struct, what, "scalar array (or one array, for an array-valued "
                     "expectation)", "scalar (or array)",
                     "Stack several outputs, e.g. `jnp.stack([...])`.")


def check_scalar_float(struct: Any, what: str, fix: str) -> None:
    """``struct`` (from eval_shape) must be a single floating-point scalar."""
    leaf = _one_float_array(struct, what, "scalar array", "scalar", fix)
    if leaf.shape != ():
        raise ValueError(f"{what} must return a scalar; got shape {leaf.shape}. {fix}")


def check_state(state: Any, est: Any, theta: Any) -> None:
    """``state`` must have the structure of ``est.init(theta)`` (as threaded from earlier calls)."""
    try:
        expected = jax.eval_shape(est.init, theta)
    except (TypeError, ValueError):  # an init that is not traceable: nothing to compare
        return
    # Any: jaxlib ships no stubs, so mypy cannot type PyTreeDef (its == and methods).
    got: Any = jax.tree_util.tree_structure(state)
    want: Any = jax.tree_util.tree_structure(expected)
    if got == want:
        _check_state_shapes(state, expected, est)
        return
    if want == jax.tree_util.tree_structure(()):
        raise TypeError(
            f"`state`: estimator {est.name} is stateless, but a state of structure {got} was "
            "passed. Pass state=None (or leave it out)."
        )
    raise TypeError(
        f"`state` has structure {got}, but estimator {est.name} expects {want}. Start from "
        "state = estimator.init(theta) and pass the state each call returns."
    )


def _check_state_shapes(state: Any, expected: Any, est: Any) -> None:
    """Leaves of ``state`` must have the shapes of ``est.init(theta)`` (a state built for
    another theta has the right structure but other shapes)."""
    paths = jax.tree_util.tree_leaves_with_path(expected)
    for (path, want), got in zip(paths, jax.tree_util.tree_leaves(state)):
        if tuple(jnp.shape(got)) != tuple(want.shape):
            raise ValueError(
                f"`state` has a leaf `state{jax.tree_util.keystr(path)}` of shape "
                f"{tuple(jnp.shape(got))}, but estimator {est.name} expects {tuple(want.shape)} "
                "for this theta: was the state built for another theta? Start from "
                "state = estimator.init(theta) and pass the state each call returns."
            )


def check_samples(samples: Any, draw_struct: Any) -> None:
    """Given draws (leading axis N) must match one draw of the family: structure and shape,
    and floating point where the family samples floating point (and integer where integer)."""
    # Any: jaxlib ships no stubs, so mypy cannot type PyTreeDef (its == and methods).
    got: Any = jax.tree_util.tree_structure(samples)
    want: Any = jax.tree_util.tree_structure(draw_struct)
    if got != want:
        raise TypeError(
            f"`samples` has structure {got}, but family.sample returns draws of structure {want}; "
            "stack draws of the family's form along a new leading axis."
        )
    pairs = zip(jax.tree_util.tree_leaves(samples), jax.tree_util.tree_leaves(draw_struct))
    for a, d in pairs:
        if tuple(a.shape[1:]) != tuple(d.shape):
            raise ValueError(
                f"`samples` leaves must have shape (N, *draw_shape) = (N, *{tuple(d.shape)}) as "
                f"family.sample returns; got {tuple(a.shape)}."
            )
        a_float = jnp.issubdtype(a.dtype, jnp.inexact)
        if a_float != jnp.issubdtype(d.dtype, jnp.inexact):
            raise TypeError(
                f"`samples` has dtype {a.dtype}, but family.sample draws dtype {d.dtype}; cast "
                f"them, e.g. samples.astype(jnp.{jnp.dtype(d.dtype).name})."
            )


def _leaf_struct(a: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))


def depends_differentiably(fn: Any, args: tuple, argnum: int) -> bool | None:
    """Whether the outputs of ``fn(*args)`` can have a non-zero derivative in ``args[argnum]``.

    Decided structurally: the tangent output of ``jax.jvp`` in that argument is traced to a jaxpr
    and followed back to the input tangents. A ``stop_gradient``, rounding, comparison or integer
    cast in between makes the derivative a symbolic zero that JAX never connects to the input
    tangent. Returns ``None`` when this cannot be decided (an untraceable function).
    """
    structs = list(args)
    structs[argnum] = jax.tree_util.tree_map(_leaf_struct, args[argnum])

    def tangent_out(primal, tangent):
        def g(a):
            call = list(args)
            call[argnum] = a
            return fn(*call)

        return jax.jvp(g, (primal,), (tangent,))[1]

    try:
        closed = jax.make_jaxpr(tangent_out)(structs[argnum], structs[argnum])
    except Exception:  # noqa: BLE001 - any tracing failure means "cannot tell"
        return None
    jaxpr = closed.jaxpr
    n_primal = len(jax.tree_util.tree_leaves(structs[argnum]))
    live = {id(v) for v in jaxpr.invars[n_primal:]}
    for eqn in jaxpr.eqns:  # forward propagation; a nested call counts as using all its inputs
        if any(id(v) in live for v in eqn.invars):
            live.update(id(v) for v in eqn.outvars)
    return any(id(v) in live for v in jaxpr.outvars)


def traced_struct(fn: Any, args: tuple, what: str, fix: str) -> Any:
    """``jax.eval_shape(fn, *args)``; a tracing error becomes a ``TypeError`` naming ``what``
    and the fix."""
    try:
        return jax.eval_shape(fn, *args)
    except (TypeError, KeyError, IndexError, AttributeError) as err:
        raise TypeError(f"{what} failed while tracing: {type(err).__name__}: {err}. {fix}") from err


def draw_struct(family: Any, theta: Any) -> Any:
    """The form of one draw of ``family`` (None if its sampler cannot be traced here)."""
    try:
        return jax.eval_shape(family.sample, theta, jax.random.key(0))
    except Exception:  # noqa: BLE001 - a sampler that wants a legacy key, or none usable
        try:
            return jax.eval_shape(family.sample, theta, jax.random.PRNGKey(0))
        except Exception:  # noqa: BLE001
            return None


def check_sample_leaves(samples: Any) -> int:
    """The number of given draws: every leaf of ``samples`` has the same leading axis."""
    leaves = jax.tree_util.tree_leaves(samples)
    if not leaves or any(jnp.ndim(a) < 1 for a in leaves):
        raise ValueError(
            "`samples` must be a pytree of arrays with a leading axis of draws; got "
            f"{type(samples).__name__}. Stack the draws, e.g. jnp.stack(draws)."
        )
    n = int(leaves[0].shape[0])
    if any(a.shape[0] != n for a in leaves):
        raise ValueError(
            f"`samples` leaves disagree on the number of draws: {[a.shape[0] for a in leaves]}."
        )
    return n
