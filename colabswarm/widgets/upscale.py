"""Upscale panel: pick a gallery image or upload one, then a tiled upscale over every worker.

Start calls swarm.submit_upscale and returns at once. The bar is this panel's own (a Generate
run never resets it): tiles done, plus the tiles still denoising counted by the step each
worker reports, so it moves before the first tile lands.
"""

from __future__ import annotations

import concurrent.futures
import html
import itertools
import threading
from typing import Any

import ipywidgets as w
from PIL import Image

from ..errors import ColabSwarmError
from ._base import (
    COLOURS,
    Panel,
    TaskThread,
    Throttle,
    button_style,
    download_link_html,
    error_html,
    full_width,
    muted_html,
    ok_html,
    png,
    read_uploads,
    row,
    style_widget,
    swarm_open,
)
from .gallery import MAX_INLINE_BYTES
from .progress import RunInfo, run_fraction

__all__ = ["UpscalePanel"]

_NONE = ""
_GALLERY_CHOICES = 30  # the newest gallery images offered (plus the one in the viewer)


class UpscalePanel(Panel):
    """Tiled upscaling of one image. Give it the GeneratePanel to pick from its gallery."""

    def __init__(self, swarm: Any, gallery: Any = None, *, update_every: float = 0.2) -> None:
        super().__init__()
        self.swarm = swarm
        self.gallery_panel = gallery
        self.result: Any = None
        self.future: concurrent.futures.Future | None = None
        self._source_label: str | None = None
        self._lock = threading.RLock()
        self._uploads: dict[str, tuple[str, Image.Image]] = {}
        self._upload_ids = itertools.count(1)
        self._last_selected: Any = None
        self._runs: dict[int, RunInfo] = {}  # this upscale's tile runs
        self._tiles = (0, 0)  # done, total (from on_tile)
        self._running = False
        self.tasks = TaskThread("colabswarm-upscale")
        label = {"description_width": "80px"}
        short = w.Layout(width="180px")

        self.source = w.Dropdown(description="Image", options=[("(none yet)", _NONE)],
                                 value=_NONE, style=label,
                                 layout=w.Layout(width="420px"))
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="Upload",
                                   layout=w.Layout(width="auto"))
        self.scale = w.Dropdown(description="Scale", options=[2, 3, 4], value=2, style=label,
                                layout=short)
        self.upscaler = w.Combobox(description="Upscaler", value="lanczos",
                                   options=["lanczos", "tiny-upscaler"], ensure_option=False,
                                   style=label, layout=w.Layout(width="260px"))
        self.tile = w.BoundedIntText(512, min=64, max=4096, step=8, description="Tile",
                                     style=label, layout=short)
        self.overlap = w.BoundedIntText(64, min=0, max=1024, step=8, description="Overlap",
                                        style=label, layout=short)
        self.denoise = w.FloatSlider(0.3, min=0.0, max=1.0, step=0.05, description="Denoise",
                                     style=label, layout=w.Layout(width="340px",))
        self.steps = w.BoundedIntText(20, min=1, max=10000, description="Steps", style=label,
                                      layout=short)
        self.prompt = full_width(w.Text(description="Prompt",
                                        placeholder="blank: the image's own prompt",
                                        style=label))
        self.start_button = w.Button(description="Start", style=button_style("success"),
                                     icon="expand", layout=w.Layout(width="auto"))
        self.progress = w.FloatProgress(value=0.0, min=0.0, max=1.0,
                                        layout=w.Layout(flex="2 1 200px", min_width="120px"))
        self.progress_text = w.HTML(muted_html("tiles"),
                                    layout=w.Layout(flex="1 1 200px", min_width="0"))
        self.message = w.HTML()
        self.result_image = w.Image(format="png", layout=w.Layout(display="none",))
        self.result_text = w.HTML()
        self.download = w.HTML()

        self.start_button.on_click(lambda _b: self.start())
        self.upload.observe(self._on_upload, "value")
        self.widget = w.VBox([
            style_widget(),
            w.HTML("<h3 style='margin:0'>Upscale</h3>"),
            row([self.source, self.upload]),
            row([self.scale, self.upscaler, self.tile, self.overlap, self.steps]),
            self.denoise,
            self.prompt,
            row([self.start_button]),
            row([self.progress_text, self.progress]),
            self.message,
            self.result_image,
            self.result_text,
            self.download,
        ], layout=w.Layout(width="100%"))
        self.widget.add_class("colabswarm")
        self.widget.add_class("colabswarm-upscale")
        self._draw = Throttle(self._show_progress, update_every, "colabswarm-upscale-draw")
        self._closers += [self._draw.stop, self.tasks.stop]
        if hasattr(swarm, "subscribe"):
            self._closers.append(swarm.subscribe(self._on_event))
        if gallery is not None:
            self._closers.append(gallery.on_gallery_change(self.refresh))
        self.refresh()

    # ----- sources ---------------------------------------------------------------------------
    def _gallery_sources(self) -> list[tuple[str, str, Any]]:
        if self.gallery_panel is None:
            return []
        images = list(self.gallery_panel.images)[-_GALLERY_CHOICES:]
        selected = getattr(self.gallery_panel, "selected", None)
        if selected is not None and all(g is not selected for g in images):
            images.append(selected)
        out = []
        for g in reversed(images):  # newest first
            label = (f"seed {g.seed} · {g.params.get('width')}x{g.params.get('height')} · "
                     f"{str(g.params.get('prompt', ''))[:30]}")
            out.append((label, f"g{id(g)}", g))
        return out

    def refresh(self) -> None:
        """Re-list the gallery's images and uploads; follow the gallery's selected image."""
        with self._lock:
            entries = self._gallery_sources()
            options = [(label, key) for label, key, _ in entries]
            options += [(f"upload: {name} · {im.width}x{im.height}", key)
                        for key, (name, im) in self._uploads.items()]
            if not options:
                options = [("(none yet)", _NONE)]
            keep = self.source.value
            selected = getattr(self.gallery_panel, "selected", None)
            if list(self.source.options) != options:
                self.source.options = options
            keys = [k for _, k in options]
            if selected is not None and f"g{id(selected)}" in keys and \
                    self._last_selected is not selected:
                keep = f"g{id(selected)}"
            self._last_selected = selected
            self.source.value = keep if keep in keys else keys[0]
            if swarm_open(self.swarm) and hasattr(self.swarm, "upscalers"):
                names = self.swarm.upscalers()  # what the backends offer, Lanczos first
                if list(self.upscaler.options) != names:
                    self.upscaler.options = names

    def _on_upload(self, change: dict[str, Any]) -> None:
        for name, im, why in read_uploads(change):
            if im is None:
                self.message.value = error_html(why)
            else:
                self.add_image(im, name)

    def add_image(self, image: Image.Image, name: str = "image") -> None:
        """Offer a PIL image as a source, as an upload would (for code and tests)."""
        key = f"u{next(self._upload_ids)}"
        with self._lock:
            self._uploads[key] = (name, image.convert("RGB"))
        self.refresh()
        self.source.value = key

    def source_image(self) -> tuple[Image.Image, dict[str, Any]] | None:
        key = self.source.value
        if key in self._uploads:
            return self._uploads[key][1], {}
        for _label, k, g in self._gallery_sources():
            if k == key:
                return g.image, dict(g.params, seed=g.seed)
        return None

    # ----- progress (the swarm's thread only records; drawing is on this panel's thread) -----
    def _on_event(self, event: dict[str, Any]) -> None:
        if self._closed or not self._running:
            return
        kind = event.get("type")
        if kind == "run" and event.get("kind") == "upscale":
            rid = event.get("run")
            with self._lock:
                r = self._runs.get(rid)
                if r is None and not event.get("finished"):
                    r = self._runs[rid] = RunInfo(rid, "upscale", int(event.get("total") or 0))
                if r is not None and event.get("finished"):
                    r.finished, r.error = True, event.get("error")
                    r.done = int(event.get("done") or r.done)
        elif kind == "image" and event.get("run") in self._runs:
            r = self._runs[event["run"]]
            r.done = max(r.done, int(event.get("done") or 0))
        if kind in ("run", "image", "progress"):
            self._draw()

    def _show_progress(self) -> None:
        with self._lock:
            runs = list(self._runs.values())
            done, total = self._tiles
        flights = self.swarm.flights() if runs and swarm_open(self.swarm) else []
        partial = sum(run_fraction(r, flights) - r.done for r in runs if not r.finished)
        total = max(total, sum(r.total for r in runs))
        value = min(float(total), done + max(0.0, partial))
        self.progress.max = float(max(1, total))
        self.progress.value = value
        if total:
            self.progress_text.value = (f"<span style='color:{COLOURS['text']}'>{done} of "
                                        f"{total} tiles ({100 * value / total:.0f}%)</span>")

    def _on_tile(self, done: int, total: int) -> None:
        with self._lock:
            self._tiles = (done, total)
        self._draw()

    # ----- run -------------------------------------------------------------------------------
    def start(self) -> concurrent.futures.Future | None:
        """What Start does: submit the upscale and return at once."""
        src = self.source_image()
        if src is None:
            self.message.value = error_html("Pick an image from the gallery (generate one "
                                            "first) or upload one.")
            return None
        image, params = src
        with self._lock:
            self._runs, self._tiles, self._running = {}, (0, 0), True
        self.progress.value, self.progress.max = 0.0, 1.0
        self.progress.bar_style = "info"
        self.progress_text.value = muted_html("starting…")
        self.download.value = ""
        try:
            fut = self.swarm.submit_upscale(
                image, scale=int(self.scale.value), upscaler=self.upscaler.value.strip(),
                tile=int(self.tile.value), overlap=int(self.overlap.value),
                denoise=float(self.denoise.value),
                prompt=self.prompt.value or str(params.get("prompt", "")),
                negative_prompt=str(params.get("negative_prompt", "")),
                seed=params.get("seed"), steps=int(self.steps.value),
                cfg=float(params.get("cfg", 7.0)), model=params.get("model"),
                on_tile=self._on_tile,
            )
        except (ColabSwarmError, ValueError) as exc:
            self._running = False
            self.message.value = error_html(str(exc))
            return None
        self.future = fut
        self._source_label = self.source.label
        self.message.value = ok_html(f"Upscaling {image.width}x{image.height} "
                                     f"x{self.scale.value}...")
        # the callback runs on the swarm's thread: the PNG of a big result is made on ours
        fut.add_done_callback(lambda f: self.tasks.submit(lambda: self._finished(f)))
        return fut

    def _finished(self, fut: concurrent.futures.Future) -> None:
        if self._closed:
            return
        with self._lock:  # wait() may render it too: once, and `result` set last
            self._running = False
            if fut.cancelled() or fut.exception() is not None:
                self.message.value = error_html(str(fut.exception() or "Cancelled."))
                self.progress.bar_style = "danger"
                return
            r = fut.result()
            if self.result is r:
                return
            self._tiles = (r.tiles, r.tiles)
            self.progress.bar_style = "success"
            self.progress.max = float(max(1, r.tiles))
            self.progress.value = self.progress.max
            self.progress_text.value = (f"<span style='color:{COLOURS['text']}'>{r.tiles} of "
                                        f"{r.tiles} tiles (100%)</span>")
            saved = r.path is not None and r.path.exists()
            data = r.path.read_bytes() if saved else png(r.image)  # saved: with parameters
            self.result_image.value = data
            self.result_image.layout.display = ""
            self.result_image.layout.width = f"{min(768, r.image.width)}px"
            where = f", saved as <code>{html.escape(str(r.path))}</code>" if r.path else ""
            self.result_text.value = (f"<span style='color:{COLOURS['text']}'>"
                                      f"{html.escape(self._source_label or '')} &rarr; "
                                      f"{r.image.width}x{r.image.height} from {r.tiles} tiles "
                                      f"on {html.escape(', '.join(r.backends))} in "
                                      f"{r.seconds:.1f}s{where}</span>")
            self.download.value = (
                download_link_html(data, f"upscaled-{r.image.width}x{r.image.height}.png",
                                   "image/png", "Download PNG")
                if len(data) <= MAX_INLINE_BYTES else
                muted_html("(too large for a link in the page: use the saved file)"))
            self.message.value = ok_html("Done.")
            self.result = r

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the current upscale is back; returns its result."""
        if self.future is None:
            return None
        fut = self.future
        r = fut.result(timeout)
        self._finished(fut)  # the done-callback may still be on its way: show it now
        return r
