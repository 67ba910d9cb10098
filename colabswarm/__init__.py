"""colabswarm: scattered GPUs (Colab, Runpod, a friend's PC) as one Stable Diffusion swarm.

Controller side (no torch needed): ``Swarm``, ``start_local_workers``.
Worker side (the ``worker`` extra): ``start_worker``.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import (
    AuthError,
    BackendUnavailable,
    BadShareString,
    Busy,
    ColabSwarmError,
    ErrorKind,
    Forbidden,
    InvalidRequest,
    JobFailed,
    JobInterrupted,
    ModelNotAvailable,
    TunnelError,
    WorkerMisbehaved,
)
from .protocol import decode_share, encode_share

__version__ = "0.1.0"

# A library's log records go where its user configures logging, and nowhere else: without
# this, Python's last-resort handler prints every warning to stderr, which a notebook shows as
# a pink error box under whichever cell made the Swarm, minutes later. The panels show the
# swarm's own log (Logs panel); `logging.basicConfig()` brings them to a terminal.
logging.getLogger("colabswarm").addHandler(logging.NullHandler())
__all__ = [
    "AuthError",
    "BackendUnavailable",
    "BadShareString",
    "Busy",
    "ColabSwarmError",
    "ErrorKind",
    "Forbidden",
    "InvalidRequest",
    "JobFailed",
    "JobInterrupted",
    "ModelNotAvailable",
    "Swarm",
    "TunnelError",
    "WorkerHandle",
    "WorkerMisbehaved",
    "__version__",
    "decode_share",
    "encode_share",
    "start_local_workers",
    "start_worker",
]

_LAZY = {
    "Swarm": ("colabswarm.swarm.controller", "Swarm"),
    "start_local_workers": ("colabswarm.swarm.local", "start_local_workers"),
    "start_worker": ("colabswarm.backend.serve", "start_worker"),
    "WorkerHandle": ("colabswarm.backend.serve", "WorkerHandle"),
}


def __getattr__(name: str) -> Any:
    """Import parts on first use: the controller never pulls in torch or fastapi."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'colabswarm' has no attribute {name!r}")
