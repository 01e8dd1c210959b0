"""Model helpers shared by the tests (not statistical checks: those live in stats_util)."""

import jax
import jax.numpy as jnp

import scoregrad as sg


def fixed_draw(family, x0):
    """The family, but its sampler always returns x0 (to enumerate E[g] over the draw).

    The draw depends on the key only formally (``+ 0 * bits``): scoregrad refuses, at trace
    time, a sampler whose draws provably ignore the key, which a user never wants; these tests
    want exactly that, to sum an estimator over the support."""

    def sample(theta, key):
        formal = jnp.zeros((), jnp.uint32) * jax.random.bits(key, (), jnp.uint32)
        return x0 + formal.astype(jnp.result_type(x0))

    return sg.Family(family.log_prob, sample, family.reparameterized, family.name, None,
                     family.capabilities)


def stateful(est) -> bool:
    """Whether ``est`` threads a state (derived from its ``init``, as the library derives it)."""
    import jax
    import jax.numpy as jnp

    return bool(jax.tree_util.tree_leaves(est.init(jnp.zeros(2))))
