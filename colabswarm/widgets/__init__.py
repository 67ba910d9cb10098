"""ipywidgets panels over a Swarm (controller) or a WorkerHandle (worker notebook).

Each panel is a thin view: `.widget` is its root ipywidget, displaying the panel displays it,
and `close()` stops its listeners. The swarm holds the state; the panels only show and forward.
Listeners only record an event and wake the panel's own threads, which read the swarm and draw:
nothing heavy runs on the swarm's event-loop thread.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as w

from ._base import Panel, quiet_library_warnings
from .backends import BackendsPanel
from .generate import GeneratePanel
from .logs import LogsPanel
from .upscale import UpscalePanel
from .worker import WorkerPanel

__all__ = [
    "BackendsPanel",
    "ControllerUI",
    "GeneratePanel",
    "LogsPanel",
    "UpscalePanel",
    "WorkerPanel",
    "controller_ui",
    "quiet_library_warnings",
]


class ControllerUI(Panel):
    """Every controller panel in one Tab: Backends, Generate, Upscale, Logs."""

    def __init__(self, swarm: Any, *, local: Any = None) -> None:
        super().__init__()
        self.swarm = swarm
        self.backends = BackendsPanel(swarm, local=local)
        self.generate = GeneratePanel(swarm)
        self.upscale = UpscalePanel(swarm, gallery=self.generate)
        self.logs = LogsPanel(swarm)
        panels = [self.backends, self.generate, self.upscale, self.logs]
        self.widget = w.Tab(children=[p.widget for p in panels],
                            titles=["Backends", "Generate", "Upscale", "Logs"])
        self.widget.selected_index = 1 if swarm.backends else 0
        self._closers += [p.close for p in panels]


def controller_ui(swarm: Any, *, local: Any = None) -> ControllerUI:
    """All controller panels for `swarm`, as tabs; display it in a notebook cell. `local`: the
    group start_local_workers returned, so the Backends panel can restart those workers."""
    return ControllerUI(swarm, local=local)
