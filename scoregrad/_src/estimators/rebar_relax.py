r"""REBAR and RELAX: score function with a reparameterized, learned control variate (Bernoulli).

For :math:`b \sim \mathrm{Bernoulli}(\sigma(\phi))` write :math:`b = H(z)`, :math:`z = \phi + L`
with logistic noise :math:`L`, and let :math:`\tilde z \sim p(z \mid b)` be drawn from the
conditional given the same :math:`b` (reparameterized with independent uniform noise :math:`v`).
For any control variate :math:`c_\omega(z)`:

.. math::
   \hat g = \big(f(b) - c_\omega(\tilde z)\big)\,\nabla_\phi \log p(b;\phi)
            + \nabla_\phi c_\omega(z) - \nabla_\phi c_\omega(\tilde z)

is unbiased, because :math:`\mathbb E[c(\tilde z)\nabla\log p(b) + \nabla c(\tilde z)] =
\nabla\,\mathbb E[c(z)] = \mathbb E[\nabla c(z)]`. REBAR takes
:math:`c(z) = \eta\, f(\sigma(z/\lambda))`; RELAX adds a neural network (or takes any user
function). The control variate's parameters :math:`\omega` are trained to minimize the variance of
:math:`\hat g`, i.e. by gradient descent on :math:`\mathbb E\|\hat g\|^2` (its mean does not
depend on :math:`\omega`), with an optax optimizer; parameters and optimizer state live in the
estimator state (:class:`RelaxState`), threaded like an optax state. The estimate of each call
uses the state it was given; the learning step (on the same draws) only affects later calls.

References:
  Tucker, Mnih, Maddison, Lawson and Sohl-Dickstein, "REBAR: Low-variance, unbiased gradient
  estimates for discrete latent variable models", NeurIPS 2017. Grathwohl, Choi, Wu, Roeder and
  Duvenaud, "Backpropagation through the Void: Optimizing control variates for black-box gradient
  estimation", ICLR 2018.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, cast

import jax
import jax.numpy as jnp
import optax

from scoregrad._src import engine
from scoregrad._src.base import Estimator, Params, Plan, UnitOut, magic_box, no_update
from scoregrad._src.binding import Bound
from scoregrad._src.estimators.relaxed import check_temperature, make_check

sg_ = jax.lax.stop_gradient
PyTree = Any


class RelaxState(NamedTuple):
    """State of :func:`rebar` / :func:`relax`: control-variate parameters and optimizer state."""

    params: PyTree
    opt_state: PyTree


def conditional_logits(logits, b, v) -> jax.Array:
    r"""A draw of :math:`z = \phi + L` conditioned on :math:`1[z > 0] = b`, from uniform ``v``.

    :math:`\tilde z = \log\!\big(1 + \tfrac{v}{(1-v)(1-p)}\big)` if :math:`b = 1` and
    :math:`-\log\!\big(1 + \tfrac{v}{(1-v)p}\big)` if :math:`b = 0`, with :math:`p = \sigma(\phi)`
    (inverse-CDF of the truncated logistic), computed stably in log space; differentiable in
    :math:`\phi` with b held fixed.
    """
    logit_v = jnp.log(v) - jnp.log1p(-v)
    z1 = jax.nn.softplus(logit_v - jax.nn.log_sigmoid(-logits))
    z0 = -jax.nn.softplus(logit_v - jax.nn.log_sigmoid(logits))
    return jnp.where(b > 0.5, z1, z0)


def relax_surrogate(f_of, log_prob_of, cv, omega, theta, eps, v):
    """One unit's surrogate (value f(b), gradient the RELAX estimate) for given noise.

    Returns ``(term, f(b))``. ``f_of(y)`` evaluates f, ``log_prob_of(theta, b)`` the Bernoulli
    log-mass, ``cv(omega, z, f_of)`` the control variate at logits ``z``.
    """
    z = theta + eps
    b = sg_((z > 0).astype(jnp.result_type(theta)))
    zt = conditional_logits(theta, b, v)
    fb = f_of(b)
    box = magic_box(log_prob_of(theta, b))
    cz, czt = cv(omega, z, f_of), cv(omega, zt, f_of)
    if jnp.shape(cz) != () or not jnp.issubdtype(jnp.result_type(cz), jnp.floating):
        raise TypeError(
            "relax(control_variate=...) must return a floating-point scalar; got shape "
            f"{jnp.shape(cz)} and dtype {jnp.result_type(cz)}. Reduce it, e.g. jnp.sum(...)."
        )
    cz, czt = cz.astype(fb.dtype), czt.astype(fb.dtype)
    # (1 - box) is 0 in value, so (1 - box) * c has gradient -c * score: no stop_gradient on c, which
    # would also hide c's dependence on omega from the variance gradient of the learning step.
    term = box * fb + (1.0 - box) * czt + (cz - sg_(cz)) - (czt - sg_(czt))
    return term, fb


def _unit_term(model, params, draws, cv, omega, draw):
    """One unit's surrogate term and f(b); ``draw`` is the dtype of the family's draws."""
    # capabilities.bernoulli_logits (checked at bind); gradients reach theta through it
    logits = model.family.capabilities.bernoulli_logits(params.theta)
    dtype = jnp.result_type(logits)
    eps = draws.logistic(jnp.shape(logits), dtype)
    v = jnp.maximum(draws.uniform(jnp.shape(logits), dtype), jnp.finfo(dtype).tiny)
    # the score is the family's own log_prob at params (its theta gradient is the chain rule
    # through the logits); the logits passed as `theta` below feed z, z~ and the relaxations
    return relax_surrogate(
        lambda y: model.eval_f(params, y),
        lambda t, b: model.eval_log_prob(params, b.astype(draw)),
        cv, omega, logits, eps, v,
    )


def rebar_cv(omega, z, f_of):
    r""":math:`c(z) = \eta\, f(\sigma(z/\lambda))`, ``omega = {"eta", "log_temperature"}``."""
    lam = jnp.exp(omega["log_temperature"])
    return omega["eta"] * f_of(jax.nn.sigmoid(z / lam))


def mlp_cv(omega, z, f_of):
    r"""RELAX's default: :math:`\eta f(\sigma(z/\lambda)) + \mathrm{MLP}_\rho(\sigma(z/\lambda))`."""
    y = jax.nn.sigmoid(z / jnp.exp(omega["log_temperature"]))
    net = omega["mlp"]
    h = jnp.tanh(y.reshape(-1) @ net["w1"] + net["b1"])
    return rebar_cv(omega, z, f_of) + (h @ net["w2"] + net["b2"]).astype(y.dtype)


def check_optimizer(optimizer, who):
    if optimizer is None:
        return optax.adam(1e-2)
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"{who}: `optimizer` must be an optax.GradientTransformation, e.g. optax.adam(1e-2); "
            f"got {type(optimizer).__name__}."
        )
    return optimizer


def learn_fn(unit_term, cv, optimizer, label: str):
    """The learning step of REBAR/RELAX (Bernoulli and categorical): one optimizer step on the
    mean over this call's units of ||g_i||^2 w.r.t. the control variate's parameters.

    ``unit_term(model, params, draws, cv, omega, draw) -> (term, f(b))`` is the estimator's unit
    surrogate; ``label`` names the variance pseudo-estimator run on the engine.
    """

    def learn(model, params, key, state, num_units, chunk_units):
        omega = state.params
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(params.theta))
        draw = jax.eval_shape(lambda: model.draw(params, key)).dtype

        def sq_unit(model_, p, draws, st_):
            del model_, st_
            # the same noise as the estimate's unit (the same unit key, streams in order)
            g = jax.grad(lambda th: unit_term(model, params._replace(theta=th), draws.replay(),
                                              cv, p.theta, draw)[0])(params.theta)
            # theta has at least one leaf (validation.check_theta): the sum is an array, not 0
            sq = cast(jax.Array, sum(jnp.sum(jnp.square(leaf))
                                     for leaf in jax.tree_util.tree_leaves(g))).astype(dtype)
            return UnitOut(sq[None], sg_(sq)[None])

        pseudo = Bound(label, Plan(sq_unit), lambda t: (), no_update, num_terms=1,
                       needs_key=True, presample=False, stateful=False)
        out = engine.run(
            model, pseudo, Params(omega), state, num_units=num_units, chunk_units=chunk_units,
            mode="grad", dtype=dtype, key=key,
        )
        assert out.grad_sums is not None  # mode="grad" always returns the gradient sums
        grads = jax.tree_util.tree_map(lambda g: g[0] / jnp.asarray(num_units, g.dtype),
                                       out.grad_sums.theta)
        # The user's optax optimizer mixes its int32 step count with floats (bias correction):
        # run it under standard promotion even when the caller asked for strict.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state.opt_state, omega)
        new = RelaxState(optax.apply_updates(omega, updates), opt_state)
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
        return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, state)

    return learn


def mlp_params(theta, temperature: float, hidden: int, seed: int) -> dict:
    """RELAX's default control-variate parameters in theta's dtype: ``eta = 1``, the
    temperature, and a one-hidden-layer MLP whose output layer is zero (training starts at
    REBAR); the input size is the number of entries of theta."""
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(theta))
    d = int(sum(jnp.size(t) for t in jax.tree_util.tree_leaves(theta)))
    w1 = jax.random.normal(jax.random.key(seed), (d, hidden), dtype) / math.sqrt(d)
    mlp = {"w1": w1, "b1": jnp.zeros(hidden, dtype), "w2": jnp.zeros(hidden, dtype),
           "b2": jnp.zeros((), dtype)}
    return {"eta": jnp.ones((), dtype), "log_temperature": jnp.asarray(math.log(temperature), dtype),
            "mlp": mlp}


def check_hidden(hidden, who: str) -> int:
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"{who}: `hidden` must be a positive int; got {hidden!r}.")
    return hidden


def relax_estimator(name, cv, init_params, optimizer, learn: bool, *, unit_term, check,
                    label: str, f_input=None) -> Estimator:
    """A REBAR/RELAX estimator (Bernoulli or categorical) from its unit surrogate.

    ``check(target)`` is the bind-time check of the family, ``unit_term`` the surrogate of one
    unit (see :func:`learn_fn`), ``init_params(theta)`` the control variate's parameters: fixed
    when ``learn`` is False (stateless), else trained after every estimate (state
    :class:`RelaxState`).
    """

    def bind(target):
        check(target)
        draw = jax.tree_util.tree_leaves(target.x_struct)[0].dtype  # log_prob takes its dtype

        def unit(model, params, draws, state):
            omega = state.params if learn else init_params(params.theta)
            term, fb = unit_term(model, params, draws, cv, omega, draw)
            return UnitOut(term[None], sg_(fb)[None])

        return Plan(unit, f_input=f_input, max_order=1,
                    learn=learn_fn(unit_term, cv, optimizer, label) if learn else None)

    def init(theta):
        if not learn:
            return ()
        p = init_params(theta)
        return RelaxState(p, optimizer.init(p))

    return Estimator(name, init, bind, no_update)


def _estimator(name, cv, init_params, optimizer, learn: bool) -> Estimator:
    check = make_check(f"{name}()", categorical=False, fix=" (REBAR/RELAX support Bernoulli "
                       "only; for categorical use sg.gumbel_softmax or the score function).")
    return relax_estimator(name, cv, init_params, optimizer, learn, unit_term=_unit_term,
                           check=lambda target: check(target, target.theta, target.x_struct),
                           label="relax_variance")


def real_param(value, name: str, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{who}: `{name}` must be a finite float; got {value!r}.")
    return float(value)


_COMMON = r"""
    * **Bias**: unbiased for every temperature, :math:`\eta` and control-variate parameters
      (tests check it exactly by quadrature over the noise, and statistically).
    * **Needs from f**: defined and differentiable on [0, 1]^d (it is evaluated at relaxed
      points :math:`\sigma(z/\lambda)` by the control variate); f of theta's shape.
    * **Needs from the family**: ``family.capabilities.bernoulli_logits`` (the built-in
      :func:`scoregrad.families.bernoulli` or an adapted numpyro/distrax Bernoulli).
      Categorical and other families raise TypeError naming the capability.
    * **Derivative order**: first order only: ``jax.hessian`` of :func:`scoregrad.expectation`
      (:func:`scoregrad.expectation_with_state`) is **not** a Hessian estimate.
    * **Cost**: 3 evaluations of f per draw (at b, and the control variate at z and z~), counted
      as one sample; the learning step re-runs the draws with second-order autodiff.
"""


def rebar(
    temperature: float = 0.5,
    eta: float = 1.0,
    *,
    learn: bool = True,
    optimizer: Optional[optax.GradientTransformation] = None,
) -> Estimator:
    r"""The REBAR estimator: control variate :math:`\eta\, f(\sigma(z/\lambda))`.

    With ``learn=True`` (default) :math:`\eta` and :math:`\log\lambda` are trained to minimize the
    estimate's variance and the estimator is stateful: ``state = est.init(theta)``, thread
    ``r.state`` through :func:`scoregrad.estimate_grad` (or use
    :func:`scoregrad.expectation_with_state`). With ``learn=False`` they stay fixed and the
    estimator is stateless.
    {common}
    Args:
      temperature: initial (or fixed) :math:`\lambda > 0`.
      eta: initial (or fixed) control-variate scale :math:`\eta`.
      learn: train :math:`(\eta, \log\lambda)` after every estimate.
      optimizer: optax optimizer for the learning step (default ``optax.adam(1e-2)``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> est = sg.rebar(temperature=0.5, eta=1.0)
      >>> f = lambda b: jnp.sum((b - 0.45) ** 2)
      >>> theta = jnp.zeros(2)
      >>> r = sg.estimate_grad(f, sg.families.bernoulli(), theta, jax.random.key(0),
      ...                      num_samples=256, estimator=est, state=est.init(theta))
      >>> r.grad.shape, sorted(r.state.params)
      ((2,), ['eta', 'log_temperature'])

    References:
      Tucker et al., NeurIPS 2017.
    """
    lam, eta, optimizer, init_params = rebar_settings(temperature, eta, learn, optimizer, "rebar")
    return _estimator(f"rebar({lam},{eta})", rebar_cv, init_params, optimizer, learn)


def rebar_settings(temperature, eta, learn, optimizer, who: str):
    """REBAR's checked settings ``(temperature, eta, optimizer, init_params)``; ``init_params``
    gives the learnable ``{"eta", "log_temperature"}`` in theta's dtype."""
    lam = check_temperature(temperature, who)
    eta = real_param(eta, "eta", who)
    if not isinstance(learn, bool):
        raise TypeError(f"{who}: `learn` must be True or False; got {learn!r}.")
    optimizer = check_optimizer(optimizer, who)

    def init_params(theta):
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(theta))
        return {"eta": jnp.asarray(eta, dtype), "log_temperature": jnp.asarray(math.log(lam), dtype)}

    return lam, eta, optimizer, init_params


def relax(
    control_variate: Optional[Callable[..., jax.Array]] = None,
    *,
    cv_params: PyTree = None,
    optimizer: Optional[optax.GradientTransformation] = None,
    temperature: float = 0.5,
    hidden: int = 16,
    seed: int = 0,
) -> Estimator:
    r"""The RELAX estimator: a learned control variate, trained to minimize the variance.

    The control variate is ``control_variate(cv_params, z, f) -> scalar``, where ``z`` is the
    logistic relaxation's logits (theta's shape; the hard draw is ``z > 0``) and ``f`` the
    integrand (so a control variate may evaluate f at relaxed points). By default it is
    :math:`\eta f(\sigma(z/\lambda)) + \mathrm{MLP}_\rho(\sigma(z/\lambda))` with one tanh hidden
    layer of ``hidden`` units; its output layer starts at zero, so training starts from REBAR.
    Always stateful: ``state = est.init(theta)`` holds the parameters and optimizer state.
    {common}
    Args:
      control_variate: a user control variate, or ``None`` for the default.
      cv_params: the user control variate's initial parameters (required with one).
      optimizer: optax optimizer of the learning step (default ``optax.adam(1e-2)``).
      temperature: initial :math:`\lambda` of the default control variate.
      hidden: hidden units of the default MLP.
      seed: seeds the default MLP's initial weights (deterministic).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> est = sg.relax()
      >>> theta = jnp.zeros(3)
      >>> r = sg.estimate_grad(lambda b: jnp.sum((b - 0.45) ** 2), sg.families.bernoulli(),
      ...                      theta, jax.random.key(0), num_samples=128, estimator=est,
      ...                      state=est.init(theta))
      >>> r.grad.shape
      (3,)

    References:
      Grathwohl et al., ICLR 2018.
    """
    optimizer = check_optimizer(optimizer, "relax")
    if control_variate is not None:
        if not callable(control_variate):
            raise TypeError(
                "relax: `control_variate` must be a function (cv_params, z, f) -> scalar, or None "
                f"for the default; got {type(control_variate).__name__}."
            )
        if cv_params is None:
            raise ValueError("relax: a user `control_variate` needs its initial `cv_params`.")
        return _estimator("relax(custom)", control_variate, lambda theta: cv_params, optimizer, True)
    lam = check_temperature(temperature, "relax")
    hidden = check_hidden(hidden, "relax")
    return _estimator(f"relax({lam})", mlp_cv, lambda theta: mlp_params(theta, lam, hidden, seed),
                      optimizer, True)


if rebar.__doc__:  # None under python -OO
    rebar.__doc__ = rebar.__doc__.replace("{common}", _COMMON)
if relax.__doc__:  # None under python -OO
    relax.__doc__ = relax.__doc__.replace("{common}", _COMMON)
