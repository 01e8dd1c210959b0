"""``value_stderr`` is over the units' mean f values: a unit's f values (an antithetic pair, a
program's per-step costs T * c_t) are not independent draws of f."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stats_util as su

import scoregrad as sg
import scoregrad.programs as sp


def test_antithetic_pair_means_are_exact_for_a_linear_f(x64):
    fam = sg.families.normal()
    th = {"loc": jnp.asarray([0.3]), "scale": jnp.asarray([1.0])}
    f = lambda x: jnp.sum(x)  # noqa: E731 - the pair (x, 2 mu - x) has mean mu exactly
    r = sg.estimate_grad(f, fam, th, jax.random.key(0), num_samples=64,
                         estimator=sg.sampling.antithetic(sg.pathwise()))
    plain = sg.estimate_grad(f, fam, th, jax.random.key(0), num_samples=64,
                             estimator=sg.pathwise())
    np.testing.assert_allclose(r.value, 0.3, rtol=1e-12)
    assert float(r.value_stderr) < 1e-12
    assert float(plain.value_stderr) > 0.05  # what treating the pair as two draws would say


@pytest.mark.statistical
def test_program_value_stderr_matches_the_spread_over_replicates():
    p1, _ = sp.iterated_prisoners_dilemma(num_steps=10)
    th = {"agent1": jnp.zeros(5), "agent2": jnp.zeros(5)}
    est = p1.estimator(sp.leave_one_out())
    run = jax.jit(jax.vmap(lambda k: sg.estimate_grad(p1.f, p1.family, th, k, num_samples=64,
                                                      estimator=est)))
    r = run(jax.random.split(jax.random.key(3), 200))
    spread = float(np.std(np.asarray(r.value), ddof=1))
    ratio = float(np.mean(np.asarray(r.value_stderr))) / spread
    # 200 replicates: the spread's relative SE is 1/sqrt(398) = 0.05; 0.2 is 4 of those
    su.assert_below(abs(ratio - 1.0), 0.2, what="value_stderr / spread - 1")
