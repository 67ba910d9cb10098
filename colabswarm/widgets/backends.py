"""Backends panel: paste share strings, order workers, see each one's status as a coloured row.

Every control writes straight to the swarm (swarm.set/move/remove/retry) and every row is
redrawn from the swarm's snapshots, so what you see is what the swarm has. A row that is away
counts down to the swarm's next try and offers "Retry now"; a row for a worker this notebook
started (`local=`, the group `start_local_workers` returned) offers "Restart" and says that it
is a process here, not a notebook behind a tunnel. The panel holds no process handle of its
own and puts none into the swarm: it only looks names up in the group it was given.
"""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Iterable
from typing import Any

import ipywidgets as w

from ..errors import AuthError, BackendUnavailable, ColabSwarmError, WorkerMisbehaved
from ._base import (
    COLOURS,
    STATUS_COLOURS,
    Panel,
    TaskThread,
    Throttle,
    button_style,
    error_html,
    full_width,
    muted_html,
    ok_html,
    row,
    style_widget,
    swarm_open,
)
from .remote import RemoteControls

__all__ = ["BackendsPanel", "status_words"]

_STATUS_TEXT = {
    "disabled": "disabled",
    "loading": "loading",
    "running": "running",
    "errored": "errored",
    "idle": "idle (away)",
}
_AWAY = ("errored", "idle")


def _seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s} s" if s < 120 else f"{s // 60} min {s % 60} s"


def status_words(snap: dict[str, Any]) -> str:
    """The status line as plain text: state, reason or activity, and the retry countdown."""
    st = snap["status"]
    text = _STATUS_TEXT.get(st, st)
    reason = snap.get("reason")
    if snap.get("activity"):
        text += f" · {snap['activity']}"
    elif reason and st != "running":
        text += f": {reason}"
    if st == "running":
        text += f" · {snap['running']}/{snap['slots']} busy · {snap['images_done']} images"
    comp = snap.get("compile") or {}
    if comp.get("state") == "compiling":
        text += " · compiling"
    if st in _AWAY and snap.get("retry_in") is not None:
        if snap.get("quarantined"):
            text += f" · kept out for {_seconds(snap['retry_in'])} (it sent something wrong)"
        else:
            text += f" · retrying in {_seconds(snap['retry_in'])}"
    return text


def _status_html(snap: dict[str, Any]) -> str:
    colour = STATUS_COLOURS.get(snap["status"], COLOURS["text"])
    first = _STATUS_TEXT.get(snap["status"], snap["status"])
    rest = status_words(snap)[len(first):]
    return (f'<span style="color:{colour};font-weight:bold">&#9679; {html.escape(first)}'
            f'</span><span style="color:{COLOURS["text"]}">{html.escape(rest)}</span>')


def _title_html(snap: dict[str, Any], local: Any = None) -> str:
    device = f" · {html.escape(str(snap['device']))}" if snap.get("device") else ""
    if local is not None:
        device += f" · process {getattr(local, 'pid', '?')} of this notebook"
    models = ", ".join(snap.get("models") or []) or "?"
    loaded = snap.get("model_loaded")
    role = f" · {html.escape(snap['role'])} token" if snap.get("role") else ""
    return (f"<b>{html.escape(snap['name'])}</b> "
            f'<code style="font-size:90%">{html.escape(snap["url"])}</code>'
            f'<span style="color:{COLOURS["muted"]}">{device} · models: '
            f'{html.escape(models)}{" (loaded: " + html.escape(loaded) + ")" if loaded else ""}'
            f"{role}</span>")


def _find_local(local: Any, name: str) -> Any:
    if local is None:
        return None
    for worker in (local if isinstance(local, Iterable) else [local]):
        if getattr(worker, "name", None) == name:
            return worker
    return None


class _Row:
    """The widgets of one backend; they call back into the panel, which calls the swarm."""

    def __init__(self, panel: BackendsPanel, name: str) -> None:
        self.name = name
        self.title = w.HTML()
        self.status = w.HTML()
        self.hint = w.HTML()
        self.allow_idle = w.Checkbox(description="AllowIdle", indent=False,
                                     layout=w.Layout(width="95px"))
        self.enabled = w.Checkbox(description="enabled", indent=False,
                                  layout=w.Layout(width="85px"))
        self.slots = w.BoundedIntText(min=1, max=64, description="slots",
                                      layout=w.Layout(width="110px"),
                                      style={"description_width": "35px"})
        self.up = w.Button(icon="arrow-up", tooltip="try this backend earlier",
                           layout=w.Layout(width="36px"))
        self.down = w.Button(icon="arrow-down", tooltip="try this backend later",
                             layout=w.Layout(width="36px"))
        self.remove = w.Button(icon="trash", tooltip="remove this backend",
                               layout=w.Layout(width="36px"))
        self.retry = w.Button(description="Retry now", icon="refresh",
                              tooltip="ask this worker for its state now",
                              layout=w.Layout(width="auto", display="none"))
        self.restart = w.Button(description="Restart", icon="power-off",
                                style=button_style("warning"),
                                tooltip="restart this worker's process (same address and token)",
                                layout=w.Layout(width="auto", display="none"))
        self.remote = RemoteControls(panel.swarm, name)  # with the worker's admin token only
        self.box = w.VBox(
            [self.title, self.status, self.hint,
             row([row([self.allow_idle, self.enabled, self.slots]),  # groups wrap whole
                  row([self.up, self.down, self.remove, self.retry, self.restart])]),
             self.remote.widget],
            layout=w.Layout(border="3px solid #5c5c5c", padding="4px", margin="3px 0",
                            width="100%"),
        )
        self.box.add_class("colabswarm-backend")
        self.box.add_class("colabswarm-backend-" + re.sub(r"[^A-Za-z0-9_-]", "-", name))
        self.colour = "grey"
        self.restarting = False
        self.allow_idle.observe(lambda c: panel._on_change(self.name, "allow_idle", c["new"]),
                                "value")
        self.enabled.observe(lambda c: panel._on_change(self.name, "enabled", c["new"]),
                             "value")
        self.slots.observe(lambda c: panel._on_change(self.name, "slots", c["new"]), "value")
        self.up.on_click(lambda _b: panel._move(self.name, -1))
        self.down.on_click(lambda _b: panel._move(self.name, +1))
        self.remove.on_click(lambda _b: panel._remove(self.name))
        self.retry.on_click(lambda _b: panel.retry(self.name))
        self.restart.on_click(lambda _b: panel.restart(self.name))

    def show(self, snap: dict[str, Any], local: Any) -> None:
        self.colour = snap["colour"]
        self.box.layout.border = f"3px solid {STATUS_COLOURS.get(snap['status'], '#5c5c5c')}"
        self.title.value = _title_html(snap, local)
        self.status.value = _status_html(snap)
        away = snap["status"] in _AWAY
        self.hint.value = self._hint(snap, local) if away or self.restarting else ""
        self.retry.layout.display = "" if away and snap.get("enabled") else "none"
        self.restart.layout.display = "" if local is not None else "none"
        self.restart.disabled = self.restarting
        self.allow_idle.value = bool(snap["allow_idle"])
        self.enabled.value = bool(snap["enabled"])
        self.slots.value = int(snap["slots"])
        self.remote.show(snap)

    def _hint(self, snap: dict[str, Any], local: Any) -> str:
        if self.restarting:
            return muted_html(f"Restarting {self.name}'s process…")
        if local is not None:
            alive = getattr(local, "alive", None)
            code = getattr(local, "returncode", None)
            if alive is False:
                return muted_html(f"{self.name} is a worker process on this machine, started "
                                  f"by this notebook, and it has exited (exit code {code}). "
                                  "Press Restart: same address and token, so this row comes "
                                  "back by itself.")
            return muted_html(f"{self.name} is a worker process on this machine (pid "
                              f"{getattr(local, 'pid', '?')}) and it is still running: press "
                              "Retry now, or Restart it.")
        if snap.get("quarantined"):
            return muted_html("It answered with something impossible and is kept out for a "
                              "while; it is checked again after that.")
        return muted_html("Is the worker's notebook (or terminal) still running, and its tunnel "
                          "open? A reopened tunnel has a new address: remove this row and paste "
                          "the worker's new share string.")

    @property
    def status_text(self) -> str:
        """The status line as plain text (what a person reads), for tests and logs."""
        return html.unescape(re.sub(r"<[^>]+>", "", self.status.value)).replace("\u25cf ", "")


class BackendsPanel(Panel):
    """One coloured row per backend, plus a box to paste share strings into.

    local: the group `start_local_workers` returned (or a list of its workers), so rows of
    those workers offer Restart and say they are processes of this notebook."""

    def __init__(self, swarm: Any, *, local: Any = None, update_every: float = 0.3) -> None:
        super().__init__()
        self.swarm = swarm
        self.local = local
        self._lock = threading.RLock()
        self._local = threading.local()
        self.rows: dict[str, _Row] = {}
        self.rows_box = w.VBox(layout=w.Layout(width="100%"))
        self.empty = w.HTML("<i>No backends yet: paste a worker's share string below.</i>")
        self.summary = w.HTML()
        self.share_text = full_width(w.Textarea(
            placeholder="Paste one or more share strings (one per line), e.g.\n"
                        "https://example.trycloudflare.com#token=...",
            layout=w.Layout(height="70px")))
        self.new_allow_idle = w.Checkbox(description="AllowIdle", indent=False,
                                         layout=w.Layout(width="95px"))
        self.new_slots = w.BoundedIntText(value=2, min=1, max=64, description="slots",
                                          layout=w.Layout(width="110px"),
                                          style={"description_width": "35px"})
        self.add_button = w.Button(description="Add", style=button_style("primary"), icon="plus",
                                   layout=w.Layout(width="auto"))
        self.check_button = w.Button(description="Check now", icon="refresh",
                                     tooltip="ask every backend for its state now",
                                     layout=w.Layout(width="auto"))
        self.message = w.HTML()
        self.add_anyway = w.VBox(layout=w.Layout(width="100%"))
        self.tasks = TaskThread("colabswarm-backends")
        self.add_button.on_click(lambda _b: self._add_in_background())
        self.check_button.on_click(lambda _b: self.tasks.submit(self._check_now))
        self.widget = w.VBox([
            style_widget(),
            w.HTML("<h3 style='margin:0'>Backends</h3>"),
            self.summary,
            self.rows_box,
            self.share_text,
            row([self.add_button, self.new_allow_idle, self.new_slots, self.check_button]),
            self.message,
            self.add_anyway,
        ], layout=w.Layout(width="100%"))
        self.widget.add_class("colabswarm")
        self.widget.add_class("colabswarm-backends")
        self._update = Throttle(self.refresh, update_every, "colabswarm-backends-draw")
        self._stop_ticks = threading.Event()
        self._closers += [self._update.stop, self.tasks.stop, self._stop_ticks.set]
        self._closers.append(swarm.subscribe(self._on_event))
        threading.Thread(target=self._tick, daemon=True, name="colabswarm-backends-tick").start()
        self.refresh()

    # ----- swarm -> widgets ------------------------------------------------------------------
    def _on_event(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        if event.get("type") in ("backend", "progress", "image"):
            self._update()  # drawn on the panel's thread, at most a few times a second

    def _tick(self) -> None:
        """Once a second while a row counts down to its next try, so the number moves."""
        while not self._stop_ticks.wait(1.0):
            if any(r.retry.layout.display == "" or r.restarting for r in list(self.rows.values())):
                self._update()

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
                    row_ = self.rows.get(snap["name"])
                    if row_ is None:
                        row_ = self.rows[snap["name"]] = _Row(self, snap["name"])
                    row_.show(snap, _find_local(self.local, snap["name"]))
                    order.append(row_)
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

    def retry(self, name: str) -> None:
        """Ask one backend for its state now (its row's "Retry now"); on the panel's thread."""
        def go() -> None:
            try:
                self.swarm.retry(name)
            except KeyError as exc:
                self.message.value = error_html(str(exc))
            self.refresh()

        self.tasks.submit(go)

    def restart(self, name: str) -> None:
        """Restart a local worker's process (its row's "Restart"): same port and token, then
        ask it at once, so the row turns green as soon as it serves, not at the next try."""
        worker = _find_local(self.local, name)
        row_ = self.rows.get(name)
        if worker is None or row_ is None or row_.restarting:
            return
        row_.restarting = True
        self.refresh()

        def go() -> None:
            try:
                worker.restart()
            except Exception as exc:  # what the process printed is in the message
                self.message.value = error_html(f"{name} did not restart: {exc}")
            else:
                self.message.value = ok_html(f"Restarted {name} (pid {worker.pid}).")
                try:
                    self.swarm.retry(name)
                except KeyError:
                    pass
            finally:
                row_.restarting = False
                self.refresh()

        threading.Thread(target=go, daemon=True, name=f"colabswarm-restart-{name}").start()

    def _add_in_background(self) -> None:
        """The Add button: contacting workers can take seconds; the kernel stays free."""
        self.add_button.disabled = True
        self.message.value = "<i>Contacting the worker(s)...</i>"
        self.tasks.submit(self.add)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until the panel's adds, retries and checks are done (tests, scripts)."""
        self.tasks.wait_idle(timeout)

    def add(self, text: str | None = None) -> list[Any]:
        """Add every share string in `text` (default: the text box); errors go to the panel.

        Lines that were added leave the box; lines that failed stay there to be fixed. A
        worker that could not be reached can still be added as AllowIdle (a button each):
        it turns green when it answers."""
        text = self.share_text.value if text is None else text
        if not text.strip():
            self.message.value = error_html("Paste a share string first (the line a worker "
                                            "notebook prints, with #token=...).")
            self.add_button.disabled = False
            return []
        self.add_button.disabled = True
        self.message.value = "<i>Contacting the worker(s)...</i>"
        lines = [ln.strip() for ln in text.replace(",", "\n").splitlines() if ln.strip()]
        allow_idle, slots = bool(self.new_allow_idle.value), int(self.new_slots.value)
        try:
            results = self.swarm.add_many(text, allow_idle=allow_idle, slots=slots)
        except Exception as exc:  # never a traceback in the panel: say what happened
            self.message.value = error_html(f"Could not add: {exc}")
            return [exc]
        finally:
            self.add_button.disabled = False
        msgs, keep, unreachable = [], [], []
        for line, res in zip(lines, results, strict=False):
            if isinstance(res, BaseException):
                msgs.append(error_html(f"Could not add {_short(line)}: {res}"))
                keep.append(line)
                if isinstance(res, BackendUnavailable) and not \
                        isinstance(res, (AuthError, WorkerMisbehaved)) and not allow_idle:
                    unreachable.append(line)
            else:
                msgs.append(ok_html(f"Added {res['name']} ({res['status']})."))
        self.message.value = "".join(msgs)
        if text == self.share_text.value:
            self.share_text.value = "\n".join(keep)
        self.add_anyway.children = tuple(self._anyway_row(line) for line in unreachable)
        self.refresh()
        return results

    def _anyway_row(self, line: str) -> w.Widget:
        button = w.Button(description="Add anyway as AllowIdle", icon="plus",
                          tooltip="add it now as a peer that comes and goes: it turns green "
                                  "when it answers", layout=w.Layout(width="auto"))
        box = row([w.HTML(muted_html(f"{_short(line)} did not answer.")), button])
        button.on_click(lambda _b: self._add_anyway(line, box))
        return box

    def _add_anyway(self, line: str, box: w.Widget) -> None:
        self.add_anyway.children = tuple(c for c in self.add_anyway.children if c is not box)
        self.message.value = muted_html(f"Adding {_short(line)} as AllowIdle…")

        def go() -> None:
            try:
                snap = self.swarm.add(line, allow_idle=True, slots=int(self.new_slots.value))
            except ColabSwarmError as exc:
                self.message.value = error_html(f"Could not add {_short(line)}: {exc}")
                return
            self.message.value = ok_html(f"Added {snap['name']} as AllowIdle ({snap['status']}"
                                         "): it turns green when it answers.")
            keep = [ln for ln in self.share_text.value.splitlines() if ln.strip() != line]
            self.share_text.value = "\n".join(keep)
            self.refresh()

        self.tasks.submit(go)


def _short(line: str) -> str:
    """A share string without its token, for messages."""
    return line.split("#", 1)[0][:80] or "(empty)"
