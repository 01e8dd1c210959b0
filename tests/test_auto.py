"""Estimator auto-selection (issue 5)."""

import jax
import jax.numpy as jnp
import pytest

import scoregrad as sg


def test_excludes_biased_and_inapplicable_and_reports_why():
    theta = {"loc": jnp.array([0.2, -0.1]), "scale": jnp.ones(2)}
    step = lambda x: jnp.sum((x > 0).astype(x.dtype))  # noqa: E731  pathwise is blind to it
    rep = sg.auto(step, sg.families.normal(), theta, jax.random.key(0), num_samples=512,
                  candidates=[sg.score_function(), sg.pathwise(),
                              sg.score_function(sg.baselines.leave_one_out())], repeats=1)
    rows = {r.name: r for r in rep.rows}
    assert not rows["pathwise"].applicable and "disagrees" in rows["pathwise"].note
    assert rep.name in ("score_function", "score_function[leave_one_out]")
    assert "picked" in rep.reason and rep.name in str(rep)


def test_not_applicable_listed_and_smooth_problem_prefers_low_variance():
    rep = sg.auto(lambda x: jnp.sum(x), sg.families.bernoulli(), jnp.zeros(3), jax.random.key(1),
                  num_samples=256, candidates=[sg.pathwise(), sg.score_function(),
                                               sg.score_function(sg.baselines.leave_one_out())],
                  repeats=1)
    rows = {r.name: r for r in rep.rows}
    assert "not applicable" in rows["pathwise"].note
    assert rep.name == "score_function[leave_one_out]"
    est = rep.estimator
    r = sg.estimate_grad(lambda x: jnp.sum(x), sg.families.bernoulli(), jnp.zeros(3),
                         jax.random.key(2), num_samples=64, estimator=est)
    assert r.grad.shape == (3,)


def test_no_candidates():
    with pytest.raises(ValueError, match="candidates"):
        sg.auto(lambda x: jnp.sum(x), sg.families.bernoulli(), jnp.zeros(1), jax.random.key(0),
                candidates=[])
