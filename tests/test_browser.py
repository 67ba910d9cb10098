"""The controller notebook in a real JupyterLab, seen and clicked in a real (headless) Chromium.

Run All starts two local tiny-model workers, makes a first batch and an upscale. Then, at 800 px
wide with JupyterLab's file browser open (and at 1400, 600 and 1600 px), the test checks what a
person sees: no control outside the visible area and no horizontal scrollbar anywhere in the
notebook's outputs (every section of the Generate panel opened in turn); clicking a thumbnail
opens the viewer in view, the arrow keys step, its download links save a PNG with parameters
and the run's zip; a run's bar moves with the workers' steps before its first batch lands; a
worker killed mid-run and restarted from its row leaves no stderr box in any cell and the run
completes. Screenshots of every panel at 800 and 1400 px go to docs/screenshots/. Skipped only
where Debian's chromium (or the jupyterlab / playwright packages) are missing; `playwright
install` is never needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
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
SHOTS = ROOT / "docs" / "screenshots"
PANELS = ("backends", "generate", "upscale", "logs")
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


# Everything in the notebook that scrolls sideways, and every visible control of a panel that
# sticks out of its output area or the window. A control inside a closed section has no box.
_LAYOUT_JS = """
() => {
  const out = [];
  const vw = document.documentElement.clientWidth;
  const name = el => el.tagName.toLowerCase() + '.' + [...el.classList].slice(0, 3).join('.');
  // the notebook's own scrolling and every output area (a code cell's editor may scroll
  // sideways over a long line of code: that is the notebook's source, not a panel)
  const scan = document.querySelectorAll('.jp-NotebookPanel, .jp-WindowedPanel-outer, ' +
                                         '.jp-Notebook, .jp-OutputArea, .jp-OutputArea *');
  for (const el of scan) {
    const cs = getComputedStyle(el);
    if ((cs.overflowX === 'auto' || cs.overflowX === 'scroll') && el.clientWidth > 0 &&
        el.scrollWidth > el.clientWidth + 1)
      out.push(`horizontal scrollbar on ${name(el)}: ${el.scrollWidth} > ${el.clientWidth}`);
  }
  if (document.scrollingElement.scrollWidth > vw + 1) out.push('the page scrolls sideways');
  for (const root of document.querySelectorAll('.colabswarm')) {
    const area = (root.closest('.jp-OutputArea-output') || root.parentElement)
      .getBoundingClientRect();
    const right = Math.min(area.right, vw);
    const sel = 'button, input, select, textarea, .progress, img, .widget-label, ' +
                '.widget-html-content, a';
    for (const c of root.querySelectorAll(sel)) {
      const r = c.getBoundingClientRect();
      if (r.width === 0 || r.height === 0 || getComputedStyle(c).visibility === 'hidden') continue;
      if (r.left < area.left - 1 || r.right > right + 1)
        out.push(`${name(c)} "${(c.innerText || c.value || '').slice(0, 30)}" in ` +
                 `${[...root.classList].join('.')} spans ${Math.round(r.left)}-` +
                 `${Math.round(r.right)}, visible ${Math.round(area.left)}-${Math.round(right)}`);
    }
  }
  return out;
}
"""

_BACKGROUND_JS = """
el => { for (let e = el; e; e = e.parentElement) { const c = getComputedStyle(e).backgroundColor;
          if (c && c !== 'rgba(0, 0, 0, 0)' && c !== 'transparent') return c; } return 'none'; }
"""


def test_controller_notebook_in_chromium_at_800_and_1400_px(lab, tmp_path: Path):
    url, work = lab
    t0 = time.monotonic()
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 800, "height": 1400},
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
                         " .jp-Toolbar-kernelStatus[data-status='idle']").first.wait_for(
                state="attached")  # at 800 px the toolbar folds it away
            _open_file_browser(page)
            # Run > Run All Cells, as a person would
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            assert "upscaled to 128x128" in _text_when(page, ".jp-Notebook",
                                                       "upscaled to 128x128", 150), \
                "Run All did not finish"
            gen = page.locator(".colabswarm-generate")
            thumbs = gen.locator(".colabswarm-thumb")
            _wait_count(page, thumbs, 4, 30)

            phases = [("Run All", time.monotonic())]
            # 800 px, the file browser open: everything fits, in every section
            _check_layout(page, "800 px with the file browser open")
            phases.append(("layout at 800 px", time.monotonic()))
            _viewer_opens_in_view(page)
            phases.append(("viewer", time.monotonic()))
            _bar_moves_before_the_first_batch(page)
            phases.append(("step progress", time.monotonic()))
            _kill_and_restart_a_worker(page)
            phases.append(("kill and restart", time.monotonic()))
            _screenshots(page, 800)
            phases.append(("screenshots at 800 px", time.monotonic()))

            # 1400 px, and the ends of the range
            for width in (1400, 600, 1600):
                page.set_viewport_size({"width": width, "height": 1400})
                page.wait_for_timeout(400)
                _check_layout(page, f"{width} px with the file browser open")
                if width == 1400:
                    _screenshots(page, 1400)
                    _grid_from_the_page(page)
            phases.append(("1400, 600 and 1600 px", time.monotonic()))
            last, parts = t0, []
            for name, t in phases:
                parts.append(f"{name} {t - last:.1f}s")
                last = t
            print("browser test phases: " + ", ".join(parts))

            errors = page.locator(".jp-OutputArea-output[data-mime-type="
                                  "'application/vnd.jupyter.stderr']")
            assert errors.count() == 0, f"a stderr box in a cell: {errors.first.inner_text()}"
        except BaseException:
            page.screenshot(path=str(tmp_path / "failure.png"))
            print("JupyterLab log:\n" + (work / "lab.log").read_text()[-4000:])
            print("page text:\n" + page.locator("body").inner_text()[-4000:])
            raise
        finally:
            context.close()
    print(f"browser test body: {time.monotonic() - t0:.0f}s")
    for width in (800, 1400):
        for name in PANELS:
            assert (SHOTS / f"{name}-{width}.png").stat().st_size > 5_000
    assert len(list((work / "outputs").glob("*.png"))) >= 12


def _open_file_browser(page) -> None:
    """JupyterLab's left side bar with the file browser, as a person usually has it."""
    stack = page.locator("#jp-left-stack")
    if not stack.is_visible():
        page.locator(".jp-SideBar.jp-mod-left [data-id='filebrowser']").first.click()
    stack.wait_for(state="visible")
    assert stack.bounding_box()["width"] > 150


def _check_layout(page, where: str) -> None:
    gen = page.locator(".colabswarm-generate")
    assert gen.evaluate(_BACKGROUND_JS) == "rgb(255, 255, 255)", \
        "the colours' contrast is computed against a white background"
    problems = page.evaluate(_LAYOUT_JS)
    headers = gen.locator(".jupyter-widget-Collapse-header")
    for i in range(headers.count()):  # LoRAs, img2img, X/Y grid: each opened in turn
        headers.nth(i).click()
        page.wait_for_timeout(150)
        problems += [f"(section {i + 1} open) {p}" for p in page.evaluate(_LAYOUT_JS)]
        headers.nth(i).click()
    assert not problems, f"at {where}:\n" + "\n".join(problems[:20])


def _viewer_opens_in_view(page) -> None:
    gen = page.locator(".colabswarm-generate")
    viewer = gen.locator(".colabswarm-viewer")
    box = gen.locator(".colabswarm-gallery")
    box.evaluate("el => el.scrollIntoView({block: 'start'})")  # the viewer is above: off screen
    page.wait_for_timeout(200)
    thumb = box.locator(".colabswarm-thumb").nth(2)
    seed = thumb.locator(".widget-html-content").inner_text().strip()
    thumb.click()  # on the picture itself
    _text_when(page, ".colabswarm-viewer", f"Seed: {seed}", 15)
    page.wait_for_timeout(300)
    vb = viewer.bounding_box()
    height = page.viewport_size["height"]
    assert vb and vb["y"] >= -1 and vb["y"] + vb["height"] <= height + 1, \
        f"the viewer is not in view after a click: {vb}, window height {height}"
    assert "colabswarm-selected" in (thumb.get_attribute("class") or "")
    _downloads_work(page, viewer)
    viewer.press("ArrowRight")  # the viewer has focus: the arrow keys step
    deadline = time.monotonic() + 10
    while f"Seed: {seed}," in viewer.inner_text():
        assert time.monotonic() < deadline, "the right arrow key did not step to the next image"
        page.wait_for_timeout(100)


def _downloads_work(page, viewer) -> None:
    """The viewer's links save files from the page itself: a PNG with its parameters, and its
    run as a zip of them."""
    import io
    import zipfile

    from PIL import Image

    viewer.focus()
    with page.expect_download() as got:
        viewer.locator("a.colabswarm-download", has_text="Download PNG").click()
    data = Path(got.value.path()).read_bytes()
    assert got.value.suggested_filename.endswith(".png")
    with Image.open(io.BytesIO(data)) as im:
        assert "Seed: " in im.info["parameters"]
    viewer.locator("button", has_text="Zip this run").click()
    link = viewer.locator("a.colabswarm-download", has_text="Download run")
    link.wait_for()
    with page.expect_download() as got:
        link.click()
    assert got.value.suggested_filename.startswith("colabswarm-run-")
    with zipfile.ZipFile(got.value.path()) as z:
        assert z.testzip() is None and any(n.endswith(".png") for n in z.namelist())
    viewer.focus()


def _bar_moves_before_the_first_batch(page) -> None:
    gen = page.locator(".colabswarm-generate")
    gen.locator(".widget-text:has(label:text-is('Steps')) input").fill("150")
    gen.locator(".widget-text:has(label:text-is('Images')) input").fill("4")
    gen.locator(".widget-text:has(label:text-is('Seed')) input").fill("")
    count = gen.locator(".colabswarm-gallery .colabswarm-thumb").count()
    total = _gallery_total(page)
    gen.locator("button", has_text="Generate").first.click()
    seen, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        state = gen.evaluate("""el => {
            const rows = el.querySelectorAll('.colabswarm-runbar');
            const last = rows[rows.length - 1];
            const bar = last && last.querySelector('.progress-bar');
            return {label: last ? last.innerText : '', width: bar ? bar.style.width : ''};
        }""")
        m = re.search(r"Run (\d+).*?(\d+) of 4 images \((\d+)%\)", state["label"], re.S)
        if m and int(m.group(1)) > 1:
            seen.append((int(m.group(2)), int(m.group(3)), _gallery_total(page),
                         state["width"]))
            if int(m.group(2)) == 4:
                break
        page.wait_for_timeout(100)
    early = [s for s in seen if s[0] == 0 and s[1] > 0 and s[2] == total]
    assert early, f"the bar did not move before the first batch landed: {seen}"
    assert any(float(s[3].rstrip("%") or 0) > 0 for s in early), seen
    _wait_count(page, gen.locator(".colabswarm-gallery .colabswarm-thumb"),
                min(count + 4, 60), 60)


def _gallery_total(page) -> int:
    text = page.locator(".colabswarm-generate .colabswarm-row").filter(
        has_text="Gallery").first.inner_text()
    m = re.search(r"([\d,]+) images?", text)
    return int(m.group(1).replace(",", "")) if m else 0


def _kill_and_restart_a_worker(page) -> None:
    """A worker process dies mid-run (SIGKILL): its row says so and offers Restart; the run
    completes elsewhere; Restart brings it back; no cell shows a stderr box meanwhile."""
    gen = page.locator(".colabswarm-generate")
    gen.locator(".widget-text:has(label:text-is('Steps')) input").fill("30")
    gen.locator(".widget-text:has(label:text-is('Images')) input").fill("12")
    row = page.locator(".colabswarm-backend-local0")
    pid = int(re.search(r"process (\d+) of this notebook", row.inner_text()).group(1))
    total = _gallery_total(page)
    gen.locator("button", has_text="Generate").first.click()
    page.wait_for_timeout(600)
    os.kill(pid, signal.SIGKILL)
    _text_when(page, ".colabswarm-backend-local0", "has exited", 60)
    status, hint = (row.locator(".widget-html-content").nth(i).inner_text() for i in (1, 2))
    assert "errored" in status and "retrying in" in status, status
    assert "process on this machine" in hint and "tunnel" not in hint, hint
    _save_shot(page.locator(".colabswarm-backends"), SHOTS / "backends-dead.png")
    row.locator("button", has_text="Restart").click()
    deadline = time.monotonic() + 90
    status = row.locator(".widget-html-content").nth(1)
    while not status.inner_text().strip().lstrip("\u25cf ").startswith("running"):
        assert time.monotonic() < deadline, row.inner_text()
        page.wait_for_timeout(250)
    assert "Restarted local0" in page.locator(".colabswarm-backends").inner_text()
    while _gallery_total(page) < total + 12:  # every image of the run, none lost
        assert time.monotonic() < deadline, "the run did not finish"
        page.wait_for_timeout(200)


def _grid_from_the_page(page) -> None:
    """The X/Y grid section: two axes typed in, Make grid, the labelled grid shown."""
    gen = page.locator(".colabswarm-generate")
    gen.locator(".jupyter-widget-Collapse-header", has_text="X/Y grid").click()
    gen.locator(".widget-dropdown:has(label:text-is('Y axis')) select").select_option(
        label="Sampler")
    values = gen.locator(".widget-text:has(label:text-is('values')) input")
    values.nth(0).fill("4, 9")
    values.nth(1).fill('Euler, "DPM++ 2M Karras"')
    gen.locator("button", has_text="Make grid").click()
    assert "2x2 grid" in _text_when(page, ".colabswarm-generate", "2x2 grid", 60)
    page.wait_for_timeout(300)
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"],
                            "height": int(gen.bounding_box()["height"]) + 400})
    gen.evaluate("el => el.scrollIntoView({block: 'center'})")
    page.wait_for_timeout(300)
    _save_shot(gen, SHOTS / "generate-grid-1400.png")
    page.set_viewport_size(size)


def _save_shot(locator, path: Path) -> None:
    """A screenshot in 256 colours: the panels stay crisp, the random pictures of the tiny
    model cost a third of the bytes in the repository."""
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(locator.screenshot())).convert("RGB")
    im.quantize(colors=256, method=Image.Quantize.FASTOCTREE,
                dither=Image.Dither.NONE).save(path, format="PNG", optimize=True)


def _screenshots(page, width: int) -> None:
    """Each panel whole: the window is made tall enough for the tallest one first (a panel
    taller than the window would be cut, with JupyterLab's bars drawn over it)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    tallest = max(page.locator(f".colabswarm-{name}").bounding_box()["height"]
                  for name in PANELS)
    page.set_viewport_size({"width": size["width"],
                            "height": max(size["height"], int(tallest) + 400)})
    page.wait_for_timeout(400)
    for name in PANELS:
        el = page.locator(f".colabswarm-{name}")
        el.evaluate("el => el.scrollIntoView({block: 'center'})")
        page.wait_for_timeout(100)
        _save_shot(el, SHOTS / f"{name}-{width}.png")
    page.set_viewport_size(size)


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
