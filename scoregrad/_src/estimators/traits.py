"""What a wrapper must know about an estimator that the :class:`~scoregrad.Estimator` record
does not (yet) say: whether the estimator, applied to *another* integrand h on the same draws,
estimates :math:`\\nabla\\,\\mathbb E[h]` without bias.

A control variate (:func:`scoregrad.control_variates.with_control_variates`) is the wrapped
estimator applied to h, minus the gradient of h's known mean. That is zero in expectation only
when the estimator is unbiased for :math:`\\nabla\\,\\mathbb E[h]` for every h; for a biased
estimator (Gumbel-softmax, straight-through) it would add bias, for VIMCO (a log-mean-exp
objective) or Rao-Blackwell (gradient terms from ``f_terms``, not from the integrand) it
estimates something else. Such estimators mark their ``unit`` with :func:`mark_not_unbiased`;
wrappers that build a new unit from an inner one carry the mark with :func:`carry`.

The mark is an attribute of the ``unit`` function because ``scoregrad/_src/base.py`` (owned
elsewhere) has no field for it yet; the intended home is a typed field of the record (e.g.
``Estimator.unbiased_for: str | None``) filled by each factory and read by every wrapper.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from scoregrad._src.base import Estimator

_ATTR = "_scoregrad_not_unbiased_for_mean"


def mark_not_unbiased(unit: Callable[..., Any], why: str) -> Callable[..., Any]:
    """Marks ``unit``: applied to an integrand h it does not estimate grad E[h] (``why``)."""
    setattr(unit, _ATTR, why)
    return unit


def not_unbiased(est: Estimator) -> Optional[str]:
    """Why ``est`` applied to another integrand is not an unbiased gradient of its mean, or None."""
    return getattr(est.unit, _ATTR, None)


def carry(unit: Callable[..., Any], inner: Estimator) -> Callable[..., Any]:
    """``unit`` (a wrapper's new unit) with the mark of ``inner``, if it has one."""
    why = not_unbiased(inner)
    return unit if why is None else mark_not_unbiased(unit, why)
