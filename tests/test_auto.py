"""Estimator auto-selection (issue 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoregrad as sg


def test_excludes_biased_and_inapplicable_and_reports_why():
    theta = {"loc": jnp.array([0.2, -0.1]), "scale": jnp.ones(2)}
    step = lambda x: jnp.sum((x > 0).astype(x.dtype))  # noqa: E731  pathwise is blind to it
    rep = sg.auto(step, sg.families.normal(), theta, jax.random.key(0), num_samples=512,
                  candidates=[sg.score_function(), sg.pathwise(),
                              sg.score_function(sg.baselines.leave_one_out())], repeats=1)
    rows = {r.name: r for r in rep.rows}
    # Refused at trace time: f's derivative in x is structurally zero (before the pilot batch's
    # disagreement check would have caught it).
    assert not rows["pathwise"].applicable and "structurally zero" in rows["pathwise"].note
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


def test_choice_is_a_function_of_the_key_not_of_timings():
    theta = {"loc": jnp.ones(2), "scale": jnp.ones(2)}
    cands = [sg.score_function(), sg.score_function(sg.baselines.leave_one_out()), sg.pathwise()]
    a = sg.auto(lambda x: jnp.sum(x**2), sg.families.normal(), theta, jax.random.key(3),
                num_samples=128, candidates=cands)
    b = sg.auto(lambda x: jnp.sum(x**2), sg.families.normal(), theta, jax.random.key(3),
                num_samples=128, candidates=cands)
    assert a.cost == "evaluations" and a.name == b.name == "pathwise"
    # default cost model: num_samples evaluations of f, no timing at all
    for ra, rb in zip(a.rows, b.rows, strict=True):
        assert ra.cost == 128.0 and np.isnan(ra.seconds)
        assert ra.work_normalized_variance == rb.work_normalized_variance
        assert ra.work_normalized_variance == ra.total_variance * 128.0
    assert "evaluations of f" in a.reason


def test_time_cost_is_opt_in_and_reports_spread():
    theta = {"loc": jnp.ones(2), "scale": jnp.ones(2)}
    rep = sg.auto(lambda x: jnp.sum(x**2), sg.families.normal(), theta, jax.random.key(3),
                  num_samples=128, candidates=[sg.score_function(), sg.pathwise()],
                  cost="time", repeats=3)
    assert rep.cost == "time"
    for r in rep.rows:
        assert r.seconds > 0 and r.seconds_iqr >= 0 and r.cost == r.seconds
    assert rep.name in {"pathwise", "score_function"} and "IQR" in rep.reason


@pytest.mark.parametrize("kwargs, match", [
    ({"cost": "flops"}, "cost"), ({"cost": "time", "repeats": 1}, "repeats >= 3"),
    ({"repeats": 0}, "repeats"),
])
def test_bad_cost_or_repeats(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sg.auto(lambda x: jnp.sum(x), sg.families.bernoulli(), jnp.zeros(1), jax.random.key(0),
                candidates=[sg.score_function()], **kwargs)


def test_default_candidates_for_discrete_families_include_rloo_and_disarm():
    from scoregrad._src.auto import default_candidates

    names = [e.name for e in default_candidates(sg.families.bernoulli(), 256)]
    assert "rloo(4)" in names and "disarm" in names, names
    names = [e.name for e in default_candidates(sg.families.categorical(), 256, jnp.zeros((2, 3)))]
    assert "rloo(4)" in names and "disarm" not in names, names
    assert "unordered_set(4)" in names and "arsm" in names, names
    names = [e.name for e in default_candidates(sg.families.normal(), 256)]
    assert "rloo(4)" not in names, names
