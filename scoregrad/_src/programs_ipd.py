"""The iterated prisoner's dilemma between two memory-one agents, as two sequential programs
(the DiCE/LOLA benchmark game)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scoregrad._src.programs import Program, program

__all__ = ["IPD_COSTS", "iterated_prisoners_dilemma"]

IPD_COSTS = ((1.0, 1.0), (3.0, 0.0), (0.0, 3.0), (2.0, 2.0))
"""Cost (negative payoff) to (agent 1, agent 2) for the joint actions CC, CD, DC, DD (row
``2 * a1 + a2``; 0 = cooperate, 1 = defect): both cooperate 1 each, a lone defector 0 and the
sucker 3, both defect 2 each."""


def _logits(theta, actions):
    """Each agent's logit of defecting at every step, from its memory-one state: 0 at the
    first step, else 1 + 2 * (own last action) + (other's last action)."""
    prev = jnp.concatenate([jnp.zeros((1, 2), actions.dtype), actions[:-1]], axis=0)
    first = jnp.arange(actions.shape[0]) == 0
    s1 = jnp.where(first, 0, 1 + 2 * prev[:, 0] + prev[:, 1])
    s2 = jnp.where(first, 0, 1 + 2 * prev[:, 1] + prev[:, 0])
    return theta["agent1"][s1], theta["agent2"][s2]


def iterated_prisoners_dilemma(num_steps: int, *, discount: float = 1.0
                               ) -> tuple[Program, Program]:
    r"""The iterated prisoner's dilemma as two programs: agent 1's costs and agent 2's.

    theta is ``{"agent1": (5,), "agent2": (5,)}``: each agent's logits of defecting in its five
    memory-one states (the first step; then its own and the other's last actions CC, CD, DC,
    DD). Step t draws both agents' actions (a draw is an int32 array ``(T, 2)``, 1 = defect);
    its log-probability is the sum of theirs. Agent i's cost at step t is
    :math:`\gamma^t` times its negative payoff (:data:`IPD_COSTS`). Both programs share one
    family, so LOLA's :math:`\partial^2 V_1 / \partial\theta_1 \partial\theta_2` is
    ``jax.hessian`` of :func:`scoregrad.expectation` on the first.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> import scoregrad.programs as sp
      >>> p1, p2 = sp.iterated_prisoners_dilemma(10)
      >>> theta = {"agent1": jnp.zeros(5), "agent2": jnp.zeros(5)}
      >>> v = sg.expectation(p1.f, p1.family, theta, jax.random.key(0), num_samples=1000,
      ...                    estimator=p1.estimator())
      >>> bool(abs(v - 15.0) < 0.5)  # random play: mean cost 1.5 per step
      True

    References:
      Foerster et al., "Learning with Opponent-Learning Awareness", AAMAS 2018.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"iterated_prisoners_dilemma: num_steps must be a positive int; got "
                         f"{num_steps!r}.")

    def log_prob(theta, actions):
        l1, l2 = _logits(theta, actions)
        a = actions.astype(l1.dtype)

        def lp(logit, x):
            return x * jax.nn.log_sigmoid(logit) + (1 - x) * jax.nn.log_sigmoid(-logit)

        return lp(l1, a[:, 0]) + lp(l2, a[:, 1])

    def sample(theta, key):
        def step(prev, inp):
            t, k = inp
            s1 = jnp.where(t == 0, 0, 1 + 2 * prev[0] + prev[1])
            s2 = jnp.where(t == 0, 0, 1 + 2 * prev[1] + prev[0])
            logits = jnp.stack([theta["agent1"][s1], theta["agent2"][s2]])
            a = jax.random.bernoulli(k, jax.nn.sigmoid(logits)).astype(jnp.int32)
            return a, a

        keys = jax.random.split(key, num_steps)
        steps = (jnp.arange(num_steps), keys)
        return jax.lax.scan(step, jnp.zeros((2,), jnp.int32), steps)[1]

    table = jnp.asarray(IPD_COSTS)

    def cost(agent):
        def c(actions):
            per = table[2 * actions[:, 0] + actions[:, 1], agent]
            return per * jnp.asarray(discount, per.dtype) ** jnp.arange(num_steps)
        return c

    return (program(log_prob, sample, cost(0), num_steps=num_steps),
            program(log_prob, sample, cost(1), num_steps=num_steps))
