r"""Sampling designs: antithetic pairs, Latin-hypercube stratification, randomized quasi-Monte
Carlo, and common random numbers across theta.

Each design draws a *unit* of M coupled draws from uniform noise :math:`u \in (0,1)^D` through
an inverse-CDF ``transform(theta, u)`` (``family.capabilities.inverse_cdf``: the built-in normal,
bernoulli and categorical and adapted numpyro/distrax ones; pass your own for other families). Units are i.i.d. (unit i uses
``fold_in(key, i)``), so the standard errors of :func:`scoregrad.estimate_grad` are honest and
results do not depend on the chunk size. Every draw is marginally exactly :math:`p(x;\theta)`,
so any unbiased one-draw estimator stays unbiased when averaged over a unit. The wrapped
estimator runs once per copy with a :class:`~scoregrad._src.base.Draws` whose every uniform is
the design's: the family's draw (through the transform) and the estimator's own noise alike
(the logistic/Gumbel noise of the relaxations and REBAR/RELAX, ARM's uniforms). Estimators that
draw with a raw key (measure-valued points, an importance proposal) or in groups (RLOO, VIMCO)
are refused, and so are baselines built from the other draws of the *same batch*
(leave-one-out), which would see the coupled partner.

References:
  Owen, "Monte Carlo theory, methods and examples", 2013, ch. 8 (antithetic, stratification) and
  ch. 17 (randomized QMC). Matoušek, "On the L2-discrepancy for anchored boxes", 1998 (random
  digit permutations). McKay, Beckman and Conover, "A comparison of three methods for selecting
  values of input variables", 1979 (Latin hypercube). Glasserman, "Monte Carlo Methods in
  Financial Engineering", 2003, §7.1 (common random numbers for finite-difference Greeks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scoregrad._src.base import DesignRefusal, Estimator, UnitOut
from scoregrad._src.estimators.score import score_function
from scoregrad._src.family import require

PyTree = Any


def _primes(n: int) -> np.ndarray:
    limit = max(16, int(n * (math.log(n + 2) + math.log(math.log(n + 3)) + 3)))
    sieve = np.ones(limit, bool)
    sieve[:2] = False
    for i in range(2, int(limit**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = False
    return np.nonzero(sieve)[0][:n]


def halton(key: jax.Array, index: jax.Array, dim: int, dtype=jnp.float32) -> jax.Array:
    r"""Randomized Halton points ``(len(index), dim)`` in (0, 1), point i a function of (key, i).

    Coordinate j is the radical inverse of i in the j-th prime base, each digit position passed
    through its own random permutation drawn from ``key`` (random digit scrambling): every point
    is uniform on :math:`(0,1)^D` and the first :math:`b^m` points of each coordinate are still
    stratified into :math:`b^m` cells, so integration errors of smooth integrands fall like
    :math:`O(N^{-1}\log^D N)` instead of :math:`N^{-1/2}`. Recommended for modest D (≲ 50).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> u = sg.sampling.halton(jax.random.key(0), jnp.arange(8), 2)
      >>> u.shape, bool(jnp.all((u > 0) & (u < 1)))
      ((8, 2), True)
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"halton(dim=...) must be a positive int; got {dim!r}.")
    idx = jnp.asarray(index).astype(jnp.uint32)
    flat = idx.reshape(-1)
    primes = _primes(dim).tolist()
    ndig = [int(math.ceil(32 * math.log(2) / math.log(b))) for b in primes]
    cols: list = [None] * dim
    # Coordinates are scrambled in groups of bases up to 8, 32, 128, 512, ... (padded to the
    # group's largest base and digit count), their digits in a fori_loop: the program has a few
    # groups (5 at D = 100), not D x digits gathers (unrolled, it compiled for minutes at
    # D = 100). Digits past a base's own count add less than its finest cell.
    bucket = [0 if b <= 8 else math.ceil((math.log2(b) - 3) / 2) for b in primes]
    for g in sorted(set(bucket)):
        js = [j for j in range(dim) if bucket[j] == g]
        nd = max(ndig[j] for j in js)
        for j, col in zip(js, _halton_group(key, flat, js, [primes[j] for j in js], nd, dtype).T):
            cols[j] = col
    return jnp.stack(cols, axis=-1).reshape(idx.shape + (dim,))


def _halton_group(key, idx, js, bases, nd, dtype):
    """Scrambled radical inverses ``(n, len(js))`` of ``idx`` in ``bases`` (``nd`` digits each):
    coordinate ``js[i]``'s digit k goes through row k of its own permutations of
    ``range(bases[i])``, drawn from ``fold_in(key, js[i])``."""
    b = jnp.asarray(bases, jnp.uint32)
    bmax = max(bases)
    u = jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key, j), (nd, bmax)))(
        jnp.asarray(js, jnp.uint32))
    pad = jnp.arange(bmax, dtype=jnp.uint32)[None, None, :] < b[:, None, None]
    perms = jnp.argsort(jnp.where(pad, u, 2.0), axis=-1).astype(dtype)  # padding sorts last
    b_row = b[None, :]  # (1, g): digits of every point at once
    inv_b = 1.0 / b_row.astype(dtype)

    def digit(k, carry):
        val, rem, scale = carry
        d = jnp.take_along_axis(perms[:, k, :], (rem % b_row).astype(jnp.int32).T, axis=1).T
        return val + d * scale, rem // b_row, scale * inv_b

    zeros = jnp.zeros((idx.shape[0], len(bases)), dtype)
    val, _, scale = jax.lax.fori_loop(0, nd, digit, (zeros, jnp.broadcast_to(
        idx[:, None], zeros.shape), inv_b))
    eps = float(jnp.finfo(dtype).eps)
    return jnp.clip(val + 0.5 * scale * b_row.astype(dtype), eps, 1.0 - eps)


def open_uniform(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Uniform noise on the midpoints ``(k + 1/2) / 2^m`` of a ``2^m`` grid (m = mantissa bits).

    Never 0 or 1, and symmetric: ``1 - u`` is exactly another grid point, so an inverse CDF
    (``ndtri``) of ``u`` or ``1 - u`` is always finite. ``jax.random.uniform`` can return 0, and
    ``1 - tiny`` rounds to 1 in float32: once in ~8e6 draws an antithetic partner was infinite.
    """
    m = jnp.finfo(dtype).nmant
    width = 64 if m > 31 else 32
    bits = jax.random.bits(key, shape, jnp.uint64 if width == 64 else jnp.uint32)
    k = jax.lax.shift_right_logical(bits, jnp.asarray(width - m, bits.dtype))
    return (k.astype(dtype) + 0.5) * (2.0**-m)


def _clip_open(u: jax.Array) -> jax.Array:
    """``u`` clipped to the open interval ``[2^-(m+1), 1 - 2^-(m+1)]`` (rounding can reach 1)."""
    lo = 2.0 ** -(jnp.finfo(u.dtype).nmant + 1)
    return jnp.clip(u, lo, 1.0 - lo)


def builtin_transform(family) -> Callable:
    """The family's inverse-CDF ``transform(theta, u)`` (``family.capabilities.inverse_cdf``;
    u shaped like the draw)."""
    return require(
        family, "inverse_cdf", "a sampling design (antithetic, stratified, qmc)",
        "Pass transform=fn with fn(theta, u) -> draw, u uniform on (0,1)^dim, and dim=D.",
    )


def _float_dtype(theta):
    leaves = [x for x in jax.tree_util.tree_leaves(theta) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return jnp.result_type(*leaves) if leaves else jnp.result_type(float)


_DESIGNED = (
    "Sampling designs reach estimators whose randomness is the family's draw and noise drawn "
    "through their Draws (score function with a baseline from past draws or "
    "sg.baselines.optimal(), pathwise, the relaxations, REBAR/RELAX, ARM/DisARM, and control "
    "variates of those)"
)


class _Transform:
    """``transform(theta, u) -> draw`` with the shape and dtype of its uniform noise."""

    def __init__(self, fn, noise_shape, dtype):
        self.fn, self.noise_shape, self.dtype = fn, tuple(noise_shape), dtype

    def __call__(self, theta, u):
        return self.fn(theta, u)


def _coupled(inner, name, per_unit, noise, transform, dim) -> Estimator:
    """Units of ``per_unit`` coupled copies of ``inner``'s unit; copy m's uniforms are row m of
    ``noise(stream key, D, dtype)``. A ``Plan -> Plan`` map applied inside ``bind``: binding
    the inner estimator can never drop the design."""
    if inner is None:
        inner = score_function()
    if not isinstance(inner, Estimator):
        raise TypeError(f"{name}(estimator=...) must be a scoregrad Estimator; got {inner!r}.")
    if (transform is None) != (dim is None):
        raise TypeError(f"{name}: pass both transform=fn(theta, u) and dim=D, or neither.")
    full = f"{name}[{inner.name}]"

    def bind(target):
        plan = inner.bind(target)
        if plan.min_units > 1 and not plan.fitted:
            raise TypeError(
                f"{name}: {inner.name} uses the other draws of the batch as its baseline, which "
                "would include each draw's coupled partner (biased). Use sg.baselines.optimal() "
                "or sg.baselines.moving_average() with sampling designs."
            )
        fn = transform if transform is not None else builtin_transform(target.family)
        shape = (dim,) if dim is not None else tuple(target.x_struct.shape)
        tr = _Transform(fn, shape, _float_dtype(target.theta))

        def unit(model, params, draws, state):
            def copy(m):
                return plan.unit(model, params, draws.coupled(noise, m, tr), state)

            try:
                outs = jax.vmap(copy)(jnp.arange(per_unit))
            except DesignRefusal as err:
                raise TypeError(f"{name}: {inner.name} {err}. {_DESIGNED}; use {inner.name} "
                                "without a sampling design.") from None
            return UnitOut(jnp.mean(outs.terms, axis=0), outs.fvals.reshape(-1))

        return plan._replace(unit=unit, draws_per_unit=per_unit * plan.draws_per_unit,
                             min_units=max(plan.min_units, 1))

    return Estimator(full, inner.init, bind, inner.update)


def antithetic(estimator: Estimator | None = None, *, transform=None, dim=None) -> Estimator:
    r"""Antithetic pairs: each unit draws :math:`x(u)` and :math:`x(1-u)` (for the normal,
    :math:`\mathrm{loc} \pm \mathrm{scale}\,\epsilon`).

    Unbiased (each draw is exactly :math:`p`); the pair mean has smaller variance than two
    independent draws whenever the estimator's contribution is monotone in the noise (and can
    have larger variance for even functions of the noise, e.g. :math:`f(x) = x^2` about the mean:
    measure with :func:`scoregrad.auto`). ``num_samples`` counts draws (a multiple of 2).
    Derivative order and needs: those of the wrapped estimator (default score function).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> theta = {"loc": jnp.zeros(2), "scale": jnp.ones(2)}
      >>> r = sg.estimate_grad(lambda x: jnp.sum(x), sg.families.normal(), theta,
      ...                      jax.random.key(0), num_samples=64,
      ...                      estimator=sg.sampling.antithetic(sg.pathwise()))
      >>> r.grad["loc"], r.stderr["loc"]  # exact: the pair cancels the noise
      (Array([1., 1.], dtype=float32), Array([0., 0.], dtype=float32))

    References:
      Hammersley and Morton, "A new Monte Carlo technique: antithetic variates", 1956.
    """

    def noise(key, size, dtype):
        u = open_uniform(key, (size,), dtype)
        return jnp.stack([u, 1.0 - u])

    return _coupled(estimator, "antithetic", 2, noise, transform, dim)


def stratified(estimator: Estimator | None = None, *, num_strata: int = 8, transform=None,
               dim=None) -> Estimator:
    r"""Latin-hypercube stratification: a unit is ``num_strata`` draws whose noise is stratified
    in every coordinate, :math:`u_{sj} = (\pi_j(s) + U_{sj}) / S` with random permutations
    :math:`\pi_j`.

    Each draw is exactly :math:`p` (unbiased); the unit mean never has more variance than S
    independent draws' asymptotically, and removes the additive (per-coordinate) part of the
    variance. For one-dimensional noise it is plain stratified sampling. ``num_samples`` must be a
    multiple of ``num_strata``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> r = sg.estimate_grad(lambda x: jnp.sum(x**2), sg.families.normal(),
      ...                      {"loc": jnp.zeros(1), "scale": jnp.ones(1)}, jax.random.key(0),
      ...                      num_samples=64, estimator=sg.sampling.stratified(num_strata=8))
      >>> r.num_samples
      64

    References:
      McKay, Beckman and Conover, Technometrics, 1979. Owen, 2013, §10.3.
    """
    if not isinstance(num_strata, int) or num_strata < 2:
        raise ValueError(f"stratified(num_strata=...) must be an int >= 2; got {num_strata!r}.")

    def noise(key, size, dtype):
        k1, k2 = jax.random.split(key)
        perm = jax.vmap(lambda k: jax.random.permutation(k, num_strata))(jax.random.split(k1, size))
        u = open_uniform(k2, (num_strata, size), dtype)
        return _clip_open((perm.T.astype(dtype) + u) / num_strata)

    return _coupled(estimator, f"stratified{num_strata}", num_strata, noise, transform, dim)


def qmc(estimator: Estimator | None = None, *, block_size: int = 64, transform=None,
        dim=None) -> Estimator:
    r"""Randomized quasi-Monte Carlo: a unit is a block of ``block_size`` scrambled Halton points.

    Every unit scrambles its own Halton block with its own key (:func:`halton`), so units are
    i.i.d. and the reported standard error is honest (replicated RQMC), while within a block the
    error of a smooth integrand falls like :math:`O(M^{-1}\log^D M)`. Unbiased (every point is
    uniform). Best for smooth f and low noise dimension D; for discontinuous f (bernoulli,
    categorical) the gain shrinks to stratification's. ``num_samples`` must be a multiple of
    ``block_size``; derivative order and needs are those of the wrapped estimator.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> theta = {"loc": jnp.zeros(2), "scale": jnp.ones(2)}
      >>> r = sg.estimate_grad(lambda x: jnp.sum(jnp.cos(x)), sg.families.normal(), theta,
      ...                      jax.random.key(0), num_samples=1024,
      ...                      estimator=sg.sampling.qmc(sg.pathwise(), block_size=256))
      >>> bool(jnp.all(r.stderr["scale"] < 0.01))
      True

    References:
      Owen, "Scrambling Sobol' and Niederreiter-Xing points", 1998; L'Ecuyer and Lemieux,
      "Recent advances in randomized quasi-Monte Carlo methods", 2002.
    """
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"qmc(block_size=...) must be an int >= 2; got {block_size!r}.")

    def noise(key, size, dtype):
        return halton(key, jnp.arange(block_size), size, dtype)

    return _coupled(estimator, f"qmc{block_size}", block_size, noise, transform, dim)


def finite_difference(f: Callable, family, theta: PyTree, key: jax.Array, *, num_samples: int,
                      step: float = 1e-3, chunk_size: int | None = None,
                      nan_policy: str = "raise"):
    r"""Central finite differences with common random numbers across theta (e.g. for Greeks).

    .. math::
       \hat g_j = \frac1N \sum_i \frac{f\big(x(\theta + h e_j, \xi_i)\big) -
       f\big(x(\theta - h e_j, \xi_i)\big)}{2h},

    where draw i at every theta uses the same key ``fold_in(key, i)`` (the same noise
    :math:`\xi_i`): with a continuous sampler the difference is :math:`O(h)` per draw and the
    variance stays bounded as :math:`h \to 0` (independent draws would blow it up like
    :math:`1/h^2`). **Biased** by :math:`O(h^2)` (f smooth in theta through the sampler). Needs
    nothing from f but evaluations, and 2P + 1 of them per draw for P parameters.

    ``nan_policy``: ``"raise"`` (default) raises when f is NaN or infinite at some draw (at
    theta or at a shifted theta), as :func:`scoregrad.estimate_grad` does, also under
    ``jit``/``vmap``; ``"propagate"`` keeps the non-finite values and counts the draws in
    ``num_nonfinite``. ``"drop"`` is refused (``ValueError``).

    Returns:
      A :class:`scoregrad.GradEstimate` (``num_samples`` counts draws).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import scoregrad as sg
      >>> theta = {"loc": jnp.array([1.0]), "scale": jnp.array([1.0])}
      >>> r = sg.sampling.finite_difference(lambda x: jnp.sum(x), sg.families.normal(), theta,
      ...                                   jax.random.key(0), num_samples=100, step=1e-2)
      >>> bool(jnp.allclose(r.grad["loc"], 1.0, atol=1e-3))
      True
    """
    from jax.flatten_util import ravel_pytree

    from scoregrad._src import engine, policy, stats, validation
    from scoregrad._src.family import Family
    from scoregrad._src.results import summarize

    who = "finite_difference"
    validation.check_callable(f, "f", who)
    if not isinstance(family, Family):
        raise TypeError(f"finite_difference: `family` must be a scoregrad.Family; got {family!r}.")
    run_policy = policy.make_policy(
        who, nan_policy, None, chunk_size,
        refuse=("drop", "a draw enters every coordinate's difference"))
    validation.check_theta(theta)
    n = validation.check_num_samples(num_samples, minimum=2, who=who)
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not step > 0:
        raise ValueError(f"finite_difference(step=...) must be a positive float; got {step!r}.")
    chunk = run_policy.chunk_size
    legacy = validation.is_legacy_key(key)
    typed = validation.normalize_key(key)
    typed = typed if legacy else engine.counter_key(typed)
    user_key = jax.random.key_data(typed) if legacy else typed
    theta_def = jax.tree_util.tree_structure(theta)
    x_struct = validation.traced_struct(
        family.sample, (theta, user_key), "family.sample(theta, key)",
        f"Check that it accepts theta of structure {theta_def} and a PRNG key.")
    f_struct = validation.traced_struct(f, (x_struct,), "f(x)",
                                        "f must accept one draw x as the family samples it.")
    validation.check_scalar_float(
        f_struct, "f(x)", "f must return one scalar per draw; reduce it, e.g. `jnp.sum(...)`.")
    flat, unravel = ravel_pytree(theta)
    dtype = flat.dtype
    shifts = float(step) * jnp.eye(flat.size, dtype=dtype)

    def per_unit(k):
        uk = jax.random.key_data(k) if legacy else k
        fval = lambda t: jnp.asarray(f(family.sample(unravel(t), uk)), dtype)  # noqa: E731
        diff = (jax.vmap(fval)(flat[None, :] + shifts)
                - jax.vmap(fval)(flat[None, :] - shifts)) / (2 * step)
        return diff, fval(flat)

    def run_chunk(keys, xs):
        del xs
        d, f0 = jax.vmap(per_unit)(keys)
        # A draw counts once when f is finite at theta but not at a shifted theta (its
        # difference row is then non-finite).
        ok = jnp.all(jnp.isfinite(d), axis=1)
        return stats.fstats_of(f0, dtype, ok), stats.moments_of(d[:, None, :], dtype)

    c = chunk or max(1, min(n, 2**16 // max(1, 2 * flat.size + 1)))
    fs, mom = engine.run_chunks(lambda keys, xs, start: run_chunk(keys, xs),
                                lambda a, b: engine.merge("diag", a, b), num_units=n,
                                chunk_units=c, key=typed)
    fs = policy.check_nonfinite(run_policy, fs, who)
    var = mom.comoment[0, 0] / (n - 1)
    return summarize(
        fs=fs._replace(mean=policy.guard(fs.mean, fs)),
        grad=unravel(policy.guard(mom.mean[0], fs)), variance=unravel(var), n_units=n,
        num_samples=n, state=(),
    )
