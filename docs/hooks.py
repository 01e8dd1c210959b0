"""mkdocs hooks: the API page from ``scoregrad.__all__``, the jupytext notebooks as pages, and
math rendered to MathML at build time.

The pages are generated at build time, so the reference can never miss a public name and the
rendered notebooks never drift from ``notebooks/*.py``. Math (``$...$`` and ``$$...$$``, parsed
by ``pymdownx.arithmatex`` in generic mode) is converted to MathML with ``latex2mathml`` in
:func:`on_page_content`, which every current browser renders natively: the built site loads no
script from a CDN and works offline. Without ``latex2mathml`` installed the TeX source is left
as it is (readable, unrendered) and the build warns once.
"""

from __future__ import annotations

import html
import logging
import pathlib
import re
import types

import jupytext
from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"

_API_INTRO = """# API reference

Every public name of `scoregrad` (its `__all__`), rendered from the docstrings. Submodules
(`scoregrad.baselines`, `scoregrad.families`, ...) list their own public names. The applications
live in [`scoregrad.examples`](#scoregrad.examples).
"""


def api_markdown() -> str:
    """The API page: one mkdocstrings block per public name, modules after the rest."""
    import scoregrad

    names = sorted(n for n in scoregrad.__all__ if n != "__version__")
    modules = [n for n in names if isinstance(getattr(scoregrad, n), types.ModuleType)]
    others = [n for n in names if n not in modules]
    parts = [_API_INTRO, "## Functions and types\n"]
    parts += [f"::: scoregrad.{n}\n    options:\n      heading_level: 3\n" for n in others]
    parts.append("## Submodules\n")
    parts += [f"::: scoregrad.{n}\n    options:\n      heading_level: 3\n" for n in modules]
    parts.append("## Applications\n")
    parts.append("::: scoregrad.examples\n    options:\n      heading_level: 3\n")
    for sub in ("finance", "rl", "vi", "vae"):
        parts.append(f"::: scoregrad.examples.{sub}\n    options:\n      heading_level: 3\n")
    return "\n".join(parts)


def notebook_markdown(path: pathlib.Path) -> str:
    """A jupytext percent notebook as markdown: markdown cells as they are, code fenced."""
    nb = jupytext.read(path)
    out = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            out.append(cell.source)
        elif cell.source.strip():
            out.append(f"```python\n{cell.source}\n```")
    src = f"notebooks/{path.name}"
    out.append(f"*Source: `{src}` (jupytext). Run it with `python {src}`, or open it in "
               "Jupyter with jupytext installed; `SCOREGRAD_SMOKE=1` shrinks it.*")
    return "\n\n".join(out) + "\n"


def on_files(files, config):
    files.append(File.generated(config, "api.md", content=api_markdown()))
    for path in sorted(NOTEBOOK_DIR.glob("*.py")):
        files.append(File.generated(config, f"notebooks/{path.stem}.md",
                                    content=notebook_markdown(path)))
    return files


_MATH = re.compile(r'<(span|div) class="arithmatex">\\?(\\\(|\\\[)(.*?)(\\\)|\\\])</\1>',
                   re.DOTALL)
_log = logging.getLogger("mkdocs.plugins.scoregrad")
_warned: list[bool] = []


def render_math(page_html: str) -> str:
    """Replaces arithmatex's generic ``\\(...\\)`` / ``\\[...\\]`` spans by MathML."""
    try:
        from latex2mathml.converter import convert
    except ImportError:
        if not _warned:
            _log.warning("latex2mathml is not installed: math is left as TeX source "
                         "(pip install latex2mathml).")
            _warned.append(True)
        return page_html

    def one(m: re.Match) -> str:
        tex = html.unescape(m.group(3))
        display = "block" if m.group(2) == "\\[" else "inline"
        try:
            return convert(tex, display=display)
        except Exception:  # noqa: BLE001 - an unsupported macro: keep the source visible
            return m.group(0)

    return _MATH.sub(one, page_html)


def on_page_content(html_text, page, config, files):
    return render_math(html_text)
