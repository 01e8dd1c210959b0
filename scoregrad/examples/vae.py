r"""A discrete VAE: Bernoulli latents on binarized 8×8 digits, trained with the estimator menu.

Model (linear encoder and decoder, as in the REBAR / DisARM experiments):
:math:`q(z \mid x) = \mathrm{Bernoulli}(\sigma(W_e x + b_e))`,
:math:`p(z) = \mathrm{Bernoulli}(1/2)`, :math:`p(x \mid z) = \mathrm{Bernoulli}(\sigma(W_d z + b_d))`.
The ELBO of a minibatch is

.. math:: \mathcal L = \mathbb E_{q(z \mid x)}\big[\log p(x \mid z) + \log p(z)\big] + \mathcal H[q],

with the Bernoulli entropy in closed form. The expectation is over binary latents, so its
encoder gradient needs the score function or one of its discrete-specific successors (RLOO,
ARM/DisARM, REBAR/RELAX) or a biased relaxation (Gumbel-softmax); the decoder's gradient is
pathwise (f closes over the decoder's parameters). The minibatch's latents are one draw of
``sg.families.bernoulli()`` with logits of shape ``(batch, latent_dim)``, so every estimator,
stateful ones included, applies unchanged.

Needs scikit-learn for the digits (``pip install 'scoregrad[examples]'``).

References:
  Kingma and Welling, "Auto-Encoding Variational Bayes", 2014. Mnih and Gregor, "Neural
  Variational Inference and Learning in Belief Networks", 2014. Tucker et al., "REBAR", 2017.
  Grathwohl et al., "Backpropagation through the Void" (RELAX), 2018. Yin and Zhou, "ARM", 2019.
  Dong, Mnih and Tucker, "DisARM", 2020. Jang, Gu and Poole, "Categorical Reparameterization with
  Gumbel-Softmax", 2017.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Optional, cast

import jax
import jax.numpy as jnp
import optax

import scoregrad as sg

__all__ = [
    "VAEResult",
    "default_estimators",
    "elbo",
    "gradient_variance",
    "init_params",
    "load_digits",
    "log_joint",
    "train",
]


class VAEResult(NamedTuple):
    """The outcome of :func:`train`.

    Attributes:
      params: ``{"enc": {"w", "b"}, "dec": {"w", "b"}}``.
      elbo: per step, the sampled minibatch ELBO per example.
      seconds_per_step: wall-clock time of a compiled step (compilation excluded).
      state: the estimator's final state.
    """

    params: dict
    elbo: jax.Array
    seconds_per_step: float
    state: Any


def load_digits(dtype=None) -> jax.Array:
    """scikit-learn's 1797 8×8 digits (bundled), binarized at half intensity: shape (1797, 64)."""
    from sklearn.datasets import load_digits as _load

    x = _load().data / 16.0
    return jnp.asarray(x > 0.5, dtype or jnp.result_type(float))


def init_params(key, *, latent_dim: int = 16, data_dim: int = 64, data=None, dtype=None) -> dict:
    """Small random weights; the decoder bias starts at the data's pixel log-odds if given."""
    dtype = dtype or jnp.result_type(float)
    k1, k2 = jax.random.split(key)
    dec_b = jnp.zeros((data_dim,), dtype)
    if data is not None:
        mean = jnp.clip(jnp.mean(data, axis=0), 1e-3, 1 - 1e-3)
        dec_b = jnp.log(mean / (1 - mean)).astype(dtype)
    return {
        "enc": {"w": 0.01 * jax.random.normal(k1, (data_dim, latent_dim), dtype),
                "b": jnp.zeros((latent_dim,), dtype)},
        "dec": {"w": 0.01 * jax.random.normal(k2, (latent_dim, data_dim), dtype), "b": dec_b},
    }


def _bernoulli_log_prob(logits, x):
    return x * jax.nn.log_sigmoid(logits) + (1 - x) * jax.nn.log_sigmoid(-logits)


def log_joint(dec: dict, x: jax.Array, z: jax.Array) -> jax.Array:
    r""":math:`\sum_b \log p(x_b \mid z_b) + \log p(z_b)`; ``z`` may be relaxed, in [0, 1]."""
    loglik = jnp.sum(_bernoulli_log_prob(z @ dec["w"] + dec["b"], x))
    return loglik + z.size * jnp.log(jnp.asarray(0.5, z.dtype))


def _entropy(logits):
    p = jax.nn.sigmoid(logits)
    return -jnp.sum(p * jax.nn.log_sigmoid(logits) + (1 - p) * jax.nn.log_sigmoid(-logits))


def elbo(params: dict, x: jax.Array, key, *, num_samples: int,
         estimator: Optional[sg.Estimator] = None, state=None):
    """The minibatch ELBO per example, differentiable: ``jax.grad`` of it is the estimator.

    Returns:
      ``(elbo, new_state)``; ``new_state`` is ``state`` for stateless estimators.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from scoregrad.examples import vae
      >>> x = jnp.ones((2, 64))
      >>> p = vae.init_params(jax.random.key(0), latent_dim=4)
      >>> value, _ = vae.elbo(p, x, jax.random.key(1), num_samples=8)
      >>> value.shape
      ()
    """
    est = sg.score_function(sg.baselines.leave_one_out()) if estimator is None else estimator
    logits = x @ params["enc"]["w"] + params["enc"]["b"]
    f = lambda z: log_joint(params["dec"], x, z)  # noqa: E731
    fam = sg.families.bernoulli()
    if sg.bind(est, fam, logits).stateful:
        value, state = sg.expectation_with_state(f, fam, logits, key, state,
                                                 num_samples=num_samples, estimator=est)
    else:
        value = sg.expectation(f, fam, logits, key, num_samples=num_samples, estimator=est)
    return (value + _entropy(logits)) / x.shape[0], state


def default_estimators(temperature: float = 0.5) -> dict:
    """The estimators the comparison runs, by label (only those this scoregrad provides)."""
    ests = {"REINFORCE": sg.score_function(),
            "RLOO": sg.score_function(sg.baselines.leave_one_out())}
    optional = {"ARM": ("arm", ()), "DisARM": ("disarm", ()), "REBAR": ("rebar", (temperature,)),
                "RELAX": ("relax", ()), "Gumbel-softmax": ("gumbel_softmax", (temperature,))}
    for label, (name, args) in optional.items():
        if hasattr(sg, name):
            ests[label] = getattr(sg, name)(*args)
    return ests


def _init_state(est: sg.Estimator, params: dict, batch_size: int):
    logits = jnp.zeros((batch_size, params["enc"]["b"].shape[0]), params["enc"]["b"].dtype)
    return est.init(logits) if sg.bind(est, sg.families.bernoulli(), logits).stateful else None


def train(data: jax.Array, key, *, estimator: sg.Estimator, num_steps: int = 500,
          batch_size: int = 32, num_samples: int = 8, latent_dim: int = 16,
          learning_rate: float = 3e-3) -> VAEResult:
    """Trains the VAE with Adam on random minibatches; the loop is one jitted ``lax.scan``.

    Examples:
      >>> import jax
      >>> import scoregrad as sg
      >>> from scoregrad.examples import vae
      >>> data = vae.load_digits()[:64]
      >>> res = vae.train(data, jax.random.key(0), estimator=sg.disarm(), num_steps=5,
      ...                 batch_size=8, num_samples=4, latent_dim=4)
      >>> res.elbo.shape
      (5,)
    """
    k_init, k_run = jax.random.split(key)
    params = init_params(k_init, latent_dim=latent_dim, data_dim=data.shape[1], data=data)
    opt = optax.adam(learning_rate)
    state0 = _init_state(estimator, params, batch_size)

    def step(carry, t):
        p, opt_state, st = carry
        k_batch, k_est = jax.random.split(jax.random.fold_in(k_run, t))
        idx = jax.random.choice(k_batch, data.shape[0], (batch_size,), replace=False)

        def loss(q):
            value, new_state = elbo(q, data[idx], k_est, num_samples=num_samples,
                                    estimator=estimator, state=st)
            return -value, new_state

        (neg, st), grads = jax.value_and_grad(loss, has_aux=True)(p)
        updates, opt_state = opt.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state, st), -neg

    carry, steps = (params, opt.init(params), state0), jnp.arange(num_steps)
    run = jax.jit(lambda c, s: jax.lax.scan(step, c, s)).lower(carry, steps).compile()
    start = time.perf_counter()
    (params, _, state), curve = jax.block_until_ready(run(carry, steps))
    return VAEResult(params, curve, (time.perf_counter() - start) / num_steps, state)


def gradient_variance(params: dict, x: jax.Array, key, *, estimator: sg.Estimator,
                      num_samples: int, num_replicates: int = 32, state=None) -> jax.Array:
    """Total variance of the encoder-gradient estimate over independent keys (summed over weights).

    ``state`` (for stateful estimators) defaults to a fresh one; pass a trained state to measure
    a trained control variate.
    """
    if state is None:
        state = _init_state(estimator, params, x.shape[0])

    def one(k):
        g = jax.grad(lambda p: elbo(p, x, k, num_samples=num_samples, estimator=estimator,
                                    state=state)[0])(params)
        return g["enc"]

    grads = jax.jit(jax.vmap(one))(jax.random.split(key, num_replicates))
    # the encoder has weight leaves, so the sum is an array, not 0
    return cast(jax.Array,
                sum(jnp.sum(jnp.var(g, axis=0, ddof=1)) for g in jax.tree_util.tree_leaves(grads)))
