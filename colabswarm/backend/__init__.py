"""One GPU backend, both ends of the wire: engine and server on the worker, client for peers.

The worker side (engine, server, serve) needs the ``worker`` extra (torch, diffusers, fastapi);
the client imports without them.
"""

from __future__ import annotations

from typing import Any

from .client import WorkerClient

__all__ = ["WorkerClient", "WorkerHandle", "start_worker"]


def __getattr__(name: str) -> Any:  # worker parts load lazily: a controller has no torch
    if name in ("start_worker", "WorkerHandle"):
        from . import serve

        return getattr(serve, name)
    raise AttributeError(name)
