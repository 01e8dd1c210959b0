"""Griffe extension for the API page (mkdocstrings): docstrings as Python shows them, in Markdown.

* Some docstrings are completed at import time: a line ``{common}`` or ``{args}`` is replaced by
  a paragraph several functions share (``scoregrad/_src/estimators/arm.py``,
  ``rebar_relax.py``, ``categorical_rebar.py``, ``lm_rl/presets.py``). Griffe reads docstrings
  from the source, placeholder included; for those objects the runtime ``__doc__`` (what
  ``help()`` shows) is used instead.
* The docstrings use reStructuredText roles (``:math:`...```, ``:func:`...```, ``.. math::``
  blocks), which Markdown does not know: math becomes arithmatex's ``$...$`` / ``$$...$$``
  (rendered to MathML by ``docs/hooks.py``) and cross-reference roles become code spans.

Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any

import griffe

_log = logging.getLogger("mkdocs.plugins.scoregrad")

# a docstring line that is only a template placeholder, e.g. "    {common}"
_PLACEHOLDER = re.compile(r"^[ \t]*\{[a-z_]+\}[ \t]*$", re.MULTILINE)
_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_XREF = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):`!?(~?)([^`]+)`")


def _xref(m: re.Match) -> str:
    target = m.group(2)
    if m.group(1):  # ~a.b.c shows c
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _math_blocks(text: str) -> str:
    """``.. math::`` directives (the indented block below them) as ``$$ ... $$``."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^([ \t]*)\.\. math::[ \t]*(.*)$", line)
        if not m:
            out.append(line)
            i += 1
            continue
        indent, first = m.group(1), m.group(2).strip()
        body = [first] if first else []
        i += 1
        while i < len(lines) and (not lines[i].strip()
                                  or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        tail = []  # blank lines eaten above that separate the block from what follows
        if i < len(lines):
            tail = [""]
        dedented = inspect.cleandoc("\n".join(body)).split("\n") if body else []
        out += ["", f"{indent}$$"] + [f"{indent}{b}" if b else "" for b in dedented]
        out += [f"{indent}$$"] + tail
    return "\n".join(out)


def markdown_docstring(text: str) -> str:
    """A docstring's reStructuredText math and cross-reference roles as Markdown."""
    text = _math_blocks(text)
    text = _INLINE_MATH.sub(lambda m: f"${m.group(1).strip()}$", text)
    return _XREF.sub(_xref, text)


def _runtime_doc(obj: griffe.Object) -> str | None:
    try:
        value = griffe.dynamic_import(obj.path)
    except Exception:  # noqa: BLE001 - not importable here: keep the source docstring
        return None
    doc = getattr(value, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else None


class RuntimeMarkdownDocstrings(griffe.Extension):
    """Runtime docstrings where the source has a template placeholder; RST roles as Markdown."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None:
            return
        value = obj.docstring.value
        if _PLACEHOLDER.search(value):
            runtime = _runtime_doc(obj)
            if runtime is None or _PLACEHOLDER.search(runtime):
                _log.warning("%s: the docstring template placeholder is not filled at runtime",
                             obj.path)
            else:
                value = runtime
        new = markdown_docstring(value)
        if new != obj.docstring.value:
            obj.docstring.value = new
            obj.docstring.__dict__.pop("parsed", None)  # parsed lazily: drop a stale parse
