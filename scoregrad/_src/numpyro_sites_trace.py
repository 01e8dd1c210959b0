"""Running a NumPyro model and guide for :mod:`scoregrad.numpyro_sites`: traces and checks.

Internal module API (used by the other ``numpyro_sites_*`` modules): :func:`numpyro_modules`,
:func:`choice`, :func:`site_lp`, :func:`total` and :class:`Runner`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Runner", "choice", "numpyro_modules", "site_lp", "total"]


def numpyro_modules():
    try:
        import numpyro  # noqa: F401
        from numpyro import handlers
        from numpyro.ops.provenance import eval_provenance
    except ImportError as e:  # pragma: no cover - numpyro is a test dependency
        raise ImportError("scoregrad.numpyro_sites needs numpyro: pip install numpyro") from e
    return handlers, eval_provenance


def total(terms: list) -> jax.Array:
    return jnp.sum(jnp.stack(terms)) if terms else jnp.zeros(())


def site_lp(site) -> jax.Array:
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
                        and choice(msg["name"], msg["fn"], choices) == "score"):
                    msg["value"] = jax.lax.stop_gradient(msg["value"])
                    msg["intermediates"] = []

        return Stop(fn)


def choice(name: str, fn, choices: dict) -> str:
    c = choices.get(name, "auto")
    if c == "auto":
        return "pathwise" if fn.has_rsample else "score"
    if c == "pathwise" and not fn.has_rsample:
        raise ValueError(
            f"site_estimators[{name!r}] = 'pathwise', but guide site {name!r} "
            f"({type(fn).__name__}) has no reparameterized sampler (has_rsample is False): use "
            f"'score' for it, or leave it out of site_estimators (automatic choice).")
    return c


class Runner:
    """The model and guide with their arguments, run under NumPyro's handlers."""

    def __init__(self, model, guide, args, kwargs, choices):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.choices = choices

    # -- traces
    def _guide(self, theta, key, values=None, sub_fn=None, stop=False):
        handlers, _ = numpyro_modules()
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
        handlers, _ = numpyro_modules()
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
        return total([site_lp(s) for s in gtr.values() if s["type"] == "sample"])

    def site_terms(self, theta, values):
        """Per-site guide log-densities and model log-densities (two dicts of scalars)."""
        gtr, mtr = self.checked_traces(theta, values)
        lq = {n: site_lp(s) for n, s in gtr.items() if s["type"] == "sample"}
        lp = {n: site_lp(s) for n, s in mtr.items() if s["type"] == "sample"}
        return lq, lp

    def cost(self, theta, values) -> jax.Array:
        lq, lp = self.site_terms(theta, values)
        return total(list(lq.values())) - total(list(lp.values()))

    def checked_traces(self, theta, values):
        """Guide and model traces at a draw ``values`` of the guide's sites (checked)."""
        gtr, mtr = self.traces(theta, values)
        _check_values(gtr, values)
        return gtr, mtr

    # -- structure
    def direct_dependence(self, theta, x_struct):
        """Guide and model traces, and for every sample site the guide sites its log-density
        reads directly (``{name: frozenset}`` for the guide and for the model): every guide
        site's value is a tracked input of NumPyro's provenance tracking."""
        _, eval_provenance = numpyro_modules()
        values = {n: jnp.zeros(s.shape, s.dtype) for n, s in x_struct.items()}
        gtr, mtr = self.traces(theta, values)

        def fn(**vals):
            def sub(msg):
                if msg["type"] == "sample" and msg["name"] in vals and not msg["is_observed"]:
                    return vals[msg["name"]]
                return None

            gt = self._guide(theta, 0, None, sub)
            gvals = {n: s["value"] for n, s in gt.items() if s["type"] == "sample"}
            mt = self._model(theta, gvals)
            return ({n: site_lp(s) for n, s in gt.items() if s["type"] == "sample"},
                    {n: site_lp(s) for n, s in mt.items() if s["type"] == "sample"})

        deps_q, deps_p = eval_provenance(fn, **values)
        return gtr, mtr, dict(deps_q), dict(deps_p)


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
            choice(n, s["fn"], choices)


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

