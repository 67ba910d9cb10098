"""The controller notebook in a real JupyterLab, seen and clicked in a real (headless) Chromium.

Run All starts two local tiny-model workers and makes a first batch; then the test clicks the
Generate button in the page, waits for new thumbnails in the gallery and saves a screenshot to
docs/screenshots/controller.png. Skipped only where Debian's chromium (or the jupyterlab /
playwright packages) are missing; `playwright install` is never needed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("COLABSWARM_CHROMIUM") or shutil.which("chromium") or \
    shutil.which("chromium-browser") or "/usr/bin/chromium"
SCREENSHOT = ROOT / "docs" / "screenshots" / "controller.png"
TOKEN = "colabswarm-browser-test"

if not Path(CHROMIUM).exists():
    pytest.skip(f"chromium not found at {CHROMIUM} (scripts/setup.sh installs it with apt)",
                allow_module_level=True)
pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (the 'test' extra)")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (the 'test' extra)")

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(folder: Path) -> None:
    """Render every cell (no virtual scrolling) and never fetch news: the page is offline."""
    settings = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
            {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings":
            {"autoStartDefaultKernel": True},
    }
    for rel, value in settings.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """JupyterLab on a free loopback port, all its files under tmp_path."""
    work = tmp_path / "lab"
    for d in ("root", "config", "data", "runtime", "settings", "workspaces", "ipython", "tmp"):
        (work / d).mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / "controller.ipynb", work / "root" / "controller.ipynb")
    _write_settings(work / "settings")
    port = _free_port()
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(work / "config"), "JUPYTER_DATA_DIR": str(work / "data"),
        "JUPYTER_RUNTIME_DIR": str(work / "runtime"), "IPYTHONDIR": str(work / "ipython"),
        "TMPDIR": str(work / "tmp"), "JUPYTER_PLATFORM_DIRS": "1",
        "COLABSWARM_LOCAL_WORKERS": "2", "COLABSWARM_MODEL": "tiny",
        "COLABSWARM_OUTPUT_DIR": str(work / "outputs"), "OMP_NUM_THREADS": "1",
    }
    env.pop("COLABSWARM_CI", None)  # keep the workers up after Run All: we click Generate
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
        f"--port={port}", "--ip=127.0.0.1", f"--ServerApp.token={TOKEN}",
        f"--ServerApp.root_dir={work / 'root'}", "--ServerApp.port_retries=0",
        f"--LabApp.user_settings_dir={work / 'settings'}",
        f"--LabApp.workspaces_dir={work / 'workspaces'}",
        "--LabApp.news_url=", "--ServerApp.disable_check_xsrf=True",
    ]
    log = (work / "lab.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=work / "root")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("JupyterLab did not start:\n"
                                         + (work / "lab.log").read_text()[-3000:]) from None
                time.sleep(0.25)
        yield url, work
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_controller_notebook_in_chromium_generates_into_the_gallery(lab, tmp_path: Path):
    url, work = lab
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1200, "height": 1800},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{url}/lab/tree/controller.ipynb?token={TOKEN}")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for()
            dialog = page.locator(".jp-Dialog button", has_text="Select")
            try:  # older/newer Labs may still ask which kernel: the notebook's own one
                dialog.wait_for(timeout=3000)
                dialog.click()
            except sync_api.TimeoutError:
                pass
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle'],"
                         " .jp-Toolbar-kernelStatus[data-status='idle']").first.wait_for()
            # Run > Run All Cells, as a person would
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            gallery = page.locator(".colabswarm-gallery")
            thumbs = gallery.locator("img")
            gallery.wait_for(timeout=90_000)
            _wait_count(page, thumbs, 4, 90)  # the batch the notebook's demo cell makes
            assert "gallery: 4 images" in _text_when(page, ".jp-Notebook", "gallery: 4 images",
                                                     60), "Run All did not reach the demo cell"
            before = thumbs.count()
            # type a new prompt and clear the seed (random), then press Generate
            form = page.locator(".colabswarm-generate")
            form.locator(".widget-textarea:has(label:text-is('Prompt')) textarea").fill(
                "a red fox in the snow")
            form.locator(".widget-text:has(label:text-is('Seed')) input").fill("")
            form.locator("button", has_text="Generate").click()
            _wait_count(page, thumbs, before + 4, 60)
            assert "0 current generations" in _text_when(
                page, ".colabswarm-generate", "0 current generations", 30)
            # open the newest image large: its parameters carry what was typed in the page
            gallery.locator("button").last.click()
            viewer = _text_when(page, ".colabswarm-generate", "a red fox in the snow", 30)
            assert "a red fox in the snow\nSteps: 4" in viewer, viewer
            page.wait_for_timeout(300)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            form.screenshot(path=str(SCREENSHOT))
            page.locator(".colabswarm-backends").screenshot(
                path=str(SCREENSHOT.with_name("backends.png")))
            upscale = page.locator(".colabswarm-upscale")
            if "tiles on" in upscale.inner_text():  # the demo cell's upscale finished
                upscale.screenshot(path=str(SCREENSHOT.with_name("upscale.png")))
            errors = page.locator(".jp-OutputArea-output[data-mime-type="
                                  "'application/vnd.jupyter.stderr'] >> text=Traceback")
            assert errors.count() == 0, errors.first.inner_text()
        except BaseException:
            page.screenshot(path=str(tmp_path / "failure.png"))
            print("JupyterLab log:\n" + (work / "lab.log").read_text()[-4000:])
            print("page text:\n" + page.locator("body").inner_text()[-4000:])
            raise
        finally:
            context.close()
    assert SCREENSHOT.stat().st_size > 10_000
    assert len(list((work / "outputs").glob("*.png"))) >= 8


def _wait_count(page, locator, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while locator.count() < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {locator.count()} of {n} thumbnails in the gallery")
        page.wait_for_timeout(200)


def _text_when(page, selector: str, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = page.locator(selector).inner_text()
        if needle in text or time.monotonic() > deadline:
            return text
        page.wait_for_timeout(200)
