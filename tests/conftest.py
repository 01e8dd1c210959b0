import os

import jax
import pytest
import stats_util

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

    # JAX does not persist compiled programs that contain host callbacks, and nan_policy="raise"
    # (the default) adds one. The sweep therefore makes "propagate" the default, so that after
    # the first seed most programs load from the compilation cache instead of compiling (3x
    # faster per seed). Values are bitwise the same (the check multiplies by 1), and a NaN still
    # fails every statistical check. SCOREGRAD_SWEEP_NAN_CHECK=1 keeps the default.
    if os.environ.get("SCOREGRAD_SWEEP_NAN_CHECK") != "1":
        import scoregrad as _sg

        for _fn in (_sg.estimate_grad, _sg.estimate_grad_from_samples, _sg.expectation,
                    _sg.expectation_with_state):
            _fn.__kwdefaults__["nan_policy"] = "propagate"


@pytest.fixture(autouse=True)
def _statistical_marker(request):
    """Tells tests/stats_util.py whether the running test is marked `statistical`."""
    stats_util.CURRENT["marked"] = request.node.get_closest_marker("statistical") is not None
    yield
    stats_util.CURRENT["marked"] = None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test traces its own closures, so JAX's caches of compiled programs are never hit
    across modules; dropping them after each module keeps a worker's memory from growing over
    the whole suite (a worker reached 4.5 GB without this)."""
    yield
    jax.clear_caches()
    import gc

    gc.collect()


@pytest.fixture
def x64():
    """Run a statistical test in float64."""
    with jax.enable_x64(True):
        yield


# Doctests and single parametrized cases among the heaviest default tests (>= 15 s each on the
# 2-core CI machine, mostly compile time), which cannot carry a mark at their definition: run with
# the slow set so the default suite stays near its 10-minute budget. Test functions are marked
# `@pytest.mark.slow` where they are defined.
HEAVY = {
    "tests/test_multisample.py::test_public_api_matches_units_on_the_same_draws[rloo]",
    "scoregrad/examples/finance.py::scoregrad.examples.finance.mc_greeks",
    "tests/test_multisample.py::test_rloo_variance_below_reinforce_common_random_numbers[0.45]",
    "scoregrad/_src/importance.py::scoregrad._src.importance.estimate_grad_importance",
    "scoregrad/_src/estimators/rebar_relax.py::scoregrad._src.estimators.rebar_relax.relax",
    "scoregrad/_src/estimators/rebar_relax.py::scoregrad._src.estimators.rebar_relax.rebar",
    "tests/test_families_extra.py::test_draw_shapes_and_dtypes[float32]",
}


def _heavy_cases() -> set:
    path = os.path.join(os.path.dirname(__file__), "heavy_cases.txt")
    with open(path) as fh:
        return {ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")}


HEAVY |= _heavy_cases()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in HEAVY:
            item.add_marker(pytest.mark.slow)
