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


# The heaviest default tests, measured on the 2-core CI machine (>= 15 s each, mostly compile
# time): run with the slow set so the default suite stays near its 10-minute budget.
HEAVY = {
    "tests/test_scale.py::test_memory_is_bounded_in_num_samples",
    "tests/test_multisample.py::test_public_api_matches_units_on_the_same_draws[rloo]",
    "scoregrad/examples/finance.py::scoregrad.examples.finance.mc_greeks",
    "tests/test_sampling.py::test_chunk_size_invariance_and_given_samples_refused",
    "tests/test_families_extra.py::test_pathwise_beta_dirichlet_exponential",
    "tests/test_rebar_relax.py::test_expectation_with_state_threads_and_learns",
    "tests/test_multisample.py::test_rloo_variance_below_reinforce_common_random_numbers[0.45]",
    "scoregrad/_src/importance.py::scoregrad._src.importance.estimate_grad_importance",
    "tests/test_measure_valued.py::test_coupling_beats_score_function_on_normal_loc",
    "tests/test_importance.py::test_ess_closed_form",
    "tests/test_measure_valued.py::test_normal_closed_forms_smooth_and_step",
    "scoregrad/_src/estimators/rebar_relax.py::scoregrad._src.estimators.rebar_relax.relax",
    "scoregrad/_src/estimators/rebar_relax.py::scoregrad._src.estimators.rebar_relax.rebar",
    "tests/test_examples.py::test_pathwise_fails_where_it_should_and_mixed_fixes_gamma",
    "tests/test_measure_valued.py::test_exponential_and_gamma_rate_closed_forms",
    "tests/test_measure_valued.py::test_expectation_gradient_with_f_closing_over_theta",
    "tests/test_examples.py::test_linear_regression_closed_forms",
    "tests/test_families_extra.py::test_draw_shapes_and_dtypes[float32]",
    "tests/test_control_variates.py::test_delta_method_exact_for_quadratic",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in HEAVY:
            item.add_marker(pytest.mark.slow)
