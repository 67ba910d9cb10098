"""The panels driven as a person would (set values, click buttons) against real workers.

Assertions are on what the person sees: border colours, labels, the queue line, the bars,
gallery thumbnails and their order, messages, the bytes of a download link.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import itertools
import re
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("ipywidgets")

import ipywidgets as w  # noqa: E402
from PIL import Image  # noqa: E402

from colabswarm.backend.tiny import build_tiny_lora  # noqa: E402
from colabswarm.swarm import Swarm  # noqa: E402
from colabswarm.swarm.controller import SwarmStatus  # noqa: E402
from colabswarm.swarm.outputs import parse_parameters  # noqa: E402
from colabswarm.widgets import (  # noqa: E402
    BackendsPanel,
    GeneratePanel,
    LogsPanel,
    UpscalePanel,
    WorkerPanel,
    _base,
    controller_ui,
    gallery,
)
from colabswarm.widgets.generate import parse_values  # noqa: E402
from colabswarm.widgets.logs import dedupe  # noqa: E402
from colabswarm.widgets.progress import RunInfo, queue_line, run_fraction  # noqa: E402
from tests.conftest import wait_until  # noqa: E402

WIDGETS = Path(_base.__file__).parent
LINE = re.compile(r"^(\d+) current generations: (\d+) generating, (\d+) waiting on a worker"
                  r"(?:, (\d+) waiting on a model load)?, (\d+) queued")


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    build_tiny_lora(root / "detail.safetensors", "tiny", 1)
    return root


@pytest.fixture(scope="module")
def workers(loras):
    """Two tiny-model workers on threads of this process (fast to start, real HTTP), each
    offering one LoRA."""
    from colabswarm.backend.serve import start_worker

    hs = [start_worker("tiny", name=n, loras=str(loras)) for n in ("alpha", "beta")]
    yield hs
    for h in hs:
        h.stop()


@pytest.fixture
def swarm(tmp_path):
    s = Swarm(output_dir=tmp_path / "out", health_every=0.3)
    yield s
    s.close()


def _generate_form(panel: GeneratePanel, images: int, size: int = 64, steps: int = 4,
                   seed: str = "100") -> None:
    panel.prompt.value = "a red fox"
    panel.width.value = panel.height.value = size
    panel.steps.value = steps
    panel.n_images.value = images
    panel.seed.value = seed


def _walk(widget: w.Widget):
    yield widget
    for child in getattr(widget, "children", ()) or ():
        yield from _walk(child)


def _text(html_value: str) -> str:
    return re.sub(r"<[^>]+>", "", html_value)


# ----- what holds for every panel ----------------------------------------------------------
def test_every_colour_passes_wcag_aa_and_status_colours_are_far_apart():
    bg = _base.PANEL_BACKGROUND
    for name, colour in {**_base.COLOURS, **_base.STATUS_COLOURS}.items():
        assert _base.contrast_ratio(colour, bg) >= 4.5, (name, colour)
    # every colour literal the panels write into HTML or CSS, not only the palette
    found = set()
    for path in WIDGETS.glob("*.py"):
        for m in re.finditer(r"color:\s*(#[0-9a-fA-F]{6}|#[0-9a-fA-F]{3})\b", path.read_text()):
            found.add((path.name, m.group(1)))
        assert not re.search(r"color:\s*(?!var\b)[a-z]+\b", path.read_text()), \
            f"{path.name}: a named colour (unchecked)"
    assert found, "the scan found the literals"
    for where, colour in found:
        assert _base.contrast_ratio(colour, bg) >= 4.5, (where, colour)
    assert _base.contrast_ratio("#ffd700", bg) < 4.5, "gold, the old 'loading', fails"
    for kind, colour in _base.BUTTON_COLOURS.items():  # white text on coloured buttons
        assert _base.contrast_ratio("#ffffff", colour) >= 4.5, kind
    for path in WIDGETS.glob("*.py"):
        assert "button_style=" not in path.read_text(), \
            f"{path.name}: ipywidgets' own button colours (white text under 4.5:1)"

    def lab(c: str) -> tuple[float, float, float]:
        rgb = [int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        r, g, b = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in rgb]
        x, y, z = ((0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047,
                   0.2126 * r + 0.7152 * g + 0.0722 * b,
                   (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883)
        f = [t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116 for t in (x, y, z)]
        return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])

    for (a, ca), (b, cb) in itertools.combinations(_base.STATUS_COLOURS.items(), 2):
        delta = sum((p - q) ** 2 for p, q in zip(lab(ca), lab(cb), strict=True)) ** 0.5
        assert delta >= 30, f"{a} and {b} look alike (CIE76 delta E {delta:.0f})"


def test_every_row_of_every_panel_wraps(swarm, workers):
    """No HBox (which never wraps): rows are flex boxes that wrap at narrow widths."""
    ui = controller_ui(swarm)
    worker = WorkerPanel(workers[0], refresh_every=None)
    try:
        for panel in (ui.backends, ui.generate, ui.upscale, ui.logs, worker):
            for widget in _walk(panel.widget):
                assert not isinstance(widget, w.HBox), f"{type(panel).__name__}: an HBox"
                if type(widget) is w.Box:
                    assert "wrap" in (widget.layout.flex_flow or ""), type(panel).__name__
            assert "colabswarm" in panel.widget._dom_classes
    finally:
        worker.close()
        ui.close()


# ----- backends --------------------------------------------------------------------------
def test_local_rows_count_down_and_restart(swarm):
    from colabswarm.swarm.local import start_local_workers

    local = start_local_workers(1, "tiny", swarm, env={"OMP_NUM_THREADS": "1"})
    try:
        panel = BackendsPanel(swarm, local=local, update_every=0.05)
        row = panel.rows["local0"]
        assert row.colour == "green" and row.status_text.startswith("running")
        assert row.restart.layout.display == "" and row.retry.layout.display == "none"
        assert f"process {local[0].pid} of this notebook" in _text(row.title.value)
        assert _base.STATUS_COLOURS["running"] in row.box.layout.border

        local[0].proc.kill()  # a dead process: errored, with the hint for a local process
        wait_until(lambda: row.colour == "red", what="red without AllowIdle")
        wait_until(lambda: "retrying in" in row.status_text, what="the retry countdown")
        assert row.status_text.startswith("errored: ")
        assert _base.STATUS_COLOURS["errored"] in row.box.layout.border
        hint = _text(row.hint.value)
        assert "process on this machine" in hint and "exited" in hint and "Restart" in hint
        assert "tunnel" not in hint, "a local process has no tunnel"
        assert row.retry.layout.display == ""
        first = int(re.search(r"retrying in (\d+)", row.status_text).group(1))
        wait_until(lambda: "retrying" not in row.status_text or int(re.search(
            r"retrying in (\d+)", row.status_text).group(1)) != first, what="the count to move")

        row.restart.click()  # restarts the process, then asks it at once
        wait_until(lambda: row.colour == "green", what="green after Restart")
        wait_until(lambda: "Restarted local0" in panel.message.value, what="the message")
        wait_until(lambda: row.hint.value == "", what="the hint to go")
        assert row.retry.layout.display == "none" and not row.restart.disabled
        panel.close()
    finally:
        local.stop()


def test_a_tunnelled_row_says_check_the_tunnel_and_retry_now_brings_it_back(swarm):
    from colabswarm.backend.serve import start_worker

    h = start_worker("tiny", name="peer")
    port, token = int(h.share.split("#")[0].rsplit(":", 1)[1]), h.token
    panel = BackendsPanel(swarm, update_every=0.05)
    panel.add(h.share)
    row = panel.rows["peer"]
    assert row.restart.layout.display == "none", "not a process of this notebook"
    row.allow_idle.value = True  # a peer that comes and goes: grey while away
    h.stop()
    try:
        wait_until(lambda: row.colour == "grey", what="an AllowIdle peer going grey")
        assert row.status_text.startswith("idle (away)") and "retrying in" in row.status_text
        hint = _text(row.hint.value)
        assert "tunnel" in hint and "new share string" in hint
        h = start_worker("tiny", name="peer", port=port, token=token)  # back, same address
        row.retry.click()  # at once, not at the next try
        wait_until(lambda: row.colour == "green", timeout=10, what="green after Retry now")
        assert row.hint.value == "" and row.retry.layout.display == "none"
    finally:
        panel.close()
        h.stop()


def test_bad_share_strings_show_errors_and_unreachable_ones_can_be_added_anyway(swarm,
                                                                               workers):
    panel = BackendsPanel(swarm)
    good = workers[0].share
    dead = f"http://127.0.0.1:9#token={'x' * 24}"
    panel.share_text.value = f"not a share string\n{good}\n{dead}"
    t0 = time.monotonic()
    panel.add_button.click()  # returns at once: contacting workers runs on the panel's thread
    assert time.monotonic() - t0 < 0.5
    panel.wait_idle()
    msg = panel.message.value
    assert "Could not add not a share string" in msg and "token" in msg
    assert "Could not add http://127.0.0.1:9" in msg
    assert "Added alpha" in msg
    assert "x" * 24 not in msg, "tokens never appear in messages"
    assert panel.share_text.value.splitlines() == ["not a share string", dead], \
        "failed lines stay"
    assert list(panel.rows) == ["alpha"]
    # the unreachable one (not the malformed one) can be added as AllowIdle
    (anyway,) = panel.add_anyway.children
    assert "127.0.0.1:9" in _text(anyway.children[0].value)
    anyway.children[1].click()
    panel.wait_idle()
    assert "as AllowIdle" in panel.message.value
    wait_until(lambda: "http://127.0.0.1:9" in panel.rows, what="the idle row")
    idle = panel.rows["http://127.0.0.1:9"]
    assert idle.colour == "grey" and idle.status_text.startswith("idle (away)")
    assert panel.share_text.value.splitlines() == ["not a share string"]
    panel.share_text.value = good
    panel.add()
    assert "already registered" in panel.message.value
    panel.share_text.value = "   "
    panel.add()
    assert "Paste a share string first" in panel.message.value
    panel.close()


def test_rows_reorder_disable_and_remove(swarm, workers):
    panel = BackendsPanel(swarm)
    panel.add("\n".join(h.share for h in workers))
    assert [s["name"] for s in swarm.backends] == ["alpha", "beta"]
    panel.rows["alpha"].down.click()
    wait_until(lambda: list(panel.rows_box.children) ==
               [panel.rows["beta"].box, panel.rows["alpha"].box], what="reorder")
    assert [s["name"] for s in swarm.backends] == ["beta", "alpha"]
    beta = panel.rows["beta"]
    beta.enabled.value = False
    wait_until(lambda: beta.colour == "orange", what="disabled")
    assert beta.status_text.startswith("disabled")
    assert _base.STATUS_COLOURS["disabled"] in beta.box.layout.border
    beta.enabled.value = True
    wait_until(lambda: beta.colour == "green", what="enabled again")
    beta.slots.value = 3
    assert swarm.backends[0]["slots"] == 3
    beta.remove.click()
    wait_until(lambda: list(panel.rows) == ["alpha"], what="removal")
    assert [s["name"] for s in swarm.backends] == ["alpha"]
    assert "1 backend: 1 running" in panel.summary.value
    panel.close()


# ----- progress ------------------------------------------------------------------------
def test_queue_line_and_run_fraction_arithmetic():
    st = SwarmStatus(current=40, running=16, queued=24, eta_s=12.4, backends=[], loading=2,
                     generating=8)
    assert queue_line(st) == ("40 current generations: 8 generating, 6 waiting on a worker, "
                              "2 waiting on a model load, 24 queued (est. 12s)")
    st = SwarmStatus(current=10, running=10, queued=0, eta_s=0.3, backends=[], generating=10)
    assert queue_line(st).endswith("(finishing…)") and "0s" not in queue_line(st)
    assert queue_line(SwarmStatus(0, 0, 0, None, [])).startswith("0 current generations")
    run = RunInfo(7, "generate", 12, done=4)
    flights = [{"runs": {7: 4}, "step": 10, "total_steps": 20, "copy": False},
               {"runs": {7: 4}, "step": 10, "total_steps": 20, "copy": True},  # counted once
               {"runs": {7: 2, 8: 2}, "step": 5, "total_steps": 20, "copy": False},
               {"runs": {8: 4}, "step": 20, "total_steps": 20, "copy": False}]
    assert run_fraction(run, flights) == pytest.approx(4 + 2 + 0.5)
    run.done = 12
    assert run_fraction(run, flights) == 12, "never above the total"


def test_queue_line_separates_generating_waiting_and_queued(swarm, workers):
    """Two workers with two slots each, batches of up to 8: the line's three counts add up
    to the total at every moment, and show batches generating while the second slot's batch
    waits on its worker and the rest waits here."""
    for h in workers:
        swarm.add(h.share)
    panel = GeneratePanel(swarm, update_every=0.02)
    _generate_form(panel, images=40, size=64, steps=60)
    seen: list[str] = []
    t0 = time.monotonic()
    panel.generate_button.click()
    assert time.monotonic() - t0 < 1.0, "Generate must return at once"
    fut = panel.futures[-1]
    while not fut.done() or not seen or not seen[-1].startswith("0 current"):
        if not seen or seen[-1] != panel.queue.value:
            seen.append(panel.queue.value)
        time.sleep(0.005)
        assert time.monotonic() - t0 < 60, seen
    counts = []
    for line in seen:
        m = LINE.match(line)
        if m:
            total, gen, wait, load, queued = (int(g or 0) for g in m.groups())
            assert gen + wait + load + queued == total, line
            counts.append((total, gen, wait, queued))
        else:
            assert line.startswith("0 current generations"), line
    assert any(g and wt for _, g, wt, _ in counts), f"generating beside waiting: {seen}"
    assert any(q and (g or wt) for _, g, wt, q in counts), f"queued beside running: {seen}"
    totals = [c[0] for c in counts]
    assert totals == sorted(totals, reverse=True), f"counts down: {seen}"
    assert not re.search(r"est\. 0s\)", " ".join(seen)), "it says finishing…, not 0s"
    panel.wait(30)
    assert len(panel.images) == 40
    wait_until(lambda: "40 of 40 images (100%)" in _text(panel.bars.widget.children[0]
                                                         .children[0].value), what="the bar")
    assert "Done: 40 images" in panel.message.value
    panel.close()


def test_step_progress_moves_before_the_first_image_lands(swarm, workers):
    swarm.add(workers[0].share)
    panel = GeneratePanel(swarm, update_every=0.02)
    _generate_form(panel, images=4, size=64, steps=150)
    panel.generate_button.click()
    fut = panel.futures[-1]
    early = []
    while not fut.done():
        bars = [c for c in panel.bars.widget.children if hasattr(c, "children")]
        if bars and not panel.gallery.total and not swarm_images(swarm):
            bar = bars[0].children[1]
            if bar.value > 0:
                early.append(bar.value / bar.max)
        time.sleep(0.01)
    assert early, "the bar stayed at 0 until the batch landed"
    # The bar may reach the end (all steps made) a moment before the images arrive; what a
    # person must see is a part-filled bar while the batch is still being made.
    assert any(0 < f < 1 for f in early), f"the bar jumped from 0 to full: {early}"
    panel.close()


def swarm_images(swarm: Swarm) -> int:
    return sum(b["images_done"] for b in swarm.backends)


def test_generate_and_upscale_keep_their_own_bars(swarm, workers):
    for h in workers:
        swarm.add(h.share)
    ui = controller_ui(swarm)
    gen, up = ui.generate, ui.upscale
    _generate_form(gen, images=2, size=64, steps=4)
    gen.generate_button.click()
    gen.wait(30)
    wait_until(lambda: len(up.source.options) == 2, what="the gallery in the upscale dropdown")
    gen.gallery.visible()[1].widget.children[2].click()  # the thumbnail picks the source
    assert up.source.value == f"g{id(gen.gallery.selected.image)}"
    up.scale.value, up.tile.value, up.overlap.value, up.steps.value = 2, 64, 16, 4
    up.start_button.click()
    r = up.wait(60)
    up.tasks.wait_idle(10)
    assert r.image.size == (128, 128)
    assert up.progress.value == up.progress.max == r.tiles and r.tiles >= 4
    assert f"{r.tiles} of {r.tiles} tiles" in up.progress_text.value
    assert Image.open(io.BytesIO(up.result_image.value)).size == (128, 128)
    assert "128x128 from" in up.result_text.value and 'download="upscaled-128x128.png"' in \
        up.download.value
    assert f"seed {gen.selected.seed}" in up.result_text.value, "it says which image it grew"
    assert len(gen.images) == 2, "upscale tiles are not gallery pictures"
    time.sleep(0.3)
    labels = [_text(b.children[0].value) for b in gen.bars.widget.children]
    assert labels and labels[0].startswith("Run ") and "2 of 2 images (100%)" in labels[0], \
        "the Generate bar keeps its run after an upscale"
    ui.close()


# ----- gallery -------------------------------------------------------------------------
def test_gallery_order_cap_notice_and_viewer(swarm, workers):
    swarm.add(workers[0].share)
    panel = GeneratePanel(swarm, page=5, keep=8)
    _generate_form(panel, images=6, seed="100")
    panel.generate_button.click()
    panel.wait(30)
    _generate_form(panel, images=6, seed="200")
    panel.generate_button.click()
    panel.wait(30)
    g = panel.gallery
    seeds = [e.image.seed for e in g.visible()]
    assert len(seeds) == 5 and all(s >= 200 for s in seeds), "newest first: the second run"
    arrival = [e.image.seed for e in g.entries]
    assert seeds == arrival[::-1][:5]
    notice = _text(g.notice.value)
    assert "Showing the newest 5 of 12 images" in notice
    assert "holds the last 8" in notice and "saved in" in notice
    assert len(g.box.children) == 5 and "12 images" in g.count.value
    g.order.value = "seed order"
    assert [e.image.seed for e in g.visible()] == [104, 105, 200, 201, 202], \
        "seed order, of the 8 held"
    assert "Showing the lowest seeds of 5 of 12" in _text(g.notice.value)
    g.more_button.click()
    assert len(g.box.children) == 8 and g.more_button.layout.display == "none"
    # clicking a thumbnail (the button laid over it) opens the viewer on that image
    thumb = g.box.children[2]
    img, caption, pick = thumb.children
    assert Image.open(io.BytesIO(img.value)).size == (64, 64) and img.format == "jpeg"
    pick.click()
    assert panel.selected.seed == 200 and g.viewer.layout.display == ""
    assert "colabswarm-selected" in thumb._dom_classes
    assert "Seed: 200" in g.viewer_text.value and "a red fox" in g.viewer_text.value
    assert Image.open(io.BytesIO(g.viewer_image.value)).size == (64, 64)
    assert "scrollIntoView" in g._trigger.value, "the viewer scrolls itself into view"
    g.next_button.click()
    assert panel.selected.seed == 201
    assert "colabswarm-selected" not in thumb._dom_classes
    assert "colabswarm-selected" in g.box.children[3]._dom_classes
    g.prev_button.click()
    g.prev_button.click()
    assert panel.selected.seed == 105
    g.clear_button.click()
    assert g.box.children == () and panel.images == [] and g.viewer.layout.display == "none"
    panel.close()


def test_a_gallery_of_thousands_holds_a_page_of_widgets_and_bounded_bytes(tmp_path):
    """1,500 images: the browser gets one page of thumbnails, the panel holds what fits in
    its byte budget, and the notice says what is where."""
    from colabswarm.swarm.outputs import GeneratedImage

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "teal").save(buf, format="PNG")
    data = buf.getvalue()
    g = gallery.Gallery(page=40, keep=1000, keep_bytes=600 * len(data), folder=tmp_path)
    made = [GeneratedImage(None, seed, "w", seed, 0.1, {"prompt": "x", "width": 32,
                                                         "height": 32}, png=data)
            for seed in range(1500)]
    for i, im in enumerate(made):
        g.add(im, run=i // 500)
    g.wait_idle(60)
    assert g.total == 1500 and len(g.entries) == 600, "held: the byte budget's worth"
    assert [e.image.seed for e in g.entries] == list(range(900, 1500))
    assert len(g.box.children) == 40
    assert sum(e.widget is not None for e in g.entries) == 40, "widgets only for the page"
    notice = _text(g.notice.value)
    assert "Showing the newest 40 of 1,500 images" in notice
    assert f"holds the last 600; every image is saved in {tmp_path}" in notice
    g.order.value = "seed order"
    assert [e.image.seed for e in g.visible()][:3] == [900, 901, 902]
    g.close()


def _link_bytes(link_html: str) -> tuple[str, bytes]:
    name = re.search(r'download="([^"]+)"', link_html).group(1)
    b64 = re.search(r'data-b64="([^"]+)"', link_html).group(1)
    href = re.search(r'href="data:[^;]+;base64,([^"]+)"', link_html).group(1)
    assert b64 == href
    return name, base64.b64decode(b64)


def test_download_one_image_and_a_run_as_a_zip(swarm, workers, monkeypatch, tmp_path):
    swarm.add(workers[0].share)
    panel = GeneratePanel(swarm)
    _generate_form(panel, images=5, seed="300")
    panel.negative_prompt.value = "blurry, dark"
    panel.generate_button.click()
    panel.wait(30)
    _generate_form(panel, images=2, seed="900")  # another run: not in the first run's zip
    panel.generate_button.click()
    panel.wait(30)
    g = panel.gallery
    first = next(e for e in g.entries if e.image.seed == 302)
    g.select(first)
    name, data = _link_bytes(g.download.value)
    assert name == "302-a-red-fox.png"
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (64, 64)
        fields = parse_parameters(im.info["parameters"])
    assert fields["Seed"] == "302" and fields["Negative prompt"] == "blurry, dark"
    g.zip_button.click()
    g.tasks.wait_idle(10)
    name, data = _link_bytes(g.zip_link.value)
    assert name == f"colabswarm-run-{first.run}.zip"
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None
        pngs = sorted(n for n in z.namelist() if n.endswith(".png"))
        assert len(pngs) == 5 and len(z.namelist()) == 10
        seeds = []
        for n in pngs:
            with Image.open(io.BytesIO(z.read(n))) as im:
                im.load()
                fields = parse_parameters(im.info["parameters"])
            seeds.append(int(fields["Seed"]))
            assert fields["Prompt"] == "a red fox" and fields["Size-1"] == "64"
            assert z.read(n[:-4] + ".txt").decode().startswith("a red fox\nNegative prompt")
        assert seeds == [300, 301, 302, 303, 304]
    # a run too big for a link in the page is written to the output folder, and it says so
    monkeypatch.setattr(gallery, "MAX_INLINE_BYTES", 1000)
    path = g.zip_run(first.run)
    assert isinstance(path, Path) and path.parent == Path(swarm.output_dir).resolve()
    assert "too big for a link" in g.zip_link.value and str(path) in g.zip_link.value
    with zipfile.ZipFile(path) as z:
        assert len([n for n in z.namelist() if n.endswith(".png")]) == 5
    panel.close()


def test_reuse_parameters_round_trip_with_sampler_lora_and_clip_skip(swarm, workers):
    swarm.add(workers[0].share)
    panel = GeneratePanel(swarm)
    assert panel.sampler.options[0][1] == "Euler" and len(panel.sampler.options) > 5
    assert [v for _, v in panel.lora_name.options] == ["detail"]
    _generate_form(panel, images=1, size=64, steps=5, seed="4242")
    panel.negative_prompt.value = "blurry"
    panel.model.value = "tiny"
    panel.sampler.value = "DPM++ 2M Karras"
    panel.cfg.value = 5.5
    panel.clip_skip.value = 2
    panel.add_lora("detail", 0.6)
    before = panel.params()
    panel.generate_button.click()
    panel.wait(30)
    (made,) = panel.images
    assert made.params["sampler"] == "DPM++ 2M Karras" and made.params["clip_skip"] == 2
    # a person changes everything, then asks for the image's parameters back
    _generate_form(panel, images=1, size=128, steps=9, seed="1")
    panel.sampler.value = "Euler"
    panel.clip_skip.value = 1
    panel.set_loras({})
    panel.negative_prompt.value = ""
    panel.gallery.select(made)
    panel.gallery.reuse_button.click()
    assert panel.params() == before
    assert "parameters of image 4242" in panel.message.value
    panel.seed.value = ""
    panel.gallery.reuse_seed_button.click()
    assert panel.seed.value == "4242"
    # the prompt history brings an earlier prompt back
    panel.prompt.value = "something else"
    (label, index) = panel.history_pick.options[1]
    assert "a red fox" in label
    panel.history_pick.value = index
    assert panel.prompt.value == "a red fox" and panel.history_pick.value == -1
    panel.close()


def test_prompt_list_grid_and_img2img_from_the_panel(swarm, workers):
    swarm.add(workers[0].share)
    panel = GeneratePanel(swarm)
    _generate_form(panel, images=2, seed="10")
    panel.prompt.value = "a red fox\n\na blue owl\n"
    panel.prompt_list.value = True
    panel.generate_button.click()
    panel.wait(30)
    prompts = sorted((g.seed, g.params["prompt"]) for g in panel.images)
    assert prompts == [(10, "a red fox"), (11, "a red fox"), (12, "a blue owl"),
                       (13, "a blue owl")]
    # img2img from a gallery image
    panel.gallery.select(panel.images[0])
    panel.gallery.init_button.click()
    assert panel.init_source.value != "" and panel.more.selected_index == 1
    panel.prompt_list.value = False
    panel.prompt.value = "oil painting"
    panel.strength.value = 0.5
    panel.n_images.value = 1
    panel.generate()
    r = panel.wait(30)[-1]
    assert r.images[0].params["kind"] == "img2img" and r.images[0].params["strength"] == 0.5
    panel.init_source.value = ""  # back to txt2img
    # an X/Y grid: sampler across, cfg down
    assert parse_values('Euler, "DPM++ 2M Karras" ,') == ["Euler", "DPM++ 2M Karras"]
    panel.grid_x.value, panel.grid_x_values.value = "sampler", "Euler, DPM++ 2M Karras"
    panel.grid_y.value, panel.grid_y_values.value = "cfg", "5, 9"
    before = len(panel.images)
    fut = panel.make_grid()
    fut.result(60)
    panel.tasks.wait_idle(10)
    panel.gallery.wait_idle()
    assert "Grid done" in panel.grid_message.value
    grid = Image.open(io.BytesIO(panel.grid_image.value))
    assert grid.width > 128 and grid.height > 128
    assert "2x2 grid" in panel.grid_caption.value and 'download="colabswarm-grid.png"' in \
        panel.grid_caption.value
    assert len(panel.images) == before + 4, "the cells are in the gallery"
    panel.grid_x_values.value = ""
    assert panel.make_grid() is None and "X axis" in panel.grid_message.value
    panel.close()


def test_a_second_click_queues_more_and_bad_input_is_a_message(swarm, workers):
    swarm.add(workers[0].share)
    panel = GeneratePanel(swarm)
    _generate_form(panel, images=3, seed="")
    panel.generate_button.click()
    panel.generate_button.click()  # while the first runs: queues three more
    results = panel.wait(timeout=30)
    assert [len(r.images) for r in results] == [3, 3]
    wait_until(lambda: len(panel.gallery.box.children) == 6, what="six thumbnails")
    panel.width.value = 100
    panel.generate_button.click()  # must not raise
    assert "multiple of 8" in panel.message.value
    panel.width.value = 64
    panel.seed.value = "abc"
    panel.generate_button.click()
    assert "Seed must be a whole number" in panel.message.value
    panel.seed.value = ""
    panel.prompt_list.value, panel.prompt.value = True, "\n  \n"
    panel.generate_button.click()
    assert "prompt list is empty" in panel.message.value
    assert len(panel.futures) == 2
    panel.close()


def test_interrupt_stops_the_run_and_says_so(swarm, workers):
    swarm.add(workers[0].share)
    panel = GeneratePanel(swarm)
    _generate_form(panel, images=400, size=128, steps=20)
    panel.generate_button.click()
    wait_until(lambda: swarm_images(swarm) >= 1, what="a first image")
    panel.interrupt_button.click()
    wait_until(lambda: "Interrupted with" in panel.message.value, what="interrupted message")
    wait_until(lambda: panel.queue.value.startswith("0 current"), what="empty queue")
    panel.gallery.wait_idle()
    assert 1 <= len(panel.images) < 400
    wait_until(lambda: "Interrupted with" in panel.bars.widget.children[0].children[0].value,
               what="the bar says why it stopped")
    panel.close()


# ----- upscale ---------------------------------------------------------------------------
def test_upscale_panel_wiring_with_a_stand_in_swarm():
    """What Start sends, what the bar and result show (independent of the tile engine)."""
    calls: list[dict] = []

    class StandIn:
        output_dir = None

        def submit_upscale(self, image, **kw):
            calls.append(dict(kw, image=image))
            fut: concurrent.futures.Future = concurrent.futures.Future()
            for i in range(1, 5):
                kw["on_tile"](i, 4)
            big = image.resize((image.width * kw["scale"], image.height * kw["scale"]))
            fut.set_result(SimpleNamespace(image=big, tiles=4, backends=["a", "b"], path=None,
                                           seconds=0.5))
            return fut

    panel = UpscalePanel(StandIn())
    panel.start_button.click()
    assert "Pick an image" in panel.message.value and not calls
    src = Image.new("RGB", (64, 48), "teal")
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    panel.upload.value = ({"name": "mine.png", "type": "image/png", "size": len(buf.getvalue()),
                           "content": memoryview(buf.getvalue()),
                           "last_modified": datetime.now(UTC)},)
    assert "upload: mine.png · 64x48" in panel.source.label
    panel.scale.value, panel.tile.value, panel.overlap.value = 3, 64, 16
    panel.denoise.value, panel.prompt.value = 0.25, "crisp"
    panel.start_button.click()
    (call,) = calls
    assert call["image"].size == (64, 48)
    assert (call["scale"], call["tile"], call["overlap"], call["upscaler"]) == (3, 64, 16,
                                                                              "lanczos")
    assert call["denoise"] == pytest.approx(0.25) and call["prompt"] == "crisp"
    panel.wait(5)
    assert "4 of 4 tiles" in panel.progress_text.value and panel.progress.value == 4
    assert Image.open(io.BytesIO(panel.result_image.value)).size == (192, 144)
    assert "192x144 from 4 tiles on a, b" in panel.result_text.value
    panel.close()


# ----- worker and logs -------------------------------------------------------------------
def test_worker_panel_shows_share_qr_health_and_asks_before_stopping(swarm):
    from colabswarm.backend.serve import start_worker

    handle = start_worker("tiny", name="mine")
    panel = WorkerPanel(handle, refresh_every=None)
    try:
        assert panel.share.value == handle.share and "#token=" in panel.share.value
        assert "navigator.clipboard.writeText" in panel.copy.value
        assert handle.token in panel.copy.value
        qr = Image.open(io.BytesIO(panel.qr.value))
        assert qr.size[0] == qr.size[1] >= 100
        assert "Scan: the share string" in panel.qr_note.value, "the QR code has a label"
        text = _text(panel.details.value)
        assert "ready" in text and "mine" in text and "0 images in 0 jobs" in text
        assert "tiny" in text
        assert "Compile" in text and "auto: off on cpu" in text  # the compiled path's state
        assert "Tunnel: none" in panel.tunnel.value
        assert panel.reopen_button.layout.display == "none", "no tunnel, nothing to reopen"
        swarm.add(handle.share)
        swarm.generate("x", images=3, width=64, height=64, steps=2)
        panel.refresh()
        assert "3 images in 1 job" in _text(panel.details.value), "images, as controllers count"
        panel.stop_button.click()  # asks first
        assert handle.running and panel.confirm.layout.display == ""
        assert "Stop this worker" in panel.confirm_text.value
        panel.cancel_button.click()
        assert handle.running and panel.confirm.layout.display == "none"
        panel.stop_button.click()
        panel.confirm_button.click()
        assert not handle.running and "stopped" in panel.details.value
        assert panel.stop_button.disabled and "Worker stopped" in panel.message.value
    finally:
        panel.close()
        handle.stop()


def test_logs_panel_filters_dedupes_orders_and_logs_runs(swarm, workers):
    from colabswarm.backend.serve import start_worker
    from colabswarm.protocol import Limits

    assert dedupe([(1.0, "info", "a"), (2.0, "info", "b"), (3.0, "info", "a"),
                   (4.0, "warning", "a")]) == [(2.0, "info", "b", 1, 2.0),
                                               (3.0, "info", "a", 2, 1.0),
                                               (4.0, "warning", "a", 1, 4.0)]
    # running, errored, running: far apart, the order of events stays
    far = [(0.0, "info", "up")] + [(i, "info", f"line {i}") for i in range(1, 10)]
    assert [e[2] for e in dedupe(far + [(10.0, "info", "up")], window=8)][-1] == "up"
    assert len(dedupe(far + [(10.0, "info", "up")], window=8)) == 11
    small = start_worker("tiny", name="small", limits=Limits(max_pixels=64 * 64))
    try:
        panel = LogsPanel(swarm, update_every=0.05)
        assert "No log lines match" in panel.output.value
        swarm.add(small.share)
        swarm.add(workers[1].share)
        swarm.generate("big", images=1, width=128, height=128, steps=2)
        swarm.generate("big", images=1, width=128, height=128, steps=2)
        wait_until(lambda: any("run 2 finished" in ln for ln in panel.lines()),
                   what="the runs in the log")
        lines = panel.lines()
        assert "run 2 finished: 1 of 1 images in" in lines[0], "newest first"
        assert any("run 1 started: 1 images (generate)" in ln for ln in lines)
        skips = [ln for ln in lines if "small skipped" in ln]
        assert len(skips) == 1, f"one line per event: {skips}"
        panel.order.value = "oldest first (follow the end)"
        assert "run 2 finished" in panel.lines()[-1]
        assert "column-reverse" in panel.output.value, "scrolled to the newest line"
        assert "colabswarm-log-lines" in panel.output.value  # whole words: the style sheet's
        assert re.search(r"\.colabswarm-log-lines \{[^}]*word-break: normal", _base._CSS)
        panel.level.value = "skip"
        assert panel.lines() and all(" skip " in f" {ln} " for ln in panel.lines())
        assert any("over its 4096 pixels" in ln for ln in panel.lines()), panel.lines()
        panel.level.value = "all"
        panel.text.value = "ADDED BETA"
        assert [ln.split(" ", 1)[1].split()[0] for ln in panel.lines()] == ["info"]
        assert "1 line" in panel.count.value
        panel.text.value = "no such words"
        assert panel.lines() == [] and "No log lines match" in panel.output.value
        panel.close()
    finally:
        small.stop()


def test_panels_display_and_close_cleanly(swarm):
    ui = controller_ui(swarm)
    bundle = ui._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert ui.widget.selected_index == 0, "no backends yet: the Backends tab comes first"
    assert [ui.widget.get_title(i) for i in range(4)] == ["Backends", "Generate", "Upscale",
                                                          "Logs"]
    n = len(swarm._listeners)
    ui.close()
    assert len(swarm._listeners) == n - 4, "every panel unsubscribed"
