"""The pass every entry point shares (:func:`run`: one engine pass with f centred, under the
problem's policy) and the differentiable objective of :func:`scoregrad.expectation`
(:func:`surrogate`: value = mean f, derivative of any order = the estimator, through a custom JVP
over the engine)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from scoregrad._src import binding, engine, fitted, policy, problem
from scoregrad._src.base import FStats
from scoregrad._src.problem import Problem

PyTree = Any
# From this many weighted terms up, expectation's gradient fixes the weights by a value pass
# first (one extra forward pass) instead of one reverse pass per term.
PREPASS_TERMS = 8


def prepass_weights(prob: Problem, params, state, key=None, samples=None):
    """The terms' weights fixed by a value pass over the same draws, for an estimator with
    ``PREPASS_TERMS`` or more weighted terms (one reverse pass for their sum then replaces one
    per term); ``None`` for the others."""
    est = prob.est
    if est.plan.weights is None or est.num_terms < PREPASS_TERMS:
        return None
    pre = run(prob, params, state, "value", key=key, samples=samples)[0].fstats
    return jax.lax.stop_gradient(est.weights(pre, state, problem.kept_units(prob, pre)))


def check(prob: Problem, fs: FStats, where: str) -> FStats:
    return policy.check_nonfinite(prob.policy, fs, where)


def run(prob: Problem, params, state, mode, key=None, samples=None):
    """One engine pass with the problem's policy and f centred (see :func:`problem.shifted`).

    Returns ``(EngineOut, ref)``: the statistics of f are those of ``f - ref``.
    """
    prob, ref = problem.shifted(prob, params, key, samples)
    return engine.run_problem(prob, params, state, mode, key=key, samples=samples), ref


def fstats_float(fs: FStats) -> FStats:
    return fs._replace(nonfinite=fs.nonfinite.astype(fs.mean.dtype))


def higher_order_message(est) -> str:
    return (
        f"jax.hessian (or any second derivative) of sg.expectation with {est.name} is not "
        f"estimated: {est.name}'s surrogate is right at first order only (its second derivative "
        "would be zeros or a partial sum). Use sg.score_function(...) (DiCE, every order, "
        "baselines included), sg.rloo(k) or sg.pathwise() for Hessians."
    )


def surrogate(prob: Problem, state) -> tuple[jax.Array, FStats]:
    """Value = mean f, gradient (any order) = the estimator, via a custom JVP over the engine."""
    est = prob.est
    assert prob.key is not None  # expectation* always pass a key (samples=None)
    impl = jax.random.key_impl(prob.key)

    def run_pass(p, kd, st, mode, pr=prob):
        out, ref = run(pr, p, st, mode, key=jax.random.wrap_key_data(kd, impl=impl))
        # The check sits on the pass's own statistics (not on the custom-JVP output), so
        # nested differentiation does not keep extra passes alive for it.
        return out._replace(fstats=check(prob, out.fstats, "expectation")), ref

    def primal_out(fs: FStats, ref):
        """(value, statistics of f itself): f was centred on ``ref`` in the engine."""
        fs = problem.unshift(fs, ref)
        value = problem.nan_if_none_kept(prob, fs, policy.guard(fs.mean, fs))
        return value.astype(prob.f_dtype), fstats_float(fs)

    @jax.custom_jvp
    def core(params, key_data, st):
        out, ref = run_pass(params, key_data, st, "value")
        return primal_out(out.fstats, ref)

    @core.defjvp
    def core_jvp(primals, tangents):
        params, key_data, st = primals
        dparams = tangents[0]
        if est.max_order is not None:
            # First order is this rule; a second derivative differentiates the rule itself.
            params = policy.refuse_derivatives(params, higher_order_message(est))
        if fitted.routed(est):
            key = jax.random.wrap_key_data(key_data, impl=impl)
            shifted, ref = problem.shifted(prob, params, key)
            fs, tangent = fitted.jvp(shifted, params, key, st, dparams)
            fs = check(prob, fs, "expectation")
            value, fsf = primal_out(fs, ref)
            return (value, fsf), (policy.guard(tangent, fs).astype(value.dtype),
                                  jax.tree_util.tree_map(jnp.zeros_like, fsf))
        fixed = prepass_weights(prob, params, st, key=jax.random.wrap_key_data(key_data, impl=impl))
        if fixed is not None:
            # Many weighted terms (a program's per-step baselines): K reverse passes per chunk
            # cost K times the gradient and compile one program per term; the weights depend
            # only on f's statistics, fixed here by a value pass over the same draws.
            weighted = prob._replace(est=binding.contracted(est, fixed))
            out, ref = run_pass(params, key_data, st, "grad", weighted)
            w = jnp.ones((1,), fixed.dtype)
        else:
            out, ref = run_pass(params, key_data, st, "grad")
            w = jax.lax.stop_gradient(
                est.weights(out.fstats, st, problem.kept_units(prob, out.fstats)))
        fs = out.fstats
        denom = problem.kept_units(prob, fs)  # with nan_policy="drop": the finite units
        # Every unit dropped: NaN (the gradient is a linear map of the tangent, so the NaN must
        # sit in its coefficients, not in a select on the result), never a zero that looks exact.
        none = jnp.where(fs.units < 1, jnp.nan, 1.0) if prob.nan_policy == "drop" else 1.0
        grads = jax.tree_util.tree_map(
            lambda g: jnp.tensordot(w.astype(g.dtype), g, axes=1) / denom
            * jnp.asarray(none, g.dtype), out.grad_sums
        )
        dots = [
            jnp.vdot(g, dp).astype(fs.mean.dtype)
            for g, dp in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(dparams))
        ]
        value, fsf = primal_out(fs, ref)
        tangent = policy.guard(sum(dots, jnp.zeros((), fs.mean.dtype)), fs).astype(value.dtype)
        return (value, fsf), (tangent, jax.tree_util.tree_map(jnp.zeros_like, fsf))

    value, fsf = core(prob.params, jax.random.key_data(prob.key), state)
    fs = fsf._replace(nonfinite=jax.lax.stop_gradient(fsf.nonfinite).astype(jnp.int32))
    return value, jax.lax.stop_gradient(fs)
