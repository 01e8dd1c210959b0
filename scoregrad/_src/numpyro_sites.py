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
   S = \sum_{c} \boxdot\Big(\sum_{s \in D(c)} \log q_s\Big)\, c
       + \sum_{s} \big(1 - \boxdot(\log q_s)\big)\, b_s ,

over the cost terms ``c`` (``log q_g`` of every guide site, ``-log p_m`` of every model site),
with ``D(c)`` the score sites that influence ``c`` (found by NumPyro's provenance tracking:
through the value of a cost's own site and, transitively, through the distributions of the sites
downstream of a score site) and ``b_s`` a baseline for site ``s`` built from the other programs of
its group. Its value is the negative-ELBO integrand, and by DiCE its derivatives of every order
are unbiased.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src.base import Estimator, Plan, Target, UnitOut, magic_box
from scoregrad._src.family import Family

PyTree = Any
__all__ = ["SiteBaseline", "SiteELBO", "elbo", "group_leave_one_out", "leave_one_out"]

_CHOICES = ("auto", "pathwise", "score")


def _numpyro():
    try:
        import numpyro  # noqa: F401
        from numpyro import handlers
        from numpyro.ops.provenance import eval_provenance
    except ImportError as e:  # pragma: no cover - numpyro is a test dependency
        raise ImportError("scoregrad.numpyro_sites needs numpyro: pip install numpyro") from e
    return handlers, eval_provenance


class SiteBaseline(NamedTuple):
    """A per-site baseline: ``group`` programs per unit; ``batch``: leave-one-out over the
    whole batch (weights from the engine's batch statistics)."""

    name: str
    group: int
    batch: bool = False


def leave_one_out() -> SiteBaseline:
    r"""Leave-one-out over the whole batch, per score site.

    Site ``s`` of program ``i`` gets :math:`b_{s,i} = rac{N ar G_s - G_{s,i}}{N-1}`, the
    mean downstream cost of the other :math:`N - 1` programs of the estimate, written as
    ``S + 1`` extra terms whose weights come from the batch means :math:`ar G_s` (one chunked
    pass; the engine takes one reverse pass per term). Independent of program i: unbiased at
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


def _total(terms: list) -> jax.Array:
    return jnp.sum(jnp.stack(terms)) if terms else jnp.zeros(())


def _site_lp(site) -> jax.Array:
    lp = site["fn"].log_prob(site["value"])
    if site.get("scale") is not None:
        lp = site["scale"] * lp
    return jnp.sum(lp)


class _StopScore:
    """Builds a NumPyro messenger that stops the gradient of the value of each score site."""

    def __init__(self, choices: dict):
        self.choices = choices

    def __call__(self, fn):
        import numpyro.primitives as prim

        choices = self.choices

        class Stop(prim.Messenger):
            def postprocess_message(self, msg):
                if (msg["type"] == "sample" and not msg["is_observed"]
                        and _choice(msg["name"], msg["fn"], choices) == "score"):
                    msg["value"] = jax.lax.stop_gradient(msg["value"])
                    msg["intermediates"] = []

        return Stop(fn)


def _choice(name: str, fn, choices: dict) -> str:
    c = choices.get(name, "auto")
    if c == "auto":
        return "pathwise" if fn.has_rsample else "score"
    if c == "pathwise" and not fn.has_rsample:
        raise ValueError(
            f"site_estimators[{name!r}] = 'pathwise', but guide site {name!r} "
            f"({type(fn).__name__}) has no reparameterized sampler (has_rsample is False): use "
            f"'score' for it, or leave it out of site_estimators (automatic choice).")
    return c


class _Runner:
    """The model and guide with their arguments, run under NumPyro's handlers."""

    def __init__(self, model, guide, args, kwargs, choices):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.choices = choices

    # -- traces
    def _guide(self, theta, key, values=None, sub_fn=None, stop=False):
        handlers, _ = _numpyro()
        g = handlers.substitute(self.guide, data=dict(theta))
        if values is not None:
            g = handlers.substitute(g, data=dict(values))
        if stop:
            g = _StopScore(self.choices)(g)
        g = handlers.seed(g, rng_seed=key)
        if sub_fn is not None:
            g = handlers.substitute(g, substitute_fn=sub_fn)
        return handlers.trace(g).get_trace(*self.args, **self.kwargs)

    def _model(self, theta, values):
        handlers, _ = _numpyro()
        m = handlers.substitute(self.model, data={**dict(theta), **dict(values)})
        m = handlers.seed(m, rng_seed=0)
        return handlers.trace(m).get_trace(*self.args, **self.kwargs)

    def traces(self, theta, values, sub_fn=None):
        """Guide and model traces at the given latent values, checked against each other."""
        _check_theta(theta)
        gtr = self._guide(theta, 0, values, sub_fn)
        _check_guide(gtr, self.choices)
        vals = {n: s["value"] for n, s in gtr.items() if s["type"] == "sample"}
        mtr = self._model(theta, vals)
        _check_match(gtr, mtr, theta)
        return gtr, mtr

    # -- the family and the integrand
    def sample(self, theta, key) -> dict:
        _check_theta(theta)
        gtr = self._guide(theta, key, stop=True)
        _check_guide(gtr, self.choices)
        return {n: s["value"] for n, s in gtr.items() if s["type"] == "sample"}

    def log_q(self, theta, values) -> jax.Array:
        gtr = self._guide(theta, 0, values)
        _check_guide(gtr, self.choices)
        _check_values(gtr, values)
        return _total([_site_lp(s) for s in gtr.values() if s["type"] == "sample"])

    def site_terms(self, theta, values):
        """Per-site guide log-densities (dict) and per-site costs (guide dict, model dict)."""
        gtr, mtr = self.traces(theta, values)
        _check_values(gtr, values)
        lq = {n: _site_lp(s) for n, s in gtr.items() if s["type"] == "sample"}
        lp = {n: _site_lp(s) for n, s in mtr.items() if s["type"] == "sample"}
        return lq, lp

    def cost(self, theta, values) -> jax.Array:
        lq, lp = self.site_terms(theta, values)
        return _total(list(lq.values())) - _total(list(lp.values()))

    # -- structure
    def structure(self, theta, x_struct):
        """Guide sites (sorted), model sites (sorted), the score sites and the dependence
        matrix ``D`` (costs x score sites): cost ``c`` depends on score site ``s``."""
        handlers, eval_provenance = _numpyro()
        values = {n: jnp.zeros(s.shape, s.dtype) for n, s in x_struct.items()}
        gtr, mtr = self.traces(theta, values)
        guide_sites = sorted(n for n, s in gtr.items() if s["type"] == "sample")
        model_sites = sorted(n for n, s in mtr.items() if s["type"] == "sample")
        score = [n for n in guide_sites if _choice(n, gtr[n]["fn"], self.choices) == "score"]
        zeros = {n: values[n] for n in score}

        def fn(**vals):
            def sub(msg):
                # A score site's value: the tracked input, plus 0 * a fresh draw from its
                # distribution, so that the provenance of the distribution's arguments (the
                # sites upstream of it) flows to everything downstream of it.
                if msg["type"] == "sample" and msg["name"] in vals and not msg["is_observed"]:
                    fresh = msg["fn"](*msg["args"], **msg["kwargs"])
                    return 0 * fresh + vals[msg["name"]]
                return None

            gt = self._guide(theta, 0, None, sub)
            gvals = {n: s["value"] for n, s in gt.items() if s["type"] == "sample"}
            mt = self._model(theta, gvals)
            return ({n: _site_lp(s) for n, s in gt.items() if s["type"] == "sample"},
                    {n: _site_lp(s) for n, s in mt.items() if s["type"] == "sample"})

        deps_q, deps_p = eval_provenance(fn, **zeros)
        rows = [deps_q[n] for n in guide_sites] + [deps_p[n] for n in model_sites]
        d = np.array([[s in r for s in score] for r in rows], dtype=bool).reshape(
            len(rows), len(score))
        return guide_sites, model_sites, score, d


def _check_theta(theta) -> None:
    if not isinstance(theta, dict):
        raise TypeError(
            "sg.numpyro_sites: theta must be a dict from the names of the numpyro.param sites "
            f"of the model and guide to their values; got {type(theta).__name__}.")


def _check_guide(gtr, choices: dict) -> None:
    names = {n for n, s in gtr.items() if s["type"] == "sample"}
    for n, s in gtr.items():
        if s["type"] == "sample" and s["is_observed"]:
            raise ValueError(
                f"sg.numpyro_sites: the guide observes site {n!r} (obs=...); a guide's sample "
                "sites are the latent variables. Remove obs= in the guide and observe it in the "
                "model.")
        if s["type"] == "sample" and s.get("infer", {}).get("enumerate"):
            raise ValueError(
                f"sg.numpyro_sites: guide site {n!r} asks for enumeration (infer="
                f"{s['infer']!r}); per-site estimators sample every site. Remove the infer "
                "option, or use numpyro's TraceEnum_ELBO.")
    _check_plates(gtr, "guide")
    unknown = sorted(set(choices) - names)
    if unknown:
        raise ValueError(
            f"site_estimators names {unknown}, which are not sample sites of the guide; the "
            f"guide's sites are {sorted(names)}. Fix the names or remove them.")
    for n, s in gtr.items():
        if s["type"] == "sample":
            _choice(n, s["fn"], choices)


def _check_plates(tr, what: str) -> None:
    for n, s in tr.items():
        if s["type"] == "plate" and len(s.get("args") or ()) == 2:
            size, sub = s["args"]
            if sub is not None and sub != size:
                raise ValueError(
                    f"sg.numpyro_sites: the {what}'s plate {n!r} subsamples ({sub} of {size}); "
                    "its subsample would be drawn apart from the other program's. Use the full "
                    "plate (subsample_size=None), or subsample the data outside and pass it as "
                    "an argument.")


def _check_values(gtr, values) -> None:
    names = {n for n, s in gtr.items() if s["type"] == "sample"}
    missing = sorted(names - set(values))
    if missing:
        raise ValueError(
            f"sg.numpyro_sites: the draw has no value for the guide sites {missing}. Pass draws "
            "of this problem's family (a dict with every guide sample site).")
    extra = sorted(set(values) - names)
    if extra:
        raise ValueError(
            f"sg.numpyro_sites: the draw has values for {extra}, which the guide does not sample "
            f"(its sites are {sorted(names)}). Pass draws of this problem's family.")


def _check_match(gtr, mtr, theta) -> None:
    _check_plates(mtr, "model")
    g = {n for n, s in gtr.items() if s["type"] == "sample"}
    latent = {n for n, s in mtr.items() if s["type"] == "sample" and not s["is_observed"]}
    observed = {n for n, s in mtr.items() if s["type"] == "sample" and s["is_observed"]}
    if latent - g:
        raise ValueError(
            f"sg.numpyro_sites: model/guide mismatch: the model's latent sites "
            f"{sorted(latent - g)} have no sample site in the guide. Add numpyro.sample(name, "
            "...) for each to the guide, or observe them in the model (obs=...).")
    if g & observed:
        raise ValueError(
            f"sg.numpyro_sites: model/guide mismatch: the guide samples {sorted(g & observed)}, "
            "which the model observes. Remove them from the guide.")
    if g - latent:
        raise ValueError(
            f"sg.numpyro_sites: model/guide mismatch: the guide samples {sorted(g - latent)}, "
            "which the model does not have. Add them to the model or remove them from the "
            "guide.")
    params = {n for tr in (gtr, mtr) for n, s in tr.items() if s["type"] == "param"}
    if set(theta) - params:
        raise ValueError(
            f"sg.numpyro_sites: theta has entries {sorted(set(theta) - params)} that are not "
            f"numpyro.param sites of the model or guide (those are {sorted(params)}).")
    missing = params - set(theta)
    if missing:
        raise ValueError(
            f"sg.numpyro_sites: the numpyro.param sites {sorted(missing)} have no entry in "
            "theta, so they would keep their initial value and get no gradient. Pass them in "
            "theta (problem.init_params() returns every param's initial value).")
    for n, site in ((n, s) for tr in (gtr, mtr) for n, s in tr.items() if s["type"] == "param"):
        init: Any = site["args"][0] if site["args"] else None
        if hasattr(init, "shape") or isinstance(init, (int, float)):
            if np.shape(init) != jnp.shape(theta[n]):
                raise ValueError(
                    f"sg.numpyro_sites: theta[{n!r}] has shape {jnp.shape(theta[n])} but the "
                    f"numpyro.param site {n!r} is declared with shape {np.shape(init)}; a "
                    "different shape silently changes the program (broadcasting). Pass a value "
                    "of the declared shape (problem.init_params() gives them).")


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
        return {n: _choice(n, s["fn"], self.choices) for n, s in gtr.items()
                if s["type"] == "sample"}

    def init_params(self, key: Any = 0) -> dict:
        """The initial value of every ``numpyro.param`` site of the guide and the model."""
        handlers, _ = _numpyro()
        r = self.runner
        gtr = handlers.trace(handlers.seed(r.guide, rng_seed=key)).get_trace(*r.args, **r.kwargs)
        vals = {n: s["value"] for n, s in gtr.items() if s["type"] == "sample"}
        m = handlers.seed(handlers.substitute(r.model, data=vals), rng_seed=key)
        mtr = handlers.trace(m).get_trace(*r.args, **r.kwargs)
        return {n: s["value"] for tr in (gtr, mtr) for n, s in tr.items()
                if s["type"] == "param"}


_NOT_UNBIASED = (
    "the per-site estimator evaluates the guide and the model itself (its costs are the ELBO's "
    "per-site log-densities), so the unit applied to another integrand h does not estimate "
    "grad E[h]")


def _vec(d: dict, names: list) -> jax.Array:
    return jnp.stack([jnp.asarray(d[n]) for n in names]) if names else jnp.zeros((0,))


def _site_estimator(runner: _Runner, family: Family, baseline: SiteBaseline) -> Estimator:
    k = baseline.group
    name = "numpyro_sites" + ("" if k == 1 else f"[{baseline.name}]")

    def bind(target: Target) -> Plan:
        if target.family is not family:
            raise TypeError(
                f"{name}: this estimator belongs to the family of the sg.numpyro_sites.elbo(...) "
                "problem that built it; pass problem.family (and problem.f(theta)).")
        guide_sites, model_sites, score, d = runner.structure(target.theta, target.x_struct)
        all_score = len(score) == len(guide_sites)
        batch = baseline.batch and bool(score)
        dmat = jnp.asarray(d, dtype=bool)

        def draw(model, params, draws):
            if all_score:  # nothing to differentiate through: the engine may presample
                x = draws.sample() if k == 1 else draws.sample(num=k)
            elif k == 1:
                x = draws.rsample()
            else:
                key = draws.key()
                keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
                    key, jnp.arange(k, dtype=jnp.uint32))
                x = jax.vmap(lambda kk: model.draw(params, kk))(keys)
            return x if k > 1 else jax.tree_util.tree_map(lambda a: a[None], x)

        def terms(theta, x):
            lq, lp = runner.site_terms(theta, x)
            costs = jnp.concatenate([_vec(lq, guide_sites), -_vec(lp, model_sites)])
            return _vec(lq, score).astype(costs.dtype), costs

        def unit(model, params, draws, state):
            xs = draw(model, params, draws)
            lq, c = jax.vmap(lambda x: terms(params.theta, x))(xs)  # (k, S), (k, C)
            dm = dmat.astype(c.dtype)
            box = magic_box(lq @ dm.T)  # (k, C): each cost boxed with the sites it depends on
            per = jnp.sum(box * c, axis=1)
            c_sg = jax.lax.stop_gradient(c)
            # Baseline terms (1 - box(log q_s)) b_s: value 0, expectation 0 at every order for
            # b_s independent of site s's draw. b_s = 1 cancels, at first order, the direct
            # derivative of the site's own cost log q_s (its score, mean zero: what
            # TraceGraph_ELBO's stop_gradient drops), keeping every higher order unbiased.
            b = jnp.ones_like(lq)
            if k > 1 and score:
                down = c_sg @ dm  # (k, S): each score site's downstream cost
                b = b + (jnp.sum(down, axis=0, keepdims=True) - down) / (k - 1)
            d = 1 - magic_box(lq)
            per = per + jnp.sum(d * b.astype(c.dtype), axis=1)
            if batch:  # k == 1: terms and f values for the batch-wide leave-one-out
                down = (c_sg @ dm)[0]
                m = len(score) + 1
                total = jnp.sum(c_sg[0])
                extra = jnp.concatenate([d[0], jnp.sum(d[0] * down)[None]])
                fvals = jnp.concatenate([m * down, (m * (total - jnp.sum(down)))[None]])
                return UnitOut(jnp.concatenate([per, extra.astype(per.dtype)]), fvals)
            return UnitOut(jnp.mean(per)[None], jnp.sum(c_sg, axis=1))

        def weights(fstats, state, n):
            if fstats.per is None:
                raise ValueError("the engine passed no per-site statistics (FStats.per)")
            m = len(score) + 1
            gbar = jnp.asarray(fstats.per)[:-1] / m
            n = jnp.asarray(n, gbar.dtype)
            return jnp.concatenate([jnp.ones((1,), gbar.dtype), n / (n - 1) * gbar,
                                    (-1.0 / (n - 1))[None]])

        if batch:
            return Plan(unit, weights=weights, min_units=2, not_unbiased=_NOT_UNBIASED)
        return Plan(unit, draws_per_unit=k, not_unbiased=_NOT_UNBIASED)

    return Estimator(name, lambda theta: (), bind, lambda state, fstats: state)


def elbo(model: Callable, guide: Callable, *args: Any,
         site_estimators: Optional[dict] = None,
         baseline: Optional[SiteBaseline] = None, **kwargs: Any) -> SiteELBO:
    r"""The negative ELBO of a NumPyro model and guide, with one estimator per guide site.

    Args:
      model: a NumPyro model (``numpyro.sample`` / ``numpyro.param`` / ``numpyro.plate``).
      guide: a NumPyro guide with one sample site per latent site of the model.
      *args, **kwargs: the arguments of both (data); ``site_estimators`` and ``baseline``
        are reserved.
      site_estimators: ``{site name: "pathwise" | "score" | "auto"}`` for guide sites; the
        others are ``"auto"``: pathwise where the site's distribution is reparameterizable
        (``has_rsample``), score function otherwise.
      baseline: ``None`` (the constant 1 only), :func:`leave_one_out` ``()`` (per score site,
        the mean downstream cost of the other ``N - 1`` programs of the batch) or
        :func:`group_leave_one_out` ``(k)`` (of the other ``k - 1`` programs of the unit).

    Returns:
      A :class:`SiteELBO`: ``family``, ``f(theta)`` (the negative-ELBO integrand at theta) and
      ``estimator``, so that ``sg.expectation(p.f(theta), p.family, theta, key,
      num_samples=N, estimator=p.estimator)`` (= ``p.expectation(theta, key,
      num_samples=N)``) is the negative ELBO whose ``jax.grad`` is the per-site estimator and
      whose ``jax.hessian`` is unbiased. ``theta`` is the dict of every ``numpyro.param`` site's
      value (``p.init_params()``).

    * **Bias**: none; each cost is credited to exactly the score sites that influence it.
    * **Needs**: a differentiable ``log_prob`` at each site; reparameterized samplers for the
      pathwise sites.
    * **Derivative order**: all orders (DiCE).

    Raises:
      ValueError: at construction for a bad ``site_estimators`` value; at trace time for a
        site name the guide does not sample, ``"pathwise"`` on a site without a reparameterized
        sampler, a model/guide mismatch, or theta not matching the param sites.

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
    if baseline is None:
        baseline = SiteBaseline("none", 1)
    if not isinstance(baseline, SiteBaseline):
        raise TypeError(
            "sg.numpyro_sites.elbo(baseline=...) must be None, sg.numpyro_sites.leave_one_out() "
            f"or sg.numpyro_sites.group_leave_one_out(k); got {type(baseline).__name__}.")
    runner = _Runner(model, guide, args, kwargs, choices)
    family = Family(log_prob=runner.log_q, sample=runner.sample, name="numpyro_guide")
    est = _site_estimator(runner, family, baseline)
    return SiteELBO(family, est, runner.cost, choices, runner)
