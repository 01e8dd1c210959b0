"""Helpers for statistical tests (see CONTRIBUTING.md).

Every assertion whose outcome depends on the random key goes through one of these helpers, and
every test that calls one carries ``@pytest.mark.statistical``. When ``SCOREGRAD_SWEEP_LOG`` names
a file (``benchmarks/seed_sweep.py`` sets it), each helper appends what it checked, before it
asserts, as one JSON line: the test, the kind of check, the statistic and its limit. The sweep
turns those lines into calibration figures (are the z-scores of unbiasedness checks N(0, 1)?) and
into a predicted failure rate per test (how far do power and effect-size checks sit from their
limits, in units of their spread over seeds?).

Kinds of check:

* ``null``: ``assert_unbiased``. Records ``z = (mean - truth) / SE`` and the limit
  ``Z + atol / SE``; the check fails when ``|z| > limit``. Under a correct estimator and honest
  standard error z is (close to) N(0, 1).
* ``upper``: the statistic must stay below the limit (``assert_power``, ``assert_below``).
* ``lower``: the statistic must exceed the limit (``assert_above``, ``assert_rejects``).
"""

import json
import os

import numpy as np

Z = 5.0

_LOG = os.environ.get("SCOREGRAD_SWEEP_LOG")
_counter = {"test": None, "n": 0}
# Set by an autouse fixture in conftest.py: whether the running test is marked `statistical`
# (None outside a test). A helper called from an unmarked test fails it, so the sweep's
# selection (-m statistical) cannot silently miss a key-dependent check.
CURRENT = {"marked": None}


def _record(kind, stat, limit, what):
    if CURRENT["marked"] is False:
        raise AssertionError(
            f"{os.environ.get('PYTEST_CURRENT_TEST', 'this test')} calls a statistical check "
            f"({what!r}) but is not marked @pytest.mark.statistical: mark it, so that "
            "benchmarks/seed_sweep.py reruns it.")
    if not _LOG:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    if _counter["test"] != test:
        _counter["test"], _counter["n"] = test, 0
    _counter["n"] += 1
    stat, limit = np.broadcast_arrays(np.asarray(stat, np.float64), np.asarray(limit, np.float64))
    row = {"test": test, "check": _counter["n"], "what": what, "kind": kind,
           "stat": np.ravel(stat).tolist(), "limit": np.ravel(limit).tolist()}
    with open(_LOG, "a") as fh:  # one short write per check: safe to share between processes
        fh.write(json.dumps(row) + "\n")


def assert_unbiased(mean, stderr, truth, *, z=Z, atol=0.0, what=""):
    """|mean - truth| <= z * stderr + atol, elementwise."""
    mean, stderr, truth = (np.asarray(a, np.float64) for a in (mean, stderr, truth))
    err = np.abs(mean - truth)
    bound = z * stderr + atol
    with np.errstate(divide="ignore", invalid="ignore"):
        zs = np.where(stderr > 0, (mean - truth) / stderr, np.where(err > 0, np.inf, 0.0))
        lim = np.where(stderr > 0, z + atol / stderr, np.inf)
    _record("null", zs, lim, what)
    assert np.all(err <= bound), (
        f"{what}: |mean - truth| = {err} exceeds {z}*SE + atol = {bound} (mean={mean}, truth={truth})"
    )


def assert_power(stderr, bound, *, what=""):
    """The test can fail: its standard error is below ``bound``."""
    stderr = np.asarray(stderr, np.float64)
    _record("upper", stderr, bound, what or "power")
    assert np.all(stderr < bound), f"{what}: SE {stderr} >= {bound}; the test has no power"


def assert_below(stat, limit, *, what=""):
    """An effect-size check: ``stat < limit`` elementwise (e.g. a variance ratio plus 5 SE < 1)."""
    stat = np.asarray(stat, np.float64)
    _record("upper", stat, limit, what)
    assert np.all(stat < limit), f"{what}: {stat} is not below {limit}"


def assert_above(stat, limit, *, what=""):
    """An effect-size check: ``stat > limit`` elementwise (e.g. a log variance ratio > 5 SE)."""
    stat = np.asarray(stat, np.float64)
    _record("lower", stat, limit, what)
    assert np.all(stat > limit), f"{what}: {stat} is not above {limit}"


def assert_rejects(mean, stderr, wrong, *, z=Z, what=""):
    """Power against a named wrong answer: some coordinate of ``mean`` is more than ``z``
    standard errors from ``wrong`` (so the unbiasedness check would catch that error)."""
    mean, stderr, wrong = (np.asarray(a, np.float64) for a in (mean, stderr, wrong))
    with np.errstate(divide="ignore", invalid="ignore"):  # SE 0: rejected iff they differ
        dist = np.max(np.where(stderr > 0, np.abs(mean - wrong) / stderr,
                               np.where(mean != wrong, np.inf, 0.0)))
    _record("lower", dist, z, what or "rejects the wrong answer")
    assert dist > z, f"{what}: the wrong answer is only {dist:.2f} SE away; the test has no power"


def assert_close_rel(actual, desired, rtol, *, what=""):
    """``|actual - desired| <= rtol * |desired|`` elementwise, for statistics whose spread over
    seeds the sweep should measure (a claimed SE against the observed spread, say)."""
    actual, desired = (np.asarray(a, np.float64) for a in (actual, desired))
    rel = np.abs(actual - desired) / np.abs(desired)
    _record("upper", rel, rtol, what or "relative difference")
    assert np.all(rel <= rtol), f"{what}: relative difference {rel} exceeds {rtol}"


def replicate_stats(values):
    """Mean and standard error over a leading axis of independent replicates."""
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    return values.mean(0), values.std(0, ddof=1) / np.sqrt(n)


def log_variance_ratio(a, b):
    """log(var(a) / var(b)) per coordinate over a leading replicate axis, and the bound
    ``Z * sqrt(4 / (R - 1))`` it must exceed for "a has more variance than b" at 5 SE: the log
    of one sample variance of R normal replicates has SE sqrt(2 / (R - 1)); two of them add."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    r = a.shape[0]
    return np.log(np.var(a, 0, ddof=1) / np.var(b, 0, ddof=1)), Z * np.sqrt(4 / (r - 1))


def variance_ratio(a, b):
    """var(a) / var(b) per coordinate for paired draws (common random numbers: row i of a and b
    share their randomness), and its delta-method standard error."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sa, sb = (a - a.mean(0)) ** 2, (b - b.mean(0)) ** 2
    r = sa.mean(0) / sb.mean(0)
    return r, (sa - r * sb).std(0, ddof=1) / np.sqrt(a.shape[0]) / sb.mean(0)
