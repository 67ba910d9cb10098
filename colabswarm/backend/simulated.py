"""A bench-only engine that sleeps instead of denoising, at a chosen relative speed.

It lets scheduling benchmarks put backends of known, different speeds side by side on one CPU
machine. It is never a default: a worker runs it only with ``--simulate-speed`` and says so in
its info (``simulated: true``). It holds one of its models at a time, as the real engine does:
a job for another model first "loads" it (``load_s`` seconds of sleep), and ``load_seconds``
reports that time per model as a real engine's measured loads would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..protocol import JobRequest
from .inflight import InFlight

__all__ = ["SimulatedEngine"]

log = logging.getLogger("colabswarm.simulated")
log.setLevel(logging.INFO)  # bench-only: its loads are in the worker's log without -v


@dataclass
class SimulatedEngine:
    """Time per job = steps * mpix * step_s * (1 + batch_cost * (n - 1)) / speed."""

    speed: float = 1.0
    step_s: float = 0.01
    batch_cost: float = 0.35
    models: tuple[str, ...] = ("tiny",)
    load_s: float = 0.0

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError("simulated speed must be > 0")
        if not self.models:
            raise ValueError("a simulated engine needs at least one model")
        if not 0 <= self.load_s <= 3600:
            raise ValueError("simulated load seconds must be within 0-3600")
        self._loaded = self.models[0]
        self.load_seconds: dict[str, float] = {m: self.load_s for m in self.models}
        self.device = "sim"
        self.allow_downloads = False
        # it knows its own speed, as a real engine knows it after its warm-up
        self.step_seconds_per_mpix: float | None = self.step_s / self.speed

    @property
    def model_names(self) -> list[str]:
        return list(self.models)

    @property
    def loaded_model(self) -> str | None:
        return self._loaded

    def upscaler_names(self) -> list[str]:
        return ["lanczos"]

    def upscaler_scales(self) -> dict[str, int]:
        return {}

    def upscaler_problem(self, name: str) -> str | None:
        return None

    def device_info(self) -> dict[str, Any]:
        return {"device": "sim", "gpu_name": f"simulated x{self.speed:g}"}

    def load(self, name: str | None = None) -> str:
        name = name or self.models[0]
        if name not in self.models:
            from ..errors import ModelNotAvailable

            raise ModelNotAvailable(f"This worker does not serve model {name!r}; it serves "
                                    f"{list(self.models)}.")
        if name != self._loaded:
            log.info("simulated load of model %s (%.1f s)", name, self.load_s)
            time.sleep(self.load_s)
            self._loaded = name
        return name

    def free(self) -> None:
        return None

    def launch(
        self,
        req: JobRequest,
        init_images: Any = None,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        *,
        scope: str = "owner",
    ) -> InFlight:
        """``run``, its images ready when it returns (nothing runs ahead of a simulated GPU)."""
        return InFlight.ready(self.run(req, init_images, on_step, should_stop, scope=scope))

    def run(
        self,
        req: JobRequest,
        init_images: Any = None,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        *,
        scope: str = "owner",
    ) -> list[Image.Image]:
        self.load(req.model)
        n = len(req.seeds)
        mpix = req.width * req.height / 1e6
        per_step = mpix * self.step_s * (1 + self.batch_cost * (n - 1)) / self.speed
        # img2img runs only the last steps*strength steps, as diffusers does
        steps = req.steps if req.kind == "txt2img" else int(req.steps * req.strength)
        t0 = time.perf_counter()
        for step in range(steps):
            if should_stop and should_stop():
                from .engine import Interrupted

                raise Interrupted()
            time.sleep(per_step)
            if on_step:
                on_step(step + 1, steps)
        elapsed = time.perf_counter() - t0
        if steps:
            sample = elapsed / (steps * n * mpix)
            prev = self.step_seconds_per_mpix
            self.step_seconds_per_mpix = sample if prev is None else 0.7 * prev + 0.3 * sample
        size = (req.width, req.height)
        return [Image.new("RGB", size, (s % 256, (s >> 8) % 256, 77)) for s in req.seeds]
