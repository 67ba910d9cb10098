"""The controller: many workers as one swarm. No torch is imported on this side."""

from __future__ import annotations

from .backends import Backend, BackendStatus
from .controller import GenerationResult, Swarm, SwarmStatus
from .outputs import GeneratedImage, read_parameters, save_image

__all__ = [
    "Backend",
    "BackendStatus",
    "GeneratedImage",
    "GenerationResult",
    "Swarm",
    "SwarmStatus",
    "read_parameters",
    "save_image",
]
