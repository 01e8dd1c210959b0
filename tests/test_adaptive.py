"""Adaptive sample size inside a compiled while_loop (issue 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stats_util import assert_unbiased, replicate_stats

import scoregrad as sg

FAM = sg.families.normal()


def _f(x):
    return jnp.sum(x**2)


def _theta():
    return {"loc": jnp.array([0.5, -1.0]), "scale": jnp.array([1.0, 0.5])}


def test_meets_target_within_budget_and_matches_fixed_n(x64):
    a = sg.estimate_grad_adaptive(_f, FAM, _theta(), jax.random.key(0), target_stderr=0.05,
                                  max_samples=200_000, chunk_size=128)
    n = int(a.estimate.num_samples)
    assert bool(a.reached_target) and not bool(a.hit_cap)
    assert n < 200_000 and n % 128 == 0
    for s in jax.tree_util.tree_leaves(a.estimate.stderr):
        assert np.all(np.asarray(s) <= 0.05)
    # It stopped at the first chunk that met the target: one chunk fewer did not.
    r = sg.estimate_grad(_f, FAM, _theta(), jax.random.key(0), num_samples=n, chunk_size=128)
    np.testing.assert_allclose(r.grad["scale"], a.estimate.grad["scale"], rtol=1e-10)
    prev = sg.estimate_grad(_f, FAM, _theta(), jax.random.key(0), num_samples=n - 128, chunk_size=128)
    assert max(float(jnp.max(s)) for s in jax.tree_util.tree_leaves(prev.stderr)) > 0.05


def test_hits_cap(x64):
    a = sg.estimate_grad_adaptive(_f, FAM, _theta(), jax.random.key(1), target_stderr=1e-6,
                                  max_samples=1000, chunk_size=100)
    assert bool(a.hit_cap) and int(a.estimate.num_samples) == 1000 and int(a.num_chunks) == 10


@pytest.mark.statistical
def test_unbiased_under_vmap(x64):
    keys = jax.random.split(jax.random.key(2), 64)
    run = jax.jit(jax.vmap(lambda k: sg.estimate_grad_adaptive(
        _f, FAM, _theta(), k, target_stderr=0.1, max_samples=20_000, min_samples=256,
        chunk_size=64).estimate.grad["loc"]))
    m, se = replicate_stats(run(keys))
    assert_unbiased(m, se, 2 * np.asarray(_theta()["loc"]), what="adaptive")


def test_errors():
    with pytest.raises(TypeError, match="cross-fitting"):
        sg.estimate_grad_adaptive(_f, FAM, _theta(), jax.random.key(0), target_stderr=0.1,
                                  max_samples=100, estimator=sg.score_function(sg.baselines.optimal()))
    with pytest.raises(ValueError, match="target_stderr"):
        sg.estimate_grad_adaptive(_f, FAM, _theta(), jax.random.key(0), target_stderr=-1.0,
                                  max_samples=100)
