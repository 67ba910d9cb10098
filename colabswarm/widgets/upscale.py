"""Upscale panel: pick a gallery image or upload one, then a tiled upscale over every worker.

Start calls swarm.submit_upscale and returns at once; tiles report through on_tile, so the bar
moves as tiles come back from whichever worker ran them.
"""

from __future__ import annotations

import concurrent.futures
import html
import io
import itertools
import threading
from typing import Any

import ipywidgets as w
from PIL import Image

from ..errors import ColabSwarmError
from ._base import Panel, error_html, ok_html, png, swarm_open

__all__ = ["UpscalePanel"]

_NONE = ""


class UpscalePanel(Panel):
    """Tiled upscaling of one image. Give it the GeneratePanel to pick from its gallery."""

    def __init__(self, swarm: Any, gallery: Any = None) -> None:
        super().__init__()
        self.swarm = swarm
        self.gallery_panel = gallery
        self.result: Any = None
        self.future: concurrent.futures.Future | None = None
        self._source_label: str | None = None
        self._lock = threading.RLock()
        self._uploads: dict[str, tuple[str, Image.Image]] = {}
        self._upload_ids = itertools.count(1)
        label = {"description_width": "80px"}
        short = w.Layout(width="180px")

        self.source = w.Dropdown(description="Image", options=[("(none yet)", _NONE)],
                                 value=_NONE, style=label, layout=w.Layout(width="420px"))
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="Upload")
        self.scale = w.Dropdown(description="Scale", options=[2, 3, 4], value=2, style=label,
                                layout=short)
        self.upscaler = w.Combobox(description="Upscaler", value="lanczos",
                                   options=["lanczos", "tiny-upscaler"], ensure_option=False,
                                   style=label, layout=w.Layout(width="240px"))
        self.tile = w.BoundedIntText(512, min=64, max=4096, step=8, description="Tile",
                                     style=label, layout=short)
        self.overlap = w.BoundedIntText(64, min=0, max=1024, step=8, description="Overlap",
                                        style=label, layout=short)
        self.denoise = w.FloatSlider(0.3, min=0.0, max=1.0, step=0.05, description="Denoise",
                                     style=label)
        self.steps = w.BoundedIntText(20, min=1, max=10000, description="Steps", style=label,
                                      layout=short)
        self.prompt = w.Text(description="Prompt", placeholder="blank: the image's own prompt",
                             style=label, layout=w.Layout(width="100%"))
        self.start_button = w.Button(description="Start", button_style="success",
                                     icon="expand")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="tiles",
                                      layout=w.Layout(width="60%"))
        self.message = w.HTML()
        self.result_image = w.Image(format="png", layout=w.Layout(display="none"))
        self.result_text = w.HTML()

        self.start_button.on_click(lambda _b: self.start())
        self.upload.observe(self._on_upload, "value")
        self.widget = w.VBox([
            w.HTML("<h3 style='margin:0'>Upscale</h3>"),
            w.HBox([self.source, self.upload]),
            w.HBox([self.scale, self.upscaler]),
            w.HBox([self.tile, self.overlap, self.steps]),
            self.denoise,
            self.prompt,
            self.start_button,
            self.progress,
            self.message,
            self.result_image,
            self.result_text,
        ])
        self.widget.add_class("colabswarm-upscale")
        if gallery is not None:
            self._closers.append(gallery.on_gallery_change(self.refresh))
        self.refresh()

    # ----- sources ---------------------------------------------------------------------------
    def _gallery_sources(self) -> list[tuple[str, str, Any]]:
        if self.gallery_panel is None:
            return []
        out = []
        for g in list(self.gallery_panel.images):
            label = (f"seed {g.seed} · {g.image.width}x{g.image.height} · "
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
                    getattr(self, "_last_selected", None) is not selected:
                keep = f"g{id(selected)}"
            self._last_selected = selected
            self.source.value = keep if keep in keys else keys[0]
            if swarm_open(self.swarm) and hasattr(self.swarm, "upscalers"):
                names = self.swarm.upscalers()  # what the backends offer, Lanczos first
                if list(self.upscaler.options) != names:
                    self.upscaler.options = names

    def _on_upload(self, change: dict[str, Any]) -> None:
        for f in change["new"] or ():
            name = f.get("name", "upload")
            try:
                im = Image.open(io.BytesIO(bytes(f["content"]))).convert("RGB")
            except Exception as exc:
                self.message.value = error_html(f"{name} is not an image I can read: {exc}")
                continue
            key = f"u{next(self._upload_ids)}"
            with self._lock:
                self._uploads[key] = (name, im)
            self.refresh()
            self.source.value = key

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

    # ----- run -------------------------------------------------------------------------------
    def start(self) -> concurrent.futures.Future | None:
        """What Start does: submit the upscale and return at once."""
        src = self.source_image()
        if src is None:
            self.message.value = error_html("Pick an image from the gallery (generate one "
                                            "first) or upload one.")
            return None
        image, params = src
        self.progress.value, self.progress.max = 0, 1
        self.progress.bar_style = ""
        self.progress.description = "tiles"
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
            self.message.value = error_html(str(exc))
            return None
        self.future = fut
        self._source_label = self.source.label
        self.message.value = ok_html(f"Upscaling {image.width}x{image.height} "
                                     f"x{self.scale.value}...")
        fut.add_done_callback(self._finished)
        return fut

    def _on_tile(self, done: int, total: int) -> None:
        self.progress.max = max(1, total)
        self.progress.value = min(done, self.progress.max)
        self.progress.description = f"{done}/{total} tiles"

    def _finished(self, fut: concurrent.futures.Future) -> None:
        if self._closed:
            return
        with self._lock:  # wait() may render it too: once, and `result` set last
            if fut.cancelled() or fut.exception() is not None:
                self.message.value = error_html(str(fut.exception() or "Cancelled."))
                self.progress.bar_style = "danger"
                return
            r = fut.result()
            if self.result is r:
                return
            self.progress.bar_style = "success"
            self.progress.value = self.progress.max
            self.result_image.value = png(r.image)
            self.result_image.layout.display = ""
            self.result_image.layout.width = f"{min(768, r.image.width)}px"
            where = f", saved as <code>{html.escape(str(r.path))}</code>" if r.path else ""
            self.result_text.value = (f"{html.escape(self._source_label or '')} &rarr; "
                                      f"{r.image.width}x{r.image.height} from {r.tiles} tiles "
                                      f"on {html.escape(', '.join(r.backends))} in "
                                      f"{r.seconds:.1f}s{where}")
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
