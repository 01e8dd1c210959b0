r"""A discretely monitored up-and-out barrier call as a sequential program: per-date credit.

The asset is observed at ``T`` monitoring dates :math:`t_k = k\,\Delta`, :math:`\Delta =
\text{maturity}/T`; its log-increments are drawn one date at a time,

* ``walk="binomial"``: :math:`\log S_k - \log S_{k-1} = \pm\sigma\sqrt\Delta`, up with
  probability :math:`p(\mu) = \tfrac12 + (\mu - \sigma^2/2)\sqrt\Delta / (2\sigma)` (the walk's
  log-drift matches :math:`(\mu - \sigma^2/2)\Delta`), so for a short horizon the price is a
  finite sum over the :math:`2^T` paths (:func:`exact_price`);
* ``walk="lognormal"``: :math:`\log S_k - \log S_{k-1} \sim N((\mu - \sigma^2/2)\Delta,
  \sigma^2\Delta)` (geometric Brownian motion sampled at the dates).

The option pays :math:`(S_T - K)^+` at maturity unless :math:`S_k \ge B` at some date (knocked
out), in which case it pays the ``rebate`` at the knock-out date; cash flows are discounted at
``rate``. The parameter is the drift :math:`\theta = \mu` of the increments (``rate`` for the
risk-neutral price), and :math:`\partial V / \partial \mu` is a likelihood-ratio Greek: the
payoff is discontinuous (the barrier), so the pathwise method does not apply.

**Per-date credit.** The payoff is written as one contribution per date, each a function of the
increments up to that date, so :func:`scoregrad.programs.causal` scores each only with the
increments that could have caused it. ``credit="cashflows"`` (default) uses the contract's own
cash flows: the rebate at the knock-out date, the call at maturity. Per-date credit then helps
only through the rebates (the call at maturity depends on every increment), and a per-date
baseline can go further: :func:`exact_value_baseline` subtracts, at each date, the exact value
of the cash flows still to come given the path so far (backward induction on the binomial
lattice, :func:`continuation_values`), which whole-path estimators cannot use.
``credit="knockout"`` telescopes the knocked-out intrinsic value :math:`V_k = e^{-rT}
\mathbf 1\{\text{alive at } k\}(S_k - K)^+` instead: date k contributes :math:`V_k - V_{k-1}`
(plus its rebate). Both sum to the same discounted payoff, so whole-path REINFORCE
(``sg.score_function()`` on the same program) is the same for both; the telescoped one has
MORE variance than the whole path here (``benchmarks/results/barrier_causal.md``): its
cost-to-go :math:`V_T - V_{k-1}` is non-zero on the many paths that were in the money and then
knocked out, whereas the whole-path payoff is zero on them.

References:
  Broadie and Glasserman, "Estimating Security Price Derivatives Using Simulation", 1996.
  Glasserman, "Monte Carlo Methods in Financial Engineering", 2003, sections 7.3 and 6.2.
  Foerster et al., "DiCE", ICML 2018.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import scoregrad as sg
import scoregrad.programs as sp

__all__ = [
    "BarrierCall",
    "barrier_program",
    "drift_sensitivity",
    "exact_drift_sensitivity",
    "exact_price",
    "continuation_values",
    "exact_value_baseline",
    "gradient_replicates",
    "per_path_gradients",
]

CREDITS = ("cashflows", "knockout")
WALKS = ("binomial", "lognormal")


class BarrierCall(NamedTuple):
    """A discretely monitored up-and-out call with a rebate paid at the knock-out date
    (defaults: at the money, barrier 20% above, rebate 5, six dates, binomial walk)."""

    spot: float = 100.0
    strike: float = 100.0
    barrier: float = 120.0
    vol: float = 0.2
    rate: float = 0.05
    maturity: float = 1.0
    num_dates: int = 6
    rebate: float = 5.0
    walk: str = "binomial"


def _check(option: BarrierCall) -> None:
    if option.walk not in WALKS:
        raise ValueError(f"BarrierCall.walk must be one of {WALKS}; got {option.walk!r}.")
    if isinstance(option.num_dates, bool) or not isinstance(option.num_dates, int) \
            or option.num_dates < 1:
        raise ValueError(f"BarrierCall.num_dates must be a positive int; got {option.num_dates!r}.")
    for name in ("spot", "strike", "barrier", "vol", "maturity"):
        if not getattr(option, name) > 0:
            raise ValueError(f"BarrierCall.{name} must be > 0; got {getattr(option, name)!r}.")
    if not option.spot < option.barrier:
        raise ValueError("BarrierCall: the spot must start below the barrier.")


def _up_probability(option: BarrierCall, mu):
    dt = option.maturity / option.num_dates
    p = 0.5 + (mu - 0.5 * option.vol**2) * np.sqrt(dt) / (2.0 * option.vol)
    return p


def _log_returns(option: BarrierCall, x):
    """Per-date log-returns from a draw (up indicators for the binomial walk)."""
    if option.walk == "binomial":
        step = option.vol * np.sqrt(option.maturity / option.num_dates)
        return (2.0 * x - 1.0) * step
    return x


def _costs(option: BarrierCall, x, credit: str):
    """Per-date discounted contributions (T,), each a function of the increments up to it."""
    t = option.num_dates
    dt = option.maturity / t
    dtype = jnp.result_type(x)
    s = option.spot * jnp.exp(jnp.cumsum(_log_returns(option, x)))       # S_1..S_T
    alive = jnp.cumprod((s < option.barrier).astype(dtype))              # alive at date k
    before = jnp.concatenate([jnp.ones((1,), dtype), alive[:-1]])
    times = dt * jnp.arange(1, t + 1, dtype=dtype)
    rebate = option.rebate * jnp.exp(-option.rate * times) * (before - alive)
    disc_t = np.exp(-option.rate * option.maturity)
    if credit == "knockout":
        v = disc_t * alive * jnp.maximum(s - option.strike, 0.0)
        v_prev = jnp.concatenate([jnp.zeros((1,), dtype), v[:-1]])       # V_0 folded into c_1
        return v - v_prev + rebate
    call = disc_t * alive[-1] * jnp.maximum(s[-1] - option.strike, 0.0)
    return rebate.at[-1].add(call)


def barrier_program(option: Optional[BarrierCall] = None, *, credit: str = "cashflows"
                    ) -> sp.Program:
    r"""The option as a :func:`scoregrad.programs.program`: one increment per monitoring date.

    theta is the drift :math:`\mu` (a scalar). ``program.f`` is the discounted payoff, so
    :math:`\nabla_\mu \mathbb E[f]` is the drift sensitivity; ``sg.score_function()`` is the
    single-site (whole-path) likelihood-ratio estimator, ``program.estimator(baseline)`` the
    per-date one.

    Examples:
      >>> from scoregrad.examples import finance_programs as fp
      >>> opt = fp.BarrierCall(num_dates=4)
      >>> prog = fp.barrier_program(opt)
      >>> prog.num_steps, round(float(fp.exact_price(opt, 0.05)), 4)
      (4, 2.092)

    A Monte Carlo estimate with per-date credit (checked against the exact answer in
    ``tests/test_applications.py``)::

      r = sg.estimate_grad(prog.f, prog.family, jnp.float32(0.05), jax.random.key(0),
                           num_samples=4096, estimator=prog.estimator())
      abs(r.grad - fp.exact_drift_sensitivity(opt, 0.05)) < 5 * r.stderr
    """
    option = BarrierCall() if option is None else option
    _check(option)
    if credit not in CREDITS:
        raise ValueError(f"barrier_program(credit=...) must be one of {CREDITS}; got {credit!r}.")
    t = option.num_dates
    dt = option.maturity / t

    def sample(mu, key):
        dtype = jnp.result_type(mu)
        if option.walk == "binomial":
            return jax.random.bernoulli(key, _up_probability(option, mu), (t,)).astype(dtype)
        mean = (mu - 0.5 * option.vol**2) * dt
        return mean + option.vol * np.sqrt(dt) * jax.random.normal(key, (t,), dtype)

    def log_prob(mu, x):
        if option.walk == "binomial":
            p = _up_probability(option, mu)
            return x * jnp.log(p) + (1.0 - x) * jnp.log1p(-p)
        mean = (mu - 0.5 * option.vol**2) * dt
        var = option.vol**2 * dt
        return -0.5 * (x - mean) ** 2 / var - 0.5 * jnp.log(2 * jnp.pi * var)

    return sp.program(log_prob, sample, lambda x: _costs(option, x, credit), num_steps=t)


def _paths(t: int) -> np.ndarray:
    return np.array(list(itertools.product([0.0, 1.0], repeat=t)))


def exact_price(option: BarrierCall, mu) -> jax.Array:
    """The exact price under the binomial walk, a sum over the :math:`2^T` paths
    (differentiable in ``mu``; T <= 16)."""
    _check(option)
    if option.walk != "binomial" or option.num_dates > 16:
        raise ValueError("exact_price enumerates the binomial walk's paths: walk='binomial' and "
                         "num_dates <= 16.")
    mu = jnp.asarray(mu)
    # the paths are an argument, not a constant of the compiled program (XLA would fold them)
    return _exact_price(option, mu, jnp.asarray(_paths(option.num_dates),
                                                jnp.result_type(mu, float)))


@partial(jax.jit, static_argnums=0)
def _exact_price(option: BarrierCall, mu: jax.Array, paths: jax.Array) -> jax.Array:
    prog = barrier_program(option)

    def one(x):
        s = sp.Steps(x, jnp.ones((option.num_dates,), x.dtype))
        return jnp.exp(prog.family.log_prob(mu, s)) * prog.f(s)

    return jnp.sum(jax.vmap(one)(paths))


def exact_drift_sensitivity(option: BarrierCall, mu) -> jax.Array:
    r""":math:`\partial V / \partial \mu` exactly, by differentiating :func:`exact_price`."""
    return jax.grad(exact_price, argnums=1)(option, jnp.asarray(mu, jnp.result_type(float)))


def drift_sensitivity(option: BarrierCall, mu, key, *, num_samples: int,
                      estimator: Optional[sg.Estimator] = None, credit: str = "cashflows"
                      ) -> sg.GradEstimate:
    """One Monte Carlo estimate of the drift sensitivity with its standard error; the default
    estimator is per-date credit (``program.estimator()``)."""
    prog = barrier_program(option, credit=credit)
    est = prog.estimator() if estimator is None else estimator
    return sg.estimate_grad(prog.f, prog.family, jnp.asarray(mu), key, num_samples=num_samples,
                            estimator=est)


def per_path_gradients(option: BarrierCall, mu, key, *, num_paths: int,
                       credit: str = "cashflows") -> tuple[jax.Array, jax.Array]:
    """Per-path likelihood-ratio gradients on the SAME paths (common random numbers):
    ``(whole_path, per_date)``, each of shape ``(num_paths,)``; their variances are the
    per-path variances of the two estimators."""
    prog = barrier_program(option, credit=credit)
    mu = jnp.asarray(mu)
    xs = jax.vmap(prog.family.sample, in_axes=(None, 0))(mu, jax.random.split(key, num_paths))

    def one(est):
        def g(s):
            one_path = jax.tree_util.tree_map(lambda a: a[None], s)
            return sg.estimate_grad_from_samples(prog.f, prog.family, mu, one_path,
                                                 estimator=est).grad
        return jax.vmap(g)(xs)

    return one(sg.score_function()), one(prog.estimator())


def continuation_values(option: BarrierCall, mu: float, *, credit: str = "cashflows"
                        ) -> np.ndarray:
    r"""The exact expected discounted cash flows still to come, by backward induction on the
    binomial lattice: entry ``[k, j]`` is :math:`\mathbb E[\sum_{s > k} c_s \mid` alive at
    date k with j up-moves so far :math:`]` (shape ``(T + 1, T + 1)``; row T is zero). For
    ``credit="cashflows"`` only (the contract's cash flows; alive at date 0 by construction).
    """
    _check(option)
    if option.walk != "binomial" or credit != "cashflows":
        raise ValueError("continuation_values: walk='binomial' and credit='cashflows' only.")
    t = option.num_dates
    dt = option.maturity / t
    step = option.vol * np.sqrt(dt)
    p = float(_up_probability(option, mu))
    w = np.zeros((t + 1, t + 1))
    for k in range(t - 1, -1, -1):
        for j in range(k + 1):
            total = 0.0
            for up, prob in ((1, p), (0, 1.0 - p)):
                jn = j + up
                s_next = option.spot * np.exp(step * (2 * jn - (k + 1)))
                if s_next >= option.barrier:       # knocked out at date k + 1: the rebate
                    total += prob * option.rebate * np.exp(-option.rate * dt * (k + 1))
                elif k + 1 == t:                   # alive at maturity: the call
                    total += prob * np.exp(-option.rate * option.maturity) * max(
                        s_next - option.strike, 0.0)
                else:
                    total += prob * w[k + 1, jn]
            w[k, j] = total
    return w


def exact_value_baseline(option: BarrierCall, mu: float):
    r"""A per-date baseline :math:`b_t` = the exact value of the cash flows from date t + 1 on,
    given the path up to date t (:func:`continuation_values` at ``mu``, held fixed): the
    conditional expectation of the cost-to-go, the best per-step baseline. A
    :func:`scoregrad.programs.value_function` whose table is not trained (``fit`` unused);
    entry t reads only the increments before step t, so the estimator stays unbiased at
    every ``mu``. Binomial walk, ``credit="cashflows"``.

    Returns:
      A per-step baseline for ``program.estimator(...)`` (stateful: its state is the table).
    """
    table = jnp.asarray(continuation_values(option, mu))
    t = option.num_dates

    def fn(w, x):
        ups = jnp.concatenate([jnp.zeros((1,), x.dtype), jnp.cumsum(x)[:-1]]).astype(jnp.int32)
        logs = _log_returns(option, x)
        s = option.spot * jnp.exp(jnp.cumsum(logs))
        alive = jnp.cumprod((s < option.barrier).astype(x.dtype))
        alive_before = jnp.concatenate([jnp.ones((1,), x.dtype), alive[:-1]])
        return alive_before * w[jnp.arange(t), ups].astype(x.dtype)

    base, _ = sp.value_function(fn, table, optax.sgd(0.0))
    return base


def gradient_replicates(option: BarrierCall, mu, key, estimators: dict, *, num_paths: int,
                        num_replicates: int, credit: str = "cashflows") -> dict:
    """Independent drift-sensitivity estimates: replicate i draws ``num_paths`` paths and every
    estimator (name -> :class:`~scoregrad.Estimator`) estimates from those same paths (common
    random numbers). Returns name -> ``(num_replicates,)``; multiply their variance by
    ``num_paths`` for a per-path variance."""
    prog = barrier_program(option, credit=credit)
    mu = jnp.asarray(mu)

    def one(k):
        xs = jax.vmap(prog.family.sample, in_axes=(None, 0))(mu, jax.random.split(k, num_paths))
        return {name: sg.estimate_grad_from_samples(prog.f, prog.family, mu, xs, estimator=est,
                                                    state=est.init(mu)).grad
                for name, est in estimators.items()}

    out = jax.jit(jax.vmap(one))(jax.random.split(key, num_replicates))
    return {k: np.asarray(v) for k, v in out.items()}
