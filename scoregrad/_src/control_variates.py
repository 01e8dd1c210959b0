r"""Control variates with known expectation, the delta method, and Rao-Blackwellization.

A control variate is a function :math:`h(x;\theta)` with a known mean
:math:`\mu(\theta) = \mathbb{E}_{p(x;\theta)}[h(x;\theta)]`. Its gradient estimate by the
wrapped estimator itself, on the same draws (score function: :math:`h\,\nabla\log p +
\nabla_\theta h`; pathwise: :math:`\nabla_\theta h(g(\theta,\epsilon))`; measure-valued, REBAR,
ARM, ...: their estimate for h), minus :math:`\nabla\mu` has expectation zero for every theta
when that estimator is unbiased, so any multiple of it can be subtracted without bias. :func:`with_control_variates` adds them to
an estimator with coefficients fitted per parameter coordinate on other draws (cross-fitting,
:mod:`scoregrad._src.fitted`), so the result stays unbiased; several at once are fitted jointly
by per-coordinate least squares.

References:
  Mohamed, Rosca, Figurnov and Mnih, "Monte Carlo Gradient Estimation in Machine Learning",
  JMLR 2020, §7 (control variates, the delta method, Rao-Blackwellization).
  Paisley, Blei and Jordan, "Variational Bayesian Inference with Stochastic Search", ICML 2012.
  Ranganath, Gerrish and Blei, "Black Box Variational Inference", AISTATS 2014.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from scoregrad._src import binding
from scoregrad._src.base import Estimator, FStats, Plan, UnitOut, fixed, magic_box
from scoregrad._src.estimators.score import score_function
from scoregrad._src.family import require

PyTree = Any


class ControlVariate(NamedTuple):
    """A control variate: ``h(x, theta) -> scalar`` with ``mean(theta) = E_p[h(x, theta)]``.

    ``resolve``, when set, builds the control variate for the family at trace time (the delta
    method needs the family's mean and variance).
    """

    name: str
    h: Callable[[PyTree, PyTree], jax.Array] | None
    mean: Callable[[PyTree], jax.Array] | None
    resolve: Callable[[Any], ControlVariate] | None = None


def control_variate(h: Callable, mean: Callable, *, name: str = "cv") -> ControlVariate:
    r"""A user control variate :math:`h(x;\theta)` with known :math:`\mathbb{E}_{p(x;\theta)}[h]`.

    Args:
      h: ``h(x, theta) -> scalar``, differentiable in theta where it depends on it.
      mean: ``mean(theta) -> scalar``, the exact expectation of ``h`` under ``p(x; theta)`` for
        every theta (it is differentiated: a wrong mean biases the gradient).
      name: a label.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> cv = sg.control_variates.control_variate(lambda x, th: jnp.sum(x),
      ...                                         lambda th: jnp.sum(th["loc"]))
      >>> est = sg.control_variates.with_control_variates(sg.score_function(), cv)
      >>> theta = {"loc": jnp.ones(2), "scale": jnp.ones(2)}
      >>> r = sg.estimate_grad(lambda x: jnp.sum(x), sg.families.normal(), theta,
      ...                      jax.random.key(0), num_samples=1000, estimator=est)
      >>> bool(jnp.allclose(r.grad["loc"], 1.0, atol=1e-4))  # f == h: zero variance
      True
    """
    for arg, val in (("h", h), ("mean", mean)):
        if not callable(val):
            raise TypeError(f"control_variate({arg}=...) must be callable; got {val!r}.")
    return ControlVariate(name, h, mean)


def _family_moments(family):
    moments = require(
        family, "moments", "delta_method",
        "Pass moments=(mean_fn, variance_fn) with mean_fn(theta) and variance_fn(theta) shaped "
        "like the draw (the diagonal of its covariance).",
    )
    return (lambda th: moments(th)[0]), (lambda th: moments(th)[1])


def delta_method(f: Callable, *, order: int = 2, moments: tuple | None = None) -> ControlVariate:
    r"""The delta-method control variate: a Taylor expansion of f about the mean of the draw.

    With :math:`a = \perp m(\theta)` (the mean of x, held fixed), :math:`g = \nabla f(a)` and
    :math:`H = \nabla^2 f(a)`,

    .. math::
       h(x) = f(a) + g^\top (x - a) + \tfrac12 (x - a)^\top H (x - a), \qquad
       \mathbb{E}[h] = f(a) + g^\top(m - a) + \tfrac12 \big(\textstyle\sum_j H_{jj} v_j
       + (m - a)^\top H (m - a)\big),

    exact for independent coordinates with variances :math:`v` (the built-in families). Use with :func:`with_control_variates`.

    * **Needs**: f differentiable in x (twice for ``order=2``; the d x d Hessian is computed once
      per chunk, so prefer ``order=1`` in high dimension); the mean and diagonal variance
      of the draw (coordinates independent): ``family.capabilities.moments`` (built-in normal and
      bernoulli, adapted ones), else ``moments``.
    * Unbiased with cross-fitted coefficients; ``jax.hessian`` stays unbiased (its coefficients
      are stop-gradient, so its mean is exact for every theta).

    Args:
      f: the integrand ``f(x) -> scalar`` (the same as the one estimated, or an approximation).
      order: 1 or 2.
      moments: ``(mean_fn, variance_fn)`` of theta, each shaped like the draw.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> f = lambda x: jnp.sum(x**2)
      >>> est = sg.control_variates.with_control_variates(
      ...     sg.score_function(), sg.control_variates.delta_method(f))
      >>> theta = {"loc": jnp.ones(2), "scale": jnp.ones(2)}
      >>> r = sg.estimate_grad(f, sg.families.normal(), theta, jax.random.key(0),
      ...                      num_samples=256, estimator=est)
      >>> bool(jnp.allclose(r.grad["scale"], 2.0, atol=1e-3))  # quadratic f: exact
      True

    References:
      Mohamed et al., JMLR 2020, §7.3 (the delta method); Paisley et al., ICML 2012.
    """
    if not callable(f):
        raise TypeError(f"delta_method(f=...) must be callable f(x) -> scalar; got {f!r}.")
    if order not in (1, 2):
        raise ValueError(f"delta_method(order=...) must be 1 or 2; got {order!r}.")

    def resolve(family):
        mean_fn, var_fn = moments if moments is not None else _family_moments(family)

        def expansion(theta):
            a = jax.lax.stop_gradient(mean_fn(theta))
            flat_a, unravel = ravel_pytree(a)
            fr = lambda z: f(unravel(z))  # noqa: E731
            shape = jnp.shape(jax.eval_shape(fr, flat_a))
            if shape != ():
                raise TypeError(
                    f"delta_method(f=...): f must return a scalar (it is expanded to second "
                    f"order around the mean); got shape {shape}. For an array-valued integrand, "
                    "estimate each entry with its own control function, e.g. "
                    "delta_method(lambda x: f(x)[j]), or drop the control variate.")
            g = jax.grad(fr)(flat_a)
            hess = jax.hessian(fr)(flat_a) if order == 2 else jnp.zeros((g.size, g.size), g.dtype)
            return fr(flat_a), g, hess, flat_a

        def h(x, theta):
            f0, g, hess, a = expansion(theta)
            d = ravel_pytree(x)[0].astype(a.dtype) - a
            return f0 + jnp.dot(g, d) + 0.5 * jnp.dot(d, hess @ d)

        def mean(theta):
            f0, g, hess, a = expansion(theta)
            d = ravel_pytree(mean_fn(theta))[0] - a
            v = ravel_pytree(var_fn(theta))[0]
            return f0 + jnp.dot(g, d) + 0.5 * (jnp.dot(jnp.diag(hess), v) + jnp.dot(d, hess @ d))

        return ControlVariate(f"delta{order}", h, mean)

    return ControlVariate(f"delta{order}", None, None, resolve)


def _resolved(cv: ControlVariate, family) -> ControlVariate:
    if cv.resolve is not None:
        cv = cv.resolve(family)
    if cv.h is None or cv.mean is None:  # only a `resolve` control variate leaves them unset
        raise TypeError(
            f"control variate {cv.name!r} has no h or mean; build it with "
            "sg.control_variates.control_variate(h, mean)."
        )
    return cv


def _on_integrand(model, params, h):
    """``(model, params)`` whose integrand is ``h(x, theta)``, everything else unchanged.

    theta reaches h through ``params.f``, so a direct dependence of h on theta is differentiated
    like one of f. A reference shift of f (``Model.f_shift``, if the engine set one) is not
    applied to h: the control-variate terms stay independent of f.
    """
    fields: dict[str, Any] = {"f": lambda y, th: h(y, th)}
    if "f_shift" in model._fields:
        fields["f_shift"] = None
    return model._replace(**fields), params._replace(f=(params.theta,))


def _cv_term(inner: Estimator, plan, cv: ControlVariate, model, params, draws, state,
             centre: bool = False):
    """``inner`` applied to h on the same draws (same ``key`` / ``x``), minus h's known mean.

    Term 0 of an estimator is, by the contract of ``GradEstimate.variance_reduction``, the
    estimator without its zero-mean auxiliary terms; for an estimator unbiased for every
    integrand its gradient has mean grad E[h], so the term's gradient has mean zero.
    With ``centre`` term 0 is applied to ``h - stop_gradient(mean)`` (a constant in theta, so
    the mean of its gradient is still grad E[h]): for an inner estimator that centres f by a batch
    baseline outside term 0, the h term is centred by h's exact mean.
    """
    cv = _resolved(cv, model.family)
    assert cv.h is not None and cv.mean is not None  # _resolved raised otherwise
    who = f"with_control_variates({inner.name}): control variate {cv.name!r}"
    h = cv.h

    mean = jnp.asarray(cv.mean(params.theta))
    if mean.shape != ():
        raise ValueError(
            f"{who}: `mean(theta)` must return a scalar, the expectation of the scalar "
            f"h(x, theta); got shape {mean.shape}."
        )
    def checked_h(y, th):  # shapes are static: these checks run once, at trace time
        out = jnp.asarray(h(y, th))
        if out.shape != ():
            raise ValueError(f"{who}: `h(x, theta)` must return a scalar; got shape {out.shape}.")
        return out - jax.lax.stop_gradient(mean).astype(out.dtype) if centre else out

    model_h, params_h = _on_integrand(model, params, checked_h)
    # the inner unit on h, on the same draws and noise (replayed from the unit's first stream)
    term = plan.unit(model_h, params_h, draws.replay(), state).terms[0]
    return term - mean.astype(term.dtype)


def with_control_variates(
    estimator: Estimator | None = None,
    *cvs: ControlVariate,
    coefficient: str | float = "optimal",
    num_folds: int = 2,
) -> Estimator:
    r"""Adds control variates to an unbiased estimator.

    A control variate h with known mean :math:`\mu(\theta)` is the wrapped estimator itself
    applied to h **on the same draws** (the same unit key, hence the same samples and the same
    auxiliary noise), minus :math:`\nabla\mu`: for the score function
    :math:`\nabla[\boxdot(\log p)\, h - \mu]`, for pathwise :math:`\nabla[h(x(\theta)) - \mu]`,
    for measure-valued the weak derivative of h at the same coupled points, for REBAR/RELAX,
    ARM/DisARM, RLOO, IndeCateR and enumeration their own estimate for h. Because the estimator
    is unbiased for every integrand, each such term has mean zero and any multiple of it can be
    subtracted; it helps where h tracks f on the same draws. Each is weighted by
    ``-coefficient``; with ``coefficient="optimal"`` the coefficients of all control variates
    (and of any fitted baseline of ``estimator``) are fitted jointly, per parameter coordinate,
    to minimise the variance, each fold of ``num_folds`` using coefficients fitted on the others:
    **unbiased**. Needs per-draw gradients (like :func:`scoregrad.baselines.optimal`).

    Over a batch baseline (``leave_one_out``, ``batch_mean``), f is centred on the batch's mean
    and h on its exact mean :math:`\mu`: unbiased and never worse than the baseline alone, but
    the mismatch :math:`(\bar h - \mu)\,\nabla\log p` (of order :math:`1/N`) limits the gain
    (on ``blr_elbo``, N = 1024: mean SE 25.5 with leave-one-out, 0.43 with leave-one-out and the
    delta method). For the full gain wrap ``sg.score_function()`` or
    ``sg.score_function(sg.baselines.optimal())`` (mean SE 0.019 and 0.024 there), whose
    baseline is fitted jointly with the control variates.
    ``jax.hessian`` of :func:`scoregrad.expectation` stays unbiased for score-function bases.

    * **Needs from h**: what the wrapped estimator needs from f (pathwise: differentiable in x;
      REBAR/RELAX: defined on [0, 1]^d, where they evaluate it at relaxed points).
    * **Refused** (``TypeError``): estimators that are biased or estimate another objective
      (``gumbel_softmax``, ``straight_through``, ``straight_through_gumbel``, ``vimco``,
      :func:`rao_blackwell`): applied to h their mean is not :math:`\nabla\mu`, so the control
      variate would add bias instead of removing variance.
    * The wrapper is a ``Plan -> Plan`` map inside ``Estimator.bind``: the wrapped estimator is
      bound to the family first (``measure_valued``, ``enumerate``, ``indecater`` depend on it)
      and the control variates applied to its plan, so binding never drops them.

    Args:
      estimator: default :func:`scoregrad.score_function`; any estimator unbiased for
        :math:`\nabla\,\mathbb E[f]` for every f.
      *cvs: :class:`ControlVariate` values (:func:`control_variate`, :func:`delta_method`).
      coefficient: ``"optimal"`` or a fixed float c (the estimate subtracts c times each).
      num_folds: folds for the cross-fitted coefficients (>= 2).

    Returns:
      An :class:`~scoregrad.Estimator`.

    Raises:
      TypeError: a wrapped estimator that is biased or estimates another objective; arguments
        of the wrong kind.
    """
    inner = score_function() if estimator is None else estimator
    if not isinstance(inner, Estimator):
        raise TypeError(f"with_control_variates(estimator=...) must be an Estimator; got {inner!r}.")
    if not cvs or not all(isinstance(c, ControlVariate) for c in cvs):
        raise TypeError(
            "with_control_variates needs one or more ControlVariate values, e.g. "
            "sg.control_variates.delta_method(f)."
        )
    optimal = coefficient == "optimal"
    if not optimal and (isinstance(coefficient, (bool, str)) or not isinstance(coefficient, (int, float))):
        raise TypeError(f"coefficient must be 'optimal' or a float; got {coefficient!r}.")
    if not isinstance(num_folds, int) or num_folds < 2:
        raise ValueError(f"num_folds must be an int >= 2; got {num_folds!r}.")

    def bind(target):
        plan = inner.bind(target)
        if plan.not_unbiased is not None:
            raise TypeError(
                f"with_control_variates(estimator={inner.name}): {plan.not_unbiased}. A control "
                "variate is the estimator applied to h minus the gradient of h's known mean, "
                "which has mean zero only for an estimator unbiased for every integrand; here it "
                "would add bias. Wrap an unbiased estimator (sg.score_function, sg.pathwise, "
                "sg.measure_valued, sg.rebar, sg.relax, sg.arm, sg.disarm, sg.rloo, "
                "sg.indecater) instead."
            )
        k_in = binding.num_terms(plan, target, inner.init)
        resolved = [_resolved(c, target.family) for c in cvs]
        # An inner estimator that centres f by a batch baseline (leave-one-out, batch mean) does
        # so outside its term 0: h is then centred by its known mean, or h's mean times the
        # score would stay in the h terms (the fit kept 1/1800 of the control variate's gain; a
        # fixed coefficient made the estimate worse than the baseline alone). A fitted constant
        # beside h centred it on the other folds' mean of f, which the batch weights leaked
        # into the fit (a bias of N/(N-1)) and which, without the leak, is noisier still.
        centre = plan.shift_term is not None and not plan.fitted  # a batch baseline

        def unit(model, params, draws, state):
            out = plan.unit(model, params, draws, state)
            extra = jnp.stack([_cv_term(inner, plan, c, model, params, draws, state, centre)
                               for c in resolved])
            return UnitOut(jnp.concatenate([out.terms, extra.astype(out.terms.dtype)]), out.fvals)

        m_all = len(resolved)

        def weights(fstats: FStats, state, n):
            dt = fstats.mean.dtype
            w = (jnp.ones((k_in,), dt) if plan.weights is None
                 else plan.weights(fstats, state, n).astype(dt))
            return jnp.concatenate([w, jnp.full((m_all,), 0.0 if optimal else -float(coefficient),
                                                dt)])

        fitted = tuple(plan.fitted) + (tuple(range(k_in, k_in + m_all)) if optimal else ())
        return plan._replace(
            unit=unit, weights=weights, fitted=fitted,
            min_units=max(plan.min_units, 2 * num_folds if fitted else 1),
            num_folds=num_folds if fitted else plan.num_folds,
        )

    return Estimator(f"{inner.name}+cv[{','.join(c.name for c in cvs)}]", inner.init, bind,
                     inner.update)


def _log_prob_terms(family):
    return require(
        family, "log_prob_terms", "rao_blackwell",
        "Pass log_prob_terms(theta, x) -> array whose sum is log_prob(theta, x).",
    )


def rao_blackwell(
    f_terms: Callable, *, log_prob_terms: Callable | None = None, baseline: bool = True
) -> Estimator:
    r"""Rao-Blackwellized score function for a factorized family and an additive f.

    When :math:`p(x;\theta) = \prod_j p_j(x_j;\theta_j)` and :math:`f(x) = \sum_j f_j(x_j)`,
    coordinate j's score only needs the part of f that depends on :math:`x_j`; the other parts
    contribute zero in expectation and only noise. The estimator is

    .. math::
       \hat g_{\theta_j} = \frac1N \sum_i \big(f_j(x_{ij}) - b_j\big)\,
       \nabla_{\theta_j} \log p_j(x_{ij};\theta_j),

    from the surrogate :math:`\sum_j \boxdot(\log p_j)\, f_j` (+ :math:`\sum_j (1 - \boxdot(\log
    p_j))` with a cross-fitted per-coordinate baseline :math:`b_j` when ``baseline=True``).
    **Unbiased** when the declared factorization holds (the caller's contract: ``f_terms`` must
    sum to the f passed to :func:`scoregrad.estimate_grad`, which is used for the value, and
    coordinate j of ``log_prob_terms`` may depend only on :math:`x_j, \theta_j`). Needs from f:
    nothing (black box per term); from the family: per-coordinate log-densities (built in for
    normal, bernoulli, categorical). ``jax.hessian`` of :func:`scoregrad.expectation` is unbiased.

    Args:
      f_terms: ``f_terms(x) -> array`` of per-coordinate parts of f, shaped like
        ``log_prob_terms(theta, x)`` (for the built-ins: like the draw).
      log_prob_terms: ``log_prob_terms(theta, x) -> array``; default: the built-in family's.
      baseline: add the optimal per-coordinate baseline (cross-fitted; needs ``num_samples >= 4``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> est = sg.control_variates.rao_blackwell(lambda x: x**2)
      >>> theta = {"loc": jnp.ones(3), "scale": jnp.ones(3)}
      >>> r = sg.estimate_grad(lambda x: jnp.sum(x**2), sg.families.normal(), theta,
      ...                      jax.random.key(0), num_samples=1000, estimator=est)
      >>> r.grad["loc"].shape
      (3,)

    References:
      Mohamed et al., JMLR 2020, §7.2; Ranganath et al., "Black Box Variational Inference", 2014.
    """
    if not callable(f_terms):
        raise TypeError(f"rao_blackwell(f_terms=...) must be callable; got {f_terms!r}.")
    if log_prob_terms is not None and not callable(log_prob_terms):
        raise TypeError(f"rao_blackwell(log_prob_terms=...) must be callable; got {log_prob_terms!r}.")

    def lp_terms(model):
        return log_prob_terms if log_prob_terms is not None else _log_prob_terms(model.family)

    def check(target):
        lp = jax.eval_shape(lp_terms(target), target.theta, target.x_struct)
        ft = jax.eval_shape(f_terms, target.x_struct)
        if lp.shape != ft.shape:
            raise ValueError(
                f"rao_blackwell: f_terms(x) has shape {ft.shape} but the per-coordinate "
                f"log-densities have shape {lp.shape}; f_terms must return one part per coordinate."
            )

    def unit(model, params, draws, state):
        del state
        x = draws.sample()
        boxes = magic_box(lp_terms(model)(params.theta, x))
        f = model.eval_f(params, x)
        ft = jax.lax.stop_gradient(f_terms(x)).astype(boxes.dtype)
        t0 = jnp.sum(boxes * ft) + (f - jax.lax.stop_gradient(f))
        terms = [t0, jnp.sum(1.0 - boxes)] if baseline else [t0]
        return UnitOut(jnp.stack(terms), jax.lax.stop_gradient(f)[None])

    k = 2 if baseline else 1
    plan = Plan(
        unit,
        weights=lambda fstats, state, n: jnp.concatenate(
            [jnp.ones((1,), fstats.mean.dtype), jnp.zeros((k - 1,), fstats.mean.dtype)]
        ),
        min_units=4 if baseline else 1,
        fitted=(1,) if baseline else (),
        not_unbiased=(
            "rao_blackwell's gradient terms come from f_terms, not from the integrand, so "
            "applied to h it does not estimate grad E[h] (add control variates to "
            "sg.score_function() instead, or fold them into f_terms)"),
    )
    return fixed("rao_blackwell" + ("[optimal]" if baseline else ""), plan, check=check)
