r"""Continuous relaxations of discrete families: Gumbel-softmax (Concrete) and straight-through.

The relaxations replace a discrete draw by a differentiable function of parameter-free noise:

* Bernoulli with logits :math:`\phi`: :math:`y = \sigma((\phi + L)/\lambda)` with logistic noise
  :math:`L = \log u - \log(1 - u)`, the binary Concrete (relaxed Bernoulli) distribution; the
  hard draw :math:`b = 1[\phi + L > 0]` is exactly :math:`\mathrm{Bernoulli}(\sigma(\phi))`.
* Categorical with logits :math:`\phi \in \mathbb R^K`: :math:`y = \mathrm{softmax}((\phi + G)
  / \lambda)` with i.i.d. Gumbel noise :math:`G`, the Concrete distribution; the hard draw
  :math:`\arg\max_k(\phi_k + G_k)` is exactly :math:`\mathrm{Categorical}(\mathrm{softmax}\,\phi)`
  (the Gumbel-max trick).

**What f receives.** For the Bernoulli family, f receives an array of theta's shape: values in
(0, 1) for :func:`gumbel_softmax`, values in {0, 1} (carrying a surrogate gradient) for the
straight-through estimators — the same shape and dtype as the family's draws. For the categorical
family, f receives a **float array of shape** ``theta.shape`` = ``(..., K)``: a point on the
probability simplex (relaxed) or a one-hot vector (straight-through), not the integer index the
family draws. Write f for one-hot input, e.g. ``f(y) = jnp.sum(y * values)`` instead of
``values[x]``.

References:
  Maddison, Mnih and Teh, "The Concrete Distribution: A Continuous Relaxation of Discrete Random
  Variables", ICLR 2017. Jang, Gu and Poole, "Categorical Reparameterization with
  Gumbel-Softmax", ICLR 2017. Bengio, Léonard and Courville, "Estimating or Propagating
  Gradients Through Stochastic Neurons for Conditional Computation", 2013.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

from scoregrad._src.base import Estimator, Plan, UnitOut, fixed
from scoregrad._src.family import Capabilities, Family

sg_ = jax.lax.stop_gradient


def check_temperature(temperature, who: str) -> float:
    """A temperature must be a positive, finite, static real number."""
    if isinstance(temperature, jax.core.Tracer):
        raise TypeError(
            f"{who}: `temperature` is traced; it must be a static Python float. Build a new "
            "estimator for each temperature of an annealing schedule."
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (numbers.Real, jax.Array)):
        raise TypeError(f"{who}: `temperature` must be a positive float; got {temperature!r}.")
    if isinstance(temperature, jax.Array) and temperature.shape != ():
        raise TypeError(f"{who}: `temperature` must be a scalar; got shape {temperature.shape}.")
    value = float(temperature)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(
            f"{who}: `temperature` must be positive and finite; got {value}. Typical values are "
            "0.1 to 1 (smaller: less bias, more variance)."
        )
    return value


def family_logits(family: Family) -> tuple[Callable, bool]:
    """``(logits_fn, categorical)`` from ``family.capabilities``: ``bernoulli_logits`` first, then
    ``categorical_logits``; ``(None, False)`` when it has neither (the check has raised)."""
    caps = family.capabilities
    if caps.bernoulli_logits is not None:
        return caps.bernoulli_logits, False
    if caps.categorical_logits is not None:
        return caps.categorical_logits, True
    return _no_logits, False


def _no_logits(theta):
    raise TypeError("this estimator needs family.capabilities.bernoulli_logits or categorical_logits.")


def make_check(who: str, categorical: bool = True, fix: str = ""):
    """A trace-time check that the family is parameterized by logits (``bernoulli_logits``, or
    also ``categorical_logits`` when ``categorical``) and that they are a floating array."""
    needs = "bernoulli_logits" + (" or categorical_logits" if categorical else "")

    def check(model, theta, x_struct):
        del x_struct
        caps = model.family.capabilities
        if caps.bernoulli_logits is None and (not categorical or caps.categorical_logits is None):
            what = "a Bernoulli" + (" or categorical" if categorical else "")
            extra = fix if caps.categorical_logits is not None else ""
            raise TypeError(
                f"{who} needs family.capabilities.{needs} ({what} parameterized by logits, e.g. "
                f"sg.families.bernoulli() or an adapted numpyro/distrax one); family "
                f"{model.family.name!r} has none. Use sg.score_function() for any family.{extra}"
            )
        fn, _ = family_logits(model.family)
        struct = jax.eval_shape(fn, theta)
        if not (hasattr(struct, "shape") and jnp.issubdtype(struct.dtype, jnp.floating)):
            raise TypeError(
                f"{who}: family.capabilities.{needs}(theta) must be a floating array of logits; "
                f"got {struct!r}."
            )

    return check


def f_input(x_struct, theta):
    """What the relaxed estimators pass to f: a float (..., K) simplex point for categorical."""
    if jnp.issubdtype(jax.tree_util.tree_leaves(x_struct)[0].dtype, jnp.integer) and hasattr(
        theta, "shape"
    ):
        return jax.ShapeDtypeStruct(jnp.shape(theta), jnp.result_type(theta))
    return x_struct


def noise(categorical: bool, key: jax.Array, logits: jax.Array) -> jax.Array:
    """Logistic noise (bernoulli) or Gumbel noise (categorical) of the logits' shape and dtype."""
    dtype = jnp.result_type(logits)
    if not categorical:
        return jax.random.logistic(key, jnp.shape(logits), dtype)
    return jax.random.gumbel(key, jnp.shape(logits), dtype)


def draws_noise(categorical: bool, draws, logits: jax.Array) -> jax.Array:
    """:func:`noise` from a unit's :class:`~scoregrad._src.base.Draws` (sampling designs reach it)."""
    dtype = jnp.result_type(logits)
    if not categorical:
        return draws.logistic(jnp.shape(logits), dtype)
    return draws.gumbel(jnp.shape(logits), dtype)


def relax(categorical: bool, logits: jax.Array, eps: jax.Array, temperature) -> jax.Array:
    r"""The relaxed sample: :math:`\sigma((\phi+L)/\lambda)` or :math:`\mathrm{softmax}((\phi+G)/\lambda)`."""
    if not categorical:
        return jax.nn.sigmoid((logits + eps) / temperature)
    return jax.nn.softmax((logits + eps) / temperature, axis=-1)


def harden(categorical: bool, logits: jax.Array, eps: jax.Array) -> jax.Array:
    """The exact discrete draw from the same noise: a {0,1} float array or a one-hot array."""
    dtype = jnp.result_type(logits)
    if not categorical:
        return (logits + eps > 0).astype(dtype)
    k = jnp.shape(logits)[-1]
    return jax.nn.one_hot(jnp.argmax(logits + eps, axis=-1), k, dtype=dtype)


def straight_through_input(categorical: bool, logits, eps, temperature):
    """What straight-through Gumbel passes to f: the hard draw, with the relaxed sample's gradient."""
    y = relax(categorical, logits, eps, temperature)
    return harden(categorical, sg_(logits), eps) + (y - sg_(y))


def binary_concrete_log_prob(logits, temperature, y) -> jax.Array:
    r"""Log-density of the binary Concrete (relaxed Bernoulli), summed over coordinates.

    .. math::
       p(y) = \frac{\lambda\, \alpha\, y^{-\lambda-1} (1-y)^{-\lambda-1}}
                   {(\alpha\, y^{-\lambda} + (1-y)^{-\lambda})^2},
       \qquad \alpha = e^{\phi},\ y \in (0, 1)

    (Maddison et al. 2017, eq. 6 in log form), the density of :math:`\sigma((\phi + L)/\lambda)`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from scoregrad._src.estimators.relaxed import binary_concrete_log_prob
      >>> float(binary_concrete_log_prob(jnp.array(0.0), 1.0, jnp.array(0.3)))  # uniform at 1
      0.0
    """
    lam = jnp.asarray(temperature, jnp.result_type(y))
    log_y, log_1my = jnp.log(y), jnp.log1p(-y)
    denom = jnp.logaddexp(logits - lam * log_y, -lam * log_1my)
    lp = jnp.log(lam) + logits - (lam + 1.0) * (log_y + log_1my) - 2.0 * denom
    return jnp.sum(lp)


def concrete_log_prob(logits, temperature, y) -> jax.Array:
    r"""Log-density of the Concrete distribution on the simplex, summed over batch axes.

    .. math::
       p(y) = (K-1)!\, \lambda^{K-1} \prod_{k=1}^K
              \frac{\alpha_k\, y_k^{-\lambda-1}}{\sum_{i=1}^K \alpha_i\, y_i^{-\lambda}},
       \qquad \alpha = e^{\phi}

    with respect to the Lebesgue measure on the first K − 1 coordinates (Maddison et al. 2017,
    Definition 1), the density of :math:`\mathrm{softmax}((\phi + G)/\lambda)`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from scoregrad._src.estimators.relaxed import concrete_log_prob
      >>> round(float(concrete_log_prob(jnp.zeros(3), 1.0, jnp.ones(3) / 3)), 6)  # log(2!·1)
      0.693147
    """
    k = jnp.shape(y)[-1]
    lam = jnp.asarray(temperature, jnp.result_type(y))
    log_y = jnp.log(y)
    lp = (
        math.lgamma(k) + (k - 1) * jnp.log(lam)
        + jnp.sum(logits - (lam + 1.0) * log_y, axis=-1)
        - k * jax.nn.logsumexp(logits - lam * log_y, axis=-1)
    )
    return jnp.sum(lp)


def relaxed_bernoulli(temperature: float) -> Family:
    r"""The binary Concrete family: theta = logits, a draw :math:`\sigma((\theta + L)/\lambda)`.

    A reparameterized family (use it with :func:`scoregrad.pathwise` or any estimator) whose
    ``log_prob`` is :func:`binary_concrete_log_prob`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> y = sg.families.relaxed_bernoulli(0.5).sample(jnp.zeros(3), jax.random.key(0))
      >>> bool(jnp.all((y > 0) & (y < 1)))
      True
    """
    lam = check_temperature(temperature, "relaxed_bernoulli")
    return Family(
        log_prob=lambda th, y: binary_concrete_log_prob(th, lam, y),
        sample=lambda th, key: relax(False, th, noise(False, key, th), lam),
        reparameterized=True,
        name=f"relaxed_bernoulli({lam})",
        capabilities=Capabilities(continuous=True, discrete=False),
    )


def relaxed_categorical(temperature: float) -> Family:
    r"""The Concrete family: theta = logits (..., K), a draw :math:`\mathrm{softmax}((\theta+G)/\lambda)`.

    Reparameterized; ``log_prob`` is :func:`concrete_log_prob`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> y = sg.families.relaxed_categorical(0.5).sample(jnp.zeros(4), jax.random.key(0))
      >>> round(float(y.sum()), 5)
      1.0
    """
    lam = check_temperature(temperature, "relaxed_categorical")
    return Family(
        log_prob=lambda th, y: concrete_log_prob(th, lam, y),
        sample=lambda th, key: relax(True, th, noise(True, key, th), lam),
        reparameterized=True,
        name=f"relaxed_categorical({lam})",
        capabilities=Capabilities(continuous=True, discrete=False),
    )


def _estimator(name, unit, check) -> Estimator:
    # Straight-through surrogates are first order only; the relaxed objective (gumbel_softmax)
    # is differentiable at every order (its Hessian is that of the relaxation, with its bias).
    plan = Plan(
        unit, f_input=f_input, max_order=1 if name.startswith("straight_through") else None,
        # Every estimator here is biased: applied to a control variate h it does not estimate
        # grad E[h], so with_control_variates refuses it.
        not_unbiased=f"{name} is biased (the mean of its gradient is not the gradient of E[f])",
    )
    return fixed(name, plan, check=lambda t: check(t, t.theta, t.x_struct))


def _noise_relaxation(name: str, temperature, f_input) -> Estimator:
    """An estimator that draws logistic/Gumbel noise per unit and evaluates f at
    ``f_input(categorical, logits, noise, temperature)`` (the relaxed or straight-through input)."""
    lam = check_temperature(temperature, name)
    who = f"{name}({lam})"

    def unit(model, params, draws, state):
        del state
        logits_of, categorical = family_logits(model.family)
        logits = logits_of(params.theta)  # gradients reach theta through the parameterization
        eps = draws_noise(categorical, draws, logits)
        return _out(model.eval_f(params, f_input(categorical, logits, eps, lam)))

    return _estimator(who, unit, make_check(who))


def _out(f):
    return UnitOut(f[None], sg_(f)[None])


def gumbel_softmax(temperature: float = 0.5) -> Estimator:
    r"""The Gumbel-softmax / Concrete estimator: pathwise through the relaxed sample.

    .. math::
       \hat g = \frac1N \sum_i \nabla_\phi f\big(y_i\big), \qquad
       y_i = \sigma\Big(\frac{\phi + L_i}{\lambda}\Big) \text{ (bernoulli)}, \quad
       y_i = \mathrm{softmax}\Big(\frac{\phi + G_i}{\lambda}\Big) \text{ (categorical)}.

    * **Bias**: **biased by construction.** f is evaluated at the relaxed sample, so the estimate
      (and the value, the mean of :math:`f(y_i)`) is unbiased for the *relaxed* objective
      :math:`\mathbb E[f(y_\lambda)]`, not for :math:`\mathbb E[f(b)]`. For a smooth f and the
      Bernoulli family the bias of the gradient vanishes as :math:`\lambda \to 0` (while the
      variance grows like :math:`1/\lambda`); tests measure it.
    * **Needs from f**: defined and differentiable on the relaxed values (see the module
      docstring: (0, 1) for bernoulli, the simplex ``(..., K)`` for categorical).
    * **Needs from the family**: ``family.capabilities.bernoulli_logits`` or
      ``categorical_logits`` (the built-in :func:`scoregrad.families.bernoulli` /
      :func:`scoregrad.families.categorical`, or adapted numpyro/distrax ones); other families
      raise TypeError naming the capability.
    * **Derivative order**: ``jax.hessian`` of :func:`scoregrad.expectation` is the pathwise
      Hessian of the relaxed objective (all orders, with the same bias), not of
      :math:`\mathbb E[f(b)]`.

    Args:
      temperature: :math:`\lambda > 0` (a static float).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> r = sg.estimate_grad(lambda y: jnp.sum((y - 0.45) ** 2), sg.families.bernoulli(),
      ...                      jnp.zeros(2), jax.random.key(0), num_samples=1000,
      ...                      estimator=sg.gumbel_softmax(0.5))
      >>> r.grad.shape
      (2,)

    References:
      Maddison, Mnih and Teh, ICLR 2017. Jang, Gu and Poole, ICLR 2017.
    """
    return _noise_relaxation("gumbel_softmax", temperature, relax)


def straight_through() -> Estimator:
    r"""The straight-through estimator: the hard draw forward, the probabilities' gradient back.

    f sees the exact draw :math:`b` (one-hot for categorical), but the backward pass treats it as
    the probabilities :math:`\sigma(\phi)` or :math:`\mathrm{softmax}(\phi)`:
    :math:`\hat g = \frac1N\sum_i J_p(\phi)^\top \nabla f(b_i)` (``b + p - stop_gradient(p)``).

    * **Bias**: **biased**: the value (mean of :math:`f(b_i)`) is unbiased, the gradient is not
      (for Bernoulli :math:`\mathbb E\hat g = \sigma'(\phi)\,\mathbb E[f'(b)]` versus the true
      :math:`\sigma'(\phi)(f(1) - f(0))`); it is exact only for f linear in b.
    * **Needs from f**: differentiable in its (float) input; categorical f takes one-hot input.
    * **Needs from the family**: ``capabilities.bernoulli_logits`` or ``categorical_logits``
      (built-in or adapted bernoulli / categorical). Accepts given samples
      (:func:`scoregrad.estimate_grad_from_samples`), since it needs no noise beyond the draw.
    * **Derivative order**: first order only; ``jax.hessian`` of :func:`scoregrad.expectation`
      is not meaningful.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> r = sg.estimate_grad(lambda b: jnp.sum(b), sg.families.bernoulli(), jnp.zeros(3),
      ...                      jax.random.key(0), num_samples=100,
      ...                      estimator=sg.straight_through())
      >>> [float(g) for g in r.grad]  # f linear: exactly sigma'(0) = 0.25
      [0.25, 0.25, 0.25]

    References:
      Bengio, Léonard and Courville, 2013.
    """
    who = "straight_through()"

    def unit(model, params, draws, state):
        del state
        logits_of, categorical = family_logits(model.family)
        th = logits_of(params.theta)
        x = draws.sample()
        if not categorical:
            hard, p = x.astype(th.dtype), jax.nn.sigmoid(th)
        else:
            hard = jax.nn.one_hot(x, jnp.shape(th)[-1], dtype=th.dtype)
            p = jax.nn.softmax(th, axis=-1)
        return _out(model.eval_f(params, hard + (p - sg_(p))))

    return _estimator(who, unit, make_check(who))


def straight_through_gumbel(temperature: float = 1.0) -> Estimator:
    r"""Straight-through Gumbel-softmax: the exact draw forward, the relaxed gradient back.

    f sees the exact draw :math:`b = H(\phi + \text{noise})` (one-hot for categorical); the
    backward pass differentiates the relaxed sample :math:`y_\lambda` of the same noise
    (``b + y - stop_gradient(y)``).

    * **Bias**: **biased**: the value is unbiased, the gradient is not. For Bernoulli, as
      :math:`\lambda\to 0` its mean tends to :math:`\sigma'(\phi)\,(f'(0) + f'(1))/2`, which is
      the true gradient :math:`\sigma'(\phi)(f(1)-f(0))` only when f is quadratic on [0, 1]; at
      larger :math:`\lambda` it is biased even then. Tests measure both.
    * **Needs from f**: differentiable in its (float) input; categorical f takes one-hot input.
    * **Needs from the family**: ``capabilities.bernoulli_logits`` or ``categorical_logits``.
    * **Derivative order**: first order only.

    Args:
      temperature: :math:`\lambda > 0` (a static float).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> r = sg.estimate_grad(lambda y: jnp.sum(y * jnp.arange(3.0)), sg.families.categorical(),
      ...                      jnp.zeros(3), jax.random.key(0), num_samples=100,
      ...                      estimator=sg.straight_through_gumbel(0.5))
      >>> 0.5 < float(r.value) < 1.5
      True

    References:
      Jang, Gu and Poole, ICLR 2017, §2.2. Bengio, Léonard and Courville, 2013.
    """
    return _noise_relaxation("straight_through_gumbel", temperature, straight_through_input)
