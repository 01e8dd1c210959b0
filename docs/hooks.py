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


def _executed_outputs(path: pathlib.Path) -> list[list[str]] | None:
    """The outputs of ``notebooks/executed/NAME.ipynb`` per code cell, as markdown/HTML pieces.

    ``None`` when there is no executed copy or its code differs from ``path`` (then the page
    shows the code alone rather than outputs of other code).
    """
    import json

    executed = path.parent / "executed" / f"{path.stem}.ipynb"
    if not executed.exists():
        return None
    nb = json.loads(executed.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    src = [c for c in jupytext.read(path).cells if c.cell_type == "code"]
    if ["".join(c["source"]).strip() for c in cells] != [c.source.strip() for c in src]:
        return None
    out = []
    for cell in cells:
        pieces = []
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if o.get("output_type") == "stream":
                text = "".join(o["text"]) if isinstance(o["text"], list) else o["text"]
                pieces.append(f"```text\n{text.rstrip()}\n```")
            elif "image/png" in data:
                png = "".join(data["image/png"]).replace("\n", "")
                pieces.append(f'<img alt="figure" src="data:image/png;base64,{png}">')
            elif "text/plain" in data and o.get("output_type") == "execute_result":
                text = "".join(data["text/plain"])
                if not text.startswith("<Figure"):
                    pieces.append(f"```text\n{text.rstrip()}\n```")
        out.append(pieces)
    return out


def notebook_markdown(path: pathlib.Path) -> str:
    """A jupytext percent notebook as markdown: markdown cells as they are, code fenced, and each
    code cell followed by its outputs and figures from the executed copy (if it is current)."""
    nb = jupytext.read(path)
    outputs = _executed_outputs(path)
    out, i = [], 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            out.append(cell.source)
        elif cell.cell_type == "code":
            if cell.source.strip():
                out.append(f"```python\n{cell.source}\n```")
            if outputs is not None:
                out.extend(outputs[i])
            i += 1
    src = f"notebooks/{path.name}"
    shown = ("Outputs and figures are those of `notebooks/executed/"
             f"{path.stem}.ipynb`." if outputs is not None else "")
    out.append(f"*Source: `{src}` (jupytext). {shown} To open it as a notebook: "
               f"`jupytext --to notebook {src}`, or open the executed `.ipynb` in Jupyter, "
               f"VS Code or on GitHub. Run it as a script with `python {src}` (figures are "
               "saved to `./figures/*.png`, see `notebooks/README.md`); "
               "`SCOREGRAD_SMOKE=1` shrinks it.*")
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
