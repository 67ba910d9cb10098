"""The Worker panel's owner sections: guests (add, copy their share strings, revoke), who used
the GPU, which controllers are connected, and the idle stop's countdown.

It reads everything from the WorkerHandle on each refresh and writes only through the handle's
public methods (add_guest, revoke), so it shows what the worker has.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from ..errors import ColabSwarmError
from ._base import button_style, error_html, ok_html, row

__all__ = ["GuestsSection"]


def _ago(t: float | None) -> str:
    if t is None:
        return "never"
    s = max(0, int(time.time() - t))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def _limits_text(limits: Any) -> str:
    if limits is None:
        return "all (admin)"
    parts = []
    if limits.images_per_hour is not None:
        parts.append(f"{limits.images_per_hour} img/h")
    if limits.max_pixels is not None:
        parts.append(f"≤{limits.max_pixels} px")
    if limits.max_steps is not None:
        parts.append(f"≤{limits.max_steps} steps")
    if limits.max_images is not None:
        parts.append(f"≤{limits.max_images} per job")
    if limits.weight != 1.0:
        parts.append(f"weight {limits.weight:g}")
    return ", ".join(parts) or "the worker's limits"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th style='text-align:left;padding-right:10px'>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td style='padding-right:10px'>{c}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f"<table style='font-size:90%'><tr>{th}</tr>{body}</table>"


class _GuestRow:
    def __init__(self, section: GuestsSection, name: str) -> None:
        self.name = name
        self.label = w.HTML()
        self.copy = w.HTML()
        self.revoke = w.Button(description="Revoke", icon="ban", style=button_style("warning"),
                               layout=w.Layout(width="95px"),
                               tooltip=f"take {name}'s token back: its next request gets 401")
        self.revoke.on_click(lambda _b: section.revoke(self.name))
        self.box = row([self.label, self.copy, self.revoke])
        self._share: str | None = None

    def show(self, limits: Any, share: str, copy_html: Callable[[str, str], str]) -> None:
        self.label.value = (f"<b>{html.escape(self.name)}</b> "
                            f"<span style='color:#555'>{html.escape(_limits_text(limits))}"
                            "</span>&nbsp;")
        if share != self._share:
            self._share = share
            self.copy.value = copy_html(share, f"Copy {self.name}'s share string")


class GuestsSection:
    """Guests, usage and connected controllers of one worker (a part of WorkerPanel)."""

    def __init__(self, handle: Any, copy_html: Callable[[str, str], str]) -> None:
        self.handle = handle
        self._copy_html = copy_html  # the panel's copy-to-clipboard button
        self.name = w.Text(placeholder="guest name, e.g. alice", layout=w.Layout(width="180px"))
        self.images_per_hour = w.BoundedIntText(
            value=0, min=0, max=1_000_000, description="images/h",
            layout=w.Layout(width="160px"), style={"description_width": "60px"},
            tooltip="images per rolling hour (0: no limit)")
        self.max_pixels = w.BoundedIntText(
            value=0, min=0, max=1 << 26, description="max px",
            layout=w.Layout(width="170px"), style={"description_width": "50px"},
            tooltip="width*height per image (0: the worker's limit)")
        self.max_steps = w.BoundedIntText(
            value=0, min=0, max=10_000, description="max steps",
            layout=w.Layout(width="150px"), style={"description_width": "70px"},
            tooltip="steps per image (0: the worker's limit)")
        self.weight = w.BoundedFloatText(
            value=1.0, min=0.01, max=100.0, step=0.5, description="weight",
            layout=w.Layout(width="130px"), style={"description_width": "50px"},
            tooltip="share of the GPU while several tokens have work queued")
        self.add_button = w.Button(description="Add guest", icon="user-plus")
        self.add_button.on_click(lambda _b: self.add())
        self.rows: dict[str, _GuestRow] = {}
        self.rows_box = w.VBox()
        self.usage = w.HTML()
        self.controllers = w.HTML()
        self.idle = w.HTML()
        self.message = w.HTML()
        self.widget = w.VBox([
            w.HTML("<b>Guests</b> <span style='color:#555'>(each friend gets a token of their "
                   "own: they can generate, upscale and see their own jobs, nothing else; "
                   "revoke one at any time)</span>"),
            self.rows_box,
            row([self.name, self.images_per_hour, self.max_pixels, self.max_steps,
                 self.weight, self.add_button]),
            self.message,
            w.HTML("<b>Who used the GPU</b>"),
            self.usage,
            w.HTML("<b>Connected controllers</b>"),
            self.controllers,
            self.idle,
        ])

    # ----- handle -> widgets -----------------------------------------------------------------
    def refresh(self) -> None:
        h = self.handle
        guests = h.guests() if h.running else {}
        for name in [n for n in self.rows if n not in guests]:
            del self.rows[name]
        for name, limits in guests.items():
            row = self.rows.get(name)
            if row is None:
                row = self.rows[name] = _GuestRow(self, name)
            row.show(limits, h.guest_share(name), self._copy_html)
        children = tuple(self.rows[n].box for n in guests) or (
            w.HTML("<i>No guests: only your own share string works.</i>"),)
        if tuple(c for c in self.rows_box.children) != children:
            self.rows_box.children = children
        self.usage.value = self._usage_html()
        self.controllers.value = self._controllers_html()
        self.idle.value = self._idle_html()

    def _usage_html(self) -> str:
        rows = []
        for u in self.handle.usage():
            who = html.escape(u.name) + (" (revoked)" if u.revoked else "")
            rows.append([who, str(u.images), f"{u.gpu_seconds:.1f}", _ago(u.last_seen),
                         str(u.queued), str(u.images_last_hour)])
        return _table(["token", "images", "GPU s", "last seen", "queued", "last hour"], rows)

    def _controllers_html(self) -> str:
        seen = self.handle.controllers()
        if not seen:
            return "<i style='color:#555'>none in the last 2 minutes</i>"
        return _table(["token", "controller", "last seen", "requests"],
                      [[html.escape(c.token), f"<code>{html.escape(c.client)}</code>",
                        _ago(c.last_seen), str(c.requests)] for c in seen])

    def _idle_html(self) -> str:
        h = self.handle
        if h.stopped_reason:
            return error_html(f"Stopped: {h.stopped_reason}.")
        if h.idle_warning:
            return error_html(h.idle_warning)
        left = h.idle_stop_in_s
        if left is None:
            return "<span style='color:#555'>Idle stop: off</span>"
        return (f"<span style='color:#555'>Idle stop: this worker stops itself in "
                f"{int(left // 60)}m {int(left % 60)}s unless a controller contacts it.</span>")

    # ----- widgets -> handle -----------------------------------------------------------------
    def add(self) -> str | None:
        """Add the guest typed in; returns its share string (also shown with a copy button)."""
        name = self.name.value.strip()
        try:
            share = self.handle.add_guest(
                name, images_per_hour=self.images_per_hour.value or None,
                max_pixels=self.max_pixels.value or None,
                max_steps=self.max_steps.value or None, weight=float(self.weight.value))
        except ColabSwarmError as exc:
            self.message.value = error_html(str(exc))
            return None
        self.name.value = ""
        self.message.value = ok_html(f"Added guest {name}: copy their share string above and "
                                     "send it to them.")
        self.refresh()
        return share

    def revoke(self, name: str) -> None:
        if self.handle.revoke(name):
            self.message.value = ok_html(f"Revoked {name}: their next request is refused.")
        else:
            self.message.value = error_html(f"No guest named {name}.")
        self.refresh()
