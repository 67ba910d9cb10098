"""Honest progress: the queue line (generating / waiting on a worker / queued) and one bar per
run that moves with every denoising step the workers report, not only when a batch lands.

The numbers come from the swarm's public views: `Swarm.status()` for the counts and the
estimate, `Swarm.flights()` for each running job's step of its total steps and how many
images of which run it carries, and the swarm's 'run'/'image' events for each run's total and
delivered count. The arithmetic is pure (queue_line, run_fraction) and tested on its own.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as w

from ..swarm.controller import format_duration
from ._base import COLOURS, row

__all__ = ["RunBars", "RunInfo", "queue_line", "run_fraction"]


def queue_line(status: Any) -> str:
    """What the swarm is doing, in three counts that add up to the total: images being
    denoised now, images sent to a worker that has not begun them (behind its other job, or
    a model load), images queued here for a free worker; then the estimate, which says
    "finishing…" rather than "0s" while the last images are still running."""
    current = int(status.current)
    if current == 0:
        return "0 current generations: nothing running or queued."
    loading = int(getattr(status, "loading", 0))
    generating = int(getattr(status, "generating", 0))
    waiting = max(int(status.running) - generating - loading, 0)
    parts = [f"{generating} generating", f"{waiting} waiting on a worker"]
    if loading:
        parts.append(f"{loading} waiting on a model load")
    parts.append(f"{int(status.queued)} queued")
    eta = status.eta_s
    if eta is None:
        est = ""
    elif eta < 1.0:
        est = " (finishing…)"
    else:
        est = f" (est. {format_duration(eta)})"
    return f"{current} current generations: {', '.join(parts)}{est}"


@dataclass
class RunInfo:
    """One run as a view knows it from the swarm's events."""

    id: int
    kind: str
    total: int
    done: int = 0
    finished: bool = False
    error: str | None = None
    label: str = ""
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None


def run_fraction(run: RunInfo, flights: Iterable[dict[str, Any]]) -> float:
    """Images of `run` done, counting each running job's images by its step: a batch of 4 at
    step 10 of 20 is 2 images' worth. Copies (a second worker racing the same images) count
    once, through the original. Never above the run's total."""
    if run.finished:
        return float(run.done if run.error else run.total)
    partial = 0.0
    for f in flights:
        if f.get("copy"):
            continue
        n = f.get("runs", {}).get(run.id, 0)
        total_steps = f.get("total_steps") or 0
        if n and total_steps > 0:
            partial += n * min(f.get("step", 0), total_steps) / total_steps
    return min(float(run.total), run.done + partial)


class _Bar:
    def __init__(self) -> None:
        self.label = w.HTML(layout=w.Layout(flex="1 1 220px", min_width="0"))
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0,
                                   layout=w.Layout(flex="2 1 200px", min_width="120px",))
        self.box = row([self.label, self.bar])
        self.box.add_class("colabswarm-runbar")


class RunBars:
    """One bar per run (at most `max_bars` running ones, then a count), plus the last run to
    finish, so a person sees how the run they started is doing, not a sum of everything."""

    def __init__(self, unit: str = "images", max_bars: int = 4) -> None:
        self.unit = unit
        self.max_bars = max_bars
        self._bars: dict[int, _Bar] = {}
        self.more = w.HTML()
        self.widget = w.VBox([], layout=w.Layout(width="100%"))

    def show(self, runs: list[RunInfo], flights: list[dict[str, Any]]) -> dict[int, float]:
        """Redraw from the runs (oldest first) and the flights; returns each shown run's
        images-done value (what the bar shows), for tests."""
        active = [r for r in runs if not r.finished]
        ended = [r for r in runs if r.finished]
        shown = active[:self.max_bars]
        if ended and len(shown) < self.max_bars:
            shown = [ended[-1], *shown]  # the last to finish stays until others take its place
        values: dict[int, float] = {}
        keep: dict[int, _Bar] = {}
        for r in shown:
            bar = self._bars.get(r.id) or _Bar()
            keep[r.id] = bar
            value = run_fraction(r, flights)
            values[r.id] = value
            bar.bar.max = float(max(1, r.total))
            bar.bar.value = value
            bar.bar.bar_style = ("success" if r.finished and not r.error else
                                 "warning" if r.finished else "info")
            pct = 100.0 * value / max(1, r.total)
            state = ""
            if r.finished:
                took = (r.ended or time.monotonic()) - r.started
                state = (f" · done in {format_duration(took)}" if not r.error else
                         f" · <span style='color:{COLOURS['error']}'>"
                         f"{html.escape(r.error[:120])}</span>")
            self._describe(bar, r, value, pct, state)
        self._bars = keep
        extra = len(active) - len([r for r in shown if not r.finished])
        self.more.value = (f"<span style='color:{COLOURS['muted']}'>and {extra} more "
                           f"run{'s' if extra != 1 else ''} queued</span>") if extra > 0 else ""
        children = tuple(self._bars[r.id].box for r in shown) + ((self.more,) if extra else ())
        if self.widget.children != children:
            self.widget.children = children
        return values

    def _describe(self, bar: _Bar, r: RunInfo, value: float, pct: float, state: str) -> str:
        label = f" · {html.escape(r.label)}" if r.label else ""
        text = (f"<b>Run {r.id}</b>{label}: {r.done} of {r.total} {self.unit} "
                f"({pct:.0f}%){state}")
        if bar.label.value != text:
            bar.label.value = text
        return text
