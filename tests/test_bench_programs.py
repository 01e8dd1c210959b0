"""The sequential-program problems of `scoregrad bench` (capability "program") and the causal
credit entries that apply to them: exact answers checked independently, registry selection."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stats_util as su

import scoregrad as sg
import scoregrad.programs as sp
from scoregrad.bench import problems, registry, runner

PROGRAMS = ("sequence_v3_t4", "barrier_t6", "ipd_t4")
CAUSAL = ("causal", "causal+loo")
# every entry that requires nothing but a family: whole-program credit on a program
WHOLE = ("score_function", "score_function+loo", "score_function+ema", "rloo(4)",
         "score_function+optimal")


def _theta(problem, dtype=jnp.float64):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), problem.theta)


def _replicates(problem, est, key, num_samples, replicates=64):
    """(R, P) float64 gradient estimates over independent keys split from ``key``."""
    theta = _theta(problem)
    keys = jax.random.split(key, replicates)
    g = jax.jit(jax.vmap(lambda k: sg.estimate_grad(
        problem.f, problem.family, theta, k, num_samples=num_samples, estimator=est).grad))(keys)
    flat = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(g)
    return np.asarray(flat, np.float64)


def test_program_problems_are_registered():
    assert set(PROGRAMS) <= set(problems.problem_names())
    assert set(PROGRAMS) <= set(runner.SUITES["full"].problems) or \
        runner.SUITES["full"].problems == ("*",)
    assert "barrier_t6" in runner.SUITES["default"].problems
    for name in PROGRAMS:
        p = problems.get_problem(name)
        assert "program" in p.capabilities and p.group == "programs"
        assert isinstance(p.family.sample(_theta(p, jnp.float32), jax.random.key(0)), sp.Steps)


def test_registry_selects_causal_credit_for_program_problems_only():
    for name in problems.problem_names():
        p = problems.get_problem(name)
        chosen = {e.name for e in registry.applicable(p)}
        if "program" in p.capabilities:
            # whole-program credit (any family) and causal credit; nothing that needs a
            # reparameterization, a built-in family kind, a relaxation or a finite support
            assert chosen == set(WHOLE) | set(CAUSAL), (name, chosen)
        else:
            assert not chosen & set(CAUSAL), (name, chosen)
    # the runner plans the rest as not applicable ("n/a" cells), without building them
    cells, skipped = runner.plan(["barrier_t6", "bernoulli_t0.45"],
                                 ["pathwise", "enumerate", "arm", "causal", "causal+loo"], [10])
    assert {(c[0].name, c[1].name) for c in cells} == {
        ("barrier_t6", "causal"), ("barrier_t6", "causal+loo"), ("bernoulli_t0.45", "enumerate"),
        ("bernoulli_t0.45", "arm")}
    assert {(s["problem"], s["estimator"]) for s in skipped} == {
        ("barrier_t6", "pathwise"), ("barrier_t6", "enumerate"), ("barrier_t6", "arm"),
        ("bernoulli_t0.45", "pathwise"), ("bernoulli_t0.45", "causal"),
        ("bernoulli_t0.45", "causal+loo")}
    assert all(s["status"] == "not_applicable" and "program" in s["reason"]
               for s in skipped if s["estimator"].startswith("causal"))


def test_causal_credit_forced_on_a_single_site_problem_is_an_error_cell_not_a_crash():
    cell = runner.run_cell(problems.get_problem("bernoulli_t0.45"),
                           registry.get_estimator("causal"), 10, 4, jnp.float32)
    assert cell["status"] == "error" and "sg.programs.program" in cell["reason"], cell


def _enumerated(family, f, theta, paths):
    """sum over trajectories of p(x) f(x) and its gradient, float64."""
    def expected(th):
        lp = jax.vmap(lambda x: family.log_prob(th, x))(paths)
        return jnp.sum(jnp.exp(lp) * jax.vmap(f)(paths))
    return jax.value_and_grad(expected)(theta)


def test_ipd_answer_equals_the_library_game_enumerated(x64):
    """ipd_t4 is an independent implementation of sp.iterated_prisoners_dilemma(4, 0.96):
    enumerating the library's program (int actions) gives the registry's answer."""
    problem = problems.get_problem("ipd_t4")
    p1, _ = sp.iterated_prisoners_dilemma(4, discount=0.96)
    acts = np.array([np.reshape(a, (4, 2)) for a in itertools.product((0, 1), repeat=8)],
                    np.int32)
    paths = p1.steps(jnp.asarray(acts))
    paths = sp.Steps(paths.x, paths.weights.astype(jnp.float64))
    value, grad = _enumerated(p1.family, p1.f, _theta(problem), paths)
    np.testing.assert_allclose(float(value), problem.exact_value, rtol=1e-6)
    np.testing.assert_allclose(problems.flat(grad), problems.flat(problem.exact_grad),
                               rtol=1e-6, atol=1e-9)


def test_terminal_reward_makes_causal_credit_whole_program_credit(x64):
    """sequence_v3_t4 pays only at the last step: every cost-to-go is the total cost, so on
    the same key causal credit with the per-step leave-one-out baseline is whole-program
    REINFORCE with leave-one-out."""
    p = problems.get_problem("sequence_v3_t4")
    theta, key = _theta(p), jax.random.key(5)

    def grad(name):
        est = registry.get_estimator(name).factory(p)
        return jax.jit(lambda th, k: sg.estimate_grad(p.f, p.family, th, k, num_samples=256,
                                                      estimator=est).grad)(theta, key)

    a, b = grad("score_function+loo"), grad("causal+loo")
    np.testing.assert_allclose(problems.flat(a), problems.flat(b), rtol=1e-9, atol=1e-12)


@pytest.mark.statistical
@pytest.mark.parametrize("entry", CAUSAL)
@pytest.mark.parametrize("name", PROGRAMS)
def test_exact_grad_matches_causal_credit(name, entry, x64):
    """The enumerated gradient against causal credit's mean over 64 x 4,000 programs (float64):
    within 5 SE, with an SE small enough to see a 20% error in any coordinate."""
    p = problems.get_problem(name)
    est = registry.get_estimator(entry).factory(p)
    key = jax.random.fold_in(jax.random.key(17), runner.stable_id(name))
    g = _replicates(p, est, key, 4000)
    mean, se = su.replicate_stats(g)
    exact = problems.flat(p.exact_grad)
    su.assert_unbiased(mean, se, exact, atol=1e-9, what=f"{entry} on {name}")
    su.assert_power(se, 0.2 * np.abs(exact) / 5, what=f"{entry} on {name}")


@pytest.mark.statistical
@pytest.mark.parametrize("whole, causal", [("score_function", "causal"),
                                           ("score_function+loo", "causal+loo")])
@pytest.mark.parametrize("name", ["barrier_t6", "ipd_t4"])
def test_causal_credit_has_less_variance_with_per_step_costs(name, whole, causal, x64):
    """With a cost at every step, causal credit beats whole-program credit on common keys:
    the ratio of total variances (trace of the covariance) plus 5 SE is below 1."""
    p = problems.get_problem(name)
    key = jax.random.fold_in(jax.random.key(23), runner.stable_id(name))
    gw, gc = (_replicates(p, registry.get_estimator(n).factory(p), key, 256, 128)
              for n in (whole, causal))
    # ratio and delta-method SE over paired replicates
    sc, sw = (np.sum((g - g.mean(0)) ** 2, axis=1) for g in (gc, gw))
    total = sc.mean() / sw.mean()
    se_total = (sc - total * sw).std(ddof=1) / np.sqrt(len(sc)) / sw.mean()
    su.assert_below(total + 5 * se_total, 1.0, what=f"{causal} / {whole} on {name}")
