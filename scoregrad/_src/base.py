"""Core types: the model as the engine sees it, estimator and baseline protocols."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src.family import Family

PyTree = Any
State = Any


class Params(NamedTuple):
    """Everything an estimate is differentiated with respect to.

    ``theta`` is the user's parameter pytree; the other fields hold values that the user's ``f``,
    ``log_prob`` and ``sample`` close over (hoisted by :func:`jax.closure_convert`), so that
    ``jax.grad`` of :func:`scoregrad.expectation` also flows into an ``f`` that closes over theta.
    """

    theta: PyTree
    f: tuple = ()
    log_prob: tuple = ()
    sample: tuple = ()


class Model(NamedTuple):
    """The user's functions in closure-converted form."""

    f: Callable[..., jax.Array]  # f(x, *consts)
    log_prob: Callable[..., jax.Array]  # log_prob(theta, x, *consts)
    sample: Callable[..., PyTree]  # sample(theta, key, *consts)
    family: Family
    legacy_key: bool
    # A stop-gradient reference value subtracted from every f evaluation, for estimators whose
    # estimate is invariant to a constant added to f (``Estimator.shift_invariant``): centring
    # keeps float32 sums from cancelling when f carries a large offset. ``None``: no shift.
    f_shift: Any = None

    def eval_f(self, params: Params, x: PyTree) -> jax.Array:
        f = jnp.asarray(self.f(x, *params.f))  # a Python float from a constant f
        if self.f_shift is None:
            return f
        return f - jax.lax.stop_gradient(self.f_shift).astype(f.dtype)

    def eval_log_prob(self, params: Params, x: PyTree) -> jax.Array:
        return jnp.asarray(self.log_prob(params.theta, x, *params.log_prob))

    def draw(self, params: Params, key: jax.Array) -> PyTree:
        """One draw from p(x; theta) for a typed key, handing the user the key kind they passed."""
        user_key = jax.random.key_data(key) if self.legacy_key else key
        return self.sample(params.theta, user_key, *params.sample)


class FStats(NamedTuple):
    """Streaming statistics of the f evaluations (merged across chunks, Chan et al. 1979)."""

    # The field shadows tuple.count (a public name, kept): mypy flags the override.
    count: jax.Array  # type: ignore[assignment]
    mean: jax.Array
    m2: jax.Array
    nonfinite: jax.Array
    units: jax.Array  # units counted (all of them, or the finite ones under nan_policy="drop")
    # The mean of each of a unit's f values over the units, shape (m,): per step of a
    # sequential program (per-step baselines), per draw of a group.
    per: Any = None
    # The centred second moment, over units, of each unit's mean f value: a unit's f values
    # (a coupled pair, a group, T * c_t of a program) are not independent draws of f, so the
    # value's standard error is over the unit means.
    unit_m2: Any = None


class UnitOut(NamedTuple):
    """What an estimator computes for one unit (a draw, a coupled pair, a group).

    Attributes:
      terms: shape ``(K,)``; the unit's surrogate terms. The estimate's surrogate is
        ``sum_k w_k * mean_over_units(terms[k])`` with weights ``w`` that may depend on statistics
        of the whole batch (see :attr:`Estimator.weights`); its value equals the mean of f and its
        gradient is the estimator.
      fvals: shape ``(m,)``; the unit's f evaluations (stop-gradient), for statistics.
    """

    terms: jax.Array
    fvals: jax.Array


class Target(NamedTuple):
    """What :attr:`Estimator.bind` sees: the family, theta, and the form of one draw.

    ``x_struct`` is the ``jax.ShapeDtypeStruct`` pytree of one draw (``None`` when the sampler
    cannot be traced here); ``legacy_key``: the user passes raw uint32 keys.
    """

    family: Family
    theta: PyTree
    x_struct: PyTree = None
    legacy_key: bool = False


class Plan(NamedTuple):
    """An estimator bound to one problem (a family, theta's shapes): what the engine runs.

    Only ``unit`` is required. What can be derived is not declared: the number of terms K
    (from the unit's output shape), whether the estimator is stateful (its ``init``), whether it
    needs a key (it asks :class:`Draws` for fresh randomness) and whether the engine may draw
    the family samples ahead of the unit (it asks for nothing but :meth:`Draws.sample`).

    Attributes:
      unit: ``unit(model, params, draws, state) -> UnitOut`` for one unit. ``draws`` (a
        :class:`Draws`) is the unit's only source of randomness.
      weights: ``weights(fstats, state, num_units) -> (K,)`` stop-gradient weights of the
        terms from statistics of the whole batch (leave-one-out, batch mean); ``None``: ones.
      draws_per_unit: evaluations of f one unit costs (``num_samples`` counts evaluations).
      min_units: the smallest number of units the estimator is defined for.
      fitted: indices of terms whose weights are fitted per parameter coordinate by
        cross-fitting over ``num_folds`` contiguous folds of units (:mod:`scoregrad._src.fitted`);
        their ``weights`` entries are ignored.
      num_folds: folds for ``fitted``.
      f_input: ``f_input(x_struct, theta) -> struct`` of what the unit passes to f when it is
        not the family's draw (a relaxed sample); ``None``: the draw.
      learn: ``learn(model, params, key, state, num_units, chunk_units) -> state``, a step run
        after an estimate on the same units (RELAX's control variate); ``None``: none.
      max_order: the highest derivative order of :func:`scoregrad.expectation` the surrogate
        gets right (``None``: every order). With 1, a second derivative raises ``ValueError``.
      shift_invariant: the estimate is exactly unchanged by a constant added to f; the engine
        then centres f on a reference value (float32 sums do not cancel).
      shift_term: for a shift-invariant estimator whose term 0 alone is not, the term whose
        per-unit gradient times the reference restores term 0 on f (the baseline's constant
        feature), for the ``variance_reduction`` diagnostic.
      not_unbiased: why the unit applied to another integrand h does not estimate the gradient
        of E[h] (biased relaxations, VIMCO's log-mean-exp, Rao-Blackwell's f_terms), or
        ``None``. Control variates are refused for such plans.
    """

    unit: Callable[..., UnitOut]
    weights: Optional[Callable[[FStats, State, Any], jax.Array]] = None
    draws_per_unit: int = 1
    min_units: int = 1
    fitted: tuple = ()
    num_folds: int = 2
    f_input: Optional[Callable[[PyTree, PyTree], PyTree]] = None
    learn: Optional[Callable[..., State]] = None
    max_order: Optional[int] = None
    shift_invariant: bool = False
    shift_term: Optional[int] = None
    not_unbiased: Optional[str] = None


class Estimator(NamedTuple):
    """A gradient estimator: four pure functions, built by a factory (optax's pattern).

    Attributes:
      name: a label for reports.
      init: ``init(theta) -> state``; ``()`` for stateless estimators (statefulness is derived
        from it).
      bind: ``bind(target) -> Plan`` at trace time (a :class:`Target`): the checks of what the
        estimator needs from the family (each error names it), and everything that depends on
        the family or theta's shapes (draws per unit). Wrappers (control variates, sampling
        designs) are ``Plan -> Plan`` functions applied inside ``bind``, so binding never drops
        them.
      update: ``update(state, fstats) -> state`` after an estimate (stateful estimators).

    The engine (:mod:`scoregrad._src.engine`) owns sampling, chunking, statistics, the
    non-finite policy, devices and derivatives.
    """

    name: str
    init: Callable[[PyTree], State]
    bind: Callable[[Target], Plan]
    update: Callable[[State, FStats], State]


class NeedsKey(TypeError):
    """Raised by :class:`Draws` when a unit asks for fresh randomness but has a given draw."""


class DesignRefusal(TypeError):
    """Raised by :class:`Draws` under a sampling design for randomness it cannot couple."""


# Streams after the first are fold_in(key, _STREAM + j): apart from fold_in(key, k) for the
# draws of a group (k < 2^31), which the first stream may use.
_STREAM = 2**31


class Draws:
    """All the randomness one unit sees.

    A unit draws the family's sample (:meth:`sample`, :meth:`rsample`), groups of samples
    (``sample(num=k)``) and auxiliary noise (:meth:`uniform`, :meth:`logistic`,
    :meth:`gumbel`, :meth:`normal`) only through this object. Each request takes the unit's
    next stream: the first uses the unit key itself, later ones ``fold_in(key, 2^31 + j)``.
    With a given draw (``estimate_grad_from_samples``, or draws the engine made ahead),
    :meth:`sample` returns it and a request for fresh randomness raises :class:`NeedsKey`.
    A sampling design (:mod:`scoregrad._src.sampling`) hands each coupled copy a ``Draws``
    whose uniforms are the design's, so antithetic, stratified and QMC designs reach every
    estimator that draws its noise here; :meth:`key` (a raw key for the estimator's own
    samplers) is refused under a design.
    """

    def __init__(self, model, params, key=None, x=None, design=None):
        self._model, self._params, self._key, self._x = model, params, key, x
        self._design = design  # (noise(key, size, dtype) -> (copies, size), copy index, transform)
        self._next = 0
        self.requests: list = []  # what the unit asked for, in order (read at bind time)

    def replay(self) -> "Draws":
        """The same draws and noise again, from the first stream (control variates)."""
        return Draws(self._model, self._params, self._key, self._x, self._design)

    def coupled(self, noise, copy, transform) -> "Draws":
        """Copy ``copy`` of a sampling design (see :mod:`scoregrad._src.sampling`)."""
        return Draws(self._model, self._params, self._key, None, (noise, copy, transform))

    @property
    def given(self) -> bool:
        return self._x is not None

    def _stream(self, what: str) -> jax.Array:
        self.requests.append(what)
        if self._key is None:
            raise NeedsKey(f"{what} needs fresh randomness, but the unit has given draws")
        j, self._next = self._next, self._next + 1
        return self._key if j == 0 else jax.random.fold_in(self._key, _STREAM + j)

    def _design_uniform(self, shape, dtype) -> jax.Array:
        noise, copy, _ = self._design
        size = int(np.prod(shape, dtype=int))
        return noise(self._stream("a sampling design"), size, dtype)[copy].reshape(shape)

    def _designed_draw(self, theta):
        transform = self._design[2]
        shape, dtype = transform.noise_shape, transform.dtype
        return transform(theta, self._design_uniform(shape, dtype))

    def sample(self, num: Optional[int] = None) -> PyTree:
        """The unit's draw (stop-gradient); with ``num``, ``num`` draws stacked on axis 0."""
        if self._x is not None:
            self.requests.append("sample()" if num is None else f"sample(num={num})")
            return self._x
        if self._design is not None:
            if num is not None:
                raise DesignRefusal("draws groups of samples, which a design cannot couple")
            return jax.lax.stop_gradient(self._designed_draw(self._params.theta))
        key = self._stream("sample()" if num is None else f"sample(num={num})")
        if num is None:
            return jax.lax.stop_gradient(self._model.draw(self._params, key))
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num, dtype=jnp.uint32))
        return jax.lax.stop_gradient(jax.vmap(lambda k: self._model.draw(self._params, k))(keys))

    def rsample(self) -> PyTree:
        """The unit's draw, differentiable in theta through the sampler (pathwise)."""
        if self._x is not None:
            raise NeedsKey("rsample() differentiates through the sampler")
        if self._design is not None:
            return self._designed_draw(self._params.theta)
        return self._model.draw(self._params, self._stream("rsample()"))

    def uniform(self, shape, dtype) -> jax.Array:
        """Uniform noise on [0, 1) (a design's: on the open interval)."""
        if self._design is not None:
            return self._design_uniform(tuple(shape), dtype)
        return jax.random.uniform(self._stream("uniform()"), shape, dtype)

    def logistic(self, shape, dtype) -> jax.Array:
        if self._design is not None:
            u = self._design_uniform(tuple(shape), dtype)
            return jnp.log(u) - jnp.log1p(-u)
        return jax.random.logistic(self._stream("logistic()"), shape, dtype)

    def gumbel(self, shape, dtype) -> jax.Array:
        if self._design is not None:
            return -jnp.log(-jnp.log(self._design_uniform(tuple(shape), dtype)))
        return jax.random.gumbel(self._stream("gumbel()"), shape, dtype)

    def normal(self, shape, dtype) -> jax.Array:
        if self._design is not None:
            return jax.scipy.special.ndtri(self._design_uniform(tuple(shape), dtype))
        return jax.random.normal(self._stream("normal()"), shape, dtype)

    def key(self) -> jax.Array:
        """A raw key for the estimator's own samplers (weak-derivative points); a sampling
        design cannot reach such draws and refuses."""
        if self._design is not None:
            raise DesignRefusal("draws its own samples with a raw key, which a sampling "
                                "design cannot couple")
        return self._stream("key()")


class Baseline(NamedTuple):
    r"""A baseline for the score-function estimator, as stop-gradient features and weights.

    The score-function surrogate with a baseline is, per draw,
    ``box_i * f_i + (1 - box_i) * b_i`` with ``box_i`` the DiCE magic box of ``log p(x_i)`` and
    ``b_i = sum_j weights_j * features_ij``. Writing ``b_i`` this way lets ``b_i`` depend on
    statistics of the whole batch (leave-one-out) while the engine makes one pass over chunks.
    ``b_i`` must not depend on draw ``i`` itself except through terms whose expectation cancels
    (leave-one-out's ``-f_i/(N-1)`` feature cancels its share of the batch mean exactly).

    Attributes:
      name: a label.
      num_features: number of features per draw.
      min_samples: the smallest batch the baseline is defined for.
      init: ``init(dtype) -> state``.
      features: ``features(f_i, state) -> (num_features,)`` with ``f_i`` stop-gradient.
      weights: ``weights(fstats, state, num_units) -> (num_features,)``.
      update: ``update(state, fstats) -> state``.
      stateful: True if the state must be threaded through calls.
      fitted: feature indices whose weights are fitted per parameter coordinate from other
        draws (cross-fitting, see :attr:`Estimator.fitted`); their ``weights`` entries are ignored.
      uses_draw: True if ``features`` takes the draw: ``features(f_i, state, x_i)`` (a learned
        baseline of a context that the score does not depend on).
      shift_invariant: True if ``b_i(f + c) = b_i(f) + c`` for every constant c (leave-one-out,
        batch mean, optimal): the estimator is then unchanged by a constant added to f.
    """

    name: str
    num_features: int
    min_samples: int
    init: Callable[[Any], State]
    features: Callable[..., jax.Array]  # (f_i, state), or (f_i, state, x_i) with uses_draw
    weights: Callable[[FStats, State, int], jax.Array]
    update: Callable[[State, FStats], State]
    stateful: bool = False
    fitted: tuple = ()
    uses_draw: bool = False
    shift_invariant: bool = False


@jax.custom_jvp
def magic_box(log_prob: jax.Array) -> jax.Array:
    r"""DiCE's magic box :math:`\exp(\tau - \perp\tau)`: value 1, derivative = itself times the score.

    Implemented as a ``custom_jvp`` whose value is exactly one, so an undifferentiated forward
    pass never evaluates ``log_prob``. Under differentiation the rule returns DiCE's own box
    ``exp(lp - stop_gradient(lp))`` (also exactly 1) as primal and as tangent factor, which JAX
    differentiates at every order. The rule must not call ``magic_box`` itself: a recursive
    ``custom_jvp`` loses its higher-order tangents inside ``lax.scan`` (the engine's chunk loop),
    which made ``jax.hessian`` of :func:`scoregrad.expectation` count only the chunk outside the
    loop (tests/test_hessian_chunks.py).

    References:
      Foerster et al., "DiCE: The Infinitely Differentiable Monte Carlo Estimator", ICML 2018.
    """
    return jnp.ones_like(log_prob)


@magic_box.defjvp
def _magic_box_jvp(primals, tangents):
    (log_prob,), (t,) = primals, tangents
    # Under differentiation the box is DiCE's own exp(lp - stop_gradient(lp)) (value exactly 1),
    # as primal and in the tangent, so an outer derivative of either is DiCE's at every order.
    out = jnp.exp(log_prob - jax.lax.stop_gradient(log_prob))
    return out, out * t


def no_update(state: State, fstats: FStats) -> State:
    del fstats
    return state


def estimator(name: str, bind: Callable[[Target], Plan], *, init=None, update=None) -> Estimator:
    """An :class:`Estimator` (stateless unless ``init``/``update`` are given)."""
    return Estimator(name, init if init is not None else (lambda theta: ()), bind,
                     update if update is not None else no_update)


def fixed(name: str, plan: Plan, check: Optional[Callable[..., None]] = None, **kw) -> Estimator:
    """An estimator whose plan does not depend on the problem (``check(target)`` runs first)."""
    def bind(target: Target) -> Plan:
        if check is not None:
            check(target)
        return plan

    return estimator(name, bind, **kw)
