"""Applications rebuilt on sequential programs (scoregrad.examples.finance_programs,
scoregrad.examples.rl_programs): a discretely monitored up-and-out barrier call whose drift
sensitivity is checked against enumeration of the binomial walk, with per-date credit against
the whole-path estimator; CartPole (gymnax) with an MLP policy, reward-to-go against trajectory
REINFORCE on the same episodes, and a short training run."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stats_util import (
    assert_above,
    assert_below,
    assert_power,
    assert_rejects,
    assert_unbiased,
    variance_ratio,
)

import scoregrad as sg
import scoregrad.programs as sp
from scoregrad.examples import finance_programs as fp

MU = 0.05
OPTION = fp.BarrierCall(num_dates=6)  # rebate 5 paid at the knock-out date


# ---------------------------------------------------------------- barrier: exact answers

def _lattice_sensitivity(option, h=1e-5):
    """dV/dmu by a central difference of the lattice price (numpy, float64)."""
    return (fp.continuation_values(option, MU + h)[0, 0]
            - fp.continuation_values(option, MU - h)[0, 0]) / (2 * h)


def test_barrier_enumeration_matches_the_lattice(x64):
    """Two independent exact prices agree: the sum over the 2^T paths of the program's own
    log_prob and f, and backward induction on the recombining lattice; the drift sensitivity
    (jax.grad of the enumeration) agrees with a central finite difference of the lattice."""
    price = float(fp.exact_price(OPTION, MU))
    np.testing.assert_allclose(price, fp.continuation_values(OPTION, MU)[0, 0], rtol=1e-12)
    np.testing.assert_allclose(float(fp.exact_drift_sensitivity(OPTION, MU)),
                               _lattice_sensitivity(OPTION), rtol=1e-6)
    # the barrier and the rebate matter: the named wrong answers below are far from the truth
    truth = _lattice_sensitivity(OPTION)
    assert abs(truth - _lattice_sensitivity(OPTION._replace(rebate=0.0))) > 1
    assert abs(truth - _lattice_sensitivity(OPTION._replace(barrier=1e9))) > 1


def _paths(t):
    return jnp.asarray(list(itertools.product([0.0, 1.0], repeat=t)))


def _per_path(prog, ests, option):
    """Every path's single-path gradient under each estimator (name -> estimator) and every
    path's probability (exact enumeration), in one compiled program."""
    paths = _paths(option.num_dates)
    steps = jax.vmap(lambda x: sp.Steps(x, jnp.ones(option.num_dates)))(paths)
    mu = jnp.float64(MU)

    @jax.jit
    @jax.vmap
    def one(s):
        one_path = jax.tree_util.tree_map(lambda a: a[None], s)
        grads = {name: sg.estimate_grad_from_samples(prog.f, prog.family, mu, one_path,
                                                     estimator=est, state=est.init(mu)).grad
                 for name, est in ests.items()}
        return grads, jnp.exp(prog.family.log_prob(mu, s))

    grads, probs = one(steps)
    return {k: np.asarray(v) for k, v in grads.items()}, np.asarray(probs)


def test_barrier_per_date_credit_exact_mean_and_variance(x64):
    """By enumeration of the 64 paths (T = 6): per-date credit, per-date credit with the exact
    continuation-value baseline and the whole-path estimator all have the exact drift
    sensitivity as their mean, and per-date credit has strictly less per-path variance than
    the whole path (the baseline less again)."""
    prog = fp.barrier_program(OPTION)
    truth = float(fp.exact_drift_sensitivity(OPTION, MU))  # jax.grad of the enumeration
    ests = {"whole": sg.score_function(), "per_date": prog.estimator(),
            "value": prog.estimator(fp.exact_value_baseline(OPTION, MU))}
    grads, p = _per_path(prog, ests, OPTION)
    var = {}
    for name, g in grads.items():
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
        mean = p @ g
        np.testing.assert_allclose(mean, truth, rtol=1e-10)
        var[name] = p @ (g - mean) ** 2
    assert var["per_date"] < 0.95 * var["whole"], var
    assert var["value"] < 0.5 * var["per_date"], var


def test_barrier_telescoped_credit_is_exact_too(x64):
    """The knock-out (telescoped intrinsic value) decomposition sums to the same payoff and its
    per-date estimator has the exact mean (its variance is higher: see the benchmark)."""
    prog = fp.barrier_program(OPTION, credit="knockout")
    g, p = _per_path(prog, {"per_date": prog.estimator()}, OPTION)
    np.testing.assert_allclose(p @ g["per_date"], _lattice_sensitivity(OPTION), rtol=1e-6)
    paths = _paths(OPTION.num_dates)
    a = jax.vmap(lambda x: fp.barrier_program(OPTION).f(sp.Steps(x, jnp.ones(6))))(paths)
    b = jax.vmap(lambda x: prog.f(sp.Steps(x, jnp.ones(6))))(paths)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- barrier: Monte Carlo

@pytest.mark.statistical
def test_barrier_monte_carlo_unbiased_with_power(x64):
    """estimate_grad with per-date credit (T = 6, 4,096 paths): within 5 SE of the enumerated truth, and the
    same check rejects the answers without the rebate and without the barrier."""
    prog = fp.barrier_program(OPTION)
    r = sg.estimate_grad(prog.f, prog.family, jnp.float64(MU), jax.random.key(0),
                         num_samples=2**12, estimator=prog.estimator())
    truth = _lattice_sensitivity(OPTION)  # = the enumeration (test above)
    assert_unbiased(r.grad, r.stderr, truth, what="drift sensitivity, per-date credit")
    assert_unbiased(r.value, r.value_stderr, fp.continuation_values(OPTION, MU)[0, 0],
                    what="price")
    assert_power(r.stderr, 0.5, what="SE of the drift sensitivity")
    for wrong in (OPTION._replace(rebate=0.0), OPTION._replace(barrier=1e9)):
        assert_rejects(r.grad, r.stderr, _lattice_sensitivity(wrong),
                       what=f"wrong answer {wrong}")


@pytest.mark.statistical
def test_barrier_per_date_variance_below_whole_path_common_random_numbers(x64):
    """T = 32 dates, the same paths for both: per-date credit with the exact continuation-value
    baseline has less variance than the whole path with a leave-one-out baseline, by a 5-SE
    margin; both replicate means agree with each other."""
    option = OPTION._replace(num_dates=32)
    prog = fp.barrier_program(option)
    ests = {"whole_loo": sg.score_function(baseline=sg.baselines.leave_one_out()),
            "value": prog.estimator(fp.exact_value_baseline(option, MU))}
    g = fp.gradient_replicates(option, MU, jax.random.key(2), ests, num_paths=32,
                               num_replicates=400)
    ratio, se = variance_ratio(g["value"][:, None], g["whole_loo"][:, None])
    assert_below(ratio + 5 * se, 1.0, what="var(per-date + value) / var(whole path + LOO)")
    d = g["value"] - g["whole_loo"]
    assert_unbiased(d.mean(), d.std(ddof=1) / np.sqrt(len(d)), 0.0, what="paired difference")


def test_barrier_refusals():
    with pytest.raises(ValueError, match="walk"):
        fp.barrier_program(OPTION._replace(walk="trinomial"))
    with pytest.raises(ValueError, match="credit"):
        fp.barrier_program(OPTION, credit="whole")
    with pytest.raises(ValueError, match="below the barrier"):
        fp.barrier_program(OPTION._replace(spot=130.0))
    with pytest.raises(ValueError, match="binomial"):
        fp.exact_price(OPTION._replace(walk="lognormal"), MU)


# ---------------------------------------------------------------- CartPole

def _cartpole():
    pytest.importorskip("gymnax")
    from scoregrad.examples import rl_programs as rp
    return rp


@pytest.mark.slow
def test_cartpole_program_masks_steps_after_the_episode():
    """alive is non-increasing, the per-step log-probabilities and costs vanish after the end,
    and f is minus the number of live steps."""
    rp = _cartpole()
    prog = rp.cartpole_program(60)
    theta = rp.init_mlp(jax.random.key(0), (4, 16, 2))
    steps = rp.rollouts(prog, theta, jax.random.key(1), 8)
    alive = np.asarray(steps.x["alive"])
    assert np.all(np.diff(alive, axis=1) <= 0) and alive[:, 0].min() == 1
    assert alive[:, -1].min() == 0  # a near-uniform policy drops the pole within 60 steps
    lp = jax.vmap(lambda s: jax.grad(lambda w: prog.family.log_prob(
        theta, s._replace(weights=w)))(s.weights))(steps)
    assert np.all(np.asarray(lp)[alive == 0] == 0) and np.all(np.asarray(lp)[alive == 1] < 0)
    np.testing.assert_allclose(jax.vmap(prog.f)(steps), -alive.sum(1))


@pytest.mark.slow
@pytest.mark.statistical
def test_cartpole_reward_to_go_same_mean_less_variance_than_reinforce():
    """At a fixed MLP, 150 replicates of 8 episodes, every method on the same episodes: the
    paired difference reward-to-go (per-step leave-one-out) minus trajectory REINFORCE has mean
    zero within 5 SE on every coordinate (they estimate the same gradient), the check has power
    against an estimator off by half the gradient, and the total variance ratio is below 1 by
    a 5-SE margin."""
    rp = _cartpole()
    prog = rp.cartpole_program(100)
    theta = rp.init_mlp(jax.random.key(0), (4, 8, 2), last_scale=0.3)
    methods = {name: rp.make_method(name, prog, theta, num_episodes=8)
               for name in ("reinforce", "causal_loo")}
    g = rp.gradient_samples(prog, theta, jax.random.key(4), methods, num_episodes=8,
                            num_replicates=150)
    d = g["causal_loo"] - g["reinforce"]
    mean, se = d.mean(0), d.std(0, ddof=1) / np.sqrt(len(d))
    assert_unbiased(mean, se, np.zeros_like(mean), what="reward-to-go minus REINFORCE")
    assert_rejects(mean, se, -0.5 * g["reinforce"].mean(0), what="half the gradient off")
    da = ((g["causal_loo"] - g["causal_loo"].mean(0)) ** 2).sum(1)
    db = ((g["reinforce"] - g["reinforce"].mean(0)) ** 2).sum(1)
    r = da.mean() / db.mean()
    r_se = (da - r * db).std(ddof=1) / np.sqrt(len(da)) / db.mean()
    assert_below(r + 5 * r_se, 1.0, what="total var(reward-to-go + LOO) / var(REINFORCE)")


@pytest.mark.slow
@pytest.mark.statistical
def test_cartpole_training_improves_the_return():
    """30 Adam iterations of reward-to-go with the per-step moving average (8 episodes each):
    the mean return of the last 5 iterations is well above that of the first 5."""
    rp = _cartpole()
    prog = rp.cartpole_program(200)
    run = jax.jit(lambda k: rp.train(prog, "causal_moving_average", k, num_iters=30,
                                     num_episodes=8))(jax.random.key(0))
    first, last = float(run.returns[:5].mean()), float(run.returns[-5:].mean())
    assert_above(last, 2 * first + 20, what="return after 30 iterations vs before")
    assert np.all(np.diff(np.asarray(run.env_steps)) > 0)
