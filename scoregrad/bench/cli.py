"""The ``scoregrad`` command line: ``scoregrad bench [options]``.

Examples:
  >>> from scoregrad.bench.cli import main
  >>> main(["bench", "--samples", "0"])
  2
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

import scoregrad
from scoregrad.bench import problems as _problems
from scoregrad.bench import registry as _registry
from scoregrad.bench import report as _report
from scoregrad.bench import runner as _runner

PROG = "scoregrad"


class _UsageError(Exception):
    """A bad argument: reported as ``scoregrad bench: error: ...`` with exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="scoregrad: Monte Carlo gradient estimation in JAX.")
    parser.add_argument("--version", action="version", version=f"scoregrad {scoregrad.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    b = sub.add_parser(
        "bench", help="benchmark gradient estimators on problems with exact answers",
        description="Measure bias, variance, standard-error honesty, time per estimate and "
                    "work-normalized variance of every applicable estimator on problems with "
                    "exact gradients, and recommend one per problem and budget. Writes "
                    "results.json, PNG plots, report.md and report.html to --out.")
    b.add_argument("--suite", choices=sorted(_runner.SUITES), default=None,
                   help="problem set, sample budgets and replicates (default: default, about "
                        "3 minutes on 2 cores; extended: 2.5 times that; full: every problem)")
    b.add_argument("--full", action="store_true",
                   help="the complete grid: every problem, N = 10 ... 10^4, R = 200 "
                        "(same as --suite full)")
    b.add_argument("--problems", nargs="+", metavar="NAME",
                   help="problem names, or globs with * and ? (default: the suite's); see --list")
    b.add_argument("--estimators", nargs="+", metavar="NAME",
                   help="estimator names as --list prints them (exact), or globs with * and ? "
                        "(default: all registered)")
    b.add_argument("--samples", nargs="+", type=_positive_int, metavar="N",
                   help="sample budgets (evaluations of f per estimate; default: the suite's)")
    b.add_argument("--replicates", type=_positive_int, metavar="R",
                   help="independent replicate estimates per cell, >= 2 (default: the suite's)")
    b.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-out"), metavar="DIR",
                   help="output folder (default: %(default)s)")
    b.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="device to run on (default: %(default)s)")
    b.add_argument("--x64", action="store_true", help="run in float64 (default float32)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--list", action="store_true",
                   help="list problems and estimators with their capabilities, then exit")
    return parser


def _require_extras():
    try:
        import matplotlib  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as err:
        raise _UsageError(
            f"`scoregrad bench` needs tqdm and matplotlib ({err}); "
            "install them with: pip install 'scoregrad[bench]'") from None


def _device(kind: str):
    try:
        devices = jax.devices(kind)
    except RuntimeError:
        devices = []
    if not devices:
        fix = " (install a GPU build of jax, e.g. pip install 'jax[cuda12]')" if kind == "gpu" else ""
        raise _UsageError(f"--device {kind}: no {kind.upper()} visible to JAX{fix}.")
    return devices[0]


def _suite_name(args) -> str:
    if args.full and args.suite not in (None, "full"):
        raise _UsageError(f"--full is --suite full; it contradicts --suite {args.suite}.")
    return "full" if args.full else (args.suite or "default")


def _settings(args) -> dict:
    name = _suite_name(args)
    suite = _runner.SUITES[name]
    names = _problems.problem_names()
    try:
        probs = _problems.select(list(args.problems or suite.problems), names, "problem")
        ests = _problems.select(list(args.estimators or ["*"]),
                                _registry.estimator_names(), "estimator")
    except ValueError as err:
        raise _UsageError(f"{err}. Run `scoregrad bench --list`.") from None
    replicates = args.replicates or suite.replicates
    if replicates < 2:
        raise _UsageError(f"--replicates must be >= 2 (variance needs two); got {replicates}.")
    return {
        "suite": name, "problems": probs, "estimators": ests,
        "samples": sorted(set(args.samples or suite.samples)), "replicates": replicates,
        "device": args.device, "dtype": "float64" if args.x64 else "float32",
        "root_seed": _runner.ROOT_SEED, "out": str(args.out),
    }


def _plural(count: int, noun: str) -> str:
    """``1 problem pattern``, ``3 problem patterns``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _check_out(out: pathlib.Path) -> None:
    """Creates ``out`` and checks that a file can be written there, before anything runs."""
    if out.exists() and not out.is_dir():
        raise _UsageError(f"--out {out}: exists and is not a folder; choose another with --out.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _UsageError(f"--out {out}: cannot create the output folder ({err}); "
                          "choose another folder with --out DIR.") from None
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise _UsageError(f"--out {out}: the folder is not writable ({err.strerror or err}); "
                          "fix its permissions or choose another folder with --out DIR. "
                          "Nothing was run.") from None


def _list() -> str:
    lines = ["problems:"]
    for name in _problems.problem_names():
        p = _problems.get_problem(name)
        lines.append(f"  {name:20s} {p.description}  [{', '.join(sorted(p.capabilities))}]")
    lines.append("estimators:")
    for e in _registry.ESTIMATORS:
        req = f"  requires {sorted(e.requires)}" if e.requires else ""
        lines.append(f"  {e.name:20s} {e.description}{req}")
    lines.append("suites: " + ", ".join(
        f"{k} ({_plural(len(s.problems), 'problem pattern')}, N={list(s.samples)}, "
        f"R={s.replicates})"
        for k, s in _runner.SUITES.items()))
    return "\n".join(lines)


def _payload(settings, cells, skipped) -> dict:
    probs = {}
    for name in settings["problems"]:
        p = _problems.get_problem(name)
        probs[name] = {"description": p.description, "group": p.group,
                       "capabilities": sorted(p.capabilities), "exact_value": p.exact_value,
                       "num_params": int(_problems.flat(p.exact_grad).size)}
    ests = {n: _registry.get_estimator(n).description for n in settings["estimators"]}
    counts = {s: sum(c["status"] == s for c in cells) for s in ("ok", "skipped", "error")}
    return {"schema_version": _report.SCHEMA_VERSION, "meta": _report.metadata(),
            "settings": settings, "problems": probs, "estimators": ests, "cells": cells,
            "not_applicable": skipped, "summary": counts}


def _bench(args) -> int:
    _require_extras()
    from tqdm.auto import tqdm

    from scoregrad.bench import plots

    settings = _settings(args)
    device = _device(args.device)
    out = pathlib.Path(args.out)
    _check_out(out)
    planned, skipped = _runner.plan(settings["problems"], settings["estimators"],
                                    settings["samples"])
    if not planned:
        raise _UsageError("no (problem, estimator) pair applies; widen --problems/--estimators.")
    x64 = jax.enable_x64(True) if args.x64 else contextlib.nullcontext()
    wall, cpu = time.perf_counter(), time.process_time()
    with x64, jax.default_device(device):
        dtype = jnp.float64 if args.x64 else jnp.float32
        progress = lambda it, **kw: tqdm(it, disable=args.quiet, file=sys.stderr, **kw)  # noqa: E731
        cells = _runner.run_suite(planned, settings["replicates"], dtype, progress)
    payload = _payload(settings, cells, skipped)
    payload["summary"].update(wall_seconds=round(time.perf_counter() - wall, 1),
                              cpu_seconds=round(time.process_time() - cpu, 1),
                              compile_threads=_runner.PHASES.get("threads"),
                              compile_phase_seconds=round(_runner.PHASES.get("compile", 0), 1),
                              measure_phase_seconds=round(_runner.PHASES.get("measure", 0), 1),
                              **_runner.compile_summary(cells))
    _report.write_json(out, payload)
    names = plots.write_plots(cells, out)
    _report.write_report(out, payload, names)
    print(_report.text_table(cells))
    print(f"{_plural(len(cells), 'cell')} in {payload['summary']['wall_seconds']} s "
          f"({payload['summary']['cpu_seconds']} s CPU); wrote {out / 'results.json'}, "
          f"{out / 'report.md'}, {out / 'report.html'} and {_plural(len(names), 'plot')}")
    errors = payload["summary"]["error"]
    if errors:
        print(f"{PROG} bench: {_plural(errors, 'cell')} failed; see 'note' above.",
              file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scoregrad`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed usage and the error (or --help)
        return int(exc.code or 0)
    if args.list:
        print(_list())
        return 0
    try:
        return _bench(args)
    except _UsageError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
