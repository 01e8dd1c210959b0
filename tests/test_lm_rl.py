"""scoregrad.lm_rl: language-model RL losses, checked exactly by enumeration on the toy.

Exact checks enumerate every multiset of K completions per prompt (float64, tolerance 1e-10);
Monte Carlo checks go through tests/stats_util.py with literal keys.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stats_util import assert_power, assert_rejects, assert_unbiased, replicate_stats

import scoregrad.lm_rl as lm

TOL = 1e-10
BETA = 0.1


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@functools.lru_cache(maxsize=None)
def _problem(flat=False):
    """The bias table's problem; ``flat``: parameters of size about 0.3 instead of 0.7, so that every
    prefix state is visited often (Monte Carlo checks: rare states make per-coordinate
    gradient draws so skewed that their 5-SE check is miscalibrated)."""
    with jax.enable_x64(True):
        if not flat:
            return lm.default_problem()
        toy = lm.make_toy()
        # fixed numbers, not drawn from a key: the seed sweep folds its seed into every key, and
        # the problem (how large each loss's bias is) must not change with it
        def params(phase):
            table = 0.5 * np.sin(1.7 * np.arange(3 * toy.num_states * 3) + phase)
            return {"table": jnp.asarray(table.reshape(3, toy.num_states, 3)),
                    "bias": jnp.asarray(0.3 * np.cos(np.arange(3.0) + phase))}
        return toy, params(0.3), params(1.9)


def _loss(preset, **options):
    cfg = lm.config(preset, **options)
    return lambda lp, m, r, **kw: lm.sequence_loss(lp, m, r, config=cfg, **kw)


def _expected(loss, k, flat=False, **kw):
    toy, theta, _ = _problem(flat)
    _, g = jax.jit(lambda th: lm.expected_grad(loss, toy, th, k, **kw))(theta)
    return _flat(g)


def _truth(kl_coef=0.0, flat=False):
    toy, theta, ref = _problem(flat)
    return _flat(lm.true_grad(toy, theta, ref=ref, kl_coef=kl_coef))


def _eg(loss, toy, theta, k, **kw):
    """lm.expected_grad under one jit (eagerly, each of its steps would compile on its own)."""
    return jax.jit(lambda th: lm.expected_grad(loss, toy, th, k, **kw))(theta)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------- exact: which losses are unbiased

UNBIASED = {
    "reinforce": ("reinforce", {}),
    "rloo": ("rloo", {}),
    "ppo_clip_sequence_sum": ("ppo_clip", {"aggregation": "sequence"}),
    "rloo_k1_reward": ("rloo", {"kl_coef": BETA, "kl_estimator": "k1", "kl_in": "reward"}),
    "rloo_k1_reward_to_go": ("rloo", {"kl_coef": BETA, "kl_estimator": "k1",
                                      "kl_in": "reward_to_go"}),
}


@pytest.mark.parametrize("name", sorted(UNBIASED))
@pytest.mark.parametrize("k", [2, 4])
def test_unbiased_losses_exact(x64, name, k):
    preset, options = UNBIASED[name]
    _, _, ref = _problem()
    kl_coef = options.get("kl_coef", 0.0)
    g = _expected(_loss(preset, **options), k, ref=ref if kl_coef else None)
    truth = _truth(kl_coef)
    assert np.linalg.norm(truth) > 0.05  # the target is not trivially small
    np.testing.assert_allclose(g, truth, rtol=0, atol=TOL * np.linalg.norm(truth))


def test_rloo_unbiased_at_k8(x64):
    g = _expected(lm.rloo_loss, 8)
    np.testing.assert_allclose(g, _truth(), rtol=0, atol=TOL)


@pytest.mark.parametrize("k", [2, 4])
def test_dr_grpo_is_the_true_gradient_times_a_constant(x64, k):
    """Dr. GRPO: group mean (own reward included) and constant normaliser T: exactly
    (K - 1) / (K T) times the true gradient; the group-mean baseline alone gives (K - 1) / K."""
    toy, _, _ = _problem()
    t = toy.max_len
    truth = _truth()
    np.testing.assert_allclose(_expected(lm.dr_grpo_loss, k), (k - 1) / (k * t) * truth,
                               rtol=0, atol=TOL)
    np.testing.assert_allclose(_expected(_loss("dr_grpo", normaliser=1.0), k),
                               (k - 1) / k * truth, rtol=0, atol=TOL)
    # and rescaled by K / (K - 1) the group-mean baseline is RLOO's
    assert _rel(_expected(_loss("dr_grpo", normaliser=1.0), k) * k / (k - 1), truth) < TOL


@pytest.mark.parametrize("options", [{}, {"scale": "none"}, {"length_norm": False}],
                         ids=["std_and_length_norm", "length_norm_only", "std_only"])
@pytest.mark.parametrize("k", [2, 4])
def test_grpo_is_biased(x64, options, k):
    """GRPO's std scaling and its 1/|o_i| each bias the direction, not only the scale."""
    g, truth = _expected(_loss("grpo", **options), k), _truth()
    cosine = g @ truth / (np.linalg.norm(g) * np.linalg.norm(truth))
    assert _rel(g, truth) > 0.1
    assert cosine < 0.99


@pytest.mark.parametrize("preset", ["dapo", "gspo", "reinforce_pp", "ppo_clip"])
def test_other_normalisations_are_biased(x64, preset):
    g, truth = _expected(_loss(preset), 4), _truth()
    assert g @ truth / (np.linalg.norm(g) * np.linalg.norm(truth)) < 0.999


def test_gspo_on_policy_expectation_is_grpos(x64):
    """At mu = p, the gradient of (p(o)/mu(o))^(1/|o|) is grad log p(o) / |o|: GRPO's."""
    np.testing.assert_allclose(_expected(lm.gspo_loss, 2), _expected(lm.grpo_loss, 2),
                               rtol=0, atol=TOL)


def test_bias_table_rows_and_verdicts(x64):
    rows = [r for r in lm.TABLE_ROWS if r.label in ("RLOO", "GRPO (std, 1/|o|)",
                                                    "Dr. GRPO (constant T)")]
    cells = lm.bias_table(rows, ks=(2,))
    verdicts = {c["loss"]: lm.verdict(c) for c in cells}
    assert verdicts == {"RLOO": "unbiased", "GRPO (std, 1/|o|)": "biased",
                        "Dr. GRPO (constant T)": "scaled (0.1667)"}
    assert "| RLOO | 2 |" in lm.markdown(cells)


# ---------------------------------------------------------------- KL estimators: closed forms


def _categorical():
    """T = 1: one categorical over 4 tokens, p and a reference q."""
    toy = lm.make_toy(((0, 3),), vocab=4, max_len=1)
    theta = lm.init_params(toy, jax.random.key(3), 0.8)
    ref = lm.init_params(toy, jax.random.key(4), 0.8)
    return toy, theta, ref


def _kl_loss(estimator):
    return lambda lp, m, r, ref_logp: jnp.sum(lm.kl_estimate(lp, ref_logp, estimator) * m)


def test_kl_estimator_values_on_one_categorical(x64):
    toy, theta, ref = _categorical()
    p, q = (jnp.exp(lm.seq_logp(toy, t)[0]) for t in (theta, ref))
    kl_pq = float(jnp.sum(p * jnp.log(p / q)))
    for est, expected in [("k1", kl_pq), ("k3", kl_pq),
                          ("k2", float(0.5 * jnp.sum(p * jnp.log(q / p) ** 2)))]:
        v, _ = _eg(_kl_loss(est), toy, theta, 1, ref=ref)
        np.testing.assert_allclose(float(v), expected, rtol=TOL)
    v2, _ = _eg(_kl_loss("k2"), toy, theta, 1, ref=ref)
    assert abs(float(v2) - kl_pq) > 1e-3 * kl_pq  # k2 is not unbiased for the KL


def test_kl_estimator_gradients_as_loss_on_one_categorical(x64):
    """E[grad k1] = 0, E[grad k2] = grad KL(p||q), E[grad k3] = grad KL(q||p)."""
    toy, theta, ref = _categorical()
    lq = lm.seq_logp(toy, ref)[0]

    def kl_pq(th):
        lp = lm.seq_logp(toy, th)[0]
        return jnp.sum(jnp.exp(lp) * (lp - lq))

    def kl_qp(th):
        return jnp.sum(jnp.exp(lq) * (lq - lm.seq_logp(toy, th)[0]))

    grads = {est: -_flat(_eg(_kl_loss(est), toy, theta, 1, ref=ref)[1])
             for est in ("k1", "k2", "k3")}
    np.testing.assert_allclose(grads["k1"], 0.0, atol=TOL)
    np.testing.assert_allclose(grads["k2"], _flat(jax.grad(kl_pq)(theta)), atol=TOL)
    np.testing.assert_allclose(grads["k3"], _flat(jax.grad(kl_qp)(theta)), atol=TOL)
    assert _rel(grads["k3"], _flat(jax.grad(kl_pq)(theta))) > 0.05  # they differ here


def _state_kls(toy, th, ref):
    """Per prompt and prefix state: KL(p_h || ref_h) and KL(ref_h || p_h)."""
    lp = jax.nn.log_softmax(th["table"] + th["bias"], -1)
    lr = jax.nn.log_softmax(ref["table"] + ref["bias"], -1)
    return (jnp.sum(jnp.exp(lp) * (lp - lr), -1), jnp.sum(jnp.exp(lr) * (lr - lp), -1))


def _visits(toy, th):
    """(P, S): probability that the completion passes through each prefix state."""
    p = jnp.exp(lm.seq_logp(toy, th))  # (P, N)
    onehot = jax.nn.one_hot(toy.states, toy.num_states) * toy.mask[..., None]  # (N, T, S)
    return jnp.einsum("pn,nts->ps", p, onehot)


def test_kl_on_sequences_values_and_gradients(x64):
    """Summed over tokens: E[sum k1] = E[sum k3] = KL of the sequence distributions; in the
    reward k1 gives its gradient; as loss terms k2 and k3 give the gradient of the per-state KLs
    with the state distribution held fixed (k2: forward, k3: reverse), which misses the
    state-distribution term of the sequence KL's gradient."""
    toy, theta, ref = _problem()
    kl_seq = lm.kl(toy, theta, ref)
    for est in ("k1", "k3"):
        v, _ = _eg(_kl_loss(est), toy, theta, 1, ref=ref)
        np.testing.assert_allclose(float(v), float(kl_seq.mean()), rtol=TOL)
    grad_kl = _flat(jax.grad(lambda th: lm.kl(toy, th, ref).mean())(theta))
    d = jax.lax.stop_gradient(_visits(toy, theta))
    frozen = {i: _flat(jax.grad(lambda th, i=i: jnp.sum(d * _state_kls(toy, th, ref)[i])
                                / d.shape[0])(theta)) for i in (0, 1)}
    grads = {est: -_flat(_eg(_kl_loss(est), toy, theta, 1, ref=ref)[1])
             for est in ("k1", "k2", "k3")}
    np.testing.assert_allclose(grads["k1"], 0.0, atol=TOL)
    np.testing.assert_allclose(grads["k2"], frozen[0], atol=TOL)
    np.testing.assert_allclose(grads["k3"], frozen[1], atol=TOL)
    assert _rel(grads["k2"], grad_kl) > 0.05  # the state-distribution term is not small here

    # k1 in the reward (no gradient, times the score) is the sequence KL's gradient
    def k1_reward(lp, m, r, ref_logp):
        k1 = jax.lax.stop_gradient(jnp.sum(lm.kl_estimate(lp, ref_logp, "k1") * m))
        return k1 * jnp.sum(lp * m)

    g = -_flat(_eg(k1_reward, toy, theta, 1, ref=ref)[1])
    np.testing.assert_allclose(g, grad_kl, atol=TOL)


# ---------------------------------------------------------------- ratios, clipping, off-policy


def _sampled_batch(k, key):
    toy, theta, _ = _problem()
    idx, _ = lm.sample(toy, theta, key, k)
    mask = jnp.asarray(toy.mask)[idx]
    rewards = jnp.take_along_axis(jnp.asarray(toy.rewards), idx, 1)
    return toy, theta, idx, mask, rewards


@pytest.mark.parametrize("preset", ["grpo", "dapo", "gspo", "ppo_clip", "reinforce_pp"])
def test_clipping_does_not_change_the_on_policy_gradient(x64, preset):
    toy, theta, idx, mask, rewards = _sampled_batch(6, jax.random.key(11))

    def loss(th, **options):
        lp = jnp.take_along_axis(lm.token_logp(toy, th), idx[..., None], 1)
        return lm.sequence_loss(lp, mask, rewards, config=lm.config(preset, **options))

    clipped = _flat(jax.grad(loss)(theta))
    unclipped = _flat(jax.grad(functools.partial(loss, clip_low=None, clip_high=None))(theta))
    assert np.linalg.norm(clipped) > 1e-3
    np.testing.assert_allclose(clipped, unclipped, rtol=0, atol=1e-14)


@pytest.mark.parametrize("preset", ["reinforce", "rloo"])
def test_off_policy_sequence_ratio_is_unbiased(x64, preset):
    """Samples from a behaviour policy mu != p: the exact importance weight p(o)/mu(o), no clip,
    gives the gradient at p exactly; the per-token ratio (PPO's) does not."""
    toy, theta, ref = _problem()
    mu = jax.tree.map(lambda a, b: 0.6 * a + 0.4 * b, theta, ref)
    truth = _truth()
    for k in (2, 4):
        g = _expected(_loss(preset, ratio="sequence"), k, behaviour=mu)
        np.testing.assert_allclose(g, truth, rtol=0, atol=TOL)
    g_tok = _expected(_loss(preset, ratio="token"), 2, behaviour=mu)
    assert _rel(g_tok, truth) > 0.01


# ---------------------------------------------------------------- aggregation weights


@pytest.mark.parametrize("aggregation,length_norm", [("token", False), ("sequence", True),
                                                     ("sequence", False), ("constant", False)])
def test_aggregation_weights(aggregation, length_norm):
    """d loss / d logp[i, t] = -A_i * w[i, t] with the documented weights."""
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    rewards = jnp.array([1.0, 0.0, 0.5])
    logp = jnp.full((3, 3), -1.0)
    cfg = lm.LossConfig(baseline="mean", aggregation=aggregation, length_norm=length_norm)
    g = jax.grad(lambda lp: lm.sequence_loss(lp, mask, rewards, config=cfg))(logp)
    adv = rewards - rewards.mean()
    lengths = mask.sum(-1)
    w = {"token": jnp.ones(3) / mask.sum(), "sequence": 1 / (3 * lengths) if length_norm
         else jnp.ones(3) / 3, "constant": jnp.ones(3) / (3 * 3)}[aggregation]
    np.testing.assert_allclose(g, -(adv * w)[:, None] * mask, rtol=1e-6)


def test_batched_groups_match_single_groups():
    toy = lm.make_toy()
    theta = lm.init_params(toy, jax.random.key(5))
    idx, _ = lm.sample(toy, theta, jax.random.key(6), 4)
    lp = jnp.take_along_axis(lm.token_logp(toy, theta), idx[..., None], 1)
    mask = jnp.asarray(toy.mask, jnp.float32)[idx]
    rewards = jnp.take_along_axis(jnp.asarray(toy.rewards, jnp.float32), idx, 1)
    for fn in (lm.grpo_loss, lm.gspo_loss):  # token ratio + 1/|o|; sequence ratio
        fn = jax.jit(jax.value_and_grad(fn))
        batched, grad = fn(lp, mask, rewards)
        singles = [fn(lp[g], mask[g], rewards[g]) for g in range(3)]
        assert batched.dtype == grad.dtype == jnp.float32
        np.testing.assert_allclose(batched, np.mean([v for v, _ in singles]), rtol=1e-6)
        np.testing.assert_allclose(grad, np.stack([g for _, g in singles]) / 3, rtol=1e-5,
                                   atol=1e-7)


def test_bad_input_raises():
    lp, mask, r = jnp.zeros((4, 3)), jnp.ones((4, 3)), jnp.zeros(4)
    with pytest.raises(ValueError, match="rewards must have shape"):
        lm.rloo_loss(lp, mask, jnp.zeros(3))
    with pytest.raises(ValueError, match="logp must be a float array"):
        lm.rloo_loss(jnp.zeros(3), mask, r)
    with pytest.raises(ValueError, match="needs ref_logp"):
        lm.grpo_loss(lp, mask, r, kl_coef=0.04)
    with pytest.raises(ValueError, match="ratio='none'"):
        lm.rloo_loss(lp, mask, r, old_logp=lp)
    with pytest.raises(ValueError, match="unknown option"):
        lm.grpo_loss(lp, mask, r, std=False)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        lm.grpo_loss(lp, mask, r, aggregation="mean")
    with pytest.raises(ValueError, match="K >= 2"):
        lm.rloo_loss(lp[:1], mask[:1], r[:1])
    with pytest.raises(ValueError, match="kl estimator"):
        lm.kl_estimate(lp, lp, "k4")


# ---------------------------------------------------------------- Monte Carlo against exact

MC = {
    "rloo": ("rloo", {}),
    "grpo": ("grpo", {}),
    "dapo": ("dapo", {}),
    "gspo": ("gspo", {}),
    "reinforce_pp_kl": ("reinforce_pp", {"kl_coef": BETA}),
    # beta 0.5: the k3 loss term's bias is proportional to beta; at 0.1 the power check's
    # margin (about 6.5 SE, sd 1 over seeds) was too thin
    "rloo_k3_loss": ("rloo", {"kl_coef": 0.5, "kl_estimator": "k3"}),
}


# GSPO's on-policy expectation is GRPO's, and DAPO's is the heaviest to compile: slow set
_MC_SLOW = ("dapo", "gspo")


@pytest.mark.statistical
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _MC_SLOW else n
                                  for n in sorted(MC)])
def test_monte_carlo_matches_exact_expectation(x64, name):
    """R independent batches (K = 4 sampled completions per prompt, token by token): the mean
    update is within 5 SE of the exact expectation, and rejects the true gradient (biased losses)
    or a 20% shorter one (unbiased) along the direction that separates it from the exact one."""
    preset, options = MC[name]
    toy, theta, ref = _problem(flat=True)
    k, reps = 4, 4000
    loss = _loss(preset, **options)
    kl_coef = options.get("kl_coef", 0.0)
    exact = _expected(loss, k, flat=True, ref=ref if kl_coef else None)
    rew_all, mask_all = jnp.asarray(toy.rewards), jnp.asarray(toy.mask)
    ref_all = lm.token_logp(toy, ref)

    def one(key):
        idx, _ = lm.sample(toy, theta, key, k)

        def batch_loss(th):
            lp = jnp.take_along_axis(lm.token_logp(toy, th), idx[..., None], 1)
            rl = jnp.take_along_axis(ref_all, idx[..., None], 1)
            rw = jnp.take_along_axis(rew_all, idx, 1)
            kw = {"ref_logp": rl} if kl_coef else {}
            return jnp.mean(jax.vmap(lambda a, m, r, kw: loss(a, m, r, **kw))(
                lp, mask_all[idx], rw, kw))

        return -jnp.concatenate([x.ravel() for x in jax.tree.leaves(jax.grad(batch_loss)(theta))])

    keys = jax.random.split(jax.random.key(2024), reps)
    draws = np.asarray(jax.jit(jax.vmap(one))(keys))
    mean, se = replicate_stats(draws)
    assert_unbiased(mean, se, exact, atol=1e-12, what=f"{name} MC vs exact")
    assert_power(se, 0.01, what=f"{name} SE")
    truth = _truth(kl_coef, flat=True)
    biased = _rel(exact, truth) > TOL
    wrong = truth if biased else 0.8 * truth
    # power along the direction that separates the right answer from the wrong one
    u = (exact - wrong) / np.linalg.norm(exact - wrong)
    pmean, pse = replicate_stats(draws @ u)
    assert_rejects(pmean, pse, wrong @ u,
                   what=f"{name} rejects {'the true gradient' if biased else '0.8 x truth'}")


@pytest.mark.statistical
def test_sampler_matches_enumerated_probabilities(x64):
    toy, theta, _ = _problem(flat=True)  # every completion has probability > 0.01
    n = 20000
    idx, tokens = lm.sample(toy, theta, jax.random.key(99), n)
    np.testing.assert_array_equal(np.asarray(tokens), toy.tokens[np.asarray(idx)])
    freq = np.stack([np.bincount(np.asarray(i), minlength=toy.tokens.shape[0]) for i in idx]) / n
    p = np.exp(np.asarray(lm.seq_logp(toy, theta)))
    assert_unbiased(freq, np.sqrt(p * (1 - p) / n), p, what="completion frequencies")
