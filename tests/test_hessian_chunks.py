"""jax.hessian (and third derivatives) of sg.expectation at any chunking, against enumeration.

Regression for a silent fault: the magic box's derivative rule called the box itself (a
recursive ``custom_jvp``), and JAX dropped the higher-order tangents of every chunk that ran
inside the engine's ``lax.scan``: only the chunk outside the loop contributed, so the Hessian
shrank with the number of chunks (0.015 for 0.057 at ``chunk_size=500``, exactly 0 for rloo(2)).
The tests that existed used 128 draws, one chunk, and never saw it.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stats_util import assert_power, assert_unbiased, replicate_stats

import scoregrad as sg

THETA = (0.3, -0.5)
CENTRE = (0.45, 0.2)
FAM = sg.families.bernoulli()


def _f(b):
    return jnp.sum((b - jnp.asarray(CENTRE, b.dtype)) ** 2) + b[0] * b[1]


def _f_theta(b, theta):
    """An f that closes over theta: the Hessian has pathwise and mixed DiCE terms."""
    return _f(b) + 0.3 * jnp.sum(theta * b) + 0.2 * jnp.sum(theta**2) * b[0]


def _exact(theta, closes_over_theta=False):
    total = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=2):
        b = jnp.asarray(bits, theta.dtype)
        fb = _f_theta(b, theta) if closes_over_theta else _f(b)
        total = total + jnp.exp(FAM.log_prob(theta, b)) * fb
    return total


ESTIMATORS = {
    "score": lambda: sg.score_function(),
    "score_loo": lambda: sg.score_function(baseline=sg.baselines.leave_one_out()),
    "rloo2": lambda: sg.rloo(2),
}


def _loss(est, n, chunk, closes_over_theta=False):
    def loss(theta, key):
        f = (lambda b: _f_theta(b, theta)) if closes_over_theta else _f
        return sg.expectation(f, FAM, theta, key, num_samples=n, estimator=est,
                              chunk_size=chunk, nan_policy="propagate")
    return loss


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_hessian_and_third_derivative_invariant_to_chunk_size(x64, name):
    """Same key, same draws: every chunking (one chunk, several, a remainder, above the automatic
    split at 4,096 units) gives the same Hessian and third derivative to rounding."""
    est = ESTIMATORS[name]()
    theta = jnp.asarray(THETA)
    key = jax.random.key(3)
    n = 8_200  # above the automatic chunk split (4,096 units), with a remainder
    outs = {}
    for chunk in (None, 500, 7):
        loss = _loss(est, n, chunk)
        h = jax.jit(jax.hessian(loss))(theta, key)
        t3 = jax.jit(jax.jacfwd(jax.jacrev(jax.jacrev(loss))))(theta, key) if chunk != 500 else h
        outs[chunk] = (np.asarray(h), np.asarray(t3))
    ref_h, ref_t = outs[None]
    assert abs(ref_h[0, 1]) > 1e-3, "the off-diagonal must not vanish"
    for chunk, (h, t3) in outs.items():
        np.testing.assert_allclose(h, ref_h, rtol=1e-9, atol=1e-12, err_msg=f"chunk {chunk}")
        if chunk != 500:
            np.testing.assert_allclose(t3, ref_t, rtol=1e-9, atol=1e-12, err_msg=f"chunk {chunk}")


@pytest.mark.statistical
@pytest.mark.parametrize("name,chunk,closes", [
    ("score", None, False), ("score", 333, True), ("score_loo", 333, False),
    ("rloo2", 333, True),
    pytest.param("score_loo", 333, True, marks=pytest.mark.slow),
    pytest.param("rloo2", None, False, marks=pytest.mark.slow),
])
def test_hessian_unbiased_against_enumeration_at_several_chunkings(x64, name, chunk, closes):
    """Also with an f that closes over theta (the product rule's mixed terms: a box whose
    value's derivative was lost would miss them)."""
    est = ESTIMATORS[name]()
    theta = jnp.asarray(THETA)
    truth = np.asarray(jax.hessian(lambda t: _exact(t, closes))(theta))
    loss = _loss(est, 4_200, chunk, closes)  # one automatic chunk would be 4,096 units: split
    reps = 64
    hs = jax.jit(jax.vmap(jax.hessian(loss), in_axes=(None, 0)))(
        theta, jax.random.split(jax.random.key(11), reps))
    mean, se = replicate_stats(np.asarray(hs))
    what = f"hessian of {name} at chunk {chunk}, f closes over theta: {closes}"
    assert_unbiased(mean, se, truth, what=what)
    # Power: the fault this guards against lost >= half of the off-diagonal at two chunks.
    assert_power(se[0, 1], 0.5 * abs(truth[0, 1]) / 5, what=what)
