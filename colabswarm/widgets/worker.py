"""Worker panel (worker notebook): the share string to copy or scan, health, tunnel, Stop.

The panel reads everything from the WorkerHandle on each refresh (a background timer, or
refresh() directly), so it never disagrees with the worker it shows.
"""

from __future__ import annotations

import html
import io
import json
import threading
from typing import Any

import ipywidgets as w

from ..errors import ColabSwarmError
from ._base import (
    COLOURS,
    Panel,
    button_style,
    error_html,
    full_width,
    muted_html,
    ok_html,
    row,
    style_widget,
)
from .guests import GuestsSection

__all__ = ["WorkerPanel", "copy_button_html", "qr_png"]


def qr_png(text: str) -> bytes | None:
    """A QR code of `text` as PNG bytes, or None when the qrcode package is not installed."""
    try:
        import qrcode
    except ImportError:
        return None
    qr = qrcode.QRCode(box_size=4, border=2,
                       error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(text)
    qr.make(fit=True)
    buf = io.BytesIO()
    qr.make_image().save(buf)
    return buf.getvalue()


def copy_button_html(text: str, label: str = "Copy share string") -> str:
    """A plain HTML button that puts `text` on the clipboard (ipywidgets has no clipboard)."""
    js = (f"navigator.clipboard.writeText({json.dumps(text)}).then("
          "()=>{this.textContent='Copied';},"
          "()=>{this.textContent='Copy failed: select the text above';})")
    return (f'<button class="jupyter-button lm-Widget" style="padding:2px 10px" '
            f'onclick="{html.escape(js, quote=True)}">{html.escape(label)}</button>')


def _mib(n: int | None) -> str:
    return "?" if not n else f"{n / 2**30:.1f} GiB"


class WorkerPanel(Panel):
    """What the person running a worker needs to see and do."""

    def __init__(self, handle: Any, *, refresh_every: float | None = 2.0) -> None:
        super().__init__()
        self.handle = handle
        self._shown_share: str | None = None
        self._lock = threading.RLock()
        self.share = full_width(w.Textarea(layout=w.Layout(height="48px")))
        self.copy = w.HTML()
        self.qr = w.Image(format="png", layout=w.Layout(width="164px"))
        self.qr_note = w.HTML()
        self.details = w.HTML(layout=w.Layout(flex="1 1 260px", min_width="0"))
        self.tunnel = w.HTML()
        self.reopen_button = w.Button(description="Reopen tunnel", icon="refresh",
                                      tooltip="a new public URL, same token",
                                      layout=w.Layout(width="auto"))
        self.stop_button = w.Button(description="Stop worker", style=button_style("danger"),
                                    icon="stop", layout=w.Layout(width="auto"))
        self.confirm_text = w.HTML()
        self.confirm_button = w.Button(description="Yes, stop it", style=button_style("danger"),
                                       icon="check", layout=w.Layout(width="auto"))
        self.cancel_button = w.Button(description="Cancel", icon="times",
                                      layout=w.Layout(width="auto"))
        self.confirm = row([self.confirm_text, self.confirm_button, self.cancel_button])
        self.confirm.layout.display = "none"
        self.message = w.HTML()
        self.guests = GuestsSection(handle, copy_button_html)  # guests, usage, idle stop
        self.reopen_button.on_click(lambda _b: self.reopen())
        self.stop_button.on_click(lambda _b: self.ask_stop())
        self.confirm_button.on_click(lambda _b: self.stop())
        self.cancel_button.on_click(lambda _b: self._cancel_stop())
        qr_box = w.VBox([self.qr, self.qr_note], layout=w.Layout(align_items="center",
                                                                 width="180px"))
        self.widget = w.VBox([
            style_widget(),
            w.HTML(f"<h3 style='margin:0'>Worker</h3><span style='color:{COLOURS['muted']}'>"
                   "Paste this line into the controller's Backends panel. It holds the secret "
                   "token: share it only with people you trust.</span>"),
            self.share,
            self.copy,
            row([qr_box, self.details], align_items="flex-start"),
            row([self.tunnel, self.reopen_button]),
            row([self.stop_button]),
            self.confirm,
            self.message,
            self.guests.widget,
        ], layout=w.Layout(width="100%"))
        self.widget.add_class("colabswarm")
        self.widget.add_class("colabswarm-worker")
        self._stop_timer = threading.Event()
        self._closers.append(self._stop_timer.set)
        self.refresh()
        if refresh_every:
            threading.Thread(target=self._loop, args=(refresh_every,), daemon=True,
                             name="colabswarm-worker-panel").start()

    def _loop(self, every: float) -> None:
        while not self._stop_timer.wait(every):
            try:
                self.refresh()
            except Exception:  # a refresh must never kill the timer
                pass

    def refresh(self) -> None:
        """Re-read the handle: share string (new after a reopen), health, tunnel."""
        h = self.handle
        with self._lock:
            share = h.share
            if share != self._shown_share:
                self._shown_share = share
                self.share.value = share
                self.copy.value = copy_button_html(share)
                code = qr_png(share)
                if code is None:
                    self.qr.layout.display = "none"
                    self.qr_note.value = muted_html("pip install qrcode for a QR code to scan.")
                else:
                    self.qr.value = code
                    self.qr.layout.display = ""
                    self.qr_note.value = (f"<div style='text-align:center;font-size:85%;"
                                          f"color:{COLOURS['muted']}'>Scan: the share string "
                                          "(with its secret token)</div>")
            self.details.value = self._details_html()
            self.tunnel.value = self._tunnel_html()
            # nothing to reopen without a tunnel, or once the worker is stopped
            self.reopen_button.layout.display = (
                "none" if h.tunnel_provider == "none" or not h.running else "")
            self.guests.refresh()

    def _details_html(self) -> str:
        h = self.handle
        try:
            info = h.info()
        except Exception as exc:  # a stopped worker may not answer; say so
            return error_html(f"No info: {exc}")
        running = h.running
        state = info.state if running else "stopped"
        colour = {"ready": COLOURS["ok"], "loading": COLOURS["accent"],
                  "stopped": COLOURS["warning"]}.get(state, COLOURS["error"])
        detail = f" ({html.escape(info.state_detail)})" if info.state_detail else ""
        rows = [
            ("Status", f'<b style="color:{colour}">{html.escape(state)}</b>{detail}'),
            ("Name", html.escape(info.name)),
            ("Device", html.escape(f"{info.device} {info.gpu_name or ''}".strip())
             + (f", {_mib(info.gpu_memory_total)}" if info.gpu_memory_total else "")),
            ("Model", html.escape(info.model_loaded or ", ".join(info.models) or "?")),
            ("Served", f"{_images_served(h)} images in {info.jobs_served} "
                       f"job{'s' if info.jobs_served != 1 else ''}; {info.running} running, "
                       f"{info.queue_depth} queued"),
            ("Local", f"<code>{html.escape(h.local_url)}</code>"),
        ]
        comp = info.compile
        if comp is not None:  # the compiled fast path: mode, state, how far it got
            shapes = ", ".join(f"{s.width}x{s.height} batches {s.batches}" for s in comp.shapes)
            text = f"{comp.mode}, {comp.state}" + (f": {comp.detail}" if comp.detail else "")
            rows.insert(4, ("Compile", html.escape(text + (f" [{shapes}]" if shapes else ""))))
        return "<table>" + "".join(
            f"<tr><td style='color:{COLOURS['muted']};padding-right:8px'>{k}</td>"
            f"<td style='color:{COLOURS['text']}'>{v}</td></tr>"
            for k, v in rows) + "</table>"

    def _tunnel_html(self) -> str:
        h = self.handle
        provider = h.tunnel_provider
        if provider == "none":
            return muted_html("Tunnel: none (reachable only from this machine or its "
                              "network)")
        alive = h.tunnel_alive and getattr(h, "tunnel", None) is not None
        state = (f'<b style="color:{COLOURS["ok"]}">up</b>' if alive
                 else f'<b style="color:{COLOURS["error"]}">down: press Reopen (new URL, same '
                      'token)</b>')
        return f"Tunnel: {html.escape(provider)} {state}"

    def reopen(self) -> None:
        """A new tunnel after the old one died; the new share string appears above."""
        self.message.value = "<i>Reopening the tunnel...</i>"
        try:
            self.handle.reopen()
        except (ColabSwarmError, OSError) as exc:
            self.message.value = error_html(str(exc))
        else:
            self.message.value = ok_html("Tunnel reopened: paste the new share string into "
                                         "the controller (the token is the same).")
        self.refresh()

    def ask_stop(self) -> None:
        """What the Stop button does: ask first (controllers using this worker lose it)."""
        if not self.handle.running:
            return
        self.confirm_text.value = (f"<span style='color:{COLOURS['error']}'>Stop this worker "
                                   "and its tunnel? Controllers using it lose it (their images "
                                   "run elsewhere); restarting gives a new URL.</span>")
        self.confirm.layout.display = ""
        self.stop_button.disabled = True

    def _cancel_stop(self) -> None:
        self.confirm.layout.display = "none"
        self.stop_button.disabled = False

    def stop(self) -> None:
        """Stop the worker (and its tunnel); the panel stays to show that it stopped."""
        self.confirm.layout.display = "none"
        self.handle.stop()
        self.refresh()
        self._stop_timer.set()
        self.stop_button.disabled = True
        self.reopen_button.disabled = True
        self.message.value = ok_html("Worker stopped. Run the start cell again to restart.")


def _images_served(handle: Any) -> int | str:
    """Images made for every token (what a controller counts), not jobs."""
    try:
        return sum(u.images for u in handle.usage())
    except Exception:  # an older handle, or a stopped worker
        return "?"
