r"""Policy gradients (REINFORCE) with optax: a multi-armed bandit and gymnax's CartPole.

The policy-gradient theorem is the score-function estimator with the *environment inside the
sampler*: a draw is an action (or a whole episode) together with what the environment returned,
and :math:`\log p(x;\theta)` is the log-probability of the policy's choices. The environment's
own randomness does not depend on :math:`\theta`, so leaving it out of ``log_prob`` changes
``log_prob`` by a constant and leaves every derivative (and DiCE's magic box) unchanged.

* **Bandit**: ``K`` arms with Gaussian rewards; a softmax policy :math:`\pi = \mathrm{softmax}
  (\theta)`; the expected return :math:`J(\theta) = \sum_a \pi_a \mu_a` and its gradient
  :math:`\pi \odot (\mu - J)` are exact, so estimators are checked against them.
* **CartPole** (optional extra ``scoregrad[rl]``, gymnax): a linear softmax policy, episodes
  rolled out under ``lax.scan`` inside the family's sampler, trajectory-level REINFORCE.

Baselines: leave-one-out (RLOO, ``sg.baselines.leave_one_out()``) and a moving average of past
returns (``sg.baselines.moving_average(decay)``, stateful, threaded through
:func:`scoregrad.expectation_with_state` like an optimizer state).

References:
  Williams, "Simple statistical gradient-following algorithms for connectionist reinforcement
  learning", 1992. Sutton et al., "Policy Gradient Methods for Reinforcement Learning with
  Function Approximation", 2000. Kool, van Hoof and Welling, "Buy 4 REINFORCE Samples, Get a
  Baseline for Free!", 2019. Lange, "gymnax: A JAX-based Reinforcement Learning Environment
  Library", 2022.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

import scoregrad as sg

__all__ = [
    "Bandit",
    "TrainResult",
    "bandit_family",
    "cartpole_family",
    "episode_return",
    "exact_policy_gradient",
    "expected_return",
    "learned_bandit_baseline",
    "make_bandit",
    "policy_gradient",
    "train",
    "train_bandit",
    "train_cartpole",
]


class Bandit(NamedTuple):
    """A Gaussian multi-armed bandit: pulling arm ``a`` pays ``means[a] + noise_scale * N(0, 1)``."""

    means: jax.Array
    noise_scale: float


class TrainResult(NamedTuple):
    """The outcome of a training run.

    Attributes:
      theta: the final policy parameters.
      curve: per step, the objective being tracked (the exact expected return for the bandit,
        the mean sampled episode return for CartPole).
      state: the estimator's final state (``()`` for stateless estimators).
    """

    theta: Any
    curve: jax.Array
    state: Any


def make_bandit(num_arms: int = 10, *, key=None, noise_scale: float = 1.0, dtype=None) -> Bandit:
    """A bandit with arm means drawn from N(0, 1) with ``key`` (default ``jax.random.key(0)``).

    Examples:
      >>> from scoregrad.examples import rl
      >>> rl.make_bandit(5).means.shape
      (5,)
    """
    if isinstance(num_arms, bool) or not isinstance(num_arms, int) or num_arms < 2:
        raise ValueError(f"`num_arms` must be an int >= 2; got {num_arms!r}.")
    if not noise_scale >= 0:
        raise ValueError(f"`noise_scale` must be >= 0; got {noise_scale!r}.")
    key = jax.random.key(0) if key is None else key
    dtype = dtype or jnp.result_type(float)
    return Bandit(jax.random.normal(key, (num_arms,), dtype), float(noise_scale))


def bandit_family(bandit: Bandit) -> sg.Family:
    """The law of one pull under the softmax policy with logits theta: ``{"action", "reward"}``.

    ``log_prob`` is the policy's log-probability of the action; the reward noise does not depend
    on theta and is left out (a constant in theta).
    """

    def sample(theta, key):
        k_act, k_rew = jax.random.split(key)
        action = jax.random.categorical(k_act, theta)
        noise = jax.random.normal(k_rew, (), jnp.result_type(theta))
        return {"action": action, "reward": bandit.means.astype(noise.dtype)[action]
                + bandit.noise_scale * noise}

    def log_prob(theta, x):
        return jax.nn.log_softmax(theta)[x["action"]]

    return sg.Family(log_prob=log_prob, sample=sample, reparameterized=False, name="bandit")


def expected_return(theta: jax.Array, bandit: Bandit) -> jax.Array:
    r"""Exact :math:`J(\theta) = \sum_a \mathrm{softmax}(\theta)_a \mu_a`."""
    return jnp.dot(jax.nn.softmax(theta), bandit.means.astype(jnp.result_type(theta)))


def exact_policy_gradient(theta: jax.Array, bandit: Bandit) -> jax.Array:
    r"""Exact :math:`\nabla J = \pi \odot (\mu - J)`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from scoregrad.examples import rl
      >>> b = rl.Bandit(jnp.array([1.0, 0.0]), 1.0)
      >>> rl.exact_policy_gradient(jnp.zeros(2), b).tolist()
      [0.25, -0.25]
    """
    pi = jax.nn.softmax(theta)
    mu = bandit.means.astype(pi.dtype)
    return pi * (mu - jnp.dot(pi, mu))


def _reward(x):
    return x["reward"]


def policy_gradient(theta: jax.Array, bandit: Bandit, key, *, num_samples: int,
                    estimator: Optional[sg.Estimator] = None, state=None) -> sg.GradEstimate:
    """One REINFORCE estimate of the bandit's policy gradient, with standard errors.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from scoregrad.examples import rl
      >>> b = rl.make_bandit(4)
      >>> r = rl.policy_gradient(jnp.zeros(4), b, jax.random.key(1), num_samples=4096)
      >>> err = jnp.abs(r.grad - rl.exact_policy_gradient(jnp.zeros(4), b))
      >>> bool(jnp.all(err < 5 * r.stderr + 1e-6))
      True
    """
    return sg.estimate_grad(_reward, bandit_family(bandit), theta, key, num_samples=num_samples,
                            estimator=estimator, state=state)


def train(f: Callable, family: sg.Family, theta, key, *, num_steps: int, num_samples: int,
          estimator: Optional[sg.Estimator] = None, optimizer=None,
          track: Optional[Callable] = None, fit_baseline: Optional[Callable] = None
          ) -> TrainResult:
    """Maximizes ``E[f(x)]`` over ``theta`` with ``optimizer`` (default ``optax.adam(0.05)``).

    The whole loop is one ``lax.scan`` under ``jax.jit``; stateful estimators thread their state
    through :func:`scoregrad.expectation_with_state`.

    Args:
      f, family, theta: the objective ``E_{p(x; theta)}[f(x)]`` and the initial parameters.
      key: step ``t`` uses ``fold_in(key, t)``.
      num_steps, num_samples: optimizer steps, and draws of ``x`` per step.
      estimator: default ``sg.score_function(baseline=sg.baselines.leave_one_out())``.
      optimizer: an optax ``GradientTransformation``.
      track: ``track(theta) -> scalar`` recorded before each step; default the sampled mean of f.
      fit_baseline: the ``fit`` returned by :func:`scoregrad.baselines.learned` when
        ``estimator`` uses that learned baseline: each step then draws its rollouts explicitly,
        estimates the gradient from them (:func:`scoregrad.estimate_grad_from_samples`) and
        afterwards takes one optimizer step of the baseline on the same rollouts.

    Returns:
      A :class:`TrainResult`.
    """
    est = sg.score_function(baseline=sg.baselines.leave_one_out()) if estimator is None else estimator
    opt = optax.adam(0.05) if optimizer is None else optimizer

    def loss(th, k, st):
        if sg.bind(est, family, th).stateful:
            value, new = sg.expectation_with_state(f, family, th, k, st, num_samples=num_samples,
                                                   estimator=est)
        else:
            value, new = sg.expectation(f, family, th, k, num_samples=num_samples,
                                        estimator=est), st
        return -value, (value, new)

    def from_rollouts(th, k, st):
        assert fit_baseline is not None  # step calls this only when fit_baseline is given
        xs = jax.vmap(family.sample, in_axes=(None, 0))(th, jax.random.split(k, num_samples))
        r = sg.estimate_grad_from_samples(f, family, th, xs, estimator=est, state=st)
        st, _ = fit_baseline(r.state, xs, jax.vmap(f)(xs))
        return jax.tree_util.tree_map(jnp.negative, r.grad), (r.value, st)

    def step(carry, t):
        th, opt_state, st = carry
        k = jax.random.fold_in(key, t)
        if fit_baseline is None:
            grads, (value, st) = jax.grad(loss, has_aux=True)(th, k, st)
        else:
            grads, (value, st) = from_rollouts(th, k, st)
        updates, opt_state = opt.update(grads, opt_state, th)
        tracked = value if track is None else track(th)
        return (optax.apply_updates(th, updates), opt_state, st), tracked

    @jax.jit
    def run(theta):
        carry = (theta, opt.init(theta), est.init(theta))
        (th, _, st), curve = jax.lax.scan(step, carry, jnp.arange(num_steps))
        return TrainResult(th, curve, st)

    return run(theta)


def train_bandit(bandit: Bandit, key, *, num_steps: int = 200, num_samples: int = 16,
                 estimator: Optional[sg.Estimator] = None, learning_rate: float = 0.1,
                 theta=None, fit_baseline: Optional[Callable] = None) -> TrainResult:
    """REINFORCE with Adam on the bandit; ``curve`` is the exact expected return at each step.

    Examples:
      >>> import jax
      >>> from scoregrad.examples import rl
      >>> b = rl.make_bandit(5)
      >>> res = rl.train_bandit(b, jax.random.key(0), num_steps=100)
      >>> bool(res.curve[-1] > res.curve[0])
      True
    """
    theta = jnp.zeros(bandit.means.shape, bandit.means.dtype) if theta is None else theta
    return train(_reward, bandit_family(bandit), theta, key, num_steps=num_steps,
                 num_samples=num_samples, estimator=estimator,
                 optimizer=optax.adam(learning_rate),
                 track=lambda th: expected_return(th, bandit), fit_baseline=fit_baseline)


def learned_bandit_baseline(learning_rate: float = 0.1, dtype=None):
    """A learned baseline for the bandit: a scalar value estimate trained by regression on returns.

    Returns:
      ``(estimator, fit)``: pass ``estimator`` and ``fit_baseline=fit`` to :func:`train_bandit`.
    """
    dtype = dtype or jnp.result_type(float)
    base, fit = sg.baselines.learned(lambda phi, x: phi, jnp.zeros((), dtype),
                                     optax.sgd(learning_rate))
    return sg.score_function(baseline=base), fit


def gymnax_cartpole():
    """gymnax's CartPole-v1 (env, params), or an ImportError naming the extra to install."""
    try:
        import gymnax
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "CartPole needs gymnax: pip install 'scoregrad[rl]' (or pip install gymnax)."
        ) from err
    return gymnax.make("CartPole-v1")


def _policy_logits(theta, obs):
    return obs @ theta["w"] + theta["b"]


def cartpole_family(max_steps: int = 200) -> sg.Family:
    """The law of one CartPole episode (``max_steps`` long) under a linear softmax policy.

    theta is ``{"w": (4, 2), "b": (2,)}``. A draw is ``{"obs", "action", "reward", "alive"}``
    with a leading time axis; steps after the episode ends have ``alive = 0``. ``log_prob`` sums
    the policy's log-probabilities over the live steps (the dynamics do not depend on theta).
    """
    env, params = gymnax_cartpole()

    def sample(theta, key):
        k_reset, k_run = jax.random.split(key)
        obs, env_state = env.reset(k_reset, params)
        dtype = jnp.result_type(theta["w"])

        def one(carry, k):
            obs, env_state, alive = carry
            k_act, k_env = jax.random.split(k)
            action = jax.random.categorical(k_act, _policy_logits(theta, obs.astype(dtype)))
            nxt, env_state, reward, term, trunc, _ = env.step(k_env, env_state, action, params)
            out = {"obs": obs.astype(dtype), "action": action,
                   "reward": reward.astype(dtype) * alive, "alive": alive}
            alive = alive * (1.0 - jnp.logical_or(term, trunc).astype(dtype))
            return (nxt, env_state, alive), out

        carry = (obs, env_state, jnp.ones((), dtype))
        _, traj = jax.lax.scan(one, carry, jax.random.split(k_run, max_steps))
        return traj

    def log_prob(theta, traj):
        logp = jax.nn.log_softmax(_policy_logits(theta, traj["obs"]), axis=-1)
        picked = jnp.take_along_axis(logp, traj["action"][:, None], axis=-1)[:, 0]
        return jnp.sum(traj["alive"] * picked)

    return sg.Family(log_prob=log_prob, sample=sample, reparameterized=False, name="cartpole")


def episode_return(traj) -> jax.Array:
    """The undiscounted return of one CartPole episode (the number of steps balanced)."""
    return jnp.sum(traj["reward"])


def train_cartpole(key, *, num_steps: int = 50, num_samples: int = 16, max_steps: int = 200,
                   estimator: Optional[sg.Estimator] = None, learning_rate: float = 0.05
                   ) -> TrainResult:
    """Trajectory-level REINFORCE on gymnax's CartPole; ``curve`` is the mean sampled return.

    Needs the optional extra ``scoregrad[rl]`` (gymnax).
    """
    dtype = jnp.result_type(float)
    theta = {"w": jnp.zeros((4, 2), dtype), "b": jnp.zeros((2,), dtype)}
    return train(episode_return, cartpole_family(max_steps), theta, key, num_steps=num_steps,
                 num_samples=num_samples, estimator=estimator,
                 optimizer=optax.adam(learning_rate))
