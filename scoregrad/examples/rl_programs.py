r"""CartPole as a sequential program: reward-to-go with per-step baselines vs trajectory REINFORCE.

An episode of gymnax's CartPole under a small neural policy (an MLP, a pytree of arrays in
plain JAX) is a :func:`scoregrad.programs.program`: step t draws the action
:math:`a_t \sim \pi_\theta(\cdot \mid s_t)`, its log-probability is
:math:`\log \pi_\theta(a_t \mid s_t)` and its cost is :math:`-r_t` (the reward, 1 per step the
pole stays up). Steps after the episode ends are masked (``alive = 0``): their log-probability
and cost are 0. The environment's dynamics do not depend on theta, so they are left out of the
log-probability (a constant in theta).

* ``sg.score_function()`` on the program is trajectory-level REINFORCE: every action's score is
  multiplied by the whole return.
* ``program.estimator(baseline)`` (:func:`scoregrad.programs.causal`) is reward-to-go: the score
  of the action at step t is multiplied by the cost-to-go :math:`G_t = -\sum_{s \ge t} r_s`,
  minus a per-step baseline :math:`b_t` (:func:`scoregrad.programs.leave_one_out`,
  :func:`~scoregrad.programs.moving_average`, or a learned state value
  :func:`~scoregrad.programs.value_function` :math:`V_\phi(s_t, t)`, which reads only what the
  agent has seen before it acts at step t).

:data:`METHODS` names the estimators compared; :func:`gradient_samples` draws many independent
gradient estimates at a fixed theta from the same episodes for every method (common random
numbers), :func:`train` runs an optax loop and records the mean return against the number of
environment steps consumed. Needs the optional extra ``scoregrad[rl]`` (gymnax).

References:
  Williams, 1992. Sutton et al., "Policy Gradient Methods for Reinforcement Learning with
  Function Approximation", 2000. Greensmith, Bartlett and Baxter, "Variance Reduction
  Techniques for Gradient Estimates in Reinforcement Learning", JMLR 2004. Foerster et al.,
  "DiCE", 2018. Lange, "gymnax", 2022.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scoregrad as sg
import scoregrad.programs as sp
from scoregrad.examples.rl import gymnax_cartpole  # one gymnax import with the install hint

__all__ = [
    "METHODS",
    "Method",
    "TrainCurve",
    "cartpole_program",
    "gradient_samples",
    "init_mlp",
    "make_method",
    "mlp",
    "rollouts",
    "train",
]

PyTree = Any

#: The estimators compared: trajectory-level REINFORCE without and with a (leave-one-out)
#: baseline, and reward-to-go without and with the per-step baselines.
METHODS = ("reinforce", "reinforce_loo", "causal", "causal_loo", "causal_moving_average",
           "causal_value")


def init_mlp(key, sizes: tuple[int, ...], *, last_scale: float = 0.01, dtype=None) -> list:
    """An MLP's parameters as a list of ``{"w", "b"}`` layers (LeCun-normal weights, zero
    biases; the last layer scaled by ``last_scale`` so the initial policy is near uniform)."""
    dtype = dtype or jnp.result_type(float)
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        scale = (last_scale if i == len(sizes) - 2 else 1.0) / np.sqrt(m)
        layers.append({"w": scale * jax.random.normal(k, (m, n), dtype),
                       "b": jnp.zeros((n,), dtype)})
    return layers


def mlp(params: list, x: jax.Array) -> jax.Array:
    """tanh hidden layers, linear output."""
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cartpole_program(max_steps: int = 200) -> sp.Program:
    r"""One CartPole episode of ``max_steps`` steps under the MLP policy ``theta``
    (:func:`init_mlp` with sizes ``(4, ..., 2)``) as a :func:`scoregrad.programs.program`.

    A draw is ``{"obs": (T, 4), "action": (T,), "alive": (T,)}``; ``alive[t]`` is 1 while the
    pole is up at step t (it depends only on earlier actions). Per step, ``log_prob`` is
    ``alive[t] * log pi(action[t] | obs[t])`` and ``cost`` is ``-alive[t]`` (CartPole pays 1
    per step balanced), so ``program.f`` is minus the return.

    Example (not run as a doctest: it needs gymnax)::

      prog = rp.cartpole_program(200)
      theta = rp.init_mlp(jax.random.key(0), (4, 32, 2))
      r = sg.estimate_grad(prog.f, prog.family, theta, jax.random.key(1), num_samples=64,
                           estimator=prog.estimator(sp.group_leave_one_out(64)))
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"cartpole_program(max_steps=...) must be a positive int; got "
                         f"{max_steps!r}.")
    env, params = gymnax_cartpole()

    def sample(theta, key):
        dtype = jnp.result_type(theta[-1]["w"])
        k_reset, k_run = jax.random.split(key)
        obs, env_state = env.reset(k_reset, params)

        def one(carry, k):
            obs, env_state, alive = carry
            k_act, k_env = jax.random.split(k)
            o = obs.astype(dtype)
            action = jax.random.categorical(k_act, mlp(theta, o))
            nxt, env_state, _, term, trunc, _ = env.step(k_env, env_state, action, params)
            out = {"obs": o, "action": action, "alive": alive}
            alive = alive * (1.0 - jnp.logical_or(term, trunc).astype(dtype))
            return (nxt, env_state, alive), out

        carry = (obs, env_state, jnp.ones((), dtype))
        return jax.lax.scan(one, carry, jax.random.split(k_run, max_steps))[1]

    def log_prob(theta, x):
        logp = jax.nn.log_softmax(mlp(theta, x["obs"]), axis=-1)
        picked = jnp.take_along_axis(logp, x["action"][:, None], axis=-1)[:, 0]
        return x["alive"] * picked

    def cost(x):
        return -x["alive"]

    return sp.program(log_prob, sample, cost, num_steps=max_steps)


def value_features(x, max_steps: int) -> jax.Array:
    """What the value function reads at step t: the observation before the action at t (it
    depends only on earlier actions) and the time left, ``(T, 5)``."""
    t = jnp.arange(max_steps, dtype=x["obs"].dtype)
    return jnp.concatenate([x["obs"], (1.0 - t / max_steps)[:, None]], axis=-1)


class Method(NamedTuple):
    """An estimator to compare: ``estimator``, its initial ``state``, and ``fit`` (the learned
    value function's regression step, or ``None``)."""

    name: str
    estimator: sg.Estimator
    state: Any
    fit: Optional[Callable]


def make_method(name: str, program: sp.Program, theta, *, num_episodes: int, value_key=None,
                value_hidden: int = 32, value_learning_rate: float = 1e-2, decay: float = 0.9
                ) -> Method:
    r"""The estimator named in :data:`METHODS` for ``program`` at the initial ``theta``, for
    batches of ``num_episodes`` episodes.

    ``causal_loo`` is the per-step leave-one-out baseline over the batch, written as
    ``sp.group_leave_one_out(num_episodes)`` (one group = the whole batch: the same estimator
    as ``sp.leave_one_out()`` up to rounding, with one reverse pass instead of T + 2).
    ``causal_moving_average`` uses ``sp.moving_average(decay)``; ``causal_value`` a learned
    :math:`V_\phi(s_t, t)` (an MLP on the observation and the time left, trained by its
    ``fit`` on the episodes after each estimate)."""
    if name == "reinforce":
        return Method(name, sg.score_function(), (), None)
    if name == "reinforce_loo":
        est = sg.score_function(baseline=sg.baselines.leave_one_out())
        return Method(name, est, est.init(theta), None)
    if name == "causal":
        return Method(name, program.estimator(), (), None)
    if name == "causal_loo":
        return Method(name, program.estimator(sp.group_leave_one_out(num_episodes)), (), None)
    if name == "causal_moving_average":
        est = program.estimator(sp.moving_average(decay))
        return Method(name, est, est.init(theta), None)
    if name == "causal_value":
        t = program.num_steps
        dtype = jnp.result_type(theta[-1]["w"])
        phi = init_mlp(jax.random.key(0) if value_key is None else value_key,
                       (5, value_hidden, 1), last_scale=1.0, dtype=dtype)

        def fn(phi, x):  # V(s_t, t) for live steps; 0 once the episode has ended (G_t = 0)
            return x["alive"] * mlp(phi, value_features(x, t))[:, 0] * (-t / 2)

        base, fit = sp.value_function(fn, phi, optax.adam(value_learning_rate))
        est = program.estimator(base)
        return Method(name, est, est.init(theta), fit)
    raise ValueError(f"unknown method {name!r}; one of {METHODS}.")


def rollouts(program: sp.Program, theta, key, num_episodes: int) -> sp.Steps:
    """``num_episodes`` independent episodes (stacked :class:`~scoregrad.programs.Steps`)."""
    keys = jax.random.split(key, num_episodes)
    return jax.vmap(program.family.sample, in_axes=(None, 0))(theta, keys)


def _step_costs(program: sp.Program, steps: sp.Steps) -> jax.Array:
    """Per-step costs (N, T) of stacked episodes: -alive."""
    return -steps.x["alive"]


def gradient_samples(program: sp.Program, theta, key, methods: dict, *, num_episodes: int,
                     num_replicates: int) -> dict:
    """Independent gradient estimates at a fixed ``theta``: replicate i draws ``num_episodes``
    episodes with ``fold_in(key, i)`` and every method estimates the gradient of the expected
    cost (minus the return) from those same episodes (common random numbers).

    Args:
      methods: name -> :class:`Method` (their states used as given, not updated).

    Returns:
      name -> ``(num_replicates, D)`` array of flattened gradients (D = number of parameters),
      and ``"returns"`` -> ``(num_replicates,)`` mean returns.
    """
    flat = lambda g: jnp.concatenate([jnp.ravel(a) for a in jax.tree_util.tree_leaves(g)])

    @jax.jit
    def one(i):
        steps = rollouts(program, theta, jax.random.fold_in(key, i), num_episodes)
        out = {name: flat(sg.estimate_grad_from_samples(
            program.f, program.family, theta, steps, estimator=m.estimator, state=m.state).grad)
            for name, m in methods.items()}
        out["returns"] = jnp.mean(jnp.sum(steps.x["alive"], axis=-1))
        return out

    rows = [one(i) for i in range(num_replicates)]
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


class TrainCurve(NamedTuple):
    """A training run: the final ``theta``; per iteration the mean ``returns`` of its episodes
    (before the update) and the cumulative ``env_steps`` consumed (live steps, this iteration's
    included)."""

    theta: PyTree
    returns: jax.Array
    env_steps: jax.Array


def train(program: sp.Program, method_name: str, key, *, num_iters: int = 100,
          num_episodes: int = 16, learning_rate: float = 1e-2, hidden: int = 32,
          theta=None) -> TrainCurve:
    """Adam on the expected return with the named estimator (:data:`METHODS`), one jitted
    ``lax.scan``: each iteration draws ``num_episodes`` episodes, estimates the gradient from
    them (:func:`scoregrad.estimate_grad_from_samples`; a stateful baseline's state threaded,
    the value function fitted on the same episodes after the estimate) and takes a step.
    ``key`` seeds the policy's initialization (``fold_in(key, 0)``) and the episodes. It
    may be a batch of keys under ``jax.vmap``.

    Example (not run as a doctest: it needs gymnax)::

      prog = rp.cartpole_program(200)
      curves = jax.jit(jax.vmap(lambda k: rp.train(prog, "causal_moving_average", k,
                                                   num_iters=80, num_episodes=8)))(
          jax.random.split(jax.random.key(0), 10))   # 10 seeds: curves.returns is (10, 80)
    """
    if theta is None:
        theta = init_mlp(jax.random.fold_in(key, 0), (4, hidden, 2))
    method = make_method(method_name, program, theta, num_episodes=num_episodes,
                         value_key=jax.random.fold_in(key, 1))
    opt = optax.adam(learning_rate)

    def step(carry, i):
        th, opt_state, st, env_steps = carry
        steps = rollouts(program, th, jax.random.fold_in(jax.random.fold_in(key, 2), i),
                         num_episodes)
        r = sg.estimate_grad_from_samples(program.f, program.family, th, steps,
                                          estimator=method.estimator, state=st)
        st = r.state
        if method.fit is not None:
            st, _ = method.fit(st, steps.x, _step_costs(program, steps))
        updates, opt_state = opt.update(r.grad, opt_state, th)  # minimizes the cost
        live = jnp.sum(steps.x["alive"])
        env_steps = env_steps + live
        return (optax.apply_updates(th, updates), opt_state, st, env_steps), \
            (live / num_episodes, env_steps)

    carry = (theta, opt.init(theta), method.state, jnp.zeros((), jnp.result_type(float)))
    (th, _, _, _), (returns, env_steps) = jax.lax.scan(step, carry, jnp.arange(num_iters))
    return TrainCurve(th, returns, env_steps)
