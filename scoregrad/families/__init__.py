"""Built-in families of distributions (each a :class:`scoregrad.Family`)."""

from scoregrad._src.adapters import from_distrax, from_numpyro
from scoregrad._src.estimators.relaxed import relaxed_bernoulli, relaxed_categorical
from scoregrad._src.families import bernoulli, categorical, normal
from scoregrad._src.families_extra import (
    beta,
    dirichlet,
    exponential,
    gamma,
    multivariate_normal,
    poisson,
)

__all__ = [
    "bernoulli",
    "beta",
    "categorical",
    "dirichlet",
    "exponential",
    "from_distrax",
    "from_numpyro",
    "gamma",
    "multivariate_normal",
    "normal",
    "poisson",
    "relaxed_bernoulli",
    "relaxed_categorical",
]
