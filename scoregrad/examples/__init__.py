"""Applications of scoregrad, importable and tested; the notebooks in ``notebooks/`` use them.

* :mod:`scoregrad.examples.finance` — likelihood-ratio, pathwise and mixed Greeks under
  Black–Scholes: vanilla call, digital and Asian options, with closed forms to check against.
* :mod:`scoregrad.examples.rl` — REINFORCE with optax on a multi-armed bandit with an exact
  policy gradient, and on gymnax's CartPole (optional extra ``scoregrad[rl]``).
* :mod:`scoregrad.examples.rl_programs` — CartPole (extra ``scoregrad[rl]``) with an MLP policy as a
  sequential program: reward-to-go with per-step baselines against trajectory REINFORCE.
* :mod:`scoregrad.examples.finance_programs` — a discretely monitored up-and-out barrier call:
  per-date credit of the drift Greek, exact by enumeration of the binomial walk.
* :mod:`scoregrad.examples.vi` — black-box variational inference: conjugate Bayesian linear
  regression (closed-form ELBO, gradient and optimum) and Bayesian logistic regression on
  scikit-learn's bundled data sets (extra ``scoregrad[examples]``).
* :mod:`scoregrad.examples.vae` — a discrete (Bernoulli-latent) VAE on binarized 8×8 digits,
  trained with the score function and the rest of the estimator menu.

Import the submodule you need (``from scoregrad.examples import finance``); they are not imported
here, so that ``import scoregrad`` never needs the optional dependencies.
"""

__all__ = ["finance", "finance_programs", "rl", "rl_programs", "vae", "vi"]
