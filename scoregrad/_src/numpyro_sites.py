r"""The ELBO of a NumPyro model and guide with one estimator per sample site (DiCE).

:func:`elbo` traces a NumPyro ``model`` and ``guide`` (with NumPyro's effect handlers) and turns
them into what the engine runs: a :class:`~scoregrad.Family` whose draw is the dict of the
guide's sample-site values and whose ``log_prob`` is the guide's log-density, the negative-ELBO
integrand ``f(x) = log q(x; theta) - log p(x, obs; theta)``, and an :class:`~scoregrad.Estimator`
that gives every guide site its own estimator:

* **pathwise** sites (reparameterizable: ``site["fn"].has_rsample``) keep their draw
  differentiable through the sampler;
* **score** sites (discrete, or chosen by the user) have their value stop-gradient and their
  log-density in a DiCE magic box applied only to the costs they can influence.

Per program (one run of the guide and of the model against it) the surrogate is

.. math::
   S = \sum_{c} \sum_j \boxdot\Big(\sum_{s \in D(c)} \sum_{i \sim_{K(s,c)} j}
       \log q_s[i]\Big)\, c[j] + \sum_{s} \sum_i \big(1 - \boxdot(\log q_s[i])\big)\, b_s[i] ,

over the elements ``j`` of the cost terms ``c`` (``log q_g`` of every guide site, ``-log p_m``
of every model site, one element per combination of their plates' indices), with ``D(c)`` the
score sites that influence ``c`` (found by NumPyro's provenance tracking: through the value of a
cost's own site and, transitively, through the distributions of the sites downstream of a score
site), ``i ~ j`` the elements of ``s`` that agree with ``j`` on the plates ``K(s, c)`` the two
share (per-element credit; :mod:`~scoregrad._src.numpyro_sites_credit`) and ``b_s[i]`` a
baseline. Its value is the negative-ELBO integrand, and by DiCE its derivatives of every order
are unbiased. The code: traces and checks in ``numpyro_sites_trace``, credit in
``numpyro_sites_credit``, the engine's plan in ``numpyro_sites_estimator``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax

from scoregrad._src.base import Estimator
from scoregrad._src.family import Family
from scoregrad._src.numpyro_sites_estimator import SiteBaseline, site_estimator
from scoregrad._src.numpyro_sites_trace import Runner, choice, numpyro_modules

__all__ = ["SiteBaseline", "SiteELBO", "elbo", "group_leave_one_out", "leave_one_out"]

_CHOICES = ("auto", "pathwise", "score")
_CREDITS = ("element", "site")


def leave_one_out() -> SiteBaseline:
    r"""Leave-one-out over the whole batch, per score site.

    Site ``s`` of program ``i`` gets :math:`b_{s,i} = \frac{N \bar G_s - G_{s,i}}{N-1}`, the
    mean downstream cost of the other :math:`N - 1` programs of the estimate, written as
    ``S + 1`` extra terms whose weights come from the batch means :math:`\bar G_s` (one chunked
    pass; with 8 or more terms the engine fixes their weights by a value pass and takes one
    reverse pass for their sum, else one per term). Independent of program i: unbiased at
    every derivative order. Needs ``num_samples >= 2``. The engine then sees ``S + 1`` f values
    per program (their mean is the program's integrand), so ``value_stderr`` is over those.
    """
    return SiteBaseline("leave_one_out", 1, True)


def group_leave_one_out(k: int) -> SiteBaseline:
    r"""Leave-one-out within a group of ``k`` programs (RLOO), per score site.

    A unit runs the guide ``k`` times; site ``s`` of program ``i`` gets the baseline
    :math:`b_{s,i} = \frac{1}{k-1}\sum_{j \ne i} G_{s,j}`, the mean over the other programs of
    its downstream cost :math:`G_s = \sum_{c:\, s \in D(c)} c`. It is independent of program
    i, so the estimator stays unbiased at every derivative order. ``num_samples`` must be a
    multiple of ``k``; groups never straddle chunks, so results do not depend on the chunk size.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"group_leave_one_out(k) needs an int k >= 2 programs per group; got "
                         f"{k!r}.")
    return SiteBaseline(f"group_leave_one_out({k})", k)


class SiteELBO(NamedTuple):
    """The ELBO of a NumPyro model and guide as the engine takes it (built by :func:`elbo`).

    Attributes:
      family: a :class:`~scoregrad.Family` whose draw is the dict of the guide's sample-site
        values and whose ``log_prob(theta, x)`` is the guide's log-density.
      estimator: the per-site estimator (pathwise / score function with DiCE credit).
      cost: ``cost(theta, x) -> scalar``: the negative-ELBO integrand
        :math:`\\log q(x;\\theta) - \\log p(x, \\mathrm{obs};\\theta)` (numpyro's loss sign).
      choices: the per-site choices the user made (``site_estimators``).
      runner: the model and guide with their arguments (internal: runs them under NumPyro's
        handlers).
    """

    family: Family
    estimator: Estimator
    cost: Callable[[dict, dict], jax.Array]
    choices: dict
    runner: Any

    def f(self, theta: dict) -> Callable[[dict], jax.Array]:
        """The integrand at ``theta``: pass it to ``sg.expectation`` with ``self.family``."""
        return lambda x: self.cost(theta, x)

    def expectation(self, theta: dict, key: jax.Array, *, num_samples: int,
                    estimator: Optional[Estimator] = None, **kw) -> jax.Array:
        """``sg.expectation(self.f(theta), self.family, theta, key, ...)``: the negative ELBO;
        its ``jax.grad`` is the per-site estimator (``estimator`` overrides it)."""
        from scoregrad._src.api import expectation

        return expectation(self.f(theta), self.family, theta, key, num_samples=num_samples,
                           estimator=self.estimator if estimator is None else estimator, **kw)

    def estimate_grad(self, theta: dict, key: jax.Array, *, num_samples: int,
                      estimator: Optional[Estimator] = None, **kw):
        """``sg.estimate_grad`` of the negative ELBO with standard errors per coordinate."""
        from scoregrad._src.api import estimate_grad

        return estimate_grad(self.f(theta), self.family, theta, key, num_samples=num_samples,
                             estimator=self.estimator if estimator is None else estimator, **kw)

    def sites(self, theta: dict) -> dict:
        """The estimator each guide site gets at ``theta``: ``"pathwise"`` or ``"score"``."""
        values = self.runner.sample(theta, jax.random.key(0))
        gtr, _ = self.runner.traces(theta, values)
        return {n: choice(n, s["fn"], self.choices) for n, s in gtr.items()
                if s["type"] == "sample"}

    def init_params(self, key: Any = 0) -> dict:
        """The initial value of every ``numpyro.param`` site of the guide and the model."""
        handlers, _ = numpyro_modules()
        r = self.runner
        gtr = handlers.trace(handlers.seed(r.guide, rng_seed=key)).get_trace(*r.args, **r.kwargs)
        vals = {n: s["value"] for n, s in gtr.items() if s["type"] == "sample"}
        m = handlers.seed(handlers.substitute(r.model, data=vals), rng_seed=key)
        mtr = handlers.trace(m).get_trace(*r.args, **r.kwargs)
        return {n: s["value"] for tr in (gtr, mtr) for n, s in tr.items()
                if s["type"] == "param"}


def elbo(model: Callable, guide: Callable, *args: Any,
         site_estimators: Optional[dict] = None,
         baseline: Optional[SiteBaseline] = None, credit: str = "element",
         **kwargs: Any) -> SiteELBO:
    r"""The negative ELBO of a NumPyro model and guide, with one estimator per guide site.

    Args:
      model: a NumPyro model (``numpyro.sample`` / ``numpyro.param`` / ``numpyro.plate``).
      guide: a NumPyro guide with one sample site per latent site of the model.
      *args, **kwargs: the arguments of both (data); ``site_estimators``, ``baseline`` and
        ``credit`` are reserved.
      site_estimators: ``{site name: "pathwise" | "score" | "auto"}`` for guide sites; the
        others are ``"auto"``: pathwise where the site's distribution is reparameterizable
        (``has_rsample``), score function otherwise.
      baseline: ``None`` (the constant 1 only), :func:`leave_one_out` ``()`` (per score site,
        the mean downstream cost of the other ``N - 1`` programs of the batch) or
        :func:`group_leave_one_out` ``(k)`` (of the other ``k - 1`` programs of the unit),
        per score element.
      credit: ``"element"`` (default): a score site in a ``numpyro.plate`` is credited per
        element: element ``i`` only with the elements of the costs in the plates it shares
        with them that have the same index (Pyro's TraceGraph_ELBO's Rao-Blackwellization,
        here at every derivative order); ``"site"``: the whole site (the sum of its elements'
        log q) with every cost it influences. Both are unbiased; per element has less
        variance for local latents.

    Returns:
      A :class:`SiteELBO`: ``family``, ``f(theta)`` (the negative-ELBO integrand at theta) and
      ``estimator``, so that ``sg.expectation(p.f(theta), p.family, theta, key,
      num_samples=N, estimator=p.estimator)`` (= ``p.expectation(theta, key,
      num_samples=N)``) is the negative ELBO whose ``jax.grad`` is the per-site estimator and
      whose ``jax.hessian`` is unbiased. ``theta`` is the dict of every ``numpyro.param`` site's
      value (``p.init_params()``).

    * **Bias**: none; each cost element is credited to the score-site elements that influence
      it, provided the program keeps the conditional independence its plates declare
      (element ``i`` of a site reads element ``i`` of the sites in the same plate only).
    * **Needs**: a differentiable ``log_prob`` at each site; reparameterized samplers for the
      pathwise sites.
    * **Derivative order**: all orders (DiCE).

    Raises:
      ValueError: at construction for a bad ``site_estimators`` value; at trace time for a
        site name the guide does not sample, ``"pathwise"`` on a site without a reparameterized
        sampler, a model/guide mismatch, theta not matching the param sites, a plate that
        subsamples, or one plate name with two sizes.

    Examples:
      >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
      >>> import scoregrad.numpyro_sites as ns
      >>> def model():
      ...     c = numpyro.sample("c", dist.Bernoulli(probs=0.5))
      ...     z = numpyro.sample("z", dist.Normal(2.0 * c - 1.0, 1.0))
      ...     numpyro.sample("y", dist.Normal(z, 1.0), obs=0.5)
      >>> def guide():
      ...     c = numpyro.sample("c", dist.Bernoulli(logits=numpyro.param("a", 0.0)))
      ...     numpyro.sample("z", dist.Normal(numpyro.param("m", 0.0) + c, 1.0))
      >>> p = ns.elbo(model, guide)
      >>> theta = {"a": jnp.array(0.0), "m": jnp.array(0.0)}
      >>> p.sites(theta)
      {'c': 'score', 'z': 'pathwise'}
      >>> loss = lambda th: p.expectation(th, jax.random.key(0), num_samples=64)
      >>> g = jax.jit(jax.grad(loss))(theta)
      >>> sorted(g)
      ['a', 'm']
    """
    choices = _checked_args(model, guide, site_estimators, baseline, credit)
    runner = Runner(model, guide, args, kwargs, choices)
    family = Family(log_prob=runner.log_q, sample=runner.sample, name="numpyro_guide")
    est = site_estimator(runner, family, baseline or SiteBaseline("none", 1),
                         credit == "element")
    return SiteELBO(family, est, runner.cost, choices, runner)


def _checked_args(model, guide, site_estimators, baseline, credit) -> dict:
    for what, fn in (("model", model), ("guide", guide)):
        if not callable(fn):
            raise TypeError(f"sg.numpyro_sites.elbo: `{what}` must be a callable NumPyro "
                            f"program; got {type(fn).__name__}.")
    choices = dict(site_estimators or {})
    for n, c in choices.items():
        if c not in _CHOICES:
            raise ValueError(
                f"site_estimators[{n!r}] = {c!r}; choose one of {list(_CHOICES)} ('auto': "
                "pathwise where the site is reparameterizable, score function otherwise).")
    if baseline is not None and not isinstance(baseline, SiteBaseline):
        raise TypeError(
            "sg.numpyro_sites.elbo(baseline=...) must be None, sg.numpyro_sites.leave_one_out() "
            f"or sg.numpyro_sites.group_leave_one_out(k); got {type(baseline).__name__}.")
    if not isinstance(credit, str) or credit not in _CREDITS:
        raise ValueError(
            f"sg.numpyro_sites.elbo(credit={credit!r}): choose 'element' (per plate element, "
            "the default) or 'site' (a plated site credited as a whole).")
    return choices
