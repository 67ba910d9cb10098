"""Logs panel: the swarm's log (swarm.logs) and its runs starting and ending, one line per
event, filtered by level and text.

A line that repeats (one dead worker's "seed N goes back" five times) is shown once with its
count and when it first happened; a line that comes back much later is shown again, so the
order of events stays readable. Newest first, or oldest first following the end (the box
stays scrolled to the newest line without a script). Words wrap whole. The swarm's records
also reach Python's logging ("colabswarm.swarm"), never a cell's stderr by themselves.
"""

from __future__ import annotations

import html
import threading
import time
from collections import deque
from typing import Any

import ipywidgets as w

from ._base import COLOURS, Panel, Throttle, row, style_widget

__all__ = ["LEVELS", "LogsPanel", "dedupe"]

LEVELS = ["all", "skip", "debug", "info", "warning", "error"]
ORDERS = ["newest first", "oldest first (follow the end)"]
_COLOURS = {"skip": COLOURS["skip"], "debug": COLOURS["debug"], "info": COLOURS["text"],
            "warning": COLOURS["warning"], "error": COLOURS["error"]}
_RUN_WHAT = {"generate": "images", "grid": "grid cells", "upscale": "tiles",
             "upscale-model": "upscale-model pass"}


def _snapshot(logs: Any) -> list[tuple[float, str, str]]:
    """Copy a deque another thread appends to (iteration may race; just try again)."""
    for _ in range(20):
        try:
            return list(logs)
        except RuntimeError:
            time.sleep(0.001)
    return []


def dedupe(entries: list[tuple[float, str, str]], window: int = 8
           ) -> list[tuple[float, str, str, int, float]]:
    """(last time, level, message, count, first time): a line that repeats one of the last
    `window` lines shown is folded into it (moved to its newest place, counted); an old line
    that comes back later is a line of its own, so "running, errored, running" keeps its
    order. Oldest first."""
    out: list[list[Any]] = []
    for t, level, message in entries:
        for i in range(len(out) - 1, max(len(out) - window, 0) - 1, -1):
            if out[i][1] == level and out[i][2] == message:
                item = out.pop(i)
                item[0], item[3] = t, item[3] + 1
                out.append(item)
                break
        else:
            out.append([t, level, message, 1, t])
    return [tuple(v) for v in out]  # type: ignore[misc]


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


class LogsPanel(Panel):
    """Recent lines; `lines()` gives what is shown, as text, in the order shown."""

    def __init__(self, swarm: Any, *, max_lines: int = 300, update_every: float = 0.3) -> None:
        super().__init__()
        self.swarm = swarm
        self.max_lines = max_lines
        self._runs: deque[tuple[float, str, str]] = deque(maxlen=200)
        self._started: dict[int, float] = {}
        self._lock = threading.Lock()
        self.level = w.Dropdown(options=LEVELS, value="all", description="Level",
                                style={"description_width": "45px"},
                                layout=w.Layout(width="160px"))
        self.text = w.Text(placeholder="filter text", description="Find",
                           style={"description_width": "40px"}, continuous_update=True,
                           layout=w.Layout(width="240px"))
        self.order = w.Dropdown(options=ORDERS, value=ORDERS[0], description="Order",
                                style={"description_width": "45px"},
                                layout=w.Layout(width="290px"))
        self.count = w.HTML()
        self.output = w.HTML()
        self.level.observe(lambda _c: self.refresh(), "value")
        self.text.observe(lambda _c: self.refresh(), "value")
        self.order.observe(lambda _c: self.refresh(), "value")
        self.widget = w.VBox([
            style_widget(),
            w.HTML(f"<h3 style='margin:0'>Logs</h3><span style='color:{COLOURS['muted']}'>"
                   "What the swarm did and why; 'skip' lines say why a backend was passed "
                   "over for a job. A repeated line shows once, with its count.</span>"),
            row([self.level, self.text, self.order, self.count]),
            self.output,
        ], layout=w.Layout(width="100%"))
        self.widget.add_class("colabswarm")
        self.widget.add_class("colabswarm-logs")
        self._update = Throttle(self.refresh, update_every, "colabswarm-logs-draw")
        self._closers.append(self._update.stop)
        self._closers.append(swarm.subscribe(self._on_event))
        self.refresh()

    def _on_event(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        kind = event.get("type")
        if kind == "run":
            self._run_line(event)
        if kind in ("log", "run"):
            self._update()

    def _run_line(self, event: dict[str, Any]) -> None:
        rid, rkind = event.get("run"), str(event.get("kind"))
        total = int(event.get("total") or 0)
        what = _RUN_WHAT.get(rkind, "images")
        now = time.time()
        if not event.get("finished"):
            self._started[rid] = now
            text = f"run {rid} started: {total} {what} ({rkind})"
            level = "info"
        else:
            began = self._started.pop(rid, None)
            took = f" in {now - began:.1f}s" if began is not None else ""
            done = int(event.get("done") or 0)
            if event.get("error"):
                level = "warning"
                text = f"run {rid} ended with {done} of {total} {what}{took}: {event['error']}"
            else:
                level = "info"
                text = f"run {rid} finished: {done} of {total} {what}{took}"
        with self._lock:
            self._runs.append((now, level, text))

    def entries(self) -> list[tuple[float, str, str, int, float]]:
        """What the filters let through, one per distinct line, oldest first:
        (last time, level, message, count, first time)."""
        level, needle = self.level.value, self.text.value.strip().lower()
        with self._lock:
            runs = list(self._runs)
        merged = sorted(_snapshot(self.swarm.logs) + runs, key=lambda e: e[0])
        out = [e for e in merged
               if (level == "all" or e[1] == level) and (not needle or needle in e[2].lower())]
        return dedupe(out)[-self.max_lines:]

    def _shown(self) -> list[tuple[float, str, str, int, float]]:
        entries = self.entries()
        return list(reversed(entries)) if self.order.value == ORDERS[0] else entries

    def lines(self) -> list[str]:
        """The lines as shown, as text: 'HH:MM:SS level   message (x3 since HH:MM:SS)'."""
        return [f"{_clock(t)} {lvl:7} {msg}"
                + (f" (x{n} since {_clock(first)})" if n > 1 else "")
                for t, lvl, msg, n, first in self._shown()]

    def refresh(self) -> None:
        shown = self._shown()
        rows = []
        for t, lvl, msg, n, first in shown:
            times = (f" <b style='color:{COLOURS['accent']}'>&times;{n}</b>"
                     f"<span style='color:{COLOURS['muted']}'> since {_clock(first)}</span>"
                     if n > 1 else "")
            rows.append(f"<div><span style='color:{COLOURS['muted']}'>{_clock(t)}</span> "
                        f"<span style='color:{_COLOURS.get(lvl, COLOURS['text'])}'>"
                        f"{html.escape(lvl)}</span> "
                        f"<span style='color:{COLOURS['text']}'>{html.escape(msg)}</span>"
                        f"{times}</div>")
        body = "".join(rows) if rows else "<i>No log lines match.</i>"
        follow = self.order.value != ORDERS[0]
        # column-reverse keeps the box scrolled to its end as lines arrive: "follow the end"
        direction = "column-reverse" if follow else "column"
        self.output.value = (f"<div class='colabswarm-log' style='flex-direction:{direction}'>"
                             f"<div class='colabswarm-log-lines'>{body}</div></div>")
        n = len(shown)
        self.count.value = (f"<span style='color:{COLOURS['muted']}'>{n} "
                            f"line{'s' if n != 1 else ''}</span>")
