"""One registry entry per worker: address, token, order, AllowIdle, slots, and its status.

Statuses follow StableSwarmUI's: disabled (bad config or switched off), loading, running
(ready for work), errored (with the reason), idle (an AllowIdle peer that is away).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..protocol import Info, JobRequest, mask_token
from .speed import SpeedModel

__all__ = ["Backend", "BackendStatus", "STATUS_COLOURS", "next_check_delay"]


class BackendStatus(StrEnum):
    DISABLED = "disabled"
    LOADING = "loading"
    RUNNING = "running"
    ERRORED = "errored"
    IDLE = "idle"


STATUS_COLOURS = {
    BackendStatus.DISABLED: "orange",
    BackendStatus.LOADING: "gold",
    BackendStatus.RUNNING: "green",
    BackendStatus.ERRORED: "red",
    BackendStatus.IDLE: "grey",
}


def next_check_delay(status: BackendStatus, failures: int, healthy_every: float) -> float:
    """How long to wait before the next health check: quick while healthy, backing off while
    away. AllowIdle peers are retried sooner than errored ones, since they are expected back."""
    if status in (BackendStatus.RUNNING, BackendStatus.LOADING):
        return healthy_every
    if status == BackendStatus.IDLE:
        return min(0.5 * 2 ** min(failures, 10), 8.0)
    return min(2.0 * 2 ** min(failures, 10), 60.0)


@dataclass
class Backend:
    """What the controller knows of one worker. Thin: the scheduler makes the decisions."""

    name: str
    url: str
    token: str = field(repr=False)
    allow_idle: bool = False
    slots: int = 2
    enabled: bool = True
    status: BackendStatus = BackendStatus.LOADING
    reason: str | None = None
    info: Info | None = None
    client: Any = field(default=None, repr=False)
    running: int = 0
    failures: int = 0
    next_check: float = 0.0
    unit_seconds_hint: float | None = field(default=None, repr=False)
    speed: SpeedModel = field(default_factory=SpeedModel, repr=False)
    batch_hint: int = 4  # the batch size the scheduler aims for (for throughput figures)
    overhead_s: float = 0.1  # per-job cost beyond the GPU's: round trips, tunnel, transfers
    batch_cap: int = 64  # lowered when the worker runs out of GPU memory on a batch
    quarantine_until: float = 0.0  # a worker caught lying stays errored until then
    offences: int = 0
    images_done: int = 0
    last_seen: float | None = None
    refused: dict[tuple, str] = field(default_factory=dict)  # param key -> why it said no

    def __post_init__(self) -> None:
        if self.unit_seconds_hint:
            self.speed.seed(self.unit_seconds_hint)

    @property
    def unit_seconds(self) -> float | None:
        """Seconds per unit of work (step x megapixel x image) at the usual batch size."""
        return self.speed.unit_seconds(min(self.batch_hint, self.max_batch()))

    def job_seconds(self, n: int, units_per_image: float) -> float | None:
        t = self.speed.job_seconds(n, units_per_image)
        return None if t is None else t + self.overhead_s

    def note_job(self, n: int, run_s: float, elapsed: float, units_per_image: float) -> None:
        """Learn from a finished job: GPU time from the worker, the rest is overhead."""
        self.speed.observe(n, run_s, units_per_image)
        extra = max(elapsed - run_s, 0.0)
        if 0 < run_s < elapsed:  # queueing behind our other slot is not overhead: cap it
            extra = min(extra, 5.0)
            self.overhead_s = 0.8 * self.overhead_s + 0.2 * extra

    def __repr__(self) -> str:
        return (f"Backend({self.name!r}, {self.url!r}, token={mask_token(self.token)}, "
                f"status={self.status.value})")

    @property
    def usable(self) -> bool:
        return self.enabled and self.status == BackendStatus.RUNNING

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - self.running) if self.usable else 0

    def why_not(self, req: JobRequest, key: tuple | None = None) -> str | None:
        """None if this backend can serve the job, else the reason (shown in the logs)."""
        if not self.enabled:
            return "disabled"
        if self.status != BackendStatus.RUNNING:
            return f"status {self.status.value}"
        if self.refused:
            reason = self.refused.get(key if key is not None else req.param_key())
            if reason:
                return reason
        info = self.info
        if info is None:
            return "no info yet"
        if req.model is not None and req.model not in info.models:
            return f"does not have model {req.model!r}"
        if req.kind not in info.capabilities:
            return f"cannot do {req.kind}"
        lim = info.limits
        if req.kind != "upscale":
            if req.width * req.height > lim.max_pixels:
                return f"{req.width}x{req.height} is over its {lim.max_pixels} pixels"
            if req.steps > lim.max_steps:
                return f"{req.steps} steps is over its {lim.max_steps}"
        if req.upscaler and req.upscaler not in info.upscalers:
            return f"does not have upscaler {req.upscaler!r}"
        if req.kind == "img2img" and req.upscaler and "tiles" not in info.capabilities:
            return "cannot cut tiles itself (update colabswarm on that worker)"
        return None

    def max_batch(self) -> int:
        return min(self.info.limits.max_images, self.batch_cap) if self.info else 1


    def snapshot(self) -> dict[str, Any]:
        """A plain dict for views (widgets, logs): no token."""
        return {
            "name": self.name,
            "url": self.url,
            "status": self.status.value,
            "colour": STATUS_COLOURS[self.status],
            "reason": self.reason,
            "allow_idle": self.allow_idle,
            "slots": self.slots,
            "enabled": self.enabled,
            "running": self.running,
            "images_done": self.images_done,
            "models": list(self.info.models) if self.info else [],
            "upscalers": list(self.info.upscalers) if self.info else [],
            "device": (self.info.gpu_name or self.info.device) if self.info else None,
            "unit_seconds": self.unit_seconds,
            "last_seen": self.last_seen,
            "age": None if self.last_seen is None else time.monotonic() - self.last_seen,
        }
