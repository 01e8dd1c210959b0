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
            "finance_greeks.py"} <= set(NOTEBOOKS)
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
