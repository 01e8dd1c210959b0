"""Code lines of the package's core (issue 14: "contract, engine, preparation, results").

A code line is a line that is not blank, not a comment and not part of a docstring. Usage::

    python benchmarks/core_size.py
"""

from __future__ import annotations

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parent.parent / "scoregrad" / "_src"
GROUPS = {
    "contract": ("base.py", "binding.py"),
    "engine": ("engine.py", "stats.py", "fitted.py", "surrogate.py"),
    "preparation": ("problem.py", "policy.py"),
    "results": ("results.py",),
    "entry points": ("api.py",),
}


def code_lines(path: pathlib.Path) -> int:
    src = path.read_text()
    docstrings: set = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return sum(1 for i, line in enumerate(src.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docstrings)


def main() -> None:
    total = 0
    for group, files in GROUPS.items():
        n = {f: code_lines(SRC / f) for f in files}
        total += sum(n.values())
        print(f"{group:13s} {sum(n.values()):5d}  " + ", ".join(f"{f} {c}" for f, c in n.items()))
        if group == "results":
            print(f"{'core':13s} {total:5d}  (contract + engine + preparation + results)")
    print(f"{'with api':13s} {total:5d}")


if __name__ == "__main__":
    main()
