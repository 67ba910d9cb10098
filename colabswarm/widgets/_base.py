"""What every panel shares: display delegation, throttled updates, images as PNG bytes."""

from __future__ import annotations

import html
import io
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as w
from PIL import Image

__all__ = ["Panel", "Throttle", "error_html", "ok_html", "png", "swarm_open", "thumbnail_png"]


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
    """Run `fn` at most once per `interval` seconds, always including a trailing run.

    Swarm events come in bursts (one per denoising step); the browser only needs the latest
    state, but it must get the last one, e.g. "0 current generations".
    """

    def __init__(self, fn: Callable[[], Any], interval: float = 0.2) -> None:
        self._fn = fn
        self._interval = interval
        self._lock = threading.Lock()
        self._last = 0.0
        self._timer: threading.Timer | None = None
        self._stopped = False

    def __call__(self) -> None:
        with self._lock:
            if self._stopped or self._timer is not None:
                return
            wait = self._last + self._interval - time.monotonic()
            if wait > 0:
                self._timer = threading.Timer(wait, self._fire)
                self._timer.daemon = True
                self._timer.start()
                return
            self._last = time.monotonic()
        self._run()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
            if self._stopped:
                return
            self._last = time.monotonic()
        self._run()

    def _run(self) -> None:
        try:
            self._fn()
        except Exception:  # a view update must not kill the swarm's thread
            import logging

            logging.getLogger("colabswarm.widgets").exception("widget update failed")

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


def swarm_open(swarm: Any) -> bool:
    """False once the swarm is closed: its loop no longer answers, so a late timer must not ask."""
    return not getattr(swarm, "closed", False)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def thumbnail_png(image: Image.Image, size: int = 128) -> bytes:
    """A PNG at most `size` px on its longer side (small images are sent as they are)."""
    if max(image.size) <= size:
        return png(image)
    thumb = image.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    return png(thumb)


def error_html(message: str) -> str:
    """A message a person reads in the panel instead of a traceback."""
    return f'<div style="color:#c62828;white-space:pre-wrap">{html.escape(message)}</div>'


def ok_html(message: str) -> str:
    return f'<div style="color:#2e7d32;white-space:pre-wrap">{html.escape(message)}</div>'
