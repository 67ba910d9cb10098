"""Packaging for real users: the sdist and wheel that `python -m build` makes hold everything,
`twine check` passes, and the wheel installed into a clean virtual environment runs
`python -m colabswarm demo` from outside the repository.

Nothing is downloaded: the build runs without isolation (an isolated build would fetch
setuptools), the wheel is installed with --no-deps --no-index, and the clean environment sees
the dependencies (torch, diffusers, ...) of the test environment through a .pth file that
names that environment's site-packages. Python processes .pth files only in site directories,
not in folders a .pth line adds, so the test environment's own editable install of colabswarm
(a .pth that imports a finder) stays invisible: colabswarm can only come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from install_cell import install_requirement  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("build", reason="the `build` package (test extra) is needed to build")
pytest.importorskip("twine", reason="the `twine` package (test extra) is needed to check")


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
        f"{result.stderr[-4000:]}")
    return result


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               **extra)
    return env


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sdist and wheel built from a copy of the tracked files (the build writes egg-info and
    build/ next to its sources, which must not land in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
         cwd=src, env=_clean_env())
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0], "src": src}


def test_wheel_and_sdist_hold_everything(dists: dict[str, Path]) -> None:
    import colabswarm

    wheel_names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "colabswarm").rglob("*.py")}
    assert package <= wheel_names, sorted(package - wheel_names)
    # the tiny model's code, the widgets the notebooks show, the tunnel code, the CLI entry
    for needed in ("colabswarm/backend/tiny.py", "colabswarm/widgets/worker.py",
                   "colabswarm/tunnel/cloudflare.py", "colabswarm/__main__.py"):
        assert needed in wheel_names
    dist_info = next(n for n in wheel_names if n.endswith(".dist-info/METADATA"))
    meta = zipfile.ZipFile(dists["wheel"]).read(dist_info).decode()
    assert f"Version: {colabswarm.__version__}" in meta  # one version, read from the package
    assert "Provides-Extra: worker" in meta and "Provides-Extra: tunnel" in meta
    entry = next(n for n in wheel_names if n.endswith(".dist-info/entry_points.txt"))
    assert "colabswarm = colabswarm.cli:main" in zipfile.ZipFile(dists["wheel"]).read(
        entry).decode()
    assert not any(n.startswith(("tests/", "notebooks/", "bench/")) for n in wheel_names)

    sdist_names = {n.split("/", 1)[1] for n in tarfile.open(dists["sdist"]).getnames()
                   if "/" in n}
    for needed in ("pyproject.toml", "README.md", "colabswarm/backend/tiny.py",
                   "notebooks/worker.ipynb", "notebooks/controller.ipynb",
                   "tests/fakes/cloudflared", "tests/fakes/ngrok", "docs/ARCHITECTURE.md",
                   "scripts/setup.sh"):
        assert needed in sdist_names, needed


def test_twine_check_passes(dists: dict[str, Path]) -> None:
    result = _run([sys.executable, "-m", "twine", "check", "--strict",
                   str(dists["wheel"]), str(dists["sdist"])], cwd=dists["src"], env=_clean_env())
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_wheel_in_a_clean_venv_runs_the_demo(dists: dict[str, Path], tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    # the requirement the worker notebook's install cell makes for a wheel (COLABSWARM_SOURCE),
    # installed by the test environment's pip into the new one (--python); no index, no deps
    requirement = install_requirement("worker.ipynb", str(dists["wheel"]))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-index", requirement], cwd=tmp_path, env=_clean_env())
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                         "['purelib'])"], cwd=tmp_path, env=_clean_env()).stdout.strip())
    (purelib / "_colabswarm_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    run_dir = tmp_path / "elsewhere"  # no colabswarm folder here to import by accident
    run_dir.mkdir()
    where = _run([str(python), "-c", "import colabswarm, sys; print(colabswarm.__file__); "
                  "print(colabswarm.__version__)"], cwd=run_dir, env=_clean_env()).stdout.split()
    assert Path(where[0]).resolve().is_relative_to(venv.resolve()), where
    assert not Path(where[0]).resolve().is_relative_to(ROOT / "colabswarm"), where

    out = tmp_path / "outputs"
    result = _run([str(python), "-m", "colabswarm", "demo", "--workers", "2", "--images", "2",
                   "--out", str(out)], cwd=run_dir, env=_clean_env(OMP_NUM_THREADS="1"),
                  timeout=240)
    assert "Got 2 images" in result.stdout, result.stdout
    assert "upscaled to 512x512" in result.stdout, result.stdout
    assert len(list(out.glob("*.png"))) >= 3, list(out.iterdir())
    script = venv / "bin" / "colabswarm"  # the console script the wheel declares
    assert script.exists()
    assert "usage" in _run([str(script), "--help"], cwd=run_dir, env=_clean_env()).stdout
