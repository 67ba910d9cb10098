"""Backends panel: paste share strings, order workers, see each one's status as a coloured row.

Every control writes straight to the swarm (swarm.set/move/remove) and every row is redrawn from
the swarm's snapshots on its 'backend' events, so what you see is what the swarm has.
"""

from __future__ import annotations

import html
import threading
from typing import Any

import ipywidgets as w

from ..errors import ColabSwarmError
from ._base import Panel, Throttle, error_html, ok_html, swarm_open
from .remote import RemoteControls

__all__ = ["BackendsPanel"]

_STATUS_TEXT = {
    "disabled": "disabled",
    "loading": "loading",
    "running": "running",
    "errored": "errored",
    "idle": "idle (away)",
}


def _status_html(snap: dict[str, Any]) -> str:
    colour = snap["colour"]
    text = _STATUS_TEXT.get(snap["status"], snap["status"])
    reason = snap.get("reason")
    tail = f": {html.escape(reason)}" if reason and snap["status"] != "running" else ""
    busy = ""
    if snap["status"] == "running":
        busy = f" · {snap['running']}/{snap['slots']} busy · {snap['images_done']} images"
    return (f'<span style="color:{colour};font-weight:bold">&#9679; {text}</span>'
            f'<span style="color:#555">{tail}{busy}</span>')


def _title_html(snap: dict[str, Any]) -> str:
    device = f" · {html.escape(str(snap['device']))}" if snap.get("device") else ""
    models = ", ".join(snap.get("models") or []) or "?"
    return (f"<b>{html.escape(snap['name'])}</b> "
            f'<code style="font-size:90%">{html.escape(snap["url"])}</code>'
            f'<span style="color:#555">{device} · models: {html.escape(models)}</span>')


class _Row:
    """The widgets of one backend; they call back into the panel, which calls the swarm."""

    def __init__(self, panel: BackendsPanel, name: str) -> None:
        self.name = name
        self.title = w.HTML()
        self.status = w.HTML()
        self.allow_idle = w.Checkbox(description="AllowIdle", indent=False,
                                     layout=w.Layout(width="95px"))
        self.enabled = w.Checkbox(description="enabled", indent=False,
                                  layout=w.Layout(width="85px"))
        self.slots = w.BoundedIntText(min=1, max=64, description="slots",
                                      layout=w.Layout(width="120px"),
                                      style={"description_width": "35px"})
        self.up = w.Button(icon="arrow-up", tooltip="try this backend earlier",
                           layout=w.Layout(width="36px"))
        self.down = w.Button(icon="arrow-down", tooltip="try this backend later",
                             layout=w.Layout(width="36px"))
        self.remove = w.Button(icon="trash", tooltip="remove this backend",
                               layout=w.Layout(width="36px"))
        self.remote = RemoteControls(panel.swarm, name)  # with the worker's admin token only
        self.box = w.VBox(
            [w.HBox([self.title]),
             w.HBox([self.status]),
             w.HBox([self.allow_idle, self.enabled, self.slots, self.up, self.down,
                     self.remove]),
             self.remote.widget],
            layout=w.Layout(border="3px solid grey", padding="4px", margin="3px 0"),
        )
        self.colour = "grey"
        self.allow_idle.observe(lambda c: panel._on_change(self.name, "allow_idle", c["new"]),
                                "value")
        self.enabled.observe(lambda c: panel._on_change(self.name, "enabled", c["new"]),
                             "value")
        self.slots.observe(lambda c: panel._on_change(self.name, "slots", c["new"]), "value")
        self.up.on_click(lambda _b: panel._move(self.name, -1))
        self.down.on_click(lambda _b: panel._move(self.name, +1))
        self.remove.on_click(lambda _b: panel._remove(self.name))

    def show(self, snap: dict[str, Any]) -> None:
        self.colour = snap["colour"]
        self.box.layout.border = f"3px solid {self.colour}"
        self.title.value = _title_html(snap)
        self.status.value = _status_html(snap)
        self.allow_idle.value = bool(snap["allow_idle"])
        self.enabled.value = bool(snap["enabled"])
        self.slots.value = int(snap["slots"])
        self.remote.show(snap)

    @property
    def status_text(self) -> str:
        """The status line as plain text (what a person reads), for tests and logs."""
        import re

        return html.unescape(re.sub(r"<[^>]+>", "", self.status.value)).replace("\u25cf ", "")


class BackendsPanel(Panel):
    """One coloured row per backend, plus a box to paste share strings into."""

    def __init__(self, swarm: Any, *, update_every: float = 0.3) -> None:
        super().__init__()
        self.swarm = swarm
        self._lock = threading.RLock()
        self._local = threading.local()
        self.rows: dict[str, _Row] = {}
        self.rows_box = w.VBox()
        self.empty = w.HTML("<i>No backends yet: paste a worker's share string below.</i>")
        self.summary = w.HTML()
        self.share_text = w.Textarea(
            placeholder="Paste one or more share strings (one per line), e.g.\n"
                        "https://example.trycloudflare.com#token=...",
            layout=w.Layout(width="100%", height="70px"),
        )
        self.new_allow_idle = w.Checkbox(description="AllowIdle", indent=False,
                                         layout=w.Layout(width="95px"))
        self.new_slots = w.BoundedIntText(value=2, min=1, max=64, description="slots",
                                          layout=w.Layout(width="120px"),
                                          style={"description_width": "35px"})
        self.add_button = w.Button(description="Add", button_style="primary", icon="plus")
        self.check_button = w.Button(description="Check now", icon="refresh",
                                     tooltip="ask every backend for its state now")
        self.message = w.HTML()
        self.add_button.on_click(lambda _b: self.add())
        self.check_button.on_click(lambda _b: self._check_now())
        self.widget = w.VBox([
            w.HTML("<h3 style='margin:0'>Backends</h3>"),
            self.summary,
            self.rows_box,
            self.share_text,
            w.HBox([self.add_button, self.new_allow_idle, self.new_slots, self.check_button]),
            self.message,
        ])
        self.widget.add_class("colabswarm-backends")
        self._busy_update = Throttle(self.refresh, update_every)
        self._closers.append(self._busy_update.stop)
        self._closers.append(swarm.subscribe(self._on_event))
        self.refresh()

    # ----- swarm -> widgets ------------------------------------------------------------------
    def _on_event(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        if event.get("type") == "backend":
            self._sync(self.swarm.backends)  # on the swarm's thread: no round trip
        elif event.get("type") in ("progress", "image"):
            self._busy_update()  # busy slots and image counts: at most a few times a second

    def refresh(self) -> None:
        """Redraw every row from the swarm's current snapshots."""
        if not swarm_open(self.swarm):
            return
        self._sync(self.swarm.backends)  # fetched before taking the lock: never wait inside

    def _sync(self, snaps: list[dict[str, Any]]) -> None:
        with self._lock:
            self._local.syncing = True
            try:
                order = []
                for snap in snaps:
                    row = self.rows.get(snap["name"])
                    if row is None:
                        row = self.rows[snap["name"]] = _Row(self, snap["name"])
                    row.show(snap)
                    order.append(row)
                for name in [n for n in self.rows if n not in {s["name"] for s in snaps}]:
                    del self.rows[name]
                children = tuple(r.box for r in order) or (self.empty,)
                if self.rows_box.children != children:
                    self.rows_box.children = children
                counts: dict[str, int] = {}
                for s in snaps:
                    counts[s["status"]] = counts.get(s["status"], 0) + 1
                parts = ", ".join(f"{n} {st}" for st, n in counts.items())
                self.summary.value = (f"{len(snaps)} backend{'s' if len(snaps) != 1 else ''}"
                                      f"{': ' + parts if parts else ''}. Jobs go to the first "
                                      "one with a free slot, top to bottom.")
            finally:
                self._local.syncing = False

    # ----- widgets -> swarm ------------------------------------------------------------------
    def _syncing(self) -> bool:
        return getattr(self._local, "syncing", False)

    def _on_change(self, name: str, field: str, value: Any) -> None:
        if self._syncing():
            return
        try:
            self.swarm.set(name, **{field: value})
        except (ColabSwarmError, KeyError, ValueError) as exc:
            self.message.value = error_html(str(exc))
            self.refresh()

    def _move(self, name: str, delta: int) -> None:
        names = [s["name"] for s in self.swarm.backends]
        if name in names:
            self.swarm.move(name, max(0, names.index(name) + delta))

    def _remove(self, name: str) -> None:
        try:
            self.swarm.remove(name)
            self.message.value = ok_html(f"Removed {name}.")
        except KeyError as exc:
            self.message.value = error_html(str(exc))

    def _check_now(self) -> None:
        self.swarm.check_now()
        self.refresh()

    def add(self, text: str | None = None) -> list[Any]:
        """Add every share string in `text` (default: the text box); errors go to the panel.

        Lines that were added leave the box; lines that failed stay there to be fixed.
        """
        text = self.share_text.value if text is None else text
        if not text.strip():
            self.message.value = error_html("Paste a share string first (the line a worker "
                                            "notebook prints, with #token=...).")
            return []
        self.add_button.disabled = True
        self.message.value = "<i>Contacting the worker(s)...</i>"
        lines = [ln.strip() for ln in text.replace(",", "\n").splitlines() if ln.strip()]
        try:
            results = self.swarm.add_many(text, allow_idle=self.new_allow_idle.value,
                                          slots=self.new_slots.value)
        except Exception as exc:  # never a traceback in the panel: say what happened
            self.message.value = error_html(f"Could not add: {exc}")
            return [exc]
        finally:
            self.add_button.disabled = False
        msgs, keep = [], []
        for line, res in zip(lines, results, strict=False):
            if isinstance(res, BaseException):
                msgs.append(error_html(f"Could not add {_short(line)}: {res}"))
                keep.append(line)
            else:
                msgs.append(ok_html(f"Added {res['name']} ({res['status']})."))
        self.message.value = "".join(msgs)
        if text == self.share_text.value:
            self.share_text.value = "\n".join(keep)
        self.refresh()
        return results


def _short(line: str) -> str:
    """A share string without its token, for messages."""
    return line.split("#", 1)[0][:80] or "(empty)"
