"""The run policy: NaN handling, devices and chunking, validated once and honoured by every entry
point (estimate_grad*, expectation*, estimate_grad_adaptive, importance sampling, finite
differences), or refused by it with a clear error."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src import validation
from scoregrad._src.base import FStats

NAN_POLICIES = ("raise", "drop", "propagate")


class RunPolicy(NamedTuple):
    """How a run treats non-finite values, which devices it uses and its chunk size.

    Attributes:
      nan_policy: ``"raise"``, ``"drop"`` or ``"propagate"`` (see docs/reliability.md).
      devices: ``None`` (one device) or a tuple of two or more devices.
      chunk_size: units per chunk, or ``None`` for the engine's automatic choice.
    """

    nan_policy: str = "raise"
    devices: Optional[tuple] = None
    chunk_size: Optional[int] = None


def make_policy(where: str, nan_policy: Any = "raise", devices: Any = None,
                chunk_size: Any = None, *, refuse: tuple = ()) -> RunPolicy:
    """A validated :class:`RunPolicy`. ``refuse`` names options ``where`` cannot honour
    (``"drop"``, ``"devices"``): asking for one raises ``ValueError`` instead of ignoring it."""
    if not isinstance(nan_policy, str) or nan_policy not in NAN_POLICIES:
        raise ValueError(
            f"{where}: `nan_policy` must be one of {NAN_POLICIES}; got {nan_policy!r}."
        )
    resolved = resolve_devices(devices)
    chunk = validation.check_chunk_size(chunk_size)
    if nan_policy == "drop" and "drop" in refuse:
        raise ValueError(
            f"{where}: nan_policy='drop' is not supported here ({refuse_reason(refuse)}). Use "
            "nan_policy='raise' (the default) or 'propagate'."
        )
    if resolved is not None and "devices" in refuse:
        raise ValueError(
            f"{where}: devices={devices!r} is not supported here ({refuse_reason(refuse)}). "
            "Use devices=None."
        )
    return RunPolicy(nan_policy, resolved, chunk)


def refuse_reason(refuse: tuple) -> str:
    reasons = [r for r in refuse if r not in ("drop", "devices")]
    return reasons[0] if reasons else "this entry point runs on one device over every draw"


def _raise_if_nonfinite(count, where: str):
    if count > 0:
        raise FloatingPointError(
            f"{where}: {int(count)} evaluation(s) of f, or units whose surrogate terms or "
            "gradients (e.g. the score, grad log_prob) were NaN or infinite (a sequential "
            "program's per-step costs are also NaN when f is not their sum, e.g. "
            "program.f(s) ** 2: pass program.f). Fix f / log_prob for "
            "these draws, or pass nan_policy='drop' to leave those units out (counted in "
            "GradEstimate.num_nonfinite) or nan_policy='propagate' to keep them."
        )


def check_nonfinite(policy: RunPolicy, fs: FStats, where: str) -> FStats:
    """With nan_policy="raise", raises if ``fs.nonfinite > 0``.

    Eagerly (a concrete count) it raises ``FloatingPointError`` at once. Under ``jit``/``vmap``
    the count goes through a host check: ``pure_callback`` with ``vmap_method="broadcast_all"``
    is called once per batch under ``vmap``; its result replaces the count, and :func:`guard`
    ties outputs to it so the check is never dead code (the error then surfaces wrapped in
    JAX's ``JaxRuntimeError``, carrying the same message).
    """
    return fs._replace(nonfinite=check_count(policy, fs.nonfinite, where))


def check_count(policy: RunPolicy, count, where: str):
    """:func:`check_nonfinite` on a bare count (any shape: raises if any entry is positive)."""
    if policy.nan_policy != "raise":
        return count
    if not isinstance(count, jax.core.Tracer):
        c = np.asarray(count)
        _raise_if_nonfinite(int(c.max()) if c.size else 0, where)
        return count
    if policy.devices is not None:  # pure_callback's host sharding does not lower under Shardy
        jax.debug.callback(lambda c: _raise_if_nonfinite(int(np.max(c)), where), count)
        return count

    def check(c):
        c = np.asarray(c)
        _raise_if_nonfinite(int(c.max()) if c.size else 0, where)
        return c

    return jax.pure_callback(
        check, jax.ShapeDtypeStruct(count.shape, count.dtype), count,
        vmap_method="broadcast_all",
    )


def guard(x, fs: FStats):
    """``x`` times 1, made data-dependent on the checked non-finite count."""
    return x * jnp.where(fs.nonfinite >= 0, 1, jnp.nan).astype(jnp.result_type(x))


def guard_count(x, count):
    """``x`` times 1, made data-dependent on a checked count of any shape."""
    return x * jnp.where(jnp.all(count >= 0), 1, jnp.nan).astype(jnp.result_type(x))


def guard_tree(tree, fs: FStats):
    return jax.tree_util.tree_map(lambda a: guard(a, fs), tree)


def refuse_derivatives(tree, message: str):
    """``tree`` unchanged; differentiating through it raises ``ValueError(message)``."""

    @jax.custom_jvp
    def ident(t):
        return t

    @ident.defjvp
    def ident_jvp(primals, tangents):
        raise ValueError(message)

    return ident(tree)


def resolve_devices(devices) -> Optional[tuple]:
    """``None`` -> one device; ``"all"`` -> all local devices; an int n -> the first n; a
    sequence of devices as given."""
    if devices is None:
        return None
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"`devices` must be None, 'all', an int or a list of devices; got {devices!r}.")
        found = tuple(jax.local_devices())
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        local = jax.local_devices()
        if not 1 <= devices <= len(local):
            raise ValueError(
                f"`devices`={devices} but {len(local)} local device(s) exist; use 1..{len(local)} or 'all'."
            )
        found = tuple(local[: int(devices)])
    else:
        try:
            found = tuple(devices)
        except TypeError:
            raise TypeError(
                f"`devices` must be None, 'all', an int or a list of devices; got {type(devices).__name__}."
            ) from None
        if not found or not all(isinstance(d, jax.Device) for d in found):
            raise TypeError("`devices` must be a non-empty list of jax.Device objects.")
    return found if len(found) > 1 else None
