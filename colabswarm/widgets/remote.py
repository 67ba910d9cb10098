"""A Backends row's owner controls: the worker's recent log, free its memory, interrupt it.

Shown only for backends whose token is the worker's admin token (its /v1/info says role
"owner"); every action goes through ``swarm.backend(name)`` (swarm/remote.py), so a refusal is
the worker's, shown as a message.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as w

from ..errors import ColabSwarmError
from ._base import button_style, error_html, ok_html, row

__all__ = ["RemoteControls"]


class RemoteControls:
    """Log / Free / Interrupt for one backend (a part of a Backends row)."""

    def __init__(self, swarm: Any, name: str, lines: int = 100) -> None:
        self.swarm, self.name, self.lines = swarm, name, lines
        small = w.Layout(width="auto")
        self.logs_button = w.Button(description="Worker log", icon="list", layout=small,
                                    tooltip="the worker's recent log lines (tokens masked)")
        self.free_button = w.Button(description="Free memory", icon="eraser", layout=small)
        self.interrupt_button = w.Button(description="Interrupt worker", icon="stop",
                                         style=button_style("warning"), layout=small,
                                         tooltip="stop every job on this worker, everyone's")
        self.output = w.HTML()
        self.logs_button.on_click(lambda _b: self.show_logs())
        self.free_button.on_click(lambda _b: self.free())
        self.interrupt_button.on_click(lambda _b: self.interrupt())
        self.widget = w.VBox([row([self.logs_button, self.free_button,
                                   self.interrupt_button]), self.output])
        self.widget.layout.display = "none"

    def show(self, snap: dict[str, Any]) -> None:
        """Visible only when this swarm holds the worker's admin token."""
        self.widget.layout.display = "" if snap.get("role") == "owner" else "none"

    def _remote(self) -> Any:
        return self.swarm.backend(self.name)

    def show_logs(self) -> str:
        try:
            text = self._remote().log_text(self.lines)
        except (ColabSwarmError, KeyError) as exc:
            self.output.value = error_html(f"Could not read the log: {exc}")
            return ""
        self.output.value = (
            "<pre style='max-height:240px;overflow:auto;font-size:85%;margin:2px 0'>"
            f"{html.escape(text) or '(empty)'}</pre>")
        return text

    def free(self) -> None:
        try:
            now = self._remote().free()
        except (ColabSwarmError, KeyError) as exc:
            self.output.value = error_html(f"Could not free memory: {exc}")
        else:
            self.output.value = ok_html(f"{self.name} freed its memory." if now else
                                        f"{self.name} frees its memory after the job it runs.")

    def interrupt(self) -> None:
        try:
            n = self._remote().interrupt()
        except (ColabSwarmError, KeyError) as exc:
            self.output.value = error_html(f"Could not interrupt: {exc}")
        else:
            self.output.value = ok_html(f"{self.name}: {n} job(s) interrupted (this swarm's "
                                        "images that were there run again).")
