r"""Categorical estimators: ARSM, and the unordered-set estimator with Gumbel-top-k sampling.

Both read the logits from ``family.capabilities.categorical_logits`` (independent categoricals
with logits of shape ``(..., C)``, e.g. :func:`scoregrad.families.categorical`) and pass f the
family's own draws (integer arrays of shape ``theta.shape[:-1]``). All noise is drawn through the
unit's :class:`~scoregrad._src.base.Draws` (``draws.gumbel``), so sampling designs reach it.

References:
  Yin, Yue and Zhou, "ARSM: Augment-REINFORCE-Swap-Merge Estimator for Gradient Backpropagation
  Through Categorical Variables", ICML 2019.
  Kool, van Hoof and Welling, "Estimating Gradients for Discrete Random Variables by Sampling
  without Replacement", ICLR 2020.
  Kool, van Hoof and Welling, "Stochastic Beams and Where to Find Them: The Gumbel-Top-k Trick
  for Sampling Sequences Without Replacement", ICML 2019.
"""

from __future__ import annotations

import itertools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src.base import Estimator, Plan, Target, UnitOut, estimator
from scoregrad._src.family import require

sg_ = jax.lax.stop_gradient


def categorical_logits_struct(target: Target, who: str) -> jax.ShapeDtypeStruct:
    """The logits' shape and dtype from ``family.capabilities.categorical_logits`` (bind time);
    ``TypeError`` naming the capability when the family has none."""
    fn = require(target.family, "categorical_logits", who,
                 "Use sg.score_function() or sg.rloo(k) for other families.")
    struct = jax.eval_shape(fn, target.theta)
    if not (hasattr(struct, "shape") and jnp.issubdtype(struct.dtype, jnp.floating)
            and len(struct.shape) >= 1):
        raise TypeError(f"{who}: family.capabilities.categorical_logits(theta) must be a floating "
                        f"array of logits of shape (..., C); got {struct!r}.")
    if struct.shape[-1] < 2:
        raise ValueError(f"{who} needs at least 2 categories; the logits have shape "
                         f"{struct.shape}.")
    return struct


def _draw_dtype(target: Target):
    leaves = jax.tree_util.tree_leaves(target.x_struct)
    return leaves[0].dtype if leaves else jnp.int32


# ---------------------------------------------------------------------------------------- ARSM


def arsm_pairs(num_categories: int) -> np.ndarray:
    """The swaps evaluated per unit: ``(0, 0)`` (the true draw), then every ``(c, j)``, c < j."""
    c = num_categories
    return np.array([(0, 0)] + [(a, b) for a in range(c) for b in range(a + 1, c)], np.int32)


def arsm_pseudo_actions(logits: jax.Array, gumbel: jax.Array) -> jax.Array:
    r"""The pseudo actions :math:`z^{c\rightleftharpoons j}` of every swap, shape ``(M, D)``.

    With :math:`\pi_d = \mathrm{softmax}(-G_d) \sim \mathrm{Dir}(1_C)` (``gumbel`` = G, shape
    ``(D, C)``), :math:`z_d = \arg\min_i(\ln\pi_{di} - \phi_{di}) = \arg\max_i(\phi_{di} + G_{di})`
    and :math:`z^{c\rightleftharpoons j}_d` is the same with entries c and j of :math:`\pi_d`
    swapped (Yin et al. 2019, eqs. 7 and 12; every dimension is swapped alike). Row 0 is the
    true draw; the rows follow :func:`arsm_pairs`. The minimum over the untouched entries is the
    first of the three smallest not in {c, j}, so the cost is O(M D), not O(M D C).
    """
    d, c = logits.shape
    a = -gumbel - logits  # ln E - phi with E = exp(-G) ~ Exp(1): argmin a is the draw
    pairs = jnp.asarray(arsm_pairs(c))
    ci, ji = pairs[:, 0], pairs[:, 1]
    top = min(3, c)
    neg, idx3 = jax.lax.top_k(-a, top)  # (D, top): the smallest entries of a
    ok = (idx3[None] != ci[:, None, None]) & (idx3[None] != ji[:, None, None])  # (M, D, top)
    first = jnp.argmax(ok, axis=-1)
    other = jnp.take_along_axis(jnp.broadcast_to(idx3, ok.shape), first[..., None], -1)[..., 0]
    other_val = jnp.where(jnp.any(ok, -1),
                          jnp.take_along_axis(jnp.broadcast_to(-neg, ok.shape), first[..., None],
                                              -1)[..., 0], jnp.inf)
    log_e = -gumbel
    v_c = log_e[:, ji].T - logits[:, ci].T  # entry c holds ln E_j after the swap: (M, D)
    v_j = log_e[:, ci].T - logits[:, ji].T
    cand = jnp.stack([v_c, v_j, other_val], -1)
    who = jnp.stack([jnp.broadcast_to(ci[:, None], v_c.shape),
                     jnp.broadcast_to(ji[:, None], v_c.shape), other], -1)
    return jnp.take_along_axis(who, jnp.argmin(cand, -1)[..., None], -1)[..., 0]


def arsm_gradient(logits: jax.Array, gumbel: jax.Array, fvals: jax.Array) -> jax.Array:
    r"""ARSM's gradient in the logits ``(D, C)`` from f at the pseudo actions (``fvals``, (M,)).

    .. math::
       \hat g_{dc} = \sum_{j=1}^C \Big(f^{c\rightleftharpoons j}
                     - \frac1C\sum_{m=1}^C f^{m\rightleftharpoons j}\Big)
                     \Big(\frac1C - \pi_{dj}\Big)

    (Yin et al. 2019, eq. 9 and Proposition 4), with
    :math:`f^{c\rightleftharpoons j} = f(z^{c\rightleftharpoons j})`,
    :math:`f^{j\rightleftharpoons j} = f(z)`.
    """
    c = logits.shape[-1]
    pairs = arsm_pairs(c)
    slot = np.zeros((c, c), np.int32)  # F[c, j] = fvals[slot[c, j]]; the diagonal is the draw
    for m, (a, b) in enumerate(pairs[1:], start=1):
        slot[a, b] = slot[b, a] = m
    f = fvals[jnp.asarray(slot)].astype(logits.dtype)  # (C, C)
    centred = f - jnp.mean(f, axis=0, keepdims=True)
    w = 1.0 / c - jax.nn.softmax(-gumbel, axis=-1)  # (D, C): 1/C - pi_dj
    return w @ centred.T


def arsm() -> Estimator:
    r"""ARSM (Augment-REINFORCE-Swap-Merge) for independent categorical latents.

    Per unit, one :math:`\pi_d \sim \mathrm{Dir}(1_C)` per categorical (from Gumbel noise
    :math:`\pi_d = \mathrm{softmax}(-G_d)`; the draw is :math:`z_d = \arg\max(\phi_d + G_d)`),
    f is evaluated at the pseudo actions :math:`z^{c\rightleftharpoons j}` of all swaps of
    entries c and j of every :math:`\pi_d`, and

    .. math::
       \hat g_{dc} = \sum_{j=1}^C \Big(f(z^{c\rightleftharpoons j})
                     - \frac1C\sum_{m=1}^C f(z^{m\rightleftharpoons j})\Big)
                     \Big(\frac1C - \pi_{dj}\Big).

    Augment: :math:`\nabla_{\phi_c}\mathbb E f(z) = \mathbb E[f(z)(1 - C\pi_c)]`; swap: any
    transposition of :math:`\pi` keeps its law; merge: the mean over m is a baseline with zero
    mean (the logits' gradients sum to zero) and the sum over the reference j averages the swaps.

    * **Bias**: unbiased for any f and every logit (tested exactly by integrating the piecewise
      linear estimate over the simplex).
    * **Needs from f**: only its values at integer draws (a black box is fine).
    * **Needs from the family**: ``family.capabilities.categorical_logits`` (logits ``(..., C)``,
      C >= 2); other families raise ``TypeError`` naming it.
    * **Derivative order**: first order only (``max_order=1``): ``jax.hessian`` of
      :func:`scoregrad.expectation` raises ``ValueError``.
    * **Cost**: :math:`M = C(C-1)/2 + 1` evaluations of f per unit (every distinct swap; JAX
      shapes are static, so coinciding pseudo actions are still evaluated), whatever the number
      of categoricals D. ``num_samples`` counts them and must be a multiple of M. Good for small
      C; for large C prefer :func:`unordered_set` or :func:`scoregrad.indecater`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> f = lambda x: jnp.sum(x == 1).astype(jnp.float32)
      >>> r = sg.estimate_grad(f, sg.families.categorical(), jnp.zeros((2, 3)),
      ...                      jax.random.key(0), num_samples=4 * 100, estimator=sg.arsm())
      >>> r.grad.shape
      (2, 3)

    References:
      Yin, Yue and Zhou, ICML 2019.
    """
    who = "arsm()"

    def bind(target):
        struct = categorical_logits_struct(target, who)
        c = struct.shape[-1]
        d = math.prod(struct.shape[:-1])
        m = len(arsm_pairs(c))
        draw = _draw_dtype(target)

        def unit(model, params, draws, state):
            del state
            th = model.family.capabilities.categorical_logits(params.theta)
            logits = sg_(th).reshape(d, c)
            g_noise = draws.gumbel((d, c), th.dtype)
            points = arsm_pseudo_actions(logits, g_noise).astype(draw)  # (M, D)
            points = points.reshape((m,) + tuple(struct.shape[:-1]))
            fv = jax.vmap(lambda x: model.eval_f(params, x))(points)
            g = sg_(arsm_gradient(logits, g_noise, sg_(fv))).reshape(th.shape)
            term = jnp.mean(fv) + jnp.sum(g * (th - sg_(th))).astype(fv.dtype)
            return UnitOut(term[None], sg_(jnp.mean(fv))[None])

        return Plan(unit, draws_per_unit=m, max_order=1, shift_invariant=True)

    return estimator(who[:-2], bind)


# ----------------------------------------------------------- sampling without replacement


def gumbel_top_k(key: jax.Array, logits: jax.Array, k: int) -> jax.Array:
    r"""k distinct categories sampled without replacement (Gumbel-top-k), in sampling order.

    The indices of the k largest :math:`\phi_i + G_i` over the last axis, with i.i.d. Gumbel
    noise, are distributed as k successive draws without replacement from
    :math:`\mathrm{softmax}(\phi)` (Kool, van Hoof and Welling 2019; Vieira 2014).

    Args:
      key: a PRNG key.
      logits: ``(..., C)``.
      k: 1 <= k <= C.

    Returns:
      int32 indices of shape ``(..., k)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> s = sg.gumbel_top_k(jax.random.key(0), jnp.zeros(5), 3)
      >>> s.shape, len(set(s.tolist()))
      ((3,), 3)
    """
    logits = jnp.asarray(logits)
    k = operator.index(k)
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"gumbel_top_k: `k` must be in [1, {logits.shape[-1]}]; got {k}.")
    noise = jax.random.gumbel(key, logits.shape, jnp.result_type(float, logits))
    return jax.lax.top_k(logits + noise, k)[1]


def log_unordered_set_prob(log_p: jax.Array, log_rest: jax.Array) -> jax.Array:
    r"""Log-probability of drawing the set with log-masses ``log_p`` (shape ``(..., m)``) in any
    order, without replacement, from a domain whose other elements have total mass
    ``exp(log_rest)`` (``(...)``), elements outside both removed beforehand.

    .. math::
       p(S) = \sum_{\text{orders } s_{1..m}} \prod_{i=1}^m
              \frac{p(s_i)}{p_{\mathrm{rest}} + \sum_{l \ge i} p(s_l)}

    Exact, by enumerating the m! orders: O(m!·m) per set (m <= 8 in practice).
    """
    m = log_p.shape[-1]
    if m == 0:
        return jnp.zeros(log_p.shape[:-1], log_p.dtype)
    perms = jnp.asarray(np.array(list(itertools.permutations(range(m))), np.int32))
    ordered = log_p[..., perms]  # (..., m!, m)
    tail = jax.lax.cumlogsumexp(ordered, axis=ordered.ndim - 1, reverse=True)
    denom = jnp.logaddexp(log_rest[..., None, None], tail)
    return jax.nn.logsumexp(jnp.sum(ordered - denom, axis=-1), axis=-1)


def unordered_set_weights(log_p_set: jax.Array, log_rest: jax.Array) -> tuple:
    r"""The stop-gradient weights of the unordered-set estimator for one set S of k elements.

    Returns ``(r, base)``: ``r[s]`` :math:`= R(S, s) = p^{D\setminus s}(S\setminus s) / p(S)`,
    and ``base`` (k, k) such that the baseline of s is ``base[s] @ f_S``:
    ``base[s, s'] =`` :math:`p(s')\,R^{D\setminus s}(S, s')` with
    :math:`R^{D\setminus s}(S, s) = 1` and :math:`R^{D\setminus s}(S, s') =
    p^{D\setminus\{s,s'\}}(S\setminus\{s,s'\}) / p^{D\setminus s}(S\setminus s)` (Kool et al.
    2020, eqs. 7 and 11).
    """
    k = log_p_set.shape[-1]
    log_set = log_unordered_set_prob(log_p_set, log_rest)
    loo_idx = np.array([[j for j in range(k) if j != s] for s in range(k)], np.int32).reshape(k, k - 1)
    log_loo = log_unordered_set_prob(log_p_set[loo_idx], jnp.broadcast_to(log_rest, (k,)))
    pair_idx = np.array([[[j for j in range(k) if j not in (s, t)] if s != t else list(range(k - 2))
                          for t in range(k)] for s in range(k)], np.int32).reshape(k, k, k - 2)
    log_pair = log_unordered_set_prob(log_p_set[pair_idx], jnp.broadcast_to(log_rest, (k, k)))
    r = jnp.exp(log_loo - log_set)
    ratio = jnp.where(jnp.eye(k, dtype=bool), 0.0, log_pair - log_loo[:, None])
    base = jnp.exp(log_p_set)[None, :] * jnp.exp(ratio)
    return r, base


def unordered_set_surrogate(log_p: jax.Array, idx: jax.Array, fvals: jax.Array) -> jax.Array:
    r"""The unit's surrogate for the sampled set ``idx`` (k,) of a domain with log-masses
    ``log_p`` (N,) (differentiable) and f at the set (``fvals``, (k,), f's own gradient flows):
    value :math:`\sum_s p(s) R(S,s) f(s)`, gradient the estimator with its baseline."""
    lp_all = sg_(log_p)
    inside = jnp.zeros(lp_all.shape, bool).at[idx].set(True)
    log_rest = jax.nn.logsumexp(jnp.where(inside, -jnp.inf, lp_all))
    lps = lp_all[idx]
    r, base = unordered_set_weights(lps, log_rest)
    fs = sg_(fvals).astype(lps.dtype)
    w = jnp.exp(lps) * r  # P(first draw = s | S): sums to 1
    p = jnp.exp(log_p[idx])
    score = jnp.sum((p - sg_(p)) * sg_(r * (fs - base @ fs)))
    return jnp.sum(sg_(w).astype(fvals.dtype) * fvals) + score.astype(fvals.dtype)


def joint_table(batch: tuple, num_categories: int) -> np.ndarray:
    """Every joint value of ``prod(batch)`` categoricals, shape ``(C^D, D)``, in the order of
    the family's support (the last categorical fastest)."""
    d = math.prod(batch)
    return np.array(list(itertools.product(range(num_categories), repeat=d)), np.int32).reshape(-1, d)


def unordered_set(num_draws: int, *, max_support: int = 4096) -> Estimator:
    r"""The unordered-set estimator: k draws without replacement, Rao-Blackwellized over order.

    Per unit a set S of k distinct values is drawn without replacement (Gumbel-top-k over the
    joint support of the categoricals), f is evaluated on it, and

    .. math::
       \hat g = \sum_{s \in S} \nabla p(s)\, R(S, s)\,\Big(f(s) - \sum_{s' \in S} p(s')\,
                R^{D\setminus s}(S, s')\, f(s')\Big), \qquad
       R(S, s) = \frac{p^{D\setminus s}(S\setminus s)}{p(S)},

    with the built-in leave-one-out baseline (Kool et al. 2020, Theorem 4): the baseline of s
    is the unordered-set estimate of :math:`\mathbb E f` from the other draws given that s was
    drawn first, so its conditional mean does not depend on s. The value is
    :math:`\sum_s p(s) R(S,s) f(s)` (the Rao-Blackwellized f of the first draw): unbiased for
    :math:`\mathbb E f`. Probabilities of unordered sets are computed exactly by summing over
    the m! orders (:func:`log_unordered_set_prob`).

    * **Bias**: unbiased (tested exactly, by enumerating every k-subset with its probability).
      Not shift invariant: a constant added to f changes the estimate (not its mean).
    * **Needs from f**: only its values at integer draws.
    * **Needs from the family**: ``family.capabilities.categorical_logits``. The domain is the
      joint support, :math:`C^D` values for D categoricals of C categories (at most
      ``max_support``); one Gumbel per joint value per unit.
    * **Derivative order**: first order only (``max_order=1``).
    * **Cost**: k evaluations of f per unit (``num_samples`` a multiple of k); O(k!·k) for the
      set probabilities (k <= 8 accepted) and O(C^D) for the sampler.

    Args:
      num_draws: k >= 2 distinct draws per unit (at most the support size).
      max_support: the largest joint support :math:`C^D` accepted.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> f = lambda x: (x == 2).astype(jnp.float32)
      >>> r = sg.estimate_grad(f, sg.families.categorical(), jnp.zeros(5), jax.random.key(0),
      ...                      num_samples=3 * 200, estimator=sg.unordered_set(3))
      >>> r.grad.shape
      (5,)

    References:
      Kool, van Hoof and Welling, ICLR 2020.
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, (int, np.integer)):
        raise TypeError(f"unordered_set(num_draws=...) must be a Python int; got {num_draws!r}.")
    k = operator.index(num_draws)
    if not 2 <= k <= 8:
        raise ValueError(f"unordered_set(num_draws=...) must be in [2, 8] (the set probabilities "
                         f"cost O(k!)); got {k}.")
    who = f"unordered_set({k})"

    def bind(target):
        struct = categorical_logits_struct(target, who)
        c, batch = struct.shape[-1], tuple(struct.shape[:-1])
        n = c ** math.prod(batch)
        if n > max_support:
            raise ValueError(f"{who}: the joint support has {n} values (C^D), more than "
                             f"max_support={max_support}; raise max_support or use sg.arsm() / "
                             "sg.indecater() for many categoricals.")
        if k > n:
            raise ValueError(f"{who}: cannot draw {k} distinct values from a support of {n}.")
        table = joint_table(batch, c)
        draw = _draw_dtype(target)

        def unit(model, params, draws, state):
            del state
            th = model.family.capabilities.categorical_logits(params.theta)
            logp = jax.nn.log_softmax(th.reshape(-1, c), axis=-1)
            log_p = jnp.sum(logp[np.arange(table.shape[1])[None, :], table], axis=1)  # (N,)
            g = draws.gumbel((n,), th.dtype)
            idx = jax.lax.top_k(sg_(log_p) + g, k)[1]
            points = jnp.asarray(table)[idx].astype(draw).reshape((k,) + batch)
            fv = jax.vmap(lambda x: model.eval_f(params, x))(points)
            term = unordered_set_surrogate(log_p, idx, fv)
            return UnitOut(term[None], sg_(term)[None])

        return Plan(unit, draws_per_unit=k, max_order=1)

    return estimator(who, bind)
