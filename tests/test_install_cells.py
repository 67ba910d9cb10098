"""The notebooks' install cells: by package name from PyPI, with one clearly marked variable
(COLABSWARM_SOURCE) to install a version, a git URL or a wheel instead; the requirement each
choice hands to pip is a valid one for the right extras. (tests/test_wheel.py installs a built
wheel through the worker notebook's requirement for real.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from install_cell import NOTEBOOKS, install_cell, install_requirement  # noqa: E402

pytest.importorskip("nbformat")
pytest.importorskip("IPython")
from packaging.requirements import Requirement  # noqa: E402

EXTRAS = {"worker.ipynb": {"worker", "tunnel", "notebook"}, "controller.ipynb": {"notebook"}}


@pytest.mark.parametrize("notebook", list(EXTRAS))
def test_install_cell_installs_by_package_name(notebook: str) -> None:
    req = Requirement(install_requirement(notebook))
    assert (req.name, req.extras, req.url, str(req.specifier)) == \
        ("colabswarm", EXTRAS[notebook], None, "")
    pinned = Requirement(install_requirement(notebook, "colabswarm==0.1.0"))
    assert str(pinned.specifier) == "==0.1.0" and pinned.extras == EXTRAS[notebook]


@pytest.mark.parametrize("notebook", list(EXTRAS))
def test_install_cell_takes_a_git_url_or_a_wheel(notebook: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    git = "git+https://github.com/someone/colabswarm@main"
    req = Requirement(install_requirement(notebook, git))
    assert (req.name, req.extras, req.url) == ("colabswarm", EXTRAS[notebook], git)
    monkeypatch.chdir(tmp_path)
    wheel = "colabswarm-0.1.0-py3-none-any.whl"  # a file here, whose name starts like the name
    req = Requirement(install_requirement(notebook, wheel))
    assert req.url == (tmp_path / wheel).as_uri() and req.extras == EXTRAS[notebook]
    url = "https://example.org/dist/colabswarm-0.1.0-py3-none-any.whl"
    assert Requirement(install_requirement(notebook, url)).url == url


@pytest.mark.parametrize("notebook", list(EXTRAS))
def test_no_placeholder_left_and_the_variable_is_marked(notebook: str) -> None:
    text = (NOTEBOOKS / notebook).read_text()
    assert "OWNER" not in text
    cell = install_cell(notebook)
    assert cell.lstrip().startswith("# ▶ COLABSWARM_SOURCE")


def test_worker_notebook_says_what_colabs_terms_allow_before_any_tunnel() -> None:
    nb = json.loads((NOTEBOOKS / "worker.ipynb").read_text())
    first = "".join(nb["cells"][0]["source"])
    assert nb["cells"][0]["cell_type"] == "markdown"
    assert "research.google.com/colaboratory/faq.html" in first and "2026-11-30" in first
    assert "web service offerings not related to interactive" in first
    assert "without compute units" in first and "not legal advice" in first
    for other in ("Kaggle", "Runpod", "LOCAL_WORKERS", "tunnel=\"none\""):
        assert other in first, other
    starts = [i for i, c in enumerate(nb["cells"]) if "start_worker(" in "".join(c["source"])]
    assert starts and starts[0] > 0  # the tunnel opens in a later cell
