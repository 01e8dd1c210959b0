r"""Exact expectations over K-tuples of completions, by multiset enumeration.

Every loss here is a symmetric function of the K completions of a group, so the expectation over
the $N^K$ ordered K-tuples equals a sum over the $\binom{N+K-1}{K}$ multisets, each weighted by
its multinomial probability $K!/\prod_j c_j! \cdot \prod_j q_j^{c_j}$. Per multiset we take the
gradient of the loss with respect to its ``(K, T)`` token log-probabilities only (the draws and
their weights are held fixed), accumulate it per completion and token, and pull the sum back to
the parameters with one VJP of the token log-probabilities. With N = 15 completions: K = 8 is
319 770 multisets per prompt.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src.lm_rl import toy as toy_lib

Params = Any
_CHUNK = 16384


@functools.lru_cache(maxsize=16)
def multisets(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(M, k)`` sorted index tuples of every multiset of size k from n, and the log of their
    multinomial coefficients ``log(k! / prod c_j!)``."""
    idx = np.array(list(itertools.combinations_with_replacement(range(n), k)), np.int32)
    counts = np.zeros((idx.shape[0], n), np.int64)
    np.add.at(counts, (np.repeat(np.arange(idx.shape[0]), k), idx.ravel()), 1)
    lgam = np.array([math.lgamma(c + 1) for c in range(k + 1)])
    logc = math.lgamma(k + 1) - lgam[counts].sum(1)
    return idx, logc


def _per_prompt(loss_fn, idx, logc, mask, lp, old, ref, rew, q_log):
    """Expected loss and cotangent ``(N, T)`` for one prompt."""
    n, t = mask.shape
    logw = logc + q_log[idx].sum(-1)
    m = idx.shape[0]
    pad = (-m) % _CHUNK
    idx_p = jnp.concatenate([idx, jnp.zeros((pad, idx.shape[1]), idx.dtype)])
    w_p = jnp.concatenate([jnp.exp(logw), jnp.zeros((pad,), logw.dtype)])

    def one(ix):
        def f(x):
            kw = {}
            if old is not None:
                kw["old_logp"] = old[ix]
            if ref is not None:
                kw["ref_logp"] = ref[ix]
            return loss_fn(x, mask[ix], rew[ix], **kw)
        return jax.value_and_grad(f)(lp[ix])

    def chunk(args):
        ix, w = args
        vals, cots = jax.vmap(one)(ix)
        acc = jax.ops.segment_sum((w[:, None, None] * cots).reshape(-1, t), ix.reshape(-1),
                                  num_segments=n)
        return jnp.sum(w * vals), acc

    if m <= _CHUNK:  # one chunk: no loop (a simpler program compiles faster)
        return chunk((idx, jnp.exp(logw)))
    vals, accs = jax.lax.map(chunk, (idx_p.reshape(-1, _CHUNK, idx.shape[1]),
                                     w_p.reshape(-1, _CHUNK)))
    return vals.sum(), accs.sum(0)


def expected_grad(loss_fn: Callable[..., jax.Array], toy: toy_lib.Toy, theta: Params, k: int, *,
                  behaviour: Params | None = None, ref: Params | None = None
                  ) -> tuple[jax.Array, Params]:
    r"""Exact $\mathbb E[\text{loss}]$ and $\mathbb E[-\nabla_\theta \text{loss}]$ (the expected
    update direction), averaged over the toy's prompts, for groups of ``k`` completions.

    Args:
        loss_fn: ``loss_fn(logp, mask, rewards, **kw) -> scalar`` for one group ``(k, T)``;
            ``kw`` holds ``old_logp`` when ``behaviour`` is given and ``ref_logp`` when ``ref``
            is.
        toy: the enumerated toy.
        theta: current policy parameters.
        k: completions per prompt.
        behaviour: parameters of the policy that samples (off-policy); ``None``: ``theta``
            itself, and ``old_logp`` is not passed (on-policy).
        ref: reference-policy parameters, passed as ``ref_logp``.
    """
    idx, logc = multisets(toy.tokens.shape[0], k)
    return _expected_grad(loss_fn, toy, theta, behaviour, ref, jnp.asarray(idx),
                          jnp.asarray(logc))


def _expected_grad(loss_fn, toy, theta, behaviour, ref, idx, logc):
    """The multisets are arguments, not constants: under ``jit`` a 10 MB constant (K = 8)
    slows compilation more than the enumeration itself takes to run."""
    lp = toy_lib.token_logp(toy, theta)
    sampler = theta if behaviour is None else behaviour
    q_log = jax.lax.stop_gradient(toy_lib.seq_logp(toy, sampler))
    old = None if behaviour is None else jax.lax.stop_gradient(toy_lib.token_logp(toy, behaviour))
    refl = None if ref is None else jax.lax.stop_gradient(toy_lib.token_logp(toy, ref))
    mask, rew = jnp.asarray(toy.mask), jnp.asarray(toy.rewards, lp.dtype)
    run = functools.partial(_per_prompt, loss_fn, idx, logc, mask)
    vals, cots = jax.vmap(run, in_axes=(0, None if old is None else 0,
                                        None if refl is None else 0, 0, 0))(
        jax.lax.stop_gradient(lp), old, refl, rew, q_log)
    p = lp.shape[0]
    _, vjp = jax.vjp(lambda th: toy_lib.token_logp(toy, th), theta)
    (g,) = vjp(-cots / p)
    return vals.mean(), g


def true_grad(toy: toy_lib.Toy, theta: Params, *, ref: Params | None = None,
              kl_coef: float = 0.0) -> Params:
    r"""Exact $\nabla_\theta$ of the mean over prompts of $\mathbb E[R] - \beta\,
    \mathrm{KL}(p_\theta\,\|\,p_{\rm ref})$."""
    if kl_coef and ref is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref (the reference-policy parameters).")

    def objective(th):
        j = toy_lib.expected_reward(toy, th).mean()
        if kl_coef and ref is not None:
            j = j - kl_coef * toy_lib.kl(toy, th, ref).mean()
        return j
    return jax.grad(objective)(theta)
