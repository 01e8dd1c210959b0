import os

import jax
import pytest

# benchmarks/seed_sweep.py reruns the statistical tests with SCOREGRAD_SWEEP_SEED=s: every literal
# key a test makes is then folded with s, so each run sees independent randomness while the
# default run (variable unset) keeps its literal keys.
_SWEEP = os.environ.get("SCOREGRAD_SWEEP_SEED")
if _SWEEP is not None:
    _key, _prng = jax.random.key, jax.random.PRNGKey

    def _swept_key(seed, *args, **kwargs):
        return jax.random.fold_in(_key(seed, *args, **kwargs), int(_SWEEP))

    def _swept_prng(seed, *args, **kwargs):
        return jax.random.fold_in(_prng(seed, *args, **kwargs), int(_SWEEP))

    jax.random.key = _swept_key
    jax.random.PRNGKey = _swept_prng


@pytest.fixture
def x64():
    """Run a statistical test in float64."""
    with jax.enable_x64(True):
        yield
