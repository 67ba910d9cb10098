"""A worker's recent log lines, for its owner (GET /v1/logs, the Worker panel), tokens masked.

Two sources go into one bounded ring per worker:
- the worker's own notes (started, guests added and revoked, limit refusals, idle warnings,
  jobs finished), written with ``WorkerLog.note``, which also logs them as usual;
- every record the ``colabswarm`` loggers let through (warnings and errors by default, more with
  ``-v``), caught by one process-wide handler. Lines of this kind are the process's: two
  workers in one process both see them.

Before a line is kept, every token the worker ever took (the owner's, each guest's, revoked
ones too) is replaced by its mask (``protocol.mask_token``), as is anything after ``token=``
or ``Bearer``; control characters go and the line is cut to 500 characters.

Attaching a handler to the ``colabswarm`` logger would stop Python's last-resort printing of
its warnings where no logging is configured (a notebook); the handler prints them itself in
that case, so what a person saw before still shows.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable

from ..protocol import LogLine, clean_text, mask_token

__all__ = ["WorkerLog"]

_MAX_LINES = 500
_LINE_CHARS = 500
_SECRETISH = re.compile(r"(token=|Bearer\s+)([A-Za-z0-9_\-]{8,256})", re.IGNORECASE)
_NOTED = "colabswarm_noted"  # a record the worker already put in its own ring


class WorkerLog:
    """One worker's ring of recent lines."""

    def __init__(self, secrets: Callable[[], list[str]], name: str = "worker",
                 max_lines: int = _MAX_LINES) -> None:
        self._secrets = secrets
        self._lines: deque[LogLine] = deque(maxlen=max_lines)
        self._lock = threading.Lock()
        self._log = logging.getLogger("colabswarm.worker")
        self.name = name

    def __repr__(self) -> str:
        return f"WorkerLog({self.name!r}, {len(self._lines)} lines)"

    def mask(self, text: str) -> str:
        for token in self._secrets():
            if token in text:
                text = text.replace(token, mask_token(token))
        return _SECRETISH.sub(lambda m: m.group(1) + mask_token(m.group(2)), text)

    def add(self, level: str, message: str, t: float | None = None) -> None:
        line = LogLine(t=time.time() if t is None else t, level=level.upper()[:10] or "INFO",
                       message=clean_text(self.mask(message), _LINE_CHARS))
        with self._lock:
            self._lines.append(line)

    def note(self, level: int, message: str) -> None:
        """A line of the worker's own: into the ring, and to the usual logging."""
        self.add(logging.getLevelName(level), message)
        self._log.log(level, "%s", self.mask(message), extra={_NOTED: True})

    def lines(self, n: int = 200) -> list[LogLine]:
        with self._lock:
            return list(self._lines)[-n:] if n > 0 else []

    # ----- the process-wide tap --------------------------------------------------------------
    def attach(self) -> None:
        _TAP.register(self)

    def detach(self) -> None:
        _TAP.unregister(self)


class _Tap(logging.Handler):
    """Fans records of the colabswarm loggers out to every running worker's ring."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self._logs: list[WorkerLog] = []
        self._guard = threading.Lock()

    def register(self, wl: WorkerLog) -> None:
        with self._guard:
            if wl not in self._logs:
                self._logs.append(wl)
            if len(self._logs) == 1:
                logging.getLogger("colabswarm").addHandler(self)

    def unregister(self, wl: WorkerLog) -> None:
        with self._guard:
            if wl in self._logs:
                self._logs.remove(wl)
            if not self._logs:
                logging.getLogger("colabswarm").removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not getattr(record, _NOTED, False):
                text = record.getMessage()
                if record.exc_info and record.exc_info[1] is not None:
                    exc = record.exc_info[1]
                    text += f" ({type(exc).__name__}: {exc})"
                for wl in list(self._logs):
                    wl.add(record.levelname, text, record.created)
            self._last_resort(record)
        except Exception:  # logging must never break the worker
            self.handleError(record)

    def _last_resort(self, record: logging.LogRecord) -> None:
        """Print as Python would have if this handler were not here: only when no other
        handler is on the record's way up, and at the last-resort handler's level."""
        resort = logging.lastResort
        if resort is None or record.levelno < resort.level:
            return
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        resort.handle(record)


_TAP = _Tap()
