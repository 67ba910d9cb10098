"""The Generate panel's gallery: thumbnails of thousands of images, a viewer above them, and
downloads.

- Newest first, oldest first or seed order; a bounded, scrollable box that shows the first
  `page` thumbnails of that order ("Showing the newest 60 of 1,234 images"), more on request;
  the panel holds the last `keep` images, at most `keep_bytes` of PNGs (every image is also
  saved in the output folder).
- Clicking a thumbnail (anywhere on it) opens the viewer above the gallery and scrolls it into
  view; the chosen thumbnail is outlined; Prev/Next (or the arrow keys once the viewer has
  focus) step through the gallery's order.
- The viewer offers the image as a PNG with its parameters, its whole run as a zip (PNGs with
  parameters, plus a .txt of each image's parameters), "Reuse parameters", "Reuse seed" and
  "Use as init image" (the Generate panel decides what those do).

Nothing here runs on the swarm's thread: the panel hands each new image to `add()`, which
queues it for this gallery's own thread (decode, thumbnail, redraw). A thumbnail is a small
JPEG made from the worker's PNG bytes without keeping the decoded pixels.
"""

from __future__ import annotations

import html
import io
import re
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as w
from PIL import Image, PngImagePlugin

from ..backend.png import with_text
from ..swarm.outputs import GeneratedImage, parameters_text
from ._base import (
    COLOURS,
    TaskThread,
    Throttle,
    download_link_html,
    error_html,
    muted_html,
    ok_html,
    png,
    row,
    thumbnail_jpeg,
)

__all__ = ["MAX_INLINE_BYTES", "ORDERS", "Entry", "Gallery", "cap_notice", "ordered",
           "png_with_parameters", "run_zip"]

ORDERS = {"newest first": "newest", "seed order": "seed", "oldest first": "oldest"}
# The largest file offered as a link inside the page. A link's bytes travel to the browser
# inside the panel's state (base64, a third larger); much more than this makes the notebook
# slow to save and Colab's output frame sluggish. Larger runs are written to the output folder.
MAX_INLINE_BYTES = 16 * 1024 * 1024


@dataclass(eq=False)
class Entry:
    """One gallery image: what the swarm delivered, which run, and its arrival number."""

    image: GeneratedImage
    run: int | None
    number: int
    thumb: bytes | None = None
    widget: w.Box | None = None


def ordered(entries: list[Entry], order: str) -> list[Entry]:
    """The gallery's order: "newest" (last arrived first), "oldest", or "seed" (then arrival)."""
    if order == "seed":
        return sorted(entries, key=lambda e: (e.image.seed, e.number))
    if order == "oldest":
        return list(entries)
    return list(reversed(entries))


def cap_notice(shown: int, total: int, kept: int, order: str, folder: Any = None) -> str:
    """What a person must know when the gallery does not show everything."""
    if shown >= total:
        return ""
    which = {"newest": "the newest", "oldest": "the oldest", "seed": "the lowest seeds of"}
    text = (f"Showing {which.get(order, '')} {shown:,} of {total:,} images "
            f"(\"Show more\" adds more).")
    if kept < total:
        where = f" in {folder}" if folder else ""
        text += (f" The panel holds the last {kept:,}; every image is saved{where}."
                 if folder else f" The panel holds only the last {kept:,}.")
    return text


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit] or "image"


def file_name(g: GeneratedImage) -> str:
    """seed-prompt.png, as the swarm names saved files."""
    return f"{g.seed}-{_slug(str(g.params.get('prompt', '')))}.png"


def png_with_parameters(g: GeneratedImage) -> bytes:
    """The image as a PNG with its A1111 'parameters' chunk (the worker's own bytes when it
    sent them: no decode, no re-encode)."""
    text = parameters_text(g.params, g.seed, g.backend)
    if g.png is not None:
        return with_text(g.png, "parameters", text)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buf = io.BytesIO()
    g.image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def run_zip(images: list[GeneratedImage], target: Any = None) -> bytes | None:
    """A zip of images (PNG with parameters, plus the parameters as .txt), in run order. Into
    `target` (a path or file) when given, else returned as bytes. PNGs are stored, not
    compressed again (they already are)."""
    out = target if target is not None else io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        for g in sorted(images, key=lambda g: (g.index, g.seed)):
            stem = f"{g.index:04d}-{file_name(g)[:-4]}"
            z.writestr(f"{stem}.png", png_with_parameters(g))
            z.writestr(f"{stem}.txt", parameters_text(g.params, g.seed, g.backend) + "\n")
    return out.getvalue() if target is None else None


def _png_size(g: GeneratedImage) -> int:
    if g.png is not None:
        return len(g.png)
    return int(g.params.get("width", 512)) * int(g.params.get("height", 512)) * 3


# Runs when the viewer's (hidden) trigger is drawn: scrolls the viewer into view, waits for
# the big image to load and scrolls again, and lets the arrow keys step while it has focus.
_VIEW_JS = (
    "var r=this.closest('.colabswarm'),v=r&&r.querySelector('.colabswarm-viewer');if(!v)return;"
    "if(!v.dataset.keys){v.dataset.keys='1';v.tabIndex=0;v.addEventListener('keydown',"
    "function(e){var c=e.key==='ArrowLeft'?'.colabswarm-prev':e.key==='ArrowRight'?"
    "'.colabswarm-next':null;if(!c)return;var b=v.querySelector(c);if(b)b.click();"
    "e.preventDefault();e.stopPropagation();});}"
    "var go=function(){v.scrollIntoView({block:'nearest'});};go();"
    "var im=v.querySelector('img');if(im&&!im.complete)im.addEventListener('load',go,"
    "{once:true});try{v.focus({preventScroll:true});}catch(e){}"
)


class Gallery:
    """Thumbnails, viewer and downloads; `widget` is its part of the Generate panel."""

    def __init__(self, *, page: int = 60, keep: int = 1000, keep_bytes: int = 384 * 2**20,
                 thumb_size: int = 128, folder: Any = None,
                 update_every: float = 0.15) -> None:
        self.page = page
        self.keep = max(keep, page)
        self.keep_bytes = keep_bytes  # the PNGs held (the viewer, downloads and zips need them)
        self._held = 0
        self.thumb_size = thumb_size
        self.folder = folder
        self.entries: list[Entry] = []  # oldest first, at most `keep`
        self.total = 0  # images added since the last clear (the "of M")
        self.shown = page
        self.selected: Entry | None = None
        self.on_reuse: Callable[[GeneratedImage], Any] | None = None
        self.on_reuse_seed: Callable[[GeneratedImage], Any] | None = None
        self.on_init_image: Callable[[GeneratedImage], Any] | None = None
        self._listeners: list[Callable[[], Any]] = []
        self._lock = threading.RLock()
        self._numbers = 0
        self._views = 0
        self.tasks = TaskThread("colabswarm-gallery")
        self._render_soon = Throttle(self.render, update_every, "colabswarm-gallery-draw")

        self.order = w.Dropdown(options=list(ORDERS), value="newest first", description="Order",
                                style={"description_width": "45px"},
                                layout=w.Layout(width="190px"))
        self.count = w.HTML()
        self.more_button = w.Button(description="Show more", icon="angle-double-down",
                                    layout=w.Layout(width="auto", display="none"))
        self.clear_button = w.Button(description="Clear gallery", icon="eraser",
                                     layout=w.Layout(width="auto"))
        self.notice = w.HTML()
        self.box = w.Box(layout=w.Layout(display="flex", flex_flow="row wrap", width="100%",
                                         max_height="460px", align_content="flex-start"))
        self.box.add_class("colabswarm-gallery")

        # the viewer
        self.viewer_image = w.Image(format="png")
        self.viewer_text = w.HTML()
        self.prev_button = w.Button(description="Prev", icon="arrow-left",
                                    tooltip="the previous image (left arrow key)",
                                    layout=w.Layout(width="auto"))
        self.next_button = w.Button(description="Next", icon="arrow-right",
                                    tooltip="the next image (right arrow key)",
                                    layout=w.Layout(width="auto"))
        self.prev_button.add_class("colabswarm-prev")
        self.next_button.add_class("colabswarm-next")
        self.reuse_button = w.Button(description="Reuse parameters", icon="recycle",
                                     tooltip="put this image's prompt, size, sampler, seed ... "
                                             "into the form", layout=w.Layout(width="auto"))
        self.reuse_seed_button = w.Button(description="Reuse seed", icon="random",
                                          layout=w.Layout(width="auto"))
        self.init_button = w.Button(description="Use as init image", icon="image",
                                    tooltip="img2img from this image",
                                    layout=w.Layout(width="auto"))
        self.zip_button = w.Button(description="Zip this run", icon="file-archive-o",
                                   layout=w.Layout(width="auto"))
        self.close_button = w.Button(description="Close", icon="times",
                                     layout=w.Layout(width="auto"))
        self.download = w.HTML()
        self.zip_link = w.HTML()
        self._trigger = w.HTML(layout=w.Layout(height="0px", margin="0"))
        self.viewer = w.VBox([
            row([self.prev_button, self.next_button, self.download, self.zip_button,
                 self.zip_link]),
            self.viewer_image,
            self.viewer_text,
            row([self.reuse_button, self.reuse_seed_button, self.init_button,
                 self.close_button]),
            self._trigger,
        ], layout=w.Layout(display="none", width="100%", padding="4px",
                           border=f"1px solid {COLOURS['accent']}", margin="4px 0"))
        self.viewer.add_class("colabswarm-viewer")

        self.order.observe(lambda _c: self.render(), "value")
        self.more_button.on_click(lambda _b: self.show_more())
        self.clear_button.on_click(lambda _b: self.clear())
        self.prev_button.on_click(lambda _b: self.step(-1))
        self.next_button.on_click(lambda _b: self.step(+1))
        self.close_button.on_click(lambda _b: self.close_viewer())
        self.zip_button.on_click(lambda _b: self.zip_selected_run())
        self.reuse_button.on_click(lambda _b: self._hand(self.on_reuse))
        self.reuse_seed_button.on_click(lambda _b: self._hand(self.on_reuse_seed))
        self.init_button.on_click(lambda _b: self._hand(self.on_init_image))
        self.header = row([w.HTML("<b>Gallery</b>"), self.count, self.order, self.more_button,
                           self.clear_button])
        self.widget = w.VBox([self.viewer, self.header, self.notice, self.box],
                             layout=w.Layout(width="100%"))

    # ----- in ------------------------------------------------------------------------------
    def add(self, g: GeneratedImage, run: int | None) -> None:
        """A new image (from any thread): thumbnailed and drawn on the gallery's thread."""
        self.tasks.submit(lambda: self._add(g, run))

    def _add(self, g: GeneratedImage, run: int | None) -> None:
        try:
            thumb = self._thumbnail(g)
        except Exception as exc:  # a broken PNG: the swarm hears of it through .image
            self.notice.value = error_html(f"Image {g.seed} from {g.backend} could not be "
                                           f"shown: {exc}")
            return
        dropped: list[Entry] = []
        with self._lock:
            self._numbers += 1
            self.total += 1
            self.entries.append(Entry(g, run, self._numbers, thumb))
            self._held += _png_size(g)
            # the oldest go first, by count or by bytes (a page always stays)
            while len(self.entries) > self.page and (len(self.entries) > self.keep
                                                     or self._held > self.keep_bytes):
                old = self.entries.pop(0)
                self._held -= _png_size(old.image)
                dropped.append(old)
        for e in dropped:
            if e.widget is not None:
                e.widget.close()
                e.widget = None
            if e is self.selected:
                self.selected = None
        self._render_soon()
        self._changed()

    def _thumbnail(self, g: GeneratedImage) -> bytes:
        if g.png is not None:
            try:
                with Image.open(io.BytesIO(g.png)) as im:  # decoded here, not kept
                    im.load()
                    return thumbnail_jpeg(im, self.thumb_size)
            except Exception:
                pass  # .image raises the swarm's own error for a broken PNG (and tells it)
        return thumbnail_jpeg(g.image, self.thumb_size)

    # ----- drawing -------------------------------------------------------------------------
    @property
    def order_key(self) -> str:
        return ORDERS.get(self.order.value, "newest")

    def visible(self) -> list[Entry]:
        with self._lock:
            return ordered(self.entries, self.order_key)[:self.shown]

    def render(self) -> None:
        """Redraw the thumbnails, the count and the cap notice from the entries."""
        with self._lock:
            shown = self.visible()
            keep = {id(e) for e in shown}
            for e in self.entries:
                if e.widget is not None and id(e) not in keep:
                    e.widget.close()  # off screen: its browser-side model goes too
                    e.widget = None
            for e in shown:
                if e.widget is None:
                    e.widget = self._thumb_widget(e)
                    if e is self.selected:
                        e.widget.add_class("colabswarm-selected")
            children = tuple(e.widget for e in shown if e.widget is not None)
            if self.box.children != children:
                self.box.children = children
            total, kept = self.total, len(self.entries)
        self.count.value = muted_html(f"{total:,} image{'s' if total != 1 else ''}")
        notice = cap_notice(len(shown), total, kept, self.order_key, self.folder)
        self.notice.value = (f"<span style='color:{COLOURS['warning']}'>"
                             f"{html.escape(notice)}</span>") if notice else ""
        self.more_button.layout.display = "" if len(shown) < kept else "none"

    def _thumb_widget(self, e: Entry) -> w.Box:
        g = e.image
        pw, ph = int(g.params.get("width") or 1), int(g.params.get("height") or 1)
        side = self.thumb_size
        tw, th = (side, max(1, round(side * ph / pw))) if pw >= ph else \
            (max(1, round(side * pw / ph)), side)
        img = w.Image(value=e.thumb or b"", format="jpeg",
                      layout=w.Layout(width=f"{tw}px", height=f"{th}px"))
        caption = w.HTML(f"<span style='color:{COLOURS['text']}'>{g.seed}</span>",
                         layout=w.Layout(width=f"{side}px"))
        pick = w.Button(description="", tooltip=f"seed {g.seed}, made by {g.backend}: click "
                        "to see it large", layout=w.Layout(width="100%", height="100%"))
        pick.on_click(lambda _b, e=e: self.select(e))
        box = w.VBox([img, caption, pick],
                     layout=w.Layout(margin="3px", align_items="center",
                                     width=f"{side + 4}px", padding="2px 0 0 0"))
        box.add_class("colabswarm-thumb")
        return box

    def show_more(self) -> None:
        self.shown += self.page
        self.render()

    # ----- the viewer ----------------------------------------------------------------------
    def select(self, e: Entry | GeneratedImage) -> None:
        """Show one image large above the gallery, scrolled into view, its thumbnail outlined."""
        if isinstance(e, GeneratedImage):
            with self._lock:
                found = next((x for x in self.entries if x.image is e), None)
            if found is None:
                found = Entry(e, None, 0)
            e = found
        with self._lock:
            old, self.selected = self.selected, e
            if old is not None and old.widget is not None and old is not e:
                old.widget.remove_class("colabswarm-selected")
            if e.widget is not None:
                e.widget.add_class("colabswarm-selected")
        g = e.image
        data = g.png if g.png is not None else png(g.image)
        width = int(g.params.get("width") or 512)
        self.viewer_image.value = data
        self.viewer_image.layout.width = f"{max(256, min(512, width))}px"
        where = (f"<br><span style='color:{COLOURS['muted']}'>saved as</span> "
                 f"<code>{html.escape(str(g.path))}</code>") if g.path else ""
        run = f"run {e.run}, " if e.run is not None else ""
        self.viewer_text.value = (
            f"<div style='white-space:pre-wrap;font-family:var(--jp-code-font-family,"
            f"monospace);font-size:90%;color:{COLOURS['text']}'>"
            f"{html.escape(parameters_text(g.params, g.seed, g.backend))}</div>"
            f"<span style='color:{COLOURS['muted']}'>{html.escape(run)}"
            f"{g.params.get('width')}x{g.params.get('height')}, {g.seconds:.2f}s on "
            f"{html.escape(g.backend)}</span>{where}")
        self.download.value = self._download_html(g)
        self.zip_link.value = ""
        self.zip_button.disabled = e.run is None
        self.viewer.layout.display = ""
        self._views += 1
        self._trigger.value = (f'<img alt="" src="" style="display:none" data-n="{self._views}"'
                               f' onerror="{html.escape(_VIEW_JS, quote=True)}">')
        self._changed()

    def _download_html(self, g: GeneratedImage) -> str:
        if _png_size(g) > MAX_INLINE_BYTES:
            where = f": it is saved as {g.path}" if g.path else ""
            return muted_html(f"(too large for a link in the page{where})")
        return download_link_html(png_with_parameters(g), file_name(g), "image/png",
                                  "Download PNG")

    def step(self, delta: int) -> None:
        """The next (+1) or previous (-1) image in the gallery's order."""
        with self._lock:
            seq = ordered(self.entries, self.order_key)
            if not seq:
                return
            cur = self.selected
            i = seq.index(cur) if cur in seq else (-1 if delta > 0 else len(seq))
            target = seq[max(0, min(len(seq) - 1, i + delta))]
            if self.shown < seq.index(target) + 1:
                self.shown = seq.index(target) + 1
        self.render()
        self.select(target)

    def close_viewer(self) -> None:
        with self._lock:
            if self.selected is not None and self.selected.widget is not None:
                self.selected.widget.remove_class("colabswarm-selected")
            self.selected = None
        self.viewer.layout.display = "none"
        self._changed()

    def _hand(self, fn: Callable[[GeneratedImage], Any] | None) -> None:
        if fn is not None and self.selected is not None:
            fn(self.selected.image)

    # ----- downloads -----------------------------------------------------------------------
    def run_images(self, run: int) -> list[GeneratedImage]:
        with self._lock:
            return [e.image for e in self.entries if e.run == run]

    def zip_selected_run(self) -> None:
        """What "Zip this run" does: build the zip on the gallery's thread, then show a link."""
        if self.selected is None or self.selected.run is None:
            return
        run = self.selected.run
        self.zip_link.value = muted_html("zipping…")
        self.tasks.submit(lambda: self.zip_run(run))

    def zip_run(self, run: int) -> bytes | Path | None:
        """A run's images as a zip: a link in the page when it fits in MAX_INLINE_BYTES,
        otherwise written to the output folder (or, without one, a message). Returns the
        bytes or the path."""
        images = self.run_images(run)
        if not images:
            self.zip_link.value = error_html(f"No image of run {run} is in the gallery now.")
            return None
        name = f"colabswarm-run-{run}.zip"
        size = sum(_png_size(g) + 600 for g in images)
        if size > MAX_INLINE_BYTES:
            mb = size / 2**20
            limit = MAX_INLINE_BYTES // 2**20
            if self.folder is None:
                self.zip_link.value = error_html(
                    f"Run {run}'s {len(images)} images are {mb:.0f} MB, too big for a link in "
                    f"the page (at most {limit} MB), and the swarm saves no images "
                    "(output_dir=None). Zip them from code: colabswarm.widgets.gallery.run_zip"
                    "(images, 'run.zip').")
                return None
            path = Path(self.folder) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            run_zip(images, path)
            self.zip_link.value = ok_html(
                f"Run {run}'s {len(images)} images are {mb:.0f} MB, too big for a link in the "
                f"page (at most {limit} MB): zipped to {path} (on Colab: "
                "from google.colab import files; files.download(path)).")
            return path
        data = run_zip(images)
        assert data is not None
        self.zip_link.value = download_link_html(
            data, name, "application/zip",
            f"Download run {run} ({len(images)} images, {len(data) / 2**20:.1f} MB)")
        return data

    # ----- the rest ------------------------------------------------------------------------
    def clear(self) -> None:
        with self._lock:
            for e in self.entries:
                if e.widget is not None:
                    e.widget.close()
                    e.widget = None
            self.entries = []
            self.total = 0
            self._held = 0
            self.shown = self.page
            self.selected = None
        self.viewer.layout.display = "none"
        self.render()
        self._changed()

    def on_change(self, listener: Callable[[], Any]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) \
            if listener in self._listeners else None

    def _changed(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                import logging

                logging.getLogger("colabswarm.widgets").exception("gallery listener failed")

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until every image handed in is drawn (tests, scripts)."""
        self.tasks.wait_idle(timeout)
        self.render()

    def close(self) -> None:
        self._render_soon.stop()
        self.tasks.stop()
