"""Generate panel: the form (prompt or prompt list, size, steps, sampler, LoRAs, clip skip,
img2img, X/Y grids), Generate/Interrupt, the queue line, one progress bar per run and the
gallery (gallery.py).

Generate calls swarm.submit_generate and returns at once, so the kernel stays free and a second
click simply queues more work. The gallery shows every image of a generate or grid run the
swarm delivers, whether it was asked for here or by `swarm.generate(...)` in a cell.

The swarm's listeners run on its own event-loop thread, which serves every worker: this panel's
listener only records the event and asks its own threads to draw (progress.py's bars, the
gallery's thumbnails), so a gallery of thousands never slows dispatch.
"""

from __future__ import annotations

import concurrent.futures
import csv
import html
import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as w
from PIL import Image

from ..errors import ColabSwarmError
from ..samplers import DEFAULT_SAMPLER, canonical_sampler
from ..swarm.grid import AXES, Axis
from ..swarm.outputs import GeneratedImage
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
    thumbnail_jpeg,
)
from .gallery import MAX_INLINE_BYTES, Gallery
from .progress import RunBars, RunInfo, queue_line

__all__ = ["GeneratePanel", "parse_values"]

_DEFAULT_MODEL = ""  # the dropdown's value for "whatever the backend loaded"
_KINDS = ("generate", "grid")  # the runs this panel shows (upscale tiles are the Upscale's)
_HISTORY = 15
_NO_Y = ""


def parse_values(text: str) -> list[str]:
    """Comma-separated axis values, as A1111's X/Y plot reads them: a value with a comma goes
    in double quotes ("a, b", c)."""
    text = text.strip()
    if not text:
        return []
    return [v.strip() for v in next(csv.reader([text], skipinitialspace=True)) if v.strip()]


def _axis_options(loras: list[str]) -> list[tuple[str, str]]:
    out = [(Axis(a, ()).title, a) for a in AXES if not a.startswith("lora:")]
    out += [(f"LoRA {n} weight", f"lora:{n}") for n in loras]
    return out


class GeneratePanel(Panel):
    """Prompt in, images out; every number on it comes from the swarm's events."""

    def __init__(self, swarm: Any, *, page: int = 60, keep: int = 1000,
                 keep_bytes: int = 384 * 2**20, thumb_size: int = 128,
                 update_every: float = 0.2) -> None:
        super().__init__()
        self.swarm = swarm
        self.futures: list[concurrent.futures.Future] = []
        self.runs: dict[int, RunInfo] = {}
        self.history: list[tuple[str, str, bool]] = []  # (prompt, negative, prompt list)
        self.grid_result: Any = None
        self.grid_future: concurrent.futures.Future | None = None
        self._lock = threading.RLock()
        self._init_images: dict[str, tuple[str, Any]] = {}
        self._init_ids = itertools.count(1)
        self._loras: dict[str, w.BoundedFloatText] = {}
        self._backends_changed = False
        self._setting_history = False
        self.tasks = TaskThread("colabswarm-generate")
        label = {"description_width": "80px"}
        num = w.Layout(width="170px")  # two to a row in a 360 px output

        # ----- the form --------------------------------------------------------------------
        self.prompt = full_width(w.Textarea(
            description="Prompt", placeholder="a red fox in the snow", style=label,
            layout=w.Layout(height="64px")))
        self.negative_prompt = full_width(w.Textarea(
            description="Negative", placeholder="blurry", style=label,
            layout=w.Layout(height="42px")))
        self.prompt_list = w.Checkbox(description="one prompt per line", indent=False,
                                      tooltip="a prompt list: each line is a prompt, and "
                                              "Images is how many of each",
                                      layout=w.Layout(width="auto"))
        self.history_pick = w.Dropdown(description="Recent", options=[("(prompts used here)",
                                                                       -1)],
                                       value=-1, style={"description_width": "50px"},
                                       layout=w.Layout(width="320px"))
        self.model = w.Dropdown(description="Model", options=[("default", _DEFAULT_MODEL)],
                                value=_DEFAULT_MODEL, style=label,
                                layout=w.Layout(width="300px"))
        self.sampler = w.Dropdown(description="Sampler",
                                  options=[(DEFAULT_SAMPLER, DEFAULT_SAMPLER)],
                                  value=DEFAULT_SAMPLER, style=label,
                                  layout=w.Layout(width="300px"))
        self.width = w.BoundedIntText(512, min=8, max=16384, step=8, description="Width",
                                      style=label, layout=num)
        self.height = w.BoundedIntText(512, min=8, max=16384, step=8, description="Height",
                                       style=label, layout=num)
        self.steps = w.BoundedIntText(20, min=1, max=10000, description="Steps", style=label,
                                      layout=num)
        self.cfg = w.BoundedFloatText(7.0, min=0.0, max=50.0, step=0.5, description="CFG",
                                      style=label, layout=num)
        self.seed = w.Text("", description="Seed", placeholder="random", style=label,
                           layout=num)
        self.n_images = w.BoundedIntText(1, min=1, max=10000, description="Images",
                                         style=label, layout=num)
        self.clip_skip = w.BoundedIntText(1, min=1, max=12, description="Clip skip",
                                          style=label, layout=num,
                                          tooltip="A1111's count: 1 = the last layer, 2 = the "
                                                  "one before")

        # LoRAs
        self.lora_name = w.Dropdown(description="LoRA", options=[("(none offered)", "")],
                                    value="", style=label,
                                    layout=w.Layout(width="300px"))
        self.lora_weight = w.BoundedFloatText(0.8, min=-4.0, max=4.0, step=0.05,
                                              description="weight", style=label, layout=num)
        self.lora_add = w.Button(description="Add LoRA", icon="plus",
                                 layout=w.Layout(width="auto"))
        self.lora_rows = w.VBox()
        self.lora_note = w.HTML(muted_html(
            "A LoRA runs only on workers that have it (the same file). <lora:name:0.8> in "
            "the prompt works too."))
        lora_box = w.VBox([row([self.lora_name, self.lora_weight, self.lora_add]),
                           self.lora_rows, self.lora_note])

        # img2img
        self.init_source = w.Dropdown(description="Init image",
                                      options=[("none: txt2img", "")], value="",
                                      style=label,
                                      layout=w.Layout(width="340px"))
        self.init_upload = w.FileUpload(accept="image/*", multiple=False, description="Upload",
                                        layout=w.Layout(width="auto"))
        self.strength = w.FloatSlider(0.75, min=0.05, max=1.0, step=0.05,
                                      description="Strength", style=label,
                                      layout=w.Layout(width="340px"))
        self.init_preview = w.Image(format="jpeg", layout=w.Layout(display="none",
                                                                   width="96px"))
        init_box = w.VBox([
            row([self.init_source, self.init_upload]),
            row([self.strength, self.init_preview]),
            w.HTML(muted_html("Pick a gallery image with its viewer's \"Use as init image\", "
                              "or upload one; it is resized to Width x Height.")),
        ])

        # X/Y grid
        opts = _axis_options([])
        self.grid_x = w.Dropdown(description="X axis", options=opts, value="cfg", style=label,
                                 layout=w.Layout(width="300px"))
        self.grid_x_values = w.Text(description="values", placeholder="5, 7, 9", style=label,
                                    layout=w.Layout(width="300px"))
        self.grid_y = w.Dropdown(description="Y axis", options=[("none", _NO_Y), *opts],
                                 value=_NO_Y, style=label,
                                 layout=w.Layout(width="300px"))
        self.grid_y_values = w.Text(description="values",
                                    placeholder="Euler, DPM++ 2M Karras", style=label,
                                    layout=w.Layout(width="300px"))
        self.grid_button = w.Button(description="Make grid", icon="th",
                                    style=button_style("success"),
                                    layout=w.Layout(width="auto"))
        self.grid_message = w.HTML()
        self.grid_image = w.Image(format="png", layout=w.Layout(display="none",))
        self.grid_caption = w.HTML()
        grid_box = w.VBox([
            row([self.grid_x, self.grid_x_values]),
            row([self.grid_y, self.grid_y_values]),
            w.HTML(muted_html("Values are comma-separated (quote one that holds a comma). "
                              "Prompt S/R: the first value is the text to find in the prompt, "
                              "each value replaces it in turn. The grid uses the form above "
                              "(one image per cell, the same seed) and its cells also go to "
                              "the gallery.")),
            row([self.grid_button]),
            self.grid_message,
            self.grid_image,
            self.grid_caption,
        ])
        self.more = w.Accordion(children=[lora_box, init_box, grid_box],
                                titles=("LoRAs", "img2img", "X/Y grid"), selected_index=None)

        self.generate_button = w.Button(description="Generate", style=button_style("success"),
                                        icon="play", layout=w.Layout(width="auto"))
        self.interrupt_button = w.Button(description="Interrupt", style=button_style("danger"),
                                         icon="stop", layout=w.Layout(width="auto"))
        self.message = w.HTML()
        self.queue = w.HTML(queue_line(swarm.status()))
        self.bars = RunBars("images")
        self.output_folder = w.HTML(self._folder_html())
        folder = getattr(swarm, "output_dir", None)
        self.gallery = Gallery(page=page, keep=keep, keep_bytes=keep_bytes,
                               thumb_size=thumb_size,
                               folder=Path(folder).resolve() if folder is not None else None)
        self.gallery.on_reuse = self.reuse
        self.gallery.on_reuse_seed = self.reuse_seed
        self.gallery.on_init_image = self.use_as_init

        self.generate_button.on_click(lambda _b: self.generate())
        self.interrupt_button.on_click(lambda _b: self.interrupt())
        self.lora_add.on_click(lambda _b: self.add_lora(self.lora_name.value,
                                                        self.lora_weight.value))
        self.init_upload.observe(self._on_upload, "value")
        self.init_source.observe(lambda _c: self._show_init_preview(), "value")
        self.grid_button.on_click(lambda _b: self.make_grid())
        self.history_pick.observe(self._on_history, "value")
        self.widget = w.VBox([
            style_widget(),
            w.HTML("<h3 style='margin:0'>Generate</h3>"),
            self.prompt, self.negative_prompt,
            row([self.history_pick, self.prompt_list]),
            row([self.model, self.sampler]),
            row([self.width, self.height, self.steps, self.cfg, self.seed, self.n_images,
                 self.clip_skip]),
            self.more,
            row([self.generate_button, self.interrupt_button]),
            self.message,
            self.queue,
            self.bars.widget,
            self.output_folder,
            self.gallery.widget,
        ], layout=w.Layout(width="100%"))
        self.widget.add_class("colabswarm")
        self.widget.add_class("colabswarm-generate")
        self._update_status = Throttle(self._show_status, update_every,
                                       "colabswarm-generate-status")
        self._closers += [self._update_status.stop, self.gallery.close, self.tasks.stop]
        self._closers.append(swarm.subscribe(self._on_event))
        self._refresh_choices()

    # ----- swarm -> widgets (on the swarm's thread: record and hand over, nothing more) -----
    def _on_event(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        kind = event.get("type")
        if kind == "image":
            self._on_image(event)
        elif kind == "run":
            self._on_run(event)
        elif kind == "backend":
            self._backends_changed = True
        if kind in ("image", "run", "progress", "backend"):
            self._update_status()

    def _on_run(self, event: dict[str, Any]) -> None:
        rid, rkind = event.get("run"), event.get("kind")
        if rkind not in _KINDS or rid is None:
            return
        with self._lock:
            r = self.runs.get(rid)
            if r is None:
                if event.get("finished"):
                    return
                r = self.runs[rid] = RunInfo(rid, rkind, int(event.get("total") or 0),
                                             label="X/Y grid" if rkind == "grid" else "")
            if event.get("finished"):
                r.finished, r.error = True, event.get("error")
                r.done = int(event.get("done") or r.done)
                r.ended = time.monotonic()
                ended = [x for x in self.runs.values() if x.finished]
                for old in ended[:-3]:  # keep the last few finished runs
                    self.runs.pop(old.id, None)

    def _on_image(self, event: dict[str, Any]) -> None:
        g: GeneratedImage = event["image"]
        rid = event.get("run")
        with self._lock:
            r = self.runs.get(rid) if rid is not None else None
            if r is None:
                # a run that began before this panel existed: judge by the image itself
                if g.params.get("kind", "txt2img") not in ("txt2img", "img2img") or \
                        "upscale" in g.params:
                    return
                if rid is not None:
                    r = self.runs[rid] = RunInfo(rid, "generate", int(event.get("total") or 0))
            if r is not None:
                r.done = max(r.done, int(event.get("done") or 0))
                if not r.label and r.kind == "generate":
                    r.label = _short(str(g.params.get("prompt", "")), 48)
        self.gallery.add(g, rid)

    def _show_status(self) -> None:
        if not swarm_open(self.swarm):
            return
        if self._backends_changed:
            self._backends_changed = False
            self._refresh_choices()
        status = self.swarm.status()
        flights = self.swarm.flights()
        self.queue.value = html.escape(queue_line(status))
        with self._lock:
            runs = sorted(self.runs.values(), key=lambda r: r.id)
        self.bars.show(runs, flights)

    def _refresh_choices(self) -> None:
        """The model, sampler, LoRA and grid-axis choices from what the backends offer."""
        if not swarm_open(self.swarm):
            return
        models = self.swarm.models()
        samplers = self.swarm.samplers() if hasattr(self.swarm, "samplers") else []
        loras = self.swarm.loras() if hasattr(self.swarm, "loras") else []
        with self._lock:
            _set_options(self.model, [("default", _DEFAULT_MODEL)] + [(m, m) for m in models],
                         _DEFAULT_MODEL)
            keep = self.sampler.value
            opts = list(dict.fromkeys([DEFAULT_SAMPLER, *samplers, keep]))
            _set_options(self.sampler, [(s, s) for s in opts], DEFAULT_SAMPLER)
            _set_options(self.lora_name, [(n, n) for n in loras] or [("(none offered)", "")],
                         "")
            axes = _axis_options(loras)
            _set_options(self.grid_x, axes, "cfg")
            _set_options(self.grid_y, [("none", _NO_Y), *axes], _NO_Y)

    def refresh(self) -> None:
        """Re-read the choices and the queue line now (the swarm's events do this too)."""
        self._refresh_choices()
        self._show_status()

    def _folder_html(self) -> str:
        folder = getattr(self.swarm, "output_dir", None)
        if folder is None:
            return muted_html("Images are not saved (output_dir=None).")
        return (f"{muted_html('Saving PNGs with their parameters to')} "
                f"<code>{html.escape(str(Path(folder).resolve()))}</code>")

    # ----- the form ------------------------------------------------------------------------
    def lora_weights(self) -> dict[str, float]:
        return {name: float(box.value) for name, box in self._loras.items()}

    def add_lora(self, name: str, weight: float = 0.8) -> None:
        """Add a LoRA to the next generations (or change its weight)."""
        if not name:
            self.message.value = error_html("No backend offers a LoRA: a worker's owner adds "
                                            "them with --lora/--loras-dir.")
            return
        with self._lock:
            box = self._loras.get(name)
            if box is not None:
                box.value = weight
                return
            box = w.BoundedFloatText(weight, min=-4.0, max=4.0, step=0.05,
                                     description=name, style={"description_width": "initial"},
                                     layout=w.Layout(width="auto"))
            remove = w.Button(icon="times", tooltip=f"leave {name} out",
                              layout=w.Layout(width="36px"))
            self._loras[name] = box
            line = row([box, remove])
            remove.on_click(lambda _b: self._remove_lora(name))
            self.lora_rows.children = (*self.lora_rows.children, line)
            self._lora_lines = {**getattr(self, "_lora_lines", {}), name: line}
        self.more.set_title(0, f"LoRAs ({len(self._loras)})")

    def _remove_lora(self, name: str) -> None:
        with self._lock:
            self._loras.pop(name, None)
            line = getattr(self, "_lora_lines", {}).pop(name, None)
            self.lora_rows.children = tuple(c for c in self.lora_rows.children if c is not line)
        self.more.set_title(0, f"LoRAs ({len(self._loras)})" if self._loras else "LoRAs")

    def set_loras(self, loras: dict[str, float]) -> None:
        for name in list(self._loras):
            self._remove_lora(name)
        for name, weight in loras.items():
            self.add_lora(name, weight)

    def _seed(self) -> int | None:
        text = self.seed.value.strip()
        if text in ("", "-1"):
            return None
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"Seed must be a whole number, or blank for random (got "
                             f"{text!r}).") from None

    def _common(self) -> dict[str, Any]:
        sampler = self.sampler.value
        return {
            "seed": self._seed(),
            "negative_prompt": self.negative_prompt.value,
            "width": int(self.width.value),
            "height": int(self.height.value),
            "steps": int(self.steps.value),
            "cfg": float(self.cfg.value),
            "model": self.model.value or None,
            "sampler": None if sampler in (None, "", DEFAULT_SAMPLER) else sampler,
            "loras": self.lora_weights() or None,
            "clip_skip": int(self.clip_skip.value),
        }

    def params(self) -> dict[str, Any]:
        """The form as submit_generate arguments; ValueError says what to fix."""
        out: dict[str, Any] = {"prompt": self.prompt.value, "prompts": None,
                               "images": int(self.n_images.value)}
        if self.prompt_list.value:
            lines = [ln.strip() for ln in self.prompt.value.splitlines() if ln.strip()]
            if not lines:
                raise ValueError("The prompt list is empty: write one prompt per line, or "
                                 "untick \"one prompt per line\".")
            out["prompt"], out["prompts"] = None, lines
        out.update(self._common())
        init = self._init_images.get(self.init_source.value)
        out["init_image"] = init[1] if init is not None else None
        out["strength"] = float(self.strength.value)
        return out

    def apply_params(self, p: dict[str, Any], seed: int | None = None) -> None:
        """Fill the form from an image's parameters (what "Reuse parameters" does)."""
        self.prompt_list.value = False
        self.prompt.value = str(p.get("prompt") or "")
        self.negative_prompt.value = str(p.get("negative_prompt") or "")
        for box, key in ((self.width, "width"), (self.height, "height"),
                         (self.steps, "steps"), (self.cfg, "cfg"),
                         (self.clip_skip, "clip_skip")):
            if p.get(key) is not None:
                box.value = p[key]
        if seed is not None:
            self.seed.value = str(seed)
        sampler = p.get("sampler") or DEFAULT_SAMPLER
        try:
            sampler = canonical_sampler(sampler)
        except ColabSwarmError:
            sampler = DEFAULT_SAMPLER
        if sampler not in [v for _, v in self.sampler.options]:
            self.sampler.options = (*self.sampler.options, (sampler, sampler))
        self.sampler.value = sampler
        model = p.get("model") or _DEFAULT_MODEL
        values = [v for _, v in self.model.options]
        if model not in values:
            self.model.options = (*self.model.options, (model, model))
        self.model.value = model
        loras = p.get("loras") or {}
        if not isinstance(loras, dict):
            loras = {str(lo["name"]): float(lo["weight"]) for lo in loras}
        self.set_loras(loras)
        if p.get("kind") == "img2img" and p.get("strength") is not None:
            self.strength.value = float(p["strength"])

    def reuse(self, g: GeneratedImage) -> None:
        self.apply_params(g.params, seed=g.seed)
        self.message.value = ok_html(f"The form now holds the parameters of image {g.seed}.")

    def reuse_seed(self, g: GeneratedImage) -> None:
        self.seed.value = str(g.seed)
        self.message.value = ok_html(f"Seed {g.seed} is in the form.")

    def use_as_init(self, g: GeneratedImage) -> None:
        """img2img from a gallery image: it becomes the form's init image."""
        key = f"g{next(self._init_ids)}"
        prompt = _short(str(g.params.get("prompt", "")), 24)
        self._add_init(key, f"gallery: seed {g.seed} · {prompt}", g)
        self.more.selected_index = 1
        self.message.value = ok_html(f"Image {g.seed} is the init image (img2img): set the "
                                     "strength and press Generate.")

    def add_init_image(self, image: Image.Image, name: str = "image") -> None:
        """Offer a PIL image as an init image, as an upload would (code and tests)."""
        self._add_init(f"u{next(self._init_ids)}", f"upload: {name} · "
                       f"{image.width}x{image.height}", image.convert("RGB"))

    def _add_init(self, key: str, label: str, source: Any) -> None:
        with self._lock:
            self._init_images[key] = (label, source)
            opts = [("none: txt2img", "")] + [(lab, k) for k, (lab, _) in
                                               self._init_images.items()]
            self.init_source.options = opts
            self.init_source.value = key

    def _on_upload(self, change: dict[str, Any]) -> None:
        for name, im, why in read_uploads(change):
            if im is None:
                self.message.value = error_html(why)
            else:
                self.add_init_image(im, name)

    def _show_init_preview(self) -> None:
        found = self._init_images.get(self.init_source.value)
        if found is None:
            self.init_preview.layout.display = "none"
            return
        source = found[1]

        def draw() -> None:
            im = source.image if isinstance(source, GeneratedImage) else source
            self.init_preview.value = thumbnail_jpeg(im, 96)
            self.init_preview.layout.display = ""

        self.tasks.submit(draw)

    def _on_history(self, change: dict[str, Any]) -> None:
        if self._setting_history or change["new"] in (None, -1):
            return
        prompt, negative, as_list = self.history[int(change["new"])]
        self.prompt.value, self.negative_prompt.value = prompt, negative
        self.prompt_list.value = as_list
        self._setting_history = True
        try:
            self.history_pick.value = -1
        finally:
            self._setting_history = False

    def _remember(self) -> None:
        entry = (self.prompt.value, self.negative_prompt.value, bool(self.prompt_list.value))
        if not entry[0].strip():
            return
        self.history = [entry] + [h for h in self.history if h != entry][:_HISTORY - 1]
        opts = [("(prompts used here)", -1)] + [
            (_short(p.replace("\n", " / "), 70) + (f"  (negative: {_short(n, 20)})" if n else ""),
             i) for i, (p, n, _) in enumerate(self.history)]
        self._setting_history = True
        try:
            self.history_pick.options = opts
            self.history_pick.value = -1
        finally:
            self._setting_history = False

    # ----- widgets -> swarm ------------------------------------------------------------------
    def generate(self) -> concurrent.futures.Future | None:
        """What the Generate button does: queue the form's request and return at once."""
        try:
            params = self.params()
            fut = self.swarm.submit_generate(**params)
        except (ColabSwarmError, ValueError) as exc:
            self.message.value = error_html(str(exc))
            return None
        self.futures.append(fut)
        self._remember()
        n = params["images"] * (len(params["prompts"]) if params["prompts"] else 1)
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

    def grid_axes(self) -> tuple[tuple[str, list[str]] | None, tuple[str, list[str]] | None]:
        """The grid section as submit_grid's x and y; ValueError says what to fix."""
        x_vals = parse_values(self.grid_x_values.value)
        if not x_vals:
            raise ValueError(f"Give the X axis's values, comma-separated (e.g. "
                             f"{self.grid_x_values.placeholder}).")
        x = (self.grid_x.value, x_vals)
        y = None
        if self.grid_y.value != _NO_Y:
            y_vals = parse_values(self.grid_y_values.value)
            if not y_vals:
                raise ValueError("Give the Y axis's values, or set the Y axis to none.")
            y = (self.grid_y.value, y_vals)
        return x, y

    def make_grid(self) -> concurrent.futures.Future | None:
        """What "Make grid" does: one image per cell over the swarm; returns at once."""
        try:
            if self.prompt_list.value:
                raise ValueError("A grid takes one prompt: untick \"one prompt per line\" "
                                 "(a prompt S/R axis varies the prompt).")
            x, y = self.grid_axes()
            common = self._common()
            fut = self.swarm.submit_grid(self.prompt.value, x, y, common.pop("seed"),
                                         **common)
        except (ColabSwarmError, ValueError) as exc:
            self.grid_message.value = error_html(str(exc))
            return None
        self.grid_future = fut
        self._remember()
        cells = len(x[1]) * (len(y[1]) if y else 1)
        self.grid_message.value = ok_html(f"Queued a grid of {cells} cells.")
        fut.add_done_callback(lambda f: self.tasks.submit(lambda: self._grid_done(f)))
        self._update_status()
        return fut

    def _grid_done(self, fut: concurrent.futures.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.grid_message.value = error_html(str(fut.exception() or "Cancelled."))
            return
        r = fut.result()
        data = png(r.image)
        self.grid_image.value = data
        self.grid_image.layout.display = ""
        self.grid_image.layout.width = f"{min(r.image.width, 1024)}px"
        rows, cols = len(r.cells), len(r.cells[0]) if r.cells else 0
        where = (f" Saved as <code>{html.escape(str(r.path))}</code>." if r.path else "")
        link = (download_link_html(data, "colabswarm-grid.png", "image/png",
                                   "Download the grid") if len(data) <= MAX_INLINE_BYTES
                else "")
        self.grid_caption.value = (
            f"<span style='color:{COLOURS['text']}'>{cols}x{rows} grid "
            f"({r.image.width}x{r.image.height}) in {r.seconds:.1f}s; its cells are in the "
            f"gallery.{where}</span> {link}")
        self.grid_message.value = ok_html("Grid done.")
        self.grid_result = r

    def wait(self, timeout: float | None = None) -> list[Any]:
        """Block until everything queued from this panel is back and drawn (scripts, CI)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for fut in list(self.futures):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out.append(fut.result(left))
        self.gallery.wait_idle(None if deadline is None
                               else max(0.1, deadline - time.monotonic()))
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

    # ----- the gallery (for the Upscale panel, notebooks and tests) --------------------------
    @property
    def images(self) -> list[GeneratedImage]:
        """The images the gallery holds, oldest first."""
        with self.gallery._lock:
            return [e.image for e in self.gallery.entries]

    @property
    def selected(self) -> GeneratedImage | None:
        e = self.gallery.selected
        return e.image if e is not None else None

    def show(self, g: GeneratedImage) -> None:
        """Open one image in the viewer (what clicking its thumbnail does)."""
        self.gallery.select(g)

    def clear(self) -> None:
        self.gallery.clear()

    def on_gallery_change(self, listener: Callable[[], Any]) -> Callable[[], None]:
        """Call listener() when the gallery or the selected image changes (Upscale panel)."""
        return self.gallery.on_change(listener)


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _set_options(dropdown: w.Dropdown, options: list[tuple[str, Any]], default: Any) -> None:
    if list(dropdown.options) == options:
        return
    keep = dropdown.value
    dropdown.options = options
    values = [v for _, v in options]
    dropdown.value = keep if keep in values else default if default in values else values[0]
