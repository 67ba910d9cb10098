"""How fast one backend is, as a function of batch size, learned from the jobs it finished.

A GPU's time for a batch of n images is close to a line, t(n) = a + b*n per unit of work
(denoising steps x megapixels of one image): a is the fixed cost of a pipeline call, b the
extra per image. Measured on an H200 with SD1.5 (1 image 0.49 s, 4 images 0.63 s), b is a tenth
of a; a CPU is nearly proportional. With one batch size seen, the shape is assumed; with two or
more, the line is fitted. Pure arithmetic: the controller feeds it observations.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

__all__ = ["SpeedModel", "plausible"]

_PRIOR_SLOPE = 0.35  # b/a assumed until two batch sizes have been seen
# seconds per unit (step x megapixel) any real device takes: an H200 ~0.002, a slow CPU ~50.
# Figures outside are a worker's lie or a bug; believed, they would make the scheduler's
# arithmetic overflow (an infinite time per image once stopped every dispatch).
_MIN_UNIT_S, _MAX_UNIT_S = 1e-6, 1e4


def plausible(seconds_per_unit: float) -> bool:
    return math.isfinite(seconds_per_unit) and _MIN_UNIT_S <= seconds_per_unit <= _MAX_UNIT_S


@dataclass
class SpeedModel:
    """Seconds per unit of work for a job of n images: a + b*n, from recent observations."""

    window: int = 24
    _obs: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=24))
    _fit: tuple[float, float] | None = None

    def seed(self, seconds_per_unit: float) -> None:
        """Start from a figure the worker reported (seconds per step-megapixel at batch 1)."""
        if self._fit is None and plausible(seconds_per_unit):
            a = seconds_per_unit / (1 + _PRIOR_SLOPE)
            self._fit = (a, a * _PRIOR_SLOPE)

    def observe(self, n: int, seconds: float, units_per_image: float) -> None:
        if n < 1 or not units_per_image > 0 or not plausible(seconds / units_per_image / n):
            return
        self._obs.append((n, seconds / units_per_image))
        self._refit()

    def _refit(self) -> None:
        pts = list(self._obs)
        ns = {n for n, _ in pts}
        if len(ns) < 2:
            n0 = next(iter(ns))
            t0 = sorted(t for _, t in pts)[len(pts) // 2]  # median: robust to one slow call
            a = t0 / (1 + _PRIOR_SLOPE * n0)
            self._fit = (a, a * _PRIOR_SLOPE)
            return
        mean_n = sum(n for n, _ in pts) / len(pts)
        mean_t = sum(t for _, t in pts) / len(pts)
        var = sum((n - mean_n) ** 2 for n, _ in pts)
        slope = sum((n - mean_n) * (t - mean_t) for n, t in pts) / var
        smallest = min(t for _, t in pts) / (max(n for n, _ in pts) * 10)
        slope = max(slope, smallest)  # more images never cost nothing
        intercept = max(mean_t - slope * mean_n, 0.0)
        self._fit = (intercept, slope)

    @property
    def known(self) -> bool:
        return self._fit is not None

    @property
    def measured(self) -> bool:
        """True once the controller timed a real job (a worker's own warm-up is only a hint)."""
        return bool(self._obs)

    def job_seconds(self, n: int, units_per_image: float) -> float | None:
        if self._fit is None:
            return None
        a, b = self._fit
        return units_per_image * (a + b * n)

    def unit_seconds(self, batch: int) -> float | None:
        """Seconds per unit of work per image when running batches of `batch`."""
        t = self.job_seconds(batch, 1.0)
        return None if t is None else t / batch
