"""The panels driven as a person would (set values, click buttons) against real workers.

Assertions are on what the person sees: border colours, labels, gallery thumbnails, messages.
"""

from __future__ import annotations

import concurrent.futures
import io
import re
import time
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

pytest.importorskip("ipywidgets")

from PIL import Image  # noqa: E402

from colabswarm.swarm import Swarm  # noqa: E402
from colabswarm.widgets import (  # noqa: E402
    BackendsPanel,
    GeneratePanel,
    LogsPanel,
    UpscalePanel,
    WorkerPanel,
    controller_ui,
)
from tests.conftest import WorkerProcess, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def workers():
    """Two tiny-model workers on threads of this process (fast to start, real HTTP)."""
    from colabswarm.backend.serve import start_worker

    hs = [start_worker("tiny", name=n) for n in ("alpha", "beta")]
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


# ----- backends --------------------------------------------------------------------------
def test_rows_change_colour_when_a_worker_dies_and_comes_back(swarm, spawn, worker_procs):
    env = {"OMP_NUM_THREADS": "1"}
    proc = spawn(name="peer", env=env)
    panel = BackendsPanel(swarm)
    assert "No backends yet" in panel.empty.value
    panel.share_text.value = proc.share
    panel.add_button.click()
    assert "Added peer" in panel.message.value
    assert panel.share_text.value == "", "an added line leaves the box"
    row = panel.rows["peer"]
    assert row.colour == "green" and "green" in row.box.layout.border
    assert row.status_text.startswith("running")

    def restart() -> None:
        nonlocal proc
        proc = WorkerProcess(name="peer", token=proc.token, port=proc.port, env=env)
        worker_procs.append(proc)
        proc.start()
        panel.check_button.click()  # a person presses "Check now" rather than wait
        wait_until(lambda: row.colour == "green", what="green again")

    row.allow_idle.value = True  # the row's checkbox writes to the swarm
    assert swarm.backends[0]["allow_idle"] is True
    proc.kill()
    wait_until(lambda: row.colour == "grey", what="an AllowIdle peer going grey")
    assert "grey" in row.box.layout.border and row.status_text.startswith("idle")
    restart()

    row.allow_idle.value = False
    proc.kill()
    wait_until(lambda: row.colour == "red", what="red without AllowIdle")
    assert "red" in row.box.layout.border
    assert row.status_text.startswith("errored: ") and len(row.status_text) > 12, \
        "an errored row says why"
    restart()
    assert row.status_text.startswith("running")


def test_bad_share_strings_show_errors_in_the_panel_not_tracebacks(swarm, workers):
    panel = BackendsPanel(swarm)
    good = workers[0].share
    panel.share_text.value = f"not a share string\n{good}\nhttp://127.0.0.1:9#token={'x' * 24}"
    panel.add_button.click()  # must not raise
    msg = panel.message.value
    assert "Could not add not a share string" in msg and "token" in msg
    assert "Could not add http://127.0.0.1:9" in msg
    assert "Added alpha" in msg
    assert "x" * 24 not in msg, "tokens never appear in messages"
    assert panel.share_text.value.splitlines() == [
        "not a share string", f"http://127.0.0.1:9#token={'x' * 24}"], "failed lines stay"
    assert list(panel.rows) == ["alpha"]
    panel.share_text.value = good
    panel.add_button.click()
    assert "already registered" in panel.message.value
    panel.share_text.value = "   "
    panel.add_button.click()
    assert "Paste a share string first" in panel.message.value


def test_rows_reorder_disable_and_remove(swarm, workers):
    panel = BackendsPanel(swarm)
    panel.add("\n".join(h.share for h in workers))
    order = lambda: [r.name for r in panel.rows.values() if r.box in panel.rows_box.children]  # noqa: E731
    assert [s["name"] for s in swarm.backends] == ["alpha", "beta"]
    panel.rows["alpha"].down.click()
    wait_until(lambda: [c for c in panel.rows_box.children] ==
          [panel.rows["beta"].box, panel.rows["alpha"].box], what="reorder")
    assert [s["name"] for s in swarm.backends] == ["beta", "alpha"]
    assert sorted(order()) == ["alpha", "beta"]
    beta = panel.rows["beta"]
    beta.enabled.value = False
    wait_until(lambda: beta.colour == "orange", what="disabled is orange")
    assert beta.status_text.startswith("disabled")
    beta.enabled.value = True
    wait_until(lambda: beta.colour == "green", what="enabled again")
    beta.slots.value = 3
    assert swarm.backends[0]["slots"] == 3
    beta.remove.click()
    wait_until(lambda: list(panel.rows) == ["alpha"], what="removal")
    assert [s["name"] for s in swarm.backends] == ["alpha"]
    assert "1 backend: 1 running" in panel.summary.value
    panel.close()


# ----- generate --------------------------------------------------------------------------
def test_gallery_fills_and_the_queue_line_counts_down(swarm, workers):
    for h in workers:
        swarm.add(h.share)
    rows = BackendsPanel(swarm, update_every=0.05)
    panel = GeneratePanel(swarm, update_every=0.05)
    assert "tiny" in [v for _, v in panel.model.options]
    assert "outputs" not in panel.output_folder.value and "out" in panel.output_folder.value
    _generate_form(panel, images=24, size=64, steps=30)
    seen: list[str] = []
    t0 = time.monotonic()
    panel.generate_button.click()
    assert time.monotonic() - t0 < 1.0, "Generate must return at once"
    fut = panel.futures[-1]
    while not fut.done() or not seen or not seen[-1].startswith("0 current"):
        if not seen or seen[-1] != panel.queue.value:
            seen.append(panel.queue.value)
        time.sleep(0.01)
        assert time.monotonic() - t0 < 30, seen
    counts = [int(s.split()[0]) for s in seen]
    busy = [c for c in counts if c > 0]
    # the whole count, then at least one step between it and zero (images arrive a batch at
    # a time, and two workers' batches may land together)
    assert len(set(busy)) >= 2 and counts[-1] == 0, f"the queue line should count down: {seen}"
    start = counts.index(busy[0])
    assert counts[start:] == sorted(counts[start:], reverse=True), f"counts down: {seen}"
    assert seen[-1].startswith("0 current generations, 0 running, 0 queued"), seen
    assert len(panel.gallery.children) == 24 and len(panel.images) == 24
    wait_until(lambda: panel.progress.description == "24/24", what="progress 24/24")
    assert panel.progress.value == panel.progress.max == 24
    assert "Done: 24 images" in panel.message.value
    # every thumbnail is a PNG; its button opens it large with its parameters
    thumb = panel.gallery.children[0]
    img, button = thumb.children
    assert Image.open(io.BytesIO(img.value)).size == (64, 64)
    seed = int(button.description)
    button.click()
    assert panel.selected is not None and panel.selected.seed == seed
    assert f"Seed: {seed}" in panel.viewer_text.value and "a red fox" in panel.viewer_text.value
    assert Image.open(io.BytesIO(panel.viewer_image.value)).size == (64, 64)
    assert sorted(g.seed for g in panel.images) == list(range(100, 124))

    def made() -> int:  # what the Backends rows say each worker made
        return sum(int(re.search(r"(\d+) images", r.status_text).group(1))
                   for r in rows.rows.values())

    wait_until(lambda: made() == 24, what="the rows to count 24 images")
    panel.close()
    rows.close()


def test_a_second_click_queues_more_and_bad_input_is_a_message(swarm, workers):
    swarm.add(workers[0].share)
    panel = GeneratePanel(swarm)
    _generate_form(panel, images=3, seed="")
    panel.generate_button.click()
    panel.generate_button.click()  # while the first runs: queues three more
    results = panel.wait(timeout=30)
    assert [len(r.images) for r in results] == [3, 3]
    wait_until(lambda: len(panel.gallery.children) == 6, what="six thumbnails")
    panel.width.value = 100
    panel.generate_button.click()  # must not raise
    assert "multiple of 8" in panel.message.value
    panel.width.value = 64
    panel.seed.value = "abc"
    panel.generate_button.click()
    assert "Seed must be a whole number" in panel.message.value
    assert len(panel.futures) == 2
    panel.close()


def test_interrupt_stops_the_run_and_says_so(swarm, workers):
    swarm.add(workers[0].share)
    panel = GeneratePanel(swarm)
    _generate_form(panel, images=400, size=128, steps=20)
    panel.generate_button.click()
    wait_until(lambda: len(panel.images) >= 1, what="a first image")
    panel.interrupt_button.click()
    wait_until(lambda: "Interrupted with" in panel.message.value, what="interrupted message")
    wait_until(lambda: panel.queue.value.startswith("0 current"), what="empty queue")
    assert 1 <= len(panel.images) < 400
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
    assert panel.progress.description == "4/4 tiles" and panel.progress.value == 4
    assert Image.open(io.BytesIO(panel.result_image.value)).size == (192, 144)
    assert "192x144 from 4 tiles on a, b" in panel.result_text.value


def test_upscale_a_gallery_image_over_two_workers(swarm, workers):
    for h in workers:
        swarm.add(h.share)
    ui = controller_ui(swarm)
    gen, up = ui.generate, ui.upscale
    _generate_form(gen, images=2, size=64, steps=4)
    gen.generate_button.click()
    gen.wait(30)
    wait_until(lambda: len(up.source.options) == 2, what="the gallery in the upscale dropdown")
    gen.gallery.children[1].children[1].click()  # picking a thumbnail picks the source
    assert up.source.value == f"g{id(gen.images[1])}"
    up.scale.value, up.tile.value, up.overlap.value, up.steps.value = 2, 64, 16, 4
    up.start_button.click()
    r = up.wait(60)
    assert r.image.size == (128, 128)
    assert up.progress.value == up.progress.max == r.tiles and r.tiles >= 4
    assert Image.open(io.BytesIO(up.result_image.value)).size == (128, 128)
    assert "128x128 from" in up.result_text.value
    assert f"seed {gen.images[1].seed}" in up.result_text.value, "it says which image it grew"
    assert len(gen.images) == 2, "upscale tiles are not gallery pictures"
    ui.close()


# ----- worker and logs -------------------------------------------------------------------
def test_worker_panel_shows_share_qr_health_and_stops(swarm):
    from colabswarm.backend.serve import start_worker

    handle = start_worker("tiny", name="mine")
    panel = WorkerPanel(handle, refresh_every=None)
    try:
        assert panel.share.value == handle.share and "#token=" in panel.share.value
        assert "navigator.clipboard.writeText" in panel.copy.value
        assert handle.token in panel.copy.value
        qr = Image.open(io.BytesIO(panel.qr.value))
        assert qr.size[0] == qr.size[1] >= 100
        text = re.sub(r"<[^>]+>", " ", panel.details.value)
        assert "ready" in text and "mine" in text and "0 served" in text and "tiny" in text
        assert "Compile" in text and "auto: off on cpu" in text  # the compiled path's state
        assert "Tunnel: none" in panel.tunnel.value
        swarm.add(handle.share)
        swarm.generate("x", images=1, width=64, height=64, steps=2)
        panel.refresh()
        assert "1 served" in panel.details.value
        panel.reopen_button.click()  # no tunnel to reopen: a message, not a traceback
        assert "no tunnel to reopen" in panel.message.value
        panel.stop_button.click()
        assert not handle.running and "stopped" in panel.details.value
        assert panel.stop_button.disabled and "Worker stopped" in panel.message.value
    finally:
        panel.close()
        handle.stop()


def test_logs_panel_filters_by_level_and_text_and_shows_skips(swarm, workers):
    from colabswarm.backend.serve import start_worker
    from colabswarm.protocol import Limits

    small = start_worker("tiny", name="small", limits=Limits(max_pixels=64 * 64))
    try:
        panel = LogsPanel(swarm, update_every=0.05)
        assert "No log lines match" in panel.output.value
        swarm.add(small.share)
        swarm.add(workers[1].share)
        swarm.generate("big", images=1, width=128, height=128, steps=2)
        wait_until(lambda: any("skip" in ln for ln in panel.lines()), what="a skip line")
        panel.level.value = "skip"
        assert panel.lines() and all(" skip " in f" {ln} " for ln in panel.lines())
        assert any("small skipped" in ln and "over its 4096 pixels" in ln
                   for ln in panel.lines()), panel.lines()
        assert "over its 4096 pixels" in panel.output.value
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
    assert len(swarm._listeners) == n - 3, "every panel unsubscribed"
