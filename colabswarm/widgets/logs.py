"""Logs panel: the swarm's recent log lines, filtered by level and text.

It renders straight from swarm.logs (the swarm keeps the history), redrawn on 'log' events,
including the 'skip' lines that say why a backend was passed over for a job.
"""

from __future__ import annotations

import html
import time
from typing import Any

import ipywidgets as w

from ._base import Panel, Throttle

__all__ = ["LogsPanel"]

LEVELS = ["all", "skip", "debug", "info", "warning", "error"]
_COLOURS = {"skip": "#6a1b9a", "debug": "#777", "info": "#333", "warning": "#e65100",
            "error": "#c62828"}


def _snapshot(logs: Any) -> list[tuple[float, str, str]]:
    """Copy a deque another thread appends to (iteration may race; just try again)."""
    for _ in range(20):
        try:
            return list(logs)
        except RuntimeError:
            time.sleep(0.001)
    return []


class LogsPanel(Panel):
    """Recent lines, newest last; `lines()` gives what is shown, as text."""

    def __init__(self, swarm: Any, *, max_lines: int = 200, update_every: float = 0.3) -> None:
        super().__init__()
        self.swarm = swarm
        self.max_lines = max_lines
        self.level = w.Dropdown(options=LEVELS, value="all", description="Level",
                                style={"description_width": "45px"},
                                layout=w.Layout(width="170px"))
        self.text = w.Text(placeholder="filter text", description="Find",
                           style={"description_width": "40px"}, continuous_update=True)
        self.count = w.Label()
        self.output = w.HTML(layout=w.Layout(max_height="300px", overflow="auto",
                                             border="1px solid #ddd", width="100%"))
        self.level.observe(lambda _c: self.refresh(), "value")
        self.text.observe(lambda _c: self.refresh(), "value")
        self.widget = w.VBox([
            w.HTML("<h3 style='margin:0'>Logs</h3><span style='color:#555'>'skip' lines say "
                   "why a backend was passed over for a job.</span>"),
            w.HBox([self.level, self.text, self.count]),
            self.output,
        ])
        self.widget.add_class("colabswarm-logs")
        self._update = Throttle(self.refresh, update_every)
        self._closers.append(self._update.stop)
        self._closers.append(swarm.subscribe(self._on_event))
        self.refresh()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "log" and not self._closed:
            self._update()

    def entries(self) -> list[tuple[float, str, str]]:
        """The (time, level, message) entries the filters let through, oldest first."""
        level, needle = self.level.value, self.text.value.strip().lower()
        out = [e for e in _snapshot(self.swarm.logs)
               if (level == "all" or e[1] == level) and (not needle or needle in e[2].lower())]
        return out[-self.max_lines:]

    def lines(self) -> list[str]:
        return [f"{time.strftime('%H:%M:%S', time.localtime(t))} {lvl:7} {msg}"
                for t, lvl, msg in self.entries()]

    def refresh(self) -> None:
        entries = self.entries()
        rows = [
            f"<span style='color:#999'>{time.strftime('%H:%M:%S', time.localtime(t))}</span> "
            f"<span style='color:{_COLOURS.get(lvl, '#333')}'>{html.escape(lvl):7}</span> "
            f"{html.escape(msg)}"
            for t, lvl, msg in entries
        ]
        body = "\n".join(rows) if rows else "<i>No log lines match.</i>"
        self.output.value = (f"<pre style='margin:4px;white-space:pre-wrap;font-size:85%'>"
                             f"{body}</pre>")
        self.count.value = f"{len(entries)} line{'s' if len(entries) != 1 else ''}"
