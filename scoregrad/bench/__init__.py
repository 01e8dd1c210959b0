"""``scoregrad bench``: problems with exact answers × registered estimators, measured.

Modules: :mod:`~scoregrad.bench.problems` (the problem registry),
:mod:`~scoregrad.bench.registry` (the estimator registry: add one entry per estimator),
:mod:`~scoregrad.bench.runner` (measuring cells), :mod:`~scoregrad.bench.stats` (bias test,
standard-error honesty, ranks with ties), :mod:`~scoregrad.bench.report` (the recommendation,
tables, report.md and report.html) and
:mod:`~scoregrad.bench.plots` (the PNG plots), :mod:`~scoregrad.bench.cli` (the command line).
"""
