"""Run a notebook's install cell the way IPython would, without installing anything: the cell
is turned into Python by IPython's own transformer, `colabswarm` is made unimportable, and the
`%pip` line magic is recorded (with IPython's own {variable} expansion) instead of run.

    requirement = install_requirement("worker.ipynb", "git+https://github.com/me/colabswarm")
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import Any

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
DEFAULT_SOURCE = 'COLABSWARM_SOURCE = "colabswarm"'


def install_cell(notebook: str) -> str:
    import nbformat

    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    return next(c.source for c in nb.cells if "%pip install" in c.source)


def install_requirement(notebook: str, source: str | None = None) -> str:
    """The requirement the install cell hands to pip when colabswarm is not installed, with
    COLABSWARM_SOURCE set to source (None: the notebook's own value)."""
    from IPython.core.inputtransformer2 import TransformerManager
    from IPython.utils.text import DollarFormatter

    cell = install_cell(notebook)
    assert cell.count(DEFAULT_SOURCE) == 1, "one clearly marked variable"
    if source is not None:
        cell = cell.replace(DEFAULT_SOURCE, f"COLABSWARM_SOURCE = {source!r}")
    code = TransformerManager().transform_cell(cell)
    calls: list[str] = []
    namespace: dict[str, Any] = {}

    class Shell:
        def run_line_magic(self, name: str, line: str) -> None:
            assert name == "pip"
            calls.append(DollarFormatter().vformat(line, args=[], kwargs=namespace))
            sys.modules.pop("colabswarm", None)  # "installed": importable again

    namespace["get_ipython"] = lambda: Shell()
    saved = {k: v for k, v in sys.modules.items() if k == "colabswarm" or
             k.startswith("colabswarm.")}
    for name in saved:
        del sys.modules[name]
    sys.modules["colabswarm"] = None  # type: ignore[assignment]  # import fails: not installed
    try:
        with contextlib.redirect_stdout(None):
            exec(compile(code, f"<{notebook} install cell>", "exec"), namespace)
    finally:
        sys.modules.pop("colabswarm", None)
        sys.modules.update(saved)
    assert len(calls) == 1, calls
    args = shlex.split(calls[0])
    assert args[:2] == ["install", "-q"] and len(args) == 3, args
    return args[2]
