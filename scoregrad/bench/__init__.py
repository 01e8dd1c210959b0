"""``scoregrad bench``: problems with exact answers × registered estimators, measured.

Modules: :mod:`~scoregrad.bench.problems` (the problem registry),
:mod:`~scoregrad.bench.registry` (the estimator registry: add one entry per estimator),
:mod:`~scoregrad.bench.runner` (measuring cells), :mod:`~scoregrad.bench.report` and
:mod:`~scoregrad.bench.plots` (outputs), :mod:`~scoregrad.bench.cli` (the command line).
"""
