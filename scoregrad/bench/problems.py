"""The problem registry of ``scoregrad bench``: expectations whose gradient is known EXACTLY.

Each :class:`Problem` is ``E_{x ~ p(x; theta)}[f(x)]`` given by a :class:`scoregrad.Family`, a
parameter ``theta``, an integrand ``f`` and the exact value and gradient (closed form or
enumeration, in float64 NumPy), with the capabilities estimators are matched on (see
:mod:`scoregrad.bench.registry`).

Problems (``problem_names()``):

* ``gauss_{square,exp,cos}_d{1,10,100}``: :math:`(x-1)^2`, :math:`e^{-x^2}`, :math:`\\cos(2x)`
  summed over the coordinates of a diagonal normal (Mohamed et al. 2020, §3).
* ``bernoulli_t0.45``, ``bernoulli_t0.499``: :math:`E_{b\\sim Bern(\\sigma(\\phi))}[(b-t)^2]`
  (Tucker et al. 2017; Yin and Zhou 2019), a tiny gradient :math:`\\sigma'(\\phi)(1-2t)`.
* ``categorical_k10``: :math:`E_{x \\sim Cat(softmax(\\theta))}[(x/9 - 0.45)^2]`; f also takes a
  one-hot or relaxed draw y (as :math:`x = \\sum_k k\\,y_k`), so relaxations apply.
* ``bs_call``, ``bs_digital``: Black–Scholes delta and vega of a call and of a cash-or-nothing
  digital (pathwise fails on the digital: its payoff has a zero derivative almost everywhere).
* ``blr_elbo``: the ELBO gradient of conjugate Bayesian linear regression under a diagonal
  normal variational posterior.
* ``bandit_k10``: a categorical policy over 10 arms with noisy rewards; the exact policy gradient.
* ``sequence_v3_t4``, ``barrier_t6``, ``ipd_t4``: sequential programs
  (:func:`scoregrad.programs.program`, capability ``"program"``): an autoregressive sequence
  rewarded at the end, an up-and-out barrier path paying at every date, 4 rounds of the
  iterated prisoner's dilemma; exact answers by enumerating every trajectory
  (:mod:`scoregrad.bench._programs`).

Examples:
  >>> from scoregrad.bench import problems
  >>> p = problems.get_problem("bernoulli_t0.499")
  >>> round(float(p.exact_grad[0]), 6), sorted(p.capabilities)
  (0.0005, ['discrete', 'enumerable', 'kind:bernoulli', 'relaxable'])
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import numpy as np

from scoregrad._src.family import Family
from scoregrad.bench import _closed_forms as cf
from scoregrad.bench import _programs as pg

PyTree = Any

CAPABILITIES = frozenset({
    "continuous", "discrete", "reparameterizable", "differentiable_f", "enumerable",
    "kind:normal", "kind:bernoulli", "kind:categorical", "relaxable", "program",
})


class Problem(NamedTuple):
    """A benchmark problem with an exact answer.

    Attributes:
      name: unique label.
      family: the :class:`scoregrad.Family` p(x; theta).
      theta: the parameters (a pytree of float64 NumPy arrays; the runner casts them).
      f: the integrand ``f(x) -> scalar`` (its dtype follows x / theta's dtype).
      exact_value: ``E[f(x)]``.
      exact_grad: the exact gradient, a pytree like theta (float64 NumPy).
      capabilities: a frozenset of strings from :data:`CAPABILITIES`.
      group: a label for grouping in reports ("gaussian", "bernoulli", ...).
      description: one line for reports.
    """

    name: str
    family: Family
    theta: PyTree
    f: Callable[[PyTree], jax.Array]
    exact_value: float
    exact_grad: PyTree
    capabilities: frozenset
    group: str
    description: str


def _family_caps(family: Family, differentiable_f: bool, relaxable: bool = False) -> frozenset:
    caps = {"relaxable"} if relaxable else set()
    meta = family.capabilities  # a typed sg.Capabilities record
    if meta.bernoulli_logits is not None:
        caps.add("kind:bernoulli")
    if meta.categorical_logits is not None:
        caps.add("kind:categorical")
    # "kind:normal" tags what the normal-only registry entries need: a weak derivative, an
    # inverse CDF and moments of a continuous family (today: the built-in normal)
    if meta.continuous and None not in (meta.weak_derivative, meta.inverse_cdf, meta.moments):
        caps.add("kind:normal")
    if meta.support is not None:
        caps.add("enumerable")
    if family.reparameterized:
        caps.add("reparameterizable")
        caps.add("continuous")
    else:
        caps.add("discrete")
    if differentiable_f and family.reparameterized:
        caps.add("differentiable_f")
    return frozenset(caps)


def _make(spec: cf.Spec, name: str, group: str, description: str,
          extra: frozenset = frozenset()) -> Problem:
    caps = _family_caps(spec.family, spec.differentiable_f, spec.relaxable) | extra
    return Problem(
        name, spec.family, spec.theta, spec.f, float(spec.value), spec.grad, caps, group,
        description,
    )


def _builders() -> list[tuple[str, Callable[[], Problem]]]:
    """``(name, build)`` per problem, in registry order; ``build()`` makes the problem (its
    exact answer included), so that a run of a few problems builds only those."""
    out: list[tuple[str, Callable[[], Problem]]] = []

    def add(name: str, spec: Callable[[], cf.Spec], group: str, description: str,
            extra: frozenset = frozenset()) -> None:
        out.append((name, lambda: _make(spec(), name, group, description, extra)))

    for d in (1, 10, 100):
        add(f"gauss_square_d{d}", partial(cf.gauss_square, d, 1.0), "gaussian",
            f"sum (x-1)^2, x ~ N(loc, scale^2) diagonal, d={d}")
        add(f"gauss_exp_d{d}", partial(cf.gauss_exp, d, 1.0), "gaussian",
            f"sum exp(-x^2), diagonal normal, d={d}")
        add(f"gauss_cos_d{d}", partial(cf.gauss_cos, d, 2.0), "gaussian",
            f"sum cos(2x), diagonal normal, d={d}")
    for t in (0.45, 0.499):
        add(f"bernoulli_t{t}", partial(cf.bernoulli_toy, t), "bernoulli",
            f"(b - {t})^2, b ~ Bern(sigmoid(phi)), phi = 0")
    add("categorical_k10", lambda: cf.categorical_toy(10, 0.45), "categorical",
        "(x/9 - 0.45)^2, x ~ Cat(softmax(theta)), K = 10")
    add("bs_call", lambda: cf.black_scholes(digital=False, strike=105.0), "finance",
        "Black-Scholes call, S0=100, K=105: delta (d/d spot) and vega (d/d sigma)")
    add("bs_digital", lambda: cf.black_scholes(digital=True, strike=120.0), "finance",
        "Black-Scholes cash-or-nothing digital, S0=100, K=120: delta and vega")
    add("blr_elbo", cf.blr_elbo, "bayes",
        "conjugate Bayesian linear regression ELBO, diagonal normal q, d = 5")
    add("bandit_k10", lambda: cf.bandit(10), "rl",
        "softmax policy over 10 arms, noisy rewards (policy gradient)")
    # sequential programs (sg.programs): "program" selects the causal-credit entries
    prog = frozenset({"program"})
    add("sequence_v3_t4", pg.sequence_policy, "programs",
        "autoregressive policy, 3 tokens x 4 steps, reward on the finished sequence only "
        "(causal = whole-program credit)", prog)
    add("barrier_t6", pg.barrier_accrual, "programs",
        "binomial path, 6 dates, up-and-out barrier: accrual per date, rebate at knock-out; "
        "d/d per-date up-move logits", prog)
    add("ipd_t4", pg.prisoners_dilemma, "programs",
        "iterated prisoner's dilemma, 4 rounds, two memory-one agents: agent 1's discounted "
        "costs", prog)
    return out


_BUILDERS: dict[str, Callable[[], Problem]] = dict(_builders())
_PROBLEMS: dict[str, Problem] = {}


def problem_names() -> list[str]:
    """Names of all registered problems."""
    return list(_BUILDERS)


def get_problem(name: str) -> Problem:
    """The problem called ``name`` (built on first use); ``KeyError`` listing the known names
    otherwise."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown problem {name!r}; known: {', '.join(_BUILDERS)}")
    if name not in _PROBLEMS:
        _PROBLEMS[name] = _BUILDERS[name]()
    return _PROBLEMS[name]


def _glob(pattern: str):
    """A matcher for a shell-style pattern with ``*`` and ``?`` only (``[`` is literal)."""
    parts = (".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile("".join(parts)).fullmatch


def select(patterns: list[str], names: list[str], what: str) -> list[str]:
    """Names matching any of ``patterns``, in registry order.

    A pattern that is a registered name selects exactly that name (names contain ``[`` and
    ``]``, e.g. ``antithetic[pathwise]``); otherwise, if it has ``*`` or ``?``, it is a glob
    where ``*`` matches any run of characters and ``?`` one character (``[`` stays literal).

    Raises:
      ValueError: a pattern matches nothing (the message lists the known names).

    Examples:
      >>> select(["antithetic[pathwise]", "qmc64*"], ["antithetic[pathwise]", "qmc64[pathwise]",
      ...        "pathwise"], "estimator")
      ['antithetic[pathwise]', 'qmc64[pathwise]']
    """
    out: list[str] = []
    for pat in patterns:
        if pat in names:
            hits = [pat]
        elif "*" in pat or "?" in pat:
            match = _glob(pat)
            hits = [n for n in names if match(n)]
        else:
            hits = []
        if not hits:
            raise ValueError(f"unknown {what} {pat!r}; known: {', '.join(names)}")
        out.extend(h for h in hits if h not in out)
    return [n for n in names if n in out]


def flat(tree: PyTree) -> np.ndarray:
    """A float64 vector of a pytree's leaves in ``jax.flatten_util.ravel_pytree`` order."""
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in leaves])
