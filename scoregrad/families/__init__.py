"""Built-in families of distributions (each a :class:`scoregrad.Family`)."""

from scoregrad._src.families import bernoulli, categorical, normal

__all__ = ["bernoulli", "categorical", "normal"]
