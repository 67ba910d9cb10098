"""Both notebooks run top to bottom in a real kernel, in CI mode (tiny model, no tunnel).

The same runs work with nbmake:
COLABSWARM_MODEL=tiny COLABSWARM_TUNNEL=none COLABSWARM_CI=1 COLABSWARM_LOCAL_WORKERS=2 \
    COLABSWARM_OUTPUT_DIR=/tmp/outputs pytest --nbmake notebooks
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _run(name: str, tmp_path: Path, **env: str) -> Any:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    kernel_env = {
        **os.environ,
        "COLABSWARM_MODEL": "tiny",
        "COLABSWARM_TUNNEL": "none",
        "COLABSWARM_CI": "1",
        "COLABSWARM_OUTPUT_DIR": str(tmp_path / "outputs"),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=kernel_env)
    return nb


def _texts(nb: Any) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o["text"])
            elif o.get("output_type") == "error":
                out.append("\n".join(o.get("traceback", [])))
    return "\n".join(out)


def _stderr(nb: Any) -> list[str]:
    """What the notebook printed to stderr: a pink box in Jupyter, as if a cell had failed."""
    return [o["text"] for c in nb.cells for o in c.get("outputs", [])
            if o.get("output_type") == "stream" and o.get("name") == "stderr"]


def _widget_outputs(nb: Any) -> int:
    return sum(1 for c in nb.cells for o in c.get("outputs", [])
               if WIDGET_MIME in o.get("data", {}))


def _is_colab_ready(nb: Any, name: str) -> None:
    assert "OWNER" not in json.dumps(nb), f"{name} still has a placeholder"
    install = next(c.source for c in nb.cells if "%pip install" in c.source)
    # by package name, with one marked variable for a git URL or a wheel (test_install_cells)
    assert "import colabswarm" in install and 'COLABSWARM_SOURCE = "colabswarm"' in install
    for cell in nb.cells:  # saved clean: no stale outputs in the repository
        assert not cell.get("outputs"), f"{name} was saved with outputs"


def test_worker_notebook_runs_and_prints_a_share_string(tmp_path: Path) -> None:
    nb = _run("worker.ipynb", tmp_path)
    text = _texts(nb)
    assert "is already installed" in text  # the install cell skipped pip
    share_lines = [ln for ln in text.splitlines() if "#token=" in ln]
    assert share_lines and share_lines[0].startswith("http://127.0.0.1:"), text
    assert ": ready on cpu" in text and "['tiny']" in text, text
    assert "worker stopped: True" in text, text
    assert _stderr(nb) == [], "library warnings are quieted (nothing above the share string)"
    assert _widget_outputs(nb) >= 1, "the worker panel was not displayed"
    _is_colab_ready(nbformat.read(NOTEBOOKS / "worker.ipynb", as_version=4), "worker.ipynb")


def test_controller_notebook_generates_and_upscales_with_local_workers(tmp_path: Path) -> None:
    nb = _run("controller.ipynb", tmp_path, COLABSWARM_LOCAL_WORKERS="2")
    text = _texts(nb)
    assert "gallery: 4 images; 0 current generations" in text, text
    saved = sorted((tmp_path / "outputs").glob("*.png"))
    assert len(saved) >= 4, saved
    assert "upscaled to 128x128 from" in text, text
    assert text.rstrip().endswith("stopped"), text
    assert _stderr(nb) == [], "the swarm's log goes to the Logs panel, not to a cell's stderr"
    assert _widget_outputs(nb) >= 4, "the four panels were not displayed"
    _is_colab_ready(nbformat.read(NOTEBOOKS / "controller.ipynb", as_version=4),
                    "controller.ipynb")


def test_notebooks_are_valid_nbformat() -> None:
    for path in NOTEBOOKS.glob("*.ipynb"):
        nbformat.validate(nbformat.read(path, as_version=4))
        json.loads(path.read_text())
