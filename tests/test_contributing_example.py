"""The worked example of CONTRIBUTING.md ("How to add an estimator") runs as written, is
unbiased against enumeration, and equals the library's own leave-one-out score function."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import scoregrad as sg

_DOC = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


def _example():
    text = _DOC.read_text()
    block = re.search(r"### How to add an estimator.*?```python\n(.*?)```", text, re.S).group(1)
    ns: dict = {}
    exec(compile(block, str(_DOC), "exec"), ns)  # noqa: S102 - our own documentation
    return ns["my_sf"]()


def test_contributing_example_is_the_leave_one_out_score_function(x64):
    est = _example()
    fam, theta = sg.families.bernoulli(), jnp.array([0.3, -0.5])

    def f(b):
        return jnp.sum((b - jnp.array([0.45, 0.2])) ** 2) + b[0] * b[1]

    b = sg.bind(est, fam, theta)
    assert (b.num_terms, b.presample, b.needs_key, b.stateful) == (3, True, False, False)
    r = sg.estimate_grad(f, fam, theta, jax.random.key(0), num_samples=1000, estimator=est)
    ref = sg.estimate_grad(f, fam, theta, jax.random.key(0), num_samples=1000,
                           estimator=sg.score_function(sg.baselines.leave_one_out()))
    np.testing.assert_allclose(r.grad, ref.grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r.stderr, ref.stderr, rtol=1e-8)
    # exact by enumeration of every pair of draws (the baseline needs >= 2 units)
    exact = sg.estimate_grad(f, fam, theta, jax.random.key(0), num_samples=4,
                             estimator=sg.enumerate()).grad
    pts = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    logp = jax.vmap(lambda x: fam.log_prob(theta, x))(pts)
    mean = 0.0
    for i in range(4):
        for j in range(4):
            xs = jnp.stack([pts[i], pts[j]])
            g = sg.estimate_grad_from_samples(f, fam, theta, xs, estimator=est).grad
            mean = mean + jnp.exp(logp[i] + logp[j]) * g
    np.testing.assert_allclose(mean, exact, rtol=1e-10)
