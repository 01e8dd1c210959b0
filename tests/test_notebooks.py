"""Every notebook (jupytext percent .py) runs cleanly in smoke mode."""

import os
import pathlib
import subprocess
import sys

import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.py"))


def test_the_expected_notebooks_exist():
    assert {"quickstart.py", "rl_bandit.py", "vi.py", "discrete_vae.py",
            "finance_greeks.py", "programs.py"} <= set(NOTEBOOKS)
    assert not list(NOTEBOOK_DIR.glob("*.ipynb"))
    for name in NOTEBOOKS:
        text = (NOTEBOOK_DIR / name).read_text()
        assert "# %%" in text and "SCOREGRAD_SMOKE" in text, name


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, tmp_path):
    env = {**os.environ, "SCOREGRAD_SMOKE": "1", "MPLBACKEND": "Agg",
           "MPLCONFIGDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(NOTEBOOK_DIR / name)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # run as a script, a notebook keeps its figures: each is saved as figures/NAME_i.png
    saved = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert saved and all(p.startswith(name[:-3]) for p in saved), (name, saved)


def test_executed_notebooks_match_their_sources_and_ran_cleanly():
    # notebooks/executed/NAME.ipynb is NAME.py run in full (jupytext --to ipynb, then
    # jupyter nbconvert --execute). Its code must be the source's code, and it must hold outputs
    # and no errors, so a stale or failed execution is caught.
    import json

    import jupytext

    for name in NOTEBOOKS:
        executed = NOTEBOOK_DIR / "executed" / name.replace(".py", ".ipynb")
        assert executed.exists(), f"{executed} missing: execute {name} (see notebooks/README.md)"
        nb = json.loads(executed.read_text())
        ran = [c for c in nb["cells"] if c["cell_type"] == "code"]
        src = [c for c in jupytext.read(NOTEBOOK_DIR / name).cells if c.cell_type == "code"]
        assert ["".join(c["source"]).strip() for c in ran] == [c.source.strip() for c in src], name
        assert all(c.get("execution_count") for c in ran), f"{name}: not every cell was executed"
        outputs = [o for c in ran for o in c.get("outputs", [])]
        assert outputs and not [o for o in outputs if o.get("output_type") == "error"], name


def test_docs_pages_show_the_executed_outputs_and_figures():
    # docs/hooks.py renders each notebook page from NAME.py with the outputs of the executed copy
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks",
                                                  NOTEBOOK_DIR.parent / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    for name in NOTEBOOKS:
        page = hooks.notebook_markdown(NOTEBOOK_DIR / name)
        assert "```text" in page and 'src="data:image/png;base64,' in page, name
        assert "jupytext --to notebook" in page, name
