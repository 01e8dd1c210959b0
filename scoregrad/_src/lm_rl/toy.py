r"""An enumerable language-model toy: every completion, its probability and its reward, exactly.

Vocabulary ``{0, ..., V-2}`` plus an end token ``EOS = V - 1``; a completion stops at its first
``EOS`` (included, as a scored token) or after ``T`` tokens (truncated). With V = 3 and T = 3 there
are N = 15 completions of lengths 1 to 3. The policy is tabular: for prompt p and the prefix s of
content tokens generated so far (one of $\sum_{\ell<T}(V-1)^\ell$ states), the next-token logits
are ``table[p, s] + bias``; the parameters are the pytree ``{"table": (P, S, V), "bias": (V,)}``.

The reward is verifiable with partial credit: each prompt has a target completion, and the reward
is the number of leading positions on which the completion agrees with the target, divided by the
target's length (1 exactly when the completion is the target).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Params = dict


class Toy(NamedTuple):
    """The enumerated toy (numpy arrays, fixed).

    Attributes:
        vocab: V, the end token included (``eos = V - 1``).
        max_len: T.
        tokens: ``(N, T)`` int, every completion, padded with 0.
        mask: ``(N, T)`` float, 1 on its tokens.
        states: ``(N, T)`` int, the prefix state before each token (0 on padding).
        rewards: ``(P, N)`` float, the reward of each completion for each prompt.
        targets: the P target completions (tuples of tokens).
        num_states: S.
    """

    vocab: int
    max_len: int
    tokens: np.ndarray
    mask: np.ndarray
    states: np.ndarray
    rewards: np.ndarray
    targets: tuple
    num_states: int


def _state(prefix, v):
    offset = sum((v - 1) ** ell for ell in range(len(prefix)))
    value = 0
    for tok in prefix:
        value = value * (v - 1) + tok
    return offset + value


def _reward(seq, target):
    n = 0
    for a, b in zip(seq, target):
        if a != b:
            break
        n += 1
    return n / len(target)


def make_toy(targets=((0, 1, 2), (1, 2), (0, 0, 0)), *, vocab: int = 3,
             max_len: int = 3) -> Toy:
    """Enumerate every completion of the toy (see the module docstring).

    Args:
        targets: one target completion per prompt (content tokens, ending with ``vocab - 1``
            unless it has ``max_len`` tokens).
        vocab: V >= 2 (the last token is EOS).
        max_len: T >= 1.
    """
    if vocab < 2 or max_len < 1:
        raise ValueError(f"need vocab >= 2 and max_len >= 1; got {vocab}, {max_len}.")
    eos = vocab - 1
    seqs = []
    for ell in range(1, max_len + 1):
        for content in itertools.product(range(eos), repeat=ell - 1):
            last = range(vocab) if ell == max_len else (eos,)
            seqs += [content + (t,) for t in last]
    n = len(seqs)
    tokens = np.zeros((n, max_len), np.int32)
    mask = np.zeros((n, max_len))
    states = np.zeros((n, max_len), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        mask[i, :len(s)] = 1.0
        states[i, :len(s)] = [_state(s[:t], vocab) for t in range(len(s))]
    rewards = np.array([[_reward(s, tuple(tg)) for s in seqs] for tg in targets])
    num_states = sum((vocab - 1) ** ell for ell in range(max_len))
    return Toy(vocab, max_len, tokens, mask, states, rewards, tuple(map(tuple, targets)),
               num_states)


def init_params(toy: Toy, key: jax.Array, scale: float = 1.0) -> Params:
    """Random tabular parameters ``{"table": (P, S, V), "bias": (V,)}`` (normal * scale)."""
    k1, k2 = jax.random.split(key)
    p = toy.rewards.shape[0]
    return {"table": scale * jax.random.normal(k1, (p, toy.num_states, toy.vocab)),
            "bias": scale * jax.random.normal(k2, (toy.vocab,))}


def _logits(toy: Toy, theta: Params) -> jax.Array:
    return theta["table"] + theta["bias"]  # (P, S, V)


def token_logp(toy: Toy, theta: Params) -> jax.Array:
    """``(P, N, T)``: log-probability of each token of each completion (0 on padding)."""
    logq = jax.nn.log_softmax(_logits(toy, theta), -1)  # (P, S, V)
    lp = logq[:, toy.states, toy.tokens]  # (P, N, T)
    return lp * toy.mask


def seq_logp(toy: Toy, theta: Params) -> jax.Array:
    """``(P, N)``: log-probability of each completion."""
    return token_logp(toy, theta).sum(-1)


def sample(toy: Toy, theta: Params, key: jax.Array, num: int,
           prompts: ArrayLike | None = None) -> tuple[jax.Array, jax.Array]:
    """Sample ``num`` completions per prompt, token by token.

    Returns:
        ``(index, tokens)``: ``(P, num)`` indices into the enumeration (``toy.tokens[index]``,
        ``toy.mask[index]``), and the sampled ``(P, num, T)`` tokens (0 on padding).
    """
    logits = _logits(toy, theta)
    p = logits.shape[0]
    prompts = jnp.arange(p) if prompts is None else jnp.asarray(prompts)
    eos, v1 = toy.vocab - 1, toy.vocab - 1
    state = jnp.zeros((prompts.shape[0], num), jnp.int32)
    done = jnp.zeros(state.shape, bool)
    toks = []
    for t in range(toy.max_len):
        tok = jax.random.categorical(jax.random.fold_in(key, t),
                                     logits[prompts[:, None], state], axis=-1)
        tok = jnp.where(done, 0, tok).astype(jnp.int32)
        toks.append(tok)
        offset_next = sum(v1 ** ell for ell in range(t + 1))
        offset = sum(v1 ** ell for ell in range(t))
        state = jnp.where(done | (tok == eos), state, offset_next + (state - offset) * v1 + tok)
        done = done | (tok == eos)
    tokens = jnp.stack(toks, -1)
    # the enumeration pads with 0 after EOS as the sampler does, so tokens identify it
    eq = jnp.all(tokens[..., None, :] == jnp.asarray(toy.tokens), -1)  # (P, num, N)
    return jnp.argmax(eq, -1), tokens


def expected_reward(toy: Toy, theta: Params) -> jax.Array:
    """``(P,)``: E[reward] per prompt, exactly."""
    return jnp.sum(jnp.exp(seq_logp(toy, theta)) * toy.rewards, -1)


def kl(toy: Toy, theta: Params, ref: Params) -> jax.Array:
    """``(P,)``: KL(p_theta || p_ref) between the completion distributions, exactly."""
    lp, lr = seq_logp(toy, theta), seq_logp(toy, ref)
    return jnp.sum(jnp.exp(lp) * (lp - lr), -1)
