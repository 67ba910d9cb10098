"""Generate panel: parameters, Generate/Interrupt, progress, the live queue line and a gallery.

Generate calls swarm.submit_generate and returns at once, so the kernel stays free and a second
click simply queues more work. The gallery shows every txt2img image the swarm delivers, whether
it was asked for here or by `swarm.generate(...)` in a cell.
"""

from __future__ import annotations

import concurrent.futures
import html
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as w

from ..errors import ColabSwarmError
from ..swarm.outputs import GeneratedImage, parameters_text
from ._base import Panel, Throttle, error_html, ok_html, png, swarm_open, thumbnail_png

__all__ = ["GeneratePanel"]

_DEFAULT_MODEL = ""  # the dropdown's value for "whatever the backend loaded"


class GeneratePanel(Panel):
    """Prompt in, images out; every number on it comes from the swarm's events."""

    def __init__(self, swarm: Any, *, max_gallery: int = 100, thumb_size: int = 128,
                 update_every: float = 0.2) -> None:
        super().__init__()
        self.swarm = swarm
        self.max_gallery = max_gallery
        self.thumb_size = thumb_size
        self.images: list[GeneratedImage] = []  # the gallery, oldest first
        self.futures: list[concurrent.futures.Future] = []
        self.selected: GeneratedImage | None = None
        self._lock = threading.RLock()
        self._done = 0  # images delivered in the current batch of runs
        self._batch_open = False
        self._runs_seen: set[int] = set()
        self._gallery_listeners: list[Callable[[], Any]] = []
        label = {"description_width": "80px"}

        self.prompt = w.Textarea(description="Prompt", placeholder="a red fox in the snow",
                                 layout=w.Layout(width="100%", height="60px"), style=label)
        self.negative_prompt = w.Textarea(description="Negative", placeholder="blurry",
                                          layout=w.Layout(width="100%", height="40px"),
                                          style=label)
        self.model = w.Dropdown(description="Model", options=[("default", _DEFAULT_MODEL)],
                                value=_DEFAULT_MODEL, style=label)
        self.width = w.BoundedIntText(512, min=8, max=16384, step=8, description="Width",
                                      style=label, layout=w.Layout(width="180px"))
        self.height = w.BoundedIntText(512, min=8, max=16384, step=8, description="Height",
                                       style=label, layout=w.Layout(width="180px"))
        self.steps = w.BoundedIntText(20, min=1, max=10000, description="Steps", style=label,
                                      layout=w.Layout(width="180px"))
        self.cfg = w.BoundedFloatText(7.0, min=0.0, max=50.0, step=0.5, description="CFG",
                                      style=label, layout=w.Layout(width="180px"))
        self.seed = w.Text("", description="Seed", placeholder="random", style=label,
                           layout=w.Layout(width="180px"))
        self.n_images = w.BoundedIntText(1, min=1, max=10000, description="Images",
                                         style=label, layout=w.Layout(width="180px"))
        self.generate_button = w.Button(description="Generate", button_style="success",
                                        icon="play")
        self.interrupt_button = w.Button(description="Interrupt", button_style="danger",
                                         icon="stop")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="0/0",
                                      layout=w.Layout(width="60%"))
        self.queue = w.Label(swarm.status_line())
        self.message = w.HTML()
        self.output_folder = w.HTML(self._folder_html())
        self.gallery = w.Box(layout=w.Layout(display="flex", flex_flow="row wrap",
                                             width="100%"))
        self.gallery.add_class("colabswarm-gallery")
        self.viewer_image = w.Image(format="png", layout=w.Layout(display="none"))
        self.viewer_text = w.HTML()
        self.clear_button = w.Button(description="Clear gallery", icon="eraser")

        self.generate_button.on_click(lambda _b: self.generate())
        self.interrupt_button.on_click(lambda _b: self.interrupt())
        self.clear_button.on_click(lambda _b: self.clear())
        self.widget = w.VBox([
            w.HTML("<h3 style='margin:0'>Generate</h3>"),
            self.prompt, self.negative_prompt,
            w.HBox([self.model]),
            w.HBox([self.width, self.height, self.steps]),
            w.HBox([self.cfg, self.seed, self.n_images]),
            w.HBox([self.generate_button, self.interrupt_button]),
            self.message,
            w.HBox([self.progress]),
            self.queue,
            self.output_folder,
            w.HTML("<b>Gallery</b> <span style='color:#555'>(click a seed to see it large)"
                   "</span>"),
            self.gallery,
            self.clear_button,
            self.viewer_image,
            self.viewer_text,
        ])
        self.widget.add_class("colabswarm-generate")
        self._update_status = Throttle(self._show_status, update_every)
        self._closers.append(self._update_status.stop)
        self._closers.append(swarm.subscribe(self._on_event))
        self._refresh_models()

    # ----- swarm -> widgets ------------------------------------------------------------------
    def _on_event(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        kind = event.get("type")
        if kind == "image":
            self._on_image(event["image"])
        elif kind == "run":
            rid = event.get("run")
            with self._lock:
                starting = rid not in self._runs_seen
                self._runs_seen.add(rid)
                if starting and not self._batch_open:
                    self._batch_open, self._done = True, 0
        elif kind == "backend":
            self._refresh_models()
        if kind in ("image", "run", "progress", "backend"):
            self._update_status()

    def _on_image(self, g: GeneratedImage) -> None:
        if g.params.get("kind", "txt2img") != "txt2img":
            return  # an upscale tile or an img2img step, not a gallery picture
        box = self._thumbnail(g)
        with self._lock:
            if not self._batch_open:
                self._batch_open, self._done = True, 0
            self._done += 1
            self.images.append(g)
            children = (*self.gallery.children, box)
            if len(self.images) > self.max_gallery:
                self.images = self.images[-self.max_gallery:]
                children = children[-self.max_gallery:]
            self.gallery.children = children
        for listener in list(self._gallery_listeners):
            listener()

    def _thumbnail(self, g: GeneratedImage) -> w.Widget:
        side = f"{self.thumb_size}px"
        ratio = g.image.height / max(1, g.image.width)
        img = w.Image(value=thumbnail_png(g.image, self.thumb_size), format="png",
                      layout=w.Layout(width=side, height=f"{round(self.thumb_size * ratio)}px",
                                      object_fit="contain"))
        button = w.Button(description=str(g.seed), tooltip=f"seed {g.seed}, made by "
                          f"{g.backend}: click to see it large",
                          layout=w.Layout(width=side))
        button.on_click(lambda _b: self.show(g))
        return w.VBox([img, button], layout=w.Layout(margin="2px", align_items="center"))

    def _show_status(self) -> None:
        if not swarm_open(self.swarm):
            return
        status = self.swarm.status()
        with self._lock:
            if status.current == 0:
                self._batch_open = False
            total = self._done + status.current
            self.progress.max = max(1, total)
            self.progress.value = min(self._done, self.progress.max)
            self.progress.description = f"{self._done}/{total}"
            self.progress.bar_style = "success" if total and status.current == 0 else ""
        self.queue.value = status.line

    def _refresh_models(self) -> None:
        options = [("default", _DEFAULT_MODEL)] + [(m, m) for m in self.swarm.models()]
        with self._lock:
            if list(self.model.options) != options:
                keep = self.model.value
                self.model.options = options
                self.model.value = keep if keep in dict(options).values() else _DEFAULT_MODEL

    def refresh(self) -> None:
        """Re-read the models and the queue line now (the swarm's events do this too)."""
        self._refresh_models()
        self._show_status()

    def _folder_html(self) -> str:
        folder = getattr(self.swarm, "output_dir", None)
        if folder is None:
            return "<span style='color:#555'>Images are not saved (output_dir=None).</span>"
        return (f"<span style='color:#555'>Saving PNGs with their parameters to</span> "
                f"<code>{html.escape(str(Path(folder).resolve()))}</code>")

    # ----- widgets -> swarm ------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The form as submit_generate arguments; ValueError says what to fix."""
        seed_text = self.seed.value.strip()
        seed: int | None = None
        if seed_text not in ("", "-1"):
            try:
                seed = int(seed_text)
            except ValueError:
                raise ValueError(f"Seed must be a whole number, or blank for random "
                                 f"(got {seed_text!r}).") from None
        return {
            "prompt": self.prompt.value,
            "images": int(self.n_images.value),
            "seed": seed,
            "negative_prompt": self.negative_prompt.value,
            "width": int(self.width.value),
            "height": int(self.height.value),
            "steps": int(self.steps.value),
            "cfg": float(self.cfg.value),
            "model": self.model.value or None,
        }

    def generate(self) -> concurrent.futures.Future | None:
        """What the Generate button does: queue the form's request and return at once."""
        try:
            params = self.params()
            fut = self.swarm.submit_generate(**params)
        except (ColabSwarmError, ValueError) as exc:
            self.message.value = error_html(str(exc))
            return None
        self.futures.append(fut)
        n = params["images"]
        hint = "" if self.swarm.backends else " Add a backend in the Backends panel to start."
        self.message.value = ok_html(f"Queued {n} image{'s' if n != 1 else ''}.{hint}")
        fut.add_done_callback(self._finished)
        self._update_status()
        return fut

    def _finished(self, fut: concurrent.futures.Future) -> None:
        if self._closed:
            return
        with self._lock:
            if fut.cancelled():
                self.message.value = error_html("Cancelled.")
            elif fut.exception() is not None:
                self.message.value = error_html(str(fut.exception()))
            elif all(f.done() for f in self.futures):
                r = fut.result()
                self.message.value = ok_html(f"Done: {len(r.images)} images in "
                                             f"{r.seconds:.1f}s.")
        self._update_status()

    def wait(self, timeout: float | None = None) -> list[Any]:
        """Block until everything queued from this panel is back (for scripts and CI cells)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for fut in list(self.futures):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out.append(fut.result(left))
        return out

    def interrupt(self) -> None:
        """Stop everything the swarm is doing; finished images stay in the gallery."""
        n = self.swarm.interrupt()
        with self._lock:  # a run's own "Interrupted with k of n" may have arrived first: keep it
            if not n:
                self.message.value = ok_html("Nothing to interrupt.")
            elif "Interrupted with" not in self.message.value:
                self.message.value = error_html(f"Interrupted {n} request(s).")
        self._update_status()

    def show(self, g: GeneratedImage) -> None:
        """Show one image large with its parameters (what a thumbnail's button does)."""
        self.selected = g
        width = max(256, min(512, g.image.width))
        self.viewer_image.value = png(g.image)
        self.viewer_image.layout.display = ""
        self.viewer_image.layout.width = f"{width}px"
        where = f"<br>saved as <code>{html.escape(str(g.path))}</code>" if g.path else ""
        self.viewer_text.value = (
            f"<pre style='white-space:pre-wrap'>"
            f"{html.escape(parameters_text(g.params, g.seed, g.backend))}</pre>"
            f"<span style='color:#555'>{g.image.width}x{g.image.height}, "
            f"{g.seconds:.2f}s on {html.escape(g.backend)}</span>{where}"
        )
        for listener in list(self._gallery_listeners):
            listener()

    def clear(self) -> None:
        with self._lock:
            self.images = []
            self.gallery.children = ()
            self.selected = None
            self.viewer_image.layout.display = "none"
            self.viewer_text.value = ""
        for listener in list(self._gallery_listeners):
            listener()

    def on_gallery_change(self, listener: Callable[[], Any]) -> Callable[[], None]:
        """Call listener() when the gallery or the selected image changes (Upscale panel)."""
        self._gallery_listeners.append(listener)
        return lambda: self._gallery_listeners.remove(listener) \
            if listener in self._gallery_listeners else None
