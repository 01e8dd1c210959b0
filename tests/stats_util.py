"""Helpers for statistical tests (see CONTRIBUTING.md)."""

import numpy as np

Z = 5.0


def assert_unbiased(mean, stderr, truth, *, z=Z, atol=0.0, what=""):
    """|mean - truth| <= z * stderr + atol, elementwise."""
    mean, stderr, truth = (np.asarray(a, np.float64) for a in (mean, stderr, truth))
    err = np.abs(mean - truth)
    bound = z * stderr + atol
    assert np.all(err <= bound), (
        f"{what}: |mean - truth| = {err} exceeds {z}*SE + atol = {bound} (mean={mean}, truth={truth})"
    )


def assert_power(stderr, bound, *, what=""):
    """The test can fail: its standard error is below ``bound``."""
    stderr = np.asarray(stderr, np.float64)
    assert np.all(stderr < bound), f"{what}: SE {stderr} >= {bound}; the test has no power"


def replicate_stats(values):
    """Mean and standard error over a leading axis of independent replicates."""
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    return values.mean(0), values.std(0, ddof=1) / np.sqrt(n)
