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


def check_num_samples(num_samples: Any, *, minimum: int = 1, multiple_of: int = 1, who: str = "") -> int:
    """num_samples must be a static Python int >= minimum, divisible by ``multiple_of``."""
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
        raise ValueError(
            f"`num_samples` must be at least {minimum}{extra}; got {n}. Increase num_samples."
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
    if key.dtype != jnp.uint32 or key.ndim != 1:
        raise TypeError(
            f"`key` must be a PRNG key: a typed key from jax.random.key(seed) or a legacy uint32 "
            f"key from jax.random.PRNGKey(seed); got an array of dtype {key.dtype} and shape "
            f"{key.shape}."
        )
    try:
        return jax.random.wrap_key_data(key)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"`key` of shape {key.shape} is not a valid legacy key for the default PRNG "
            f"implementation: {err}. Use jax.random.key(seed)."
        ) from None


def is_legacy_key(key: Any) -> bool:
    return hasattr(key, "dtype") and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def check_scalar_float(struct: Any, what: str, fix: str) -> None:
    """``struct`` (from eval_shape) must be a single floating-point scalar."""
    leaves = jax.tree_util.tree_leaves(struct)
    if len(leaves) != 1 or not hasattr(leaves[0], "shape"):
        raise TypeError(
            f"{what} must return a single floating-point scalar; got {jax.tree_util.tree_structure(struct)}. {fix}"
        )
    (leaf,) = leaves
    if leaf.shape != ():
        raise ValueError(
            f"{what} must return a scalar; got shape {leaf.shape}. {fix}"
        )
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise TypeError(
            f"{what} must return a floating-point scalar; got dtype {leaf.dtype}. Cast the result, e.g. "
            f"`.astype(jnp.float32)`."
        )
