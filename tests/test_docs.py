"""The documentation builds with warnings as errors and documents every public name."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

import scoregrad

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _public_modules():
    return [n for n in scoregrad.__all__ if isinstance(getattr(scoregrad, n), types.ModuleType)]


def test_api_page_source_names_every_public_name():
    """Fast check of the generator (the built site is checked by the slow test below)."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = hooks.api_markdown()
    for name in scoregrad.__all__:
        if name != "__version__":
            assert f"::: scoregrad.{name}\n" in page, name
    nb = hooks.notebook_markdown(ROOT / "notebooks" / "quickstart.py")
    assert "```python" in nb and "# Quickstart" in nb


def _build(out):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-5000:]}"


@pytest.mark.slow
def test_docs_build_strict_with_every_public_name_and_notebook(tmp_path):
    """One build (about a minute), then what it must contain."""
    site = tmp_path / "site"
    _build(site)
    _check_api(site)
    _check_pages(site)


def _check_api(site):
    html = (site / "api" / "index.html").read_text()
    ids = set(re.findall(r'id="([^"]+)"', html))
    missing = [n for n in scoregrad.__all__ if n != "__version__" and f"scoregrad.{n}" not in ids]
    assert not missing, f"public names without an API entry: {missing}"
    for sub in _public_modules():
        mod = getattr(scoregrad, sub)
        lost = [n for n in getattr(mod, "__all__", []) if f"scoregrad.{sub}.{n}" not in ids]
        assert not lost, f"scoregrad.{sub}: {lost}"
    for sub in ("finance", "rl", "vi", "vae"):
        assert f"scoregrad.examples.{sub}" in ids


def _check_pages(site):
    for page in ("getting-started", "estimators"):
        assert (site / page / "index.html").exists()
    for nb in sorted((ROOT / "notebooks").glob("*.py")):
        html = (site / "notebooks" / nb.stem / "index.html").read_text()
        assert "SCOREGRAD_SMOKE" in html, nb.name
    guide = (site / "estimators" / "index.html").read_text()
    for name in ("score_function", "pathwise", "measure_valued", "disarm", "relax",
                 "gumbel_softmax", "enumerate"):
        assert name in guide
