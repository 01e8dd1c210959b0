"""Core types: the model as the engine sees it, estimator and baseline protocols."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

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


class Estimator(NamedTuple):
    """A gradient estimator: a configuration of pure functions, built by a factory.

    An estimator describes only what differs between estimators; the engine
    (:mod:`scoregrad._src.engine`) owns sampling, chunking, statistics and derivatives.

    Attributes:
      name: a label for reports.
      init: ``init(theta) -> state``; ``()`` for stateless estimators.
      unit: ``unit(model, params, key, x, state) -> UnitOut`` for one unit. Exactly one of
        ``key`` (a typed key for this unit) and ``x`` (a given draw) is not ``None``.
      weights: ``weights(fstats, state, num_units) -> (K,)`` stop-gradient weights of the terms.
      update: ``update(state, fstats) -> state`` after an estimate (stateful estimators).
      num_terms: K.
      draws_per_unit: how many evaluations of f one unit costs.
      min_units: the smallest number of units the estimator is defined for.
      needs_key: True if the estimator must draw (pathwise): given samples are refused.
      stateful: True if ``state`` must be threaded through calls.
      check: ``check(model, theta, x_struct) -> None``, trace-time capability checks.
      learn: optional ``learn(model, params, key, state, num_units, chunk_units) -> state``, a
        learning step run after an estimate on the same units (``fold_in(key, i)``), e.g. RELAX's
        control-variate update minimizing the estimate's variance. The estimate itself used the
        old state, so learning from the current draws keeps it unbiased. ``None``: no step.
      f_input: optional ``f_input(x_struct, theta) -> struct``: the shape/dtype structure of what
        the estimator passes to f when it is not the family's draw (e.g. a relaxed categorical
        sample on the simplex, shape ``(..., K)``). ``None``: f receives the family's draws.
      fitted: indices of terms whose weights are fitted per parameter coordinate to minimise
        the variance, each from the *other* folds' draws (cross-fitting keeps it unbiased); see
        :mod:`scoregrad._src.fitted`. Their ``weights`` entries are ignored. ``()``: none.
      num_folds: folds for ``fitted`` (contiguous ranges of units).
      specialize: optional ``specialize(family, theta) -> Estimator``, called by the API first
        (after theta's checks, before ``num_samples`` is validated) for estimators whose static
        fields depend on the family or on theta's shapes, e.g. ``draws_per_unit`` of
        measure-valued (1 + 2 points per coordinate) or enumeration (the support size). It
        raises ``TypeError``/``ValueError`` for families it cannot handle. ``None``: as built.
      max_order: the highest derivative order of :func:`scoregrad.expectation` that the
        surrogate gets right; ``None``: every order (DiCE, pathwise, enumeration). With 1,
        ``jax.hessian`` of the expectation raises ``ValueError`` instead of returning the zeros
        of a first-order surrogate.
      shift_invariant: True if the estimate is exactly unchanged by a constant added to f (a
        baseline that moves with f: leave-one-out, batch mean, optimal; RLOO, VIMCO, ARM,
        enumeration, measure-valued, pathwise). The engine then centres f on a reference value
        so that float32 sums do not cancel.
      shift_term: for a shift-invariant estimator whose term 0 alone is not (the score term of a
        score function with a baseline), the index of the term whose per-unit gradient, times
        the reference value, restores term 0 on f itself (the baseline's constant feature);
        the ``variance_reduction`` diagnostic uses it. ``None``: term 0 needs no correction.
    """

    name: str
    init: Callable[[PyTree], State]
    unit: Callable[..., UnitOut]
    weights: Callable[[FStats, State, int], jax.Array]
    update: Callable[[State, FStats], State]
    num_terms: int = 1
    draws_per_unit: int = 1
    min_units: int = 1
    needs_key: bool = False
    stateful: bool = False
    check: Optional[Callable[..., None]] = None
    presample: bool = False
    learn: Optional[Callable[..., State]] = None
    f_input: Optional[Callable[[PyTree, PyTree], PyTree]] = None
    fitted: tuple = ()
    num_folds: int = 2
    specialize: Optional[Callable[..., "Estimator"]] = None
    max_order: Optional[int] = None
    shift_invariant: bool = False
    shift_term: Optional[int] = None


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


def _unit_weight(fstats: FStats, state, num_units) -> jax.Array:
    del state, num_units
    return jnp.ones((1,), fstats.mean.dtype)


def single_term(name: str, unit: Callable[..., UnitOut], **fields) -> Estimator:
    """A stateless one-term estimator that draws its own samples (the common case).

    ``fields`` override any other :class:`Estimator` field (``draws_per_unit``, ``check``, ...).
    """
    base: dict[str, Any] = dict(
        init=lambda theta: (), weights=_unit_weight, update=no_update, num_terms=1,
        min_units=1, needs_key=True, stateful=False,
    )
    base.update(fields)
    return Estimator(name=name, unit=unit, **base)
