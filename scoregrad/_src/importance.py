r"""Importance-weighted score-function estimators: draws from a proposal q (off-policy RL, reuse
of samples across optimizer steps), plain and self-normalized, with effective sample size.

.. math::
   \nabla_\theta \mathbb{E}_p[f] = \mathbb{E}_q\big[w(x)\, f(x)\, \nabla_\theta \log p(x;\theta)\big],
   \qquad w = p(x;\theta)/q(x).

References:
  Owen, "Monte Carlo theory, methods and examples", 2013, ch. 9 (importance sampling,
  self-normalization, effective sample size). Kong, "A note on importance sampling using
  standardized weights", 1992. Precup, Sutton and Singh, "Eligibility traces for off-policy
  policy evaluation", ICML 2000. Jie and Abbeel, "On a connection between importance sampling
  and the likelihood ratio policy gradient", NeurIPS 2010.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from scoregrad._src import engine, policy, stats, validation
from scoregrad._src.base import Estimator, Plan, UnitOut, fixed
from scoregrad._src.family import Family

PyTree = Any


def _check_proposal_log_prob(proposal, proposal_theta, x_struct) -> None:
    lq = validation.traced_struct(
        proposal.log_prob, (proposal_theta, x_struct), "proposal.log_prob(proposal_theta, x)",
        "Check that `proposal_theta` has the structure `proposal` expects.")
    validation.check_scalar_float(
        lq, "proposal.log_prob(proposal_theta, x)",
        "It must return the log-density of ONE draw; sum over independent coordinates.")


def _check_proposal(proposal, who):
    if not isinstance(proposal, Family):
        raise TypeError(f"{who}: `proposal` must be a scoregrad.Family (the distribution q that "
                        f"drew the samples); got {type(proposal).__name__}.")


def _check_proposal_theta(proposal_theta, who):
    """``proposal_theta`` must be a non-empty pytree of floating-point arrays (q's parameters)."""
    leaves = jax.tree_util.tree_leaves_with_path(proposal_theta)
    if not leaves:
        raise ValueError(f"{who}: `proposal_theta` has no array leaves; pass the parameters of "
                         "the proposal q, e.g. proposal_theta=jnp.zeros(3).")
    for path, leaf in leaves:
        name = "proposal_theta" + jax.tree_util.keystr(path)
        try:
            dtype = jnp.result_type(leaf)
        except TypeError:
            raise TypeError(f"{who}: `{name}` is a {type(leaf).__name__} ({leaf!r:.40}); "
                            "proposal_theta must be a pytree of floating-point arrays.") from None
        if isinstance(leaf, bool) or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{who}: `{name}` has dtype {dtype}; the proposal's parameters must "
                            "be floating point. Cast them, e.g. jnp.asarray(value, jnp.float32).")


def _proposal_draw(proposal, proposal_theta, key, who):
    """The form of one draw of q (``key``: what ``proposal.sample`` is given)."""
    return validation.traced_struct(
        proposal.sample, (proposal_theta, key), f"{who}: proposal.sample(proposal_theta, key)",
        "Check that `proposal_theta` has the structure `proposal` expects (its parameters, not "
        "the target's).",
    )


def _check_draws_match(q_draw, p_draw, who):
    """Draws of q must have the form of draws of p (structure, shapes, float vs integer)."""
    if p_draw is None:
        return
    got: Any = jax.tree_util.tree_structure(q_draw)
    want: Any = jax.tree_util.tree_structure(p_draw)
    if got != want:
        raise TypeError(f"{who}: the proposal draws x of structure {got}, but the target family "
                        f"draws {want}; `proposal` and `proposal_theta` must describe a "
                        "distribution on the same space as the family.")
    for a, b in zip(jax.tree_util.tree_leaves(q_draw), jax.tree_util.tree_leaves(p_draw)):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"{who}: the proposal draws x of shape {tuple(a.shape)}, but the "
                             f"target family draws shape {tuple(b.shape)}; check `proposal_theta` "
                             "(its shape sets the proposal's draw shape).")
        if jnp.issubdtype(a.dtype, jnp.inexact) != jnp.issubdtype(b.dtype, jnp.inexact):
            raise TypeError(f"{who}: the proposal draws dtype {a.dtype}, but the target family "
                            f"draws {b.dtype}; `proposal` must be a distribution on the same "
                            "space as the family.")


def _check_log_probs(family, theta, proposal, proposal_theta, x_struct, who):
    theta_def = jax.tree_util.tree_structure(theta)
    lp = validation.traced_struct(
        family.log_prob, (theta, x_struct), "family.log_prob(theta, x)",
        f"Check that family.log_prob accepts theta of structure {theta_def} and the proposal's "
        "draws.")
    validation.check_scalar_float(
        lp, "family.log_prob(theta, x)",
        "It must return the log-density of ONE draw; sum over independent coordinates.")
    _check_proposal_log_prob(proposal, proposal_theta, x_struct)


def _check_f(f, x_struct):
    fs = validation.traced_struct(f, (x_struct,), "f(x)", "f must accept one draw x of the proposal.")
    validation.check_scalar_float(
        fs, "f(x)", "f must return one scalar per draw; reduce it, e.g. `jnp.sum(...)`.")


def importance_weighted(proposal: Family, proposal_theta: PyTree) -> Estimator:
    r"""The (plain) importance-weighted score-function estimator, for draws from ``proposal``.

    Per draw :math:`x_i \sim q`: surrogate :math:`w_i f_i` with
    :math:`w_i = \exp(\log p(x_i;\theta) - \perp\log q(x_i))`; its value is the importance
    sampling estimate of :math:`E_p[f]` (so the result's ``value`` is that, not the mean of f)
    and its gradient :math:`w_i (f_i \nabla\log p_i + \nabla f_i)`.

    * **Bias**: unbiased when q covers p (q > 0 wherever p f ≠ 0); the variance grows with the
      mismatch (watch :func:`estimate_grad_importance`'s ``ess``).
    * **Needs**: a differentiable ``log_prob`` of p, ``proposal.log_prob`` (and
      ``proposal.sample`` when drawing with a key); nothing from f.
    * **Derivative order**: all orders (the surrogate is the exact importance-weighted objective).

    Use with :func:`scoregrad.estimate_grad_from_samples` (samples drawn from q) or
    :func:`scoregrad.estimate_grad` (then it draws from q), or inside
    :func:`scoregrad.expectation`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> fam = sg.families.bernoulli()
      >>> est = sg.importance.importance_weighted(fam, jnp.zeros(1))  # q = Bernoulli(1/2)
      >>> xs = jnp.array([[0.0], [1.0]])  # exactly the support, each with q = 1/2
      >>> r = sg.estimate_grad_from_samples(lambda x: jnp.sum(x), fam, jnp.zeros(1), xs,
      ...                                   estimator=est)
      >>> float(r.value), float(r.grad[0])  # E_p[x] and its gradient sigma'(0)
      (0.5, 0.25)
    """
    _check_proposal(proposal, "importance_weighted")
    _check_proposal_theta(proposal_theta, "importance_weighted")

    def check(target):
        who = "importance_weighted"
        key = jax.random.PRNGKey(0) if target.legacy_key else jax.random.key(0)
        _check_draws_match(_proposal_draw(proposal, proposal_theta, key, who), target.x_struct, who)
        _check_proposal_log_prob(proposal, proposal_theta, target.x_struct)

    def unit(model, params, draws, state):
        del state
        if draws.given:  # given samples are draws from the proposal
            x = draws.sample()
        else:
            key = draws.key()
            x = proposal.sample(proposal_theta, jax.random.key_data(key) if model.legacy_key else key)
        x = jax.lax.stop_gradient(x)
        logq = jax.lax.stop_gradient(proposal.log_prob(proposal_theta, x))
        w = jnp.exp(model.eval_log_prob(params, x) - logq)
        wf = w * model.eval_f(params, x)
        return UnitOut(wf[None], jax.lax.stop_gradient(wf)[None])

    return fixed("importance_weighted", Plan(unit), check=check)


class ImportanceEstimate(NamedTuple):
    """Result of :func:`estimate_grad_importance`.

    Attributes:
      value: estimate of :math:`E_p[f]` (self-normalized or plain).
      grad, stderr, variance, snr: as in :class:`scoregrad.GradEstimate` (``variance`` per draw;
        for the self-normalized estimator, of its delta-method influence function).
      ess: Kish's effective sample size :math:`(\\sum w)^2 / \\sum w^2` (in draws).
      num_samples: draws used.
      self_normalized: which estimator this is.
      num_nonfinite: draws whose f, importance weight or gradient row was NaN or infinite
        (see ``nan_policy``).
    """

    value: jax.Array
    grad: PyTree
    stderr: PyTree
    variance: PyTree
    snr: PyTree
    ess: jax.Array
    num_samples: int
    self_normalized: bool
    num_nonfinite: Any = None


class _WStats(NamedTuple):
    """Streaming sums of scaled weights w' = exp(log w - c) with a running shift c."""

    shift: jax.Array
    sw: jax.Array
    sw2: jax.Array
    swf: jax.Array


def _wstats(logw, f) -> _WStats:
    c = jnp.max(logw)
    w = jnp.exp(logw - c)
    return _WStats(c, jnp.sum(w), jnp.sum(w * w), jnp.sum(w * f))


def _merge_w(a: _WStats, b: _WStats) -> _WStats:
    c = jnp.maximum(a.shift, b.shift)
    ea, eb = jnp.exp(a.shift - c), jnp.exp(b.shift - c)
    return _WStats(c, a.sw * ea + b.sw * eb, a.sw2 * ea**2 + b.sw2 * eb**2, a.swf * ea + b.swf * eb)


def estimate_grad_importance(
    f: Callable, family: Family, theta: PyTree, *, proposal: Family, proposal_theta: PyTree,
    samples: PyTree = None, key: jax.Array | None = None, num_samples: int | None = None,
    self_normalized: bool = True, chunk_size: int | None = None, nan_policy: str = "raise",
) -> ImportanceEstimate:
    r"""Importance-weighted score-function gradient with effective sample size.

    Plain: :math:`\hat g = \frac1N\sum_i w_i f_i \nabla\log p_i`. Self-normalized:
    :math:`\hat g = \sum_i w_i (f_i - \hat V)\nabla\log p_i / \sum_i w_i` with
    :math:`\hat V = \sum_i w_i f_i / \sum_i w_i` — the gradient of the self-normalized value;
    needs p only up to a constant and is **biased** by :math:`O(1/N)` (consistent), usually with
    much less variance. Standard errors of the self-normalized estimator use the delta method.
    Weights are handled in log space (shifted by their running maximum).

    Args:
      f: ``f(x) -> scalar`` (a black box; no gradient of f is used).
      family, theta: the target :math:`p(x;\theta)`.
      proposal, proposal_theta: q as a :class:`scoregrad.Family` and its parameters.
      samples: draws from q (leading axis N), or ``None`` to draw ``num_samples`` with ``key``.
      self_normalized: which estimator.
      chunk_size: draws per chunk (memory bound).
      nan_policy: ``"raise"`` (default) raises when f, an importance weight or a gradient row is
        NaN or infinite for some draw (as :func:`scoregrad.estimate_grad` does, also under
        ``jit``/``vmap``); ``"propagate"`` keeps them (the estimate becomes non-finite) and
        counts them in ``num_nonfinite``. ``"drop"`` is refused: self-normalization shares the
        weights of all draws, so a draw cannot be left out of one pass alone.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> fam = sg.families.normal()
      >>> q = {"loc": jnp.zeros(1), "scale": jnp.full(1, 2.0)}
      >>> p = {"loc": jnp.ones(1), "scale": jnp.ones(1)}
      >>> r = sg.importance.estimate_grad_importance(
      ...     lambda x: jnp.sum(x), fam, p, proposal=fam, proposal_theta=q,
      ...     key=jax.random.key(0), num_samples=4000)
      >>> bool(abs(r.grad["loc"][0] - 1.0) < 5 * r.stderr["loc"][0]), bool(r.ess < 4000)
      (True, True)
    """
    who = "estimate_grad_importance"
    validation.check_callable(f, "f", who)
    _check_proposal(proposal, who)
    if not isinstance(family, Family):
        raise TypeError(f"{who}: `family` must be a scoregrad.Family; got {family!r}.")
    run_policy = policy.make_policy(
        who, nan_policy, None, chunk_size,
        refuse=("drop", "the self-normalized estimator and the weight shift use every draw's "
                        "weight"))
    validation.check_theta(theta)
    _check_proposal_theta(proposal_theta, who)
    typed, samples, n, legacy = _inputs(samples, key, num_samples)
    chunk = run_policy.chunk_size
    p_draw = validation.draw_struct(family, theta)
    if samples is None:
        assert key is not None  # _inputs: exactly one of samples and key
        user_key = key if legacy else validation.normalize_key(key)
        x_struct = _proposal_draw(proposal, proposal_theta, user_key, who)
        _check_draws_match(x_struct, p_draw, who)
    else:
        samples = jax.tree_util.tree_map(jnp.asarray, samples)
        x_struct = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), samples)
        if p_draw is not None:
            validation.check_samples(samples, p_draw)
    _check_log_probs(family, theta, proposal, proposal_theta, x_struct, who)
    _check_f(f, x_struct)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(theta))
    c = chunk or engine.auto_chunk_size(n, 1024)

    def draw(k, x):
        if x is None:
            x = proposal.sample(proposal_theta, jax.random.key_data(k) if legacy else k)
        return jax.lax.stop_gradient(x)

    def logw_f(th, x):
        logq = jax.lax.stop_gradient(proposal.log_prob(proposal_theta, x))
        return family.log_prob(th, x) - logq, jnp.asarray(f(x), dtype)

    def pass1(keys, xs):
        x = jax.vmap(draw)(keys, xs)
        lw, fv = jax.vmap(logw_f, in_axes=(None, 0))(theta, x)
        return _wstats(lw.astype(dtype), fv)

    ws = engine.run_chunks(lambda keys, xs, start: pass1(keys, xs), _merge_w, num_units=n,
                           chunk_units=c, key=typed, samples=samples)
    vhat = ws.swf / ws.sw
    center = vhat if self_normalized else jnp.zeros((), dtype)

    def row(k, x):
        x = draw(k, x)

        def a(th):
            lw, fv = logw_f(th, x)
            return jnp.exp(lw - ws.shift) * (fv - center)

        val, g = jax.value_and_grad(a)(theta)
        w = jnp.exp(logw_f(theta, x)[0] - ws.shift)
        return jax.tree_util.tree_map(lambda gl: jnp.stack([gl, jnp.full_like(gl, w)]), g), val

    def pass2(keys, xs):
        rows, vals = jax.vmap(row)(keys, xs)
        ok = jnp.ones(vals.shape[:1], bool)
        for leaf in jax.tree_util.tree_leaves(rows):
            ok = ok & jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
        return stats.fstats_of(vals, dtype, ok), stats.moments_of(rows, dtype)

    fs, mom = engine.run_chunks(lambda keys, xs, start: pass2(keys, xs),
                                lambda p, q: engine.merge("diag", p, q), num_units=n,
                                chunk_units=c, key=typed, samples=samples)
    # A non-finite f or weight makes that draw's term (and, through the shift or the
    # self-normalizing mean, possibly every draw's) non-finite: counted in pass 2's statistics.
    fs = policy.check_nonfinite(run_policy, fs, who)
    res = _finish(mom, ws, n, self_normalized, vhat)
    guard = lambda t: policy.guard_tree(t, fs)  # noqa: E731
    return res._replace(value=guard(res.value), grad=guard(res.grad), stderr=guard(res.stderr),
                        num_nonfinite=fs.nonfinite)


def _inputs(samples, key, num_samples):
    if (samples is None) == (key is None):
        raise TypeError("estimate_grad_importance: pass exactly one of `samples` (draws from the "
                        "proposal) and `key` (with num_samples).")
    if samples is not None:
        leaves = jax.tree_util.tree_leaves(samples)
        if not leaves or any(jnp.ndim(a) < 1 for a in leaves):
            raise ValueError("`samples` must be a pytree of arrays with a leading axis of draws.")
        samples = jax.tree_util.tree_map(jnp.asarray, samples)
        return None, samples, int(leaves[0].shape[0]), False
    n = validation.check_num_samples(num_samples, minimum=2, who="estimate_grad_importance")
    legacy = validation.is_legacy_key(key)
    typed = validation.normalize_key(key)
    return (typed if legacy else engine.counter_key(typed)), None, n, legacy


def _finish(mom, ws: _WStats, n, self_normalized, vhat):
    wbar = ws.sw / n
    scale = jnp.exp(ws.shift)

    def leaf(m, cm):
        var_a, cov_aw, var_w = cm[0, 0] / (n - 1), cm[0, 1] / (n - 1), cm[1, 1] / (n - 1)
        if not self_normalized:
            return m[0] * scale, var_a * scale**2
        g = m[0] / wbar
        return g, jnp.maximum(var_a - 2 * g * cov_aw + g * g * var_w, 0.0) / wbar**2

    # Per leaf, not pairs picked apart with is_leaf=tuple: theta may itself be a tuple.
    leaves, treedef = jax.tree_util.tree_flatten(mom.mean)
    pairs = [leaf(m, cm) for m, cm in zip(leaves, jax.tree_util.tree_leaves(mom.comoment))]
    grad = jax.tree_util.tree_unflatten(treedef, [p[0] for p in pairs])
    var = jax.tree_util.tree_unflatten(treedef, [p[1] for p in pairs])
    stderr = jax.tree_util.tree_map(lambda v: jnp.sqrt(v / n), var)
    value = vhat if self_normalized else scale * ws.swf / n
    return ImportanceEstimate(
        value=value, grad=grad, stderr=stderr, variance=var,
        snr=jax.tree_util.tree_map(lambda g, s: jnp.abs(g) / s, grad, stderr),
        ess=ws.sw**2 / ws.sw2, num_samples=n, self_normalized=self_normalized,
    )

