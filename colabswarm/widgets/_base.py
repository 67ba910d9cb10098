"""What every panel shares: display delegation, updates off the swarm's thread, the palette
(checked for WCAG AA contrast), the style sheet that makes rows wrap, images as PNG bytes, and
download links that work in Jupyter and Colab.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ipywidgets as w
from PIL import Image

__all__ = [
    "BUTTON_COLOURS",
    "COLOURS",
    "PANEL_BACKGROUND",
    "STATUS_COLOURS",
    "Panel",
    "TaskThread",
    "Throttle",
    "button_style",
    "contrast_ratio",
    "download_link_html",
    "error_html",
    "muted_html",
    "ok_html",
    "png",
    "quiet_library_warnings",
    "row",
    "style_widget",
    "swarm_open",
    "thumbnail_jpeg",
]

log = logging.getLogger("colabswarm.widgets")

# The panels assume a light page (JupyterLab's and Colab's default themes: white). Every text
# colour below keeps WCAG AA's 4.5:1 against it (tests/test_widgets.py computes each ratio, and
# the browser test reads the real background), so nothing is "barely readable".
PANEL_BACKGROUND = "#ffffff"
COLOURS = {
    "text": "#1f1f1f",
    "muted": "#555555",
    "ok": "#1b6e2d",
    "error": "#b3261e",
    "warning": "#8f4a00",
    "accent": "#1258a8",
    "skip": "#6a1b9a",
    "debug": "#5c5c5c",
}
# buttons with white text: ipywidgets' own success/danger/warning/primary colours give white
# text 2.2:1 to 3.7:1, so the panels colour their buttons from here (each >= 4.5:1 with white)
BUTTON_COLOURS = {
    "success": "#1b6e2d",
    "danger": "#b3261e",
    "warning": "#8f4a00",
    "primary": "#1258a8",
}
# a backend's status as the panel draws it (text and border); the swarm's own colour names
# (snapshot["colour"]) stay what code compares
STATUS_COLOURS = {
    "running": "#1b6e2d",  # green
    "loading": "#1258a8",  # blue: busy getting ready (gold was unreadable and near orange)
    "errored": "#b3261e",  # red
    "idle": "#5c5c5c",  # grey: an AllowIdle peer that is away
    "disabled": "#8f5200",  # brown-orange: switched off
}

# Rows wrap instead of scrolling sideways; text wraps at word boundaries. Every ipywidget has a
# 2px margin and every box `overflow: auto`, so a child 100% wide (or wider) made a scrollbar
# 4px wide: a control is at most its box's width less its margins, a full-width one has no side
# margin, and images shrink to fit.
_CSS = f"""
.colabswarm {{ max-width: 100%; box-sizing: border-box; }}
.colabswarm .jupyter-widgets {{ max-width: calc(100% - 2 * var(--jp-widgets-margin, 2px)); }}
.colabswarm .widget-box, .colabswarm.widget-box {{ max-width: 100%; }}
.colabswarm .widget-image {{ height: auto; }}
.colabswarm .colabswarm-row {{ display: flex; flex-flow: row wrap; align-items: center;
  max-width: 100%; }}
.colabswarm .widget-html-content {{ white-space: normal; line-height: 1.45;
  overflow-wrap: anywhere; word-break: normal; }}
.colabswarm .widget-html, .colabswarm .widget-label {{ height: auto; max-width: 100%; }}
.colabswarm .colabswarm-full {{ width: 100%; max-width: 100%; margin-left: 0; margin-right: 0;
  box-sizing: border-box; }}
.colabswarm code {{ overflow-wrap: anywhere; }}
.colabswarm .widget-inline-hbox .widget-label {{ overflow: visible; }}
.colabswarm-gallery {{ overflow-y: auto; overflow-x: hidden; align-content: flex-start; }}
.colabswarm-thumb {{ position: relative; border-radius: 3px; }}
.colabswarm-thumb > .widget-button {{ position: absolute; left: 0; top: 0; width: 100%;
  height: 100%; margin: 0; padding: 0; background: transparent; border: none;
  cursor: pointer; }}
.colabswarm-thumb > .widget-button:hover {{ background: rgba(18, 88, 168, 0.12);
  box-shadow: none; }}
.colabswarm-thumb.colabswarm-selected {{ outline: 3px solid {COLOURS["accent"]};
  outline-offset: 1px; }}
.colabswarm-thumb .widget-html-content {{ text-align: center; line-height: 1.2;
  font-size: 85%; }}
.colabswarm-viewer:focus {{ outline: 2px dotted {COLOURS["accent"]}; }}
.colabswarm-runbar .widget-label {{ min-width: 0; }}
.colabswarm-log {{ max-height: 320px; overflow-y: auto; overflow-x: hidden;
  display: flex; border: 1px solid #c8c8c8; padding: 2px 4px; }}
.colabswarm-log-lines {{ white-space: pre-wrap; overflow-wrap: anywhere; word-break: normal;
  font-family: var(--jp-code-font-family, monospace); font-size: 85%; width: 100%; }}
"""


def style_widget() -> w.HTML:
    """The panels' style sheet, as a widget each panel carries (Colab renders each output in
    its own frame, so a sheet shown once elsewhere would not reach it)."""
    out = w.HTML(f"<style>{_CSS}</style>", layout=w.Layout(height="0px", margin="0"))
    out.add_class("colabswarm-style")
    return out


def row(children: Sequence[w.Widget], *, gap: str = "0 4px", **layout: Any) -> w.Box:
    """A row of controls that wraps onto the next line when the panel is narrow."""
    box = w.Box(list(children), layout=w.Layout(**{
        "display": "flex", "flex_flow": "row wrap", "align_items": "center", "grid_gap": gap,
        **layout}))
    box.add_class("colabswarm-row")
    return box


def button_style(kind: str) -> dict[str, str]:
    """A coloured button's style (Button(style=button_style("danger"))): the palette's colour
    with white text, at least 4.5:1, instead of ipywidgets' lighter ones."""
    return {"button_color": BUTTON_COLOURS[kind], "text_color": "#ffffff"}


def full_width(widget: w.Widget) -> w.Widget:
    """A control as wide as its panel, without the side margins that overflow it."""
    widget.layout.width = "100%"
    widget.add_class("colabswarm-full")
    return widget


def contrast_ratio(foreground: str, background: str) -> float:
    """WCAG 2's contrast ratio of two #rrggbb colours (1 to 21; AA text needs 4.5)."""
    def luminance(colour: str) -> float:
        c = colour.lstrip("#")
        if len(c) == 3:
            c = "".join(ch * 2 for ch in c)
        rgb = [int(c[i:i + 2], 16) / 255 for i in (0, 2, 4)]
        lin = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


class Panel:
    """A thin view: `.widget` is the root ipywidget; displaying the panel displays it."""

    widget: w.Widget

    def __init__(self) -> None:
        self._closers: list[Callable[[], Any]] = []
        self._closed = False

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def close(self) -> None:
        """Stop listening to the swarm (and timers); the widgets stay as they were."""
        self._closed = True
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception:  # closing must never raise in a notebook cleanup cell
                pass
        self._closers.clear()

    def __enter__(self) -> Panel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Throttle:
    """Run `fn` on a thread of its own, at most once per `interval` seconds, always including
    a trailing run after the last call.

    Swarm events come in bursts (one per denoising step) on the swarm's own thread, which also
    serves every worker: a listener only asks for an update (`throttle()`), and the reading
    and drawing happen here, never on the swarm's thread. The browser only needs the latest
    state, but it must get the last one, e.g. "0 to go".
    """

    def __init__(self, fn: Callable[[], Any], interval: float = 0.2,
                 name: str = "colabswarm-panel") -> None:
        self._fn = fn
        self._interval = interval
        self._wake = threading.Event()
        self._stopped = False
        self._name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __call__(self) -> None:
        if self._stopped:
            return
        self._wake.set()
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._stopped:
                    self._thread = threading.Thread(target=self._loop, daemon=True,
                                                    name=self._name)
                    self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            if self._stopped:
                return
            self._wake.clear()
            try:
                self._fn()
            except Exception:  # a view update must never end the updates
                log.exception("widget update failed")
            time.sleep(self._interval)
            if self._stopped:
                return

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()


class TaskThread:
    """One daemon thread that runs submitted calls in order (thumbnails, zips, restarts), so
    neither the swarm's thread nor the kernel's waits on them."""

    def __init__(self, name: str = "colabswarm-tasks") -> None:
        self._tasks: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0

    def submit(self, fn: Callable[[], Any]) -> None:
        if self._stopped:
            return
        with self._lock:
            self._pending += 1
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name=self._name)
                self._thread.start()
        self._tasks.put(fn)

    def _loop(self) -> None:
        while True:
            fn = self._tasks.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:
                log.exception("panel task failed")
            finally:
                with self._lock:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until every submitted call has run (tests and scripts)."""
        return self._idle.wait(timeout)

    def stop(self) -> None:
        self._stopped = True
        self._tasks.put(None)


def swarm_open(swarm: Any) -> bool:
    """False once the swarm is closed: its loop no longer answers, so a late timer must not ask."""
    return not getattr(swarm, "closed", False)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def thumbnail_jpeg(image: Image.Image, size: int = 128) -> bytes:
    """A small JPEG for a gallery of thousands (a tenth of a PNG thumbnail's bytes)."""
    thumb = image.convert("RGB")
    if max(thumb.size) > size:
        thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def read_uploads(change: dict[str, Any]) -> Iterator[tuple[str, Image.Image | None, str]]:
    """The images of a FileUpload change, as (name, RGB image or None, why not readable)."""
    for f in change["new"] or ():
        name = f.get("name", "upload")
        try:
            yield name, Image.open(io.BytesIO(bytes(f["content"]))).convert("RGB"), ""
        except Exception as exc:  # a file that is not an image: the panel says so
            yield name, None, f"{name} is not an image I can read: {exc}"


def _span(colour: str, message: str) -> str:
    return (f'<div style="color:{colour};white-space:pre-wrap;overflow-wrap:anywhere">'
            f"{html.escape(message)}</div>")


def error_html(message: str) -> str:
    """A message a person reads in the panel instead of a traceback."""
    return _span(COLOURS["error"], message)


def ok_html(message: str) -> str:
    return _span(COLOURS["ok"], message)


def muted_html(message: str) -> str:
    return f'<span style="color:{COLOURS["muted"]}">{html.escape(message)}</span>'


# Turning the base64 into a Blob on click: a data: URL of several MB is refused by Chrome's
# URL length limit (2 MB) on some paths; a blob: URL has none. The href stays a data: URL, so
# the link still works where inline scripts do not run.
_BLOB_JS = (
    "try{var s=atob(this.dataset.b64),a=new Uint8Array(s.length);"
    "for(var i=0;i<s.length;i++)a[i]=s.charCodeAt(i);"
    "var u=URL.createObjectURL(new Blob([a],{type:this.dataset.mime})),"
    "l=document.createElement('a');l.href=u;l.download=this.getAttribute('download');"
    "document.body.appendChild(l);l.click();l.remove();"
    "setTimeout(function(){URL.revokeObjectURL(u)},60000);return false;}catch(e){return true;}"
)


def download_link_html(data: bytes, filename: str, mime: str, label: str) -> str:
    """A link that saves `data` as `filename` from the page itself: no file browser, no server
    route, so it works the same in JupyterLab, Notebook and Colab."""
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<a class="colabswarm-download" download="{html.escape(filename, quote=True)}" '
            f'href="data:{mime};base64,{b64}" data-mime="{mime}" data-b64="{b64}" '
            f'onclick="{html.escape(_BLOB_JS, quote=True)}" '
            f'style="color:{COLOURS["accent"]};font-weight:bold">{html.escape(label)}</a>')


_NOISY = ("transformers", "diffusers", "torch", "huggingface_hub", "accelerate", "peft")


def quiet_library_warnings() -> None:
    """Keep the libraries a worker loads (transformers, diffusers, torch, ...) from printing
    warnings into the notebook (above the share string, or as a pink box later): their loggers
    go to errors only and their Python warnings are ignored. Errors still show. Call it before
    start_worker in a notebook; colabswarm's own records go to its Logs panel and to logging."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
    import sys

    for name in ("transformers", "diffusers"):  # already imported: their own switch
        mod = sys.modules.get(f"{name}.utils.logging")
        if mod is not None and hasattr(mod, "set_verbosity_error"):
            mod.set_verbosity_error()
