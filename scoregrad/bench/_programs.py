r"""Sequential-program problems of ``scoregrad bench`` (:func:`scoregrad.programs.program`),
with exact answers by enumerating every trajectory.

Each is short enough (at most 256 trajectories) that the expected total cost is a finite sum,
:math:`V(\theta) = \sum_x \prod_t p_t(x_t \mid x_{<t};\theta) \sum_t c_t(x_{\le t})`, and its
gradient is ``jax.grad`` of that sum in float64. Draws carry floats in theta's dtype (tokens,
up-moves, actions as 0., 1., ...), so every function keeps theta's precision and passes under
``jax.numpy_dtype_promotion("strict")``.

* :func:`sequence_policy`: an autoregressive categorical policy (a vocabulary of 3, 4 tokens)
  rewarded on the finished sequence only: every cost is zero except the last step's, so causal
  credit equals whole-program credit (the control: no gain where the reward is terminal).
* :func:`barrier_accrual`: a binomial path monitored at 6 dates, knocked out at an upper
  barrier, paying at every date (an accrual while alive, a rebate at the knock-out date).
* :func:`prisoners_dilemma`: 4 rounds of the iterated prisoner's dilemma between two
  memory-one agents (agent 1's discounted costs), the DiCE/LOLA game.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import scoregrad.programs as sp
from scoregrad.bench._closed_forms import Spec

PyTree = Any


def _enumerate(log_prob, cost, paths: np.ndarray, theta: PyTree) -> tuple[float, PyTree]:
    """``(E[sum_t c_t], its gradient)`` by summing over every trajectory in ``paths``
    (float64; the probabilities are checked to sum to one)."""
    with jax.enable_x64(True):
        th = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), theta)

        def expected(th, xs):
            total = jax.vmap(lambda x: jnp.sum(cost(x)))(xs)
            p = jnp.exp(jax.vmap(lambda x: jnp.sum(log_prob(th, x)))(xs))
            return jnp.sum(p * total), jnp.sum(p)

        run = jax.jit(jax.value_and_grad(expected, has_aux=True))
        (value, mass), grad = run(th, jnp.asarray(paths, jnp.float64))
        if not abs(float(mass) - 1.0) < 1e-12:
            raise AssertionError(f"the enumerated trajectories have total probability {mass}")
        return float(value), jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), grad)


def _spec(log_prob, sample, cost, num_steps: int, paths: np.ndarray, theta: PyTree) -> Spec:
    prog = sp.program(log_prob, sample, cost, num_steps=num_steps)
    value, grad = _enumerate(log_prob, cost, paths, theta)
    return Spec(prog.family, theta, prog.f, value, grad, False)


def _prev(x: jax.Array) -> jax.Array:
    """The draw before each step (0 before the first), along the leading axis."""
    return jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1]], axis=0)


# ------------------------------------------------------------------------------------------
# An autoregressive categorical sequence, rewarded at the end.

SEQ_VOCAB, SEQ_STEPS = 3, 4
SEQ_TARGET = (0, 1, 2, 2)


def sequence_policy() -> Spec:
    r"""Tokens :math:`x_1 \dots x_4 \in \{0, 1, 2\}`, :math:`x_1 \sim \text{softmax}(s)`,
    :math:`x_t \sim \text{softmax}(W_{x_{t-1}})`; theta = ``{"start": s (3,), "trans": W (3,
    3)}``. Cost :math:`-(m/4)^2` at the last step (m = positions equal to the target 0 1 2 2),
    zero before: a reward on the finished sequence, as in RL fine-tuning of a language model."""
    v, t = SEQ_VOCAB, SEQ_STEPS
    theta = {"start": np.array([0.2, -0.1, 0.0]),
             "trans": np.array([[0.5, -0.3, 0.1], [-0.2, 0.4, 0.0], [0.1, -0.5, 0.3]])}
    target = np.asarray(SEQ_TARGET, np.int32)

    def logits(th, tok):  # (T, V): step t's logits given the tokens before it
        return jnp.concatenate([th["start"][None, :], th["trans"][tok[:-1]]], axis=0)

    def log_prob(th, x):
        tok = x.astype(jnp.int32)
        lsm = jax.nn.log_softmax(logits(th, tok), axis=-1)
        return jnp.take_along_axis(lsm, tok[:, None], axis=1)[:, 0]

    def sample(th, key):
        dtype = jnp.result_type(th["start"])

        def step(prev, inp):
            i, k = inp
            lg = jnp.where(i == 0, th["start"], th["trans"][prev])
            tok = jax.random.categorical(k, lg).astype(jnp.int32)
            return tok, tok.astype(dtype)

        keys = jax.random.split(key, t)
        return jax.lax.scan(step, jnp.int32(0), (jnp.arange(t), keys))[1]

    def cost(x):
        matches = jnp.sum((x.astype(jnp.int32) == target).astype(x.dtype))
        return jnp.zeros((t,), x.dtype).at[-1].set(-((matches / t) ** 2))

    paths = np.array(list(itertools.product(range(v), repeat=t)), np.float64)
    return _spec(log_prob, sample, cost, t, paths, theta)


# ------------------------------------------------------------------------------------------
# A discretely monitored up-and-out accrual on a binomial path.

BARRIER_DATES = 6
BARRIER = {"spot": 100.0, "strike": 100.0, "barrier": 115.0, "step": 0.05, "rebate": 2.0}


def barrier_accrual() -> Spec:
    r"""Up-moves :math:`x_k \sim \text{Bern}(\sigma(\theta_k))` at 6 dates, :math:`S_k = 100
    \exp(0.05 \sum_{j \le k} (2x_j - 1))`; the path is alive at date k while :math:`S_j < 115`
    for every :math:`j \le k`. Date k pays :math:`(S_k - 100)^+/6` if alive and the rebate 2 at
    the knock-out date (nothing after). theta: the 6 up-move logits (a time-dependent drift);
    the barrier makes the payoff discontinuous (no pathwise derivative)."""
    t, o = BARRIER_DATES, BARRIER
    theta = np.linspace(0.3, -0.3, t)

    def log_prob(th, x):
        return x * jax.nn.log_sigmoid(th) + (1 - x) * jax.nn.log_sigmoid(-th)

    def sample(th, key):
        return jax.random.bernoulli(key, jax.nn.sigmoid(th)).astype(jnp.result_type(th))

    def cost(x):
        s = o["spot"] * jnp.exp(o["step"] * jnp.cumsum(2 * x - 1))
        alive = jnp.cumprod((s < o["barrier"]).astype(x.dtype))
        before = jnp.concatenate([jnp.ones((1,), x.dtype), alive[:-1]])
        return alive * jnp.maximum(s - o["strike"], 0) / t + o["rebate"] * (before - alive)

    paths = np.array(list(itertools.product((0.0, 1.0), repeat=t)), np.float64)
    return _spec(log_prob, sample, cost, t, paths, theta)


# ------------------------------------------------------------------------------------------
# The iterated prisoner's dilemma, two memory-one agents, agent 1's costs.

IPD_ROUNDS, IPD_DISCOUNT = 4, 0.96


def _ipd_states(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each agent's memory-one state per round from the actions ``(T, 2)`` (ints): 0 in the
    first round, else 1 + 2 * (own last action) + (the other's last action)."""
    prev = _prev(a)
    first = jnp.arange(a.shape[0]) == 0
    s1 = jnp.where(first, 0, 1 + 2 * prev[:, 0] + prev[:, 1])
    s2 = jnp.where(first, 0, 1 + 2 * prev[:, 1] + prev[:, 0])
    return s1, s2


def prisoners_dilemma() -> Spec:
    r"""4 rounds between two memory-one agents (theta = ``{"agent1": (5,), "agent2": (5,)}``,
    each agent's logits of defecting in its five states, as
    :func:`scoregrad.programs.iterated_prisoners_dilemma`); a draw is the actions ``(4, 2)``
    (1. = defect) and the cost is agent 1's, :data:`scoregrad.programs.IPD_COSTS` discounted by
    0.96 per round. The gradient covers both agents' parameters."""
    t = IPD_ROUNDS
    theta = {"agent1": np.linspace(-0.5, 0.5, 5), "agent2": np.linspace(0.4, -0.4, 5)}
    table = np.asarray(sp.IPD_COSTS)[:, 0]
    discount = IPD_DISCOUNT ** np.arange(t)

    def log_prob(th, x):
        s1, s2 = _ipd_states(x.astype(jnp.int32))
        l1, l2 = th["agent1"][s1], th["agent2"][s2]

        def lp(logit, a):
            return a * jax.nn.log_sigmoid(logit) + (1 - a) * jax.nn.log_sigmoid(-logit)

        return lp(l1, x[:, 0]) + lp(l2, x[:, 1])

    def sample(th, key):
        dtype = jnp.result_type(th["agent1"])

        def step(prev, inp):
            i, k = inp
            s1 = jnp.where(i == 0, 0, 1 + 2 * prev[0] + prev[1])
            s2 = jnp.where(i == 0, 0, 1 + 2 * prev[1] + prev[0])
            lg = jnp.stack([th["agent1"][s1], th["agent2"][s2]])
            a = jax.random.bernoulli(k, jax.nn.sigmoid(lg)).astype(jnp.int32)
            return a, a.astype(dtype)

        keys = jax.random.split(key, t)
        return jax.lax.scan(step, jnp.zeros((2,), jnp.int32), (jnp.arange(t), keys))[1]

    def cost(x):
        a = x.astype(jnp.int32)
        return jnp.asarray(table, x.dtype)[2 * a[:, 0] + a[:, 1]] * jnp.asarray(discount, x.dtype)

    paths = np.array([np.reshape(p, (t, 2)) for p in itertools.product((0.0, 1.0), repeat=2 * t)],
                     np.float64)
    return _spec(log_prob, sample, cost, t, paths, theta)
