"""A job's images between the device and the host: launched, not yet waited for.

The engine's thread hands a job over as soon as its last GPU work is queued: the images are
made 8-bit on the device, copied to pinned host memory without waiting, and an event marks
the end. Whoever needs the pictures (the worker's PNG thread) calls ``wait()``; the engine's
thread meanwhile prepares the next job and queues its first steps behind this one's tail, so
the GPU goes from one job to the next without waiting for Python (docs/ARCHITECTURE.md, "The
GPU never waits between jobs").

The pixels are the ones diffusers' ``output_type="pil"`` gives: the same ``x * 255``, rounded
half to even, in float32 from the pipeline's [0, 1] tensor, done on the device instead of in
numpy (both exact, so the bytes are equal on any processor).

``Pacer`` keeps the engine's thread a bounded amount of GPU work ahead of the GPU inside a
job: progress reports the steps the GPU has finished, and an interrupt lands within that lead.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from PIL import Image

__all__ = ["AHEAD_S", "InFlight", "Pacer", "on_cuda", "start_event", "to_device", "to_uint8"]

log = logging.getLogger("colabswarm.engine")

# how much GPU work (seconds) the engine's thread may have queued ahead of the GPU in a job:
# enough to cover the next job's set-up on a slow host (about 10-30 ms of Python)
AHEAD_S = 0.05
_MAX_LEAD_STEPS = 32


_PIN_TRIES = 3
_pinning = {"ok": True, "failed": 0}  # after _PIN_TRIES failures: plain copies from then on


def _pinned(shape: Any, dtype: Any) -> Any | None:
    """An empty page-locked host tensor, or None where the host refuses to pin (some WSL and
    container set-ups limit locked memory): then the copy is a plain one, which waits. After
    ``_PIN_TRIES`` refusals (not one: a passing shortage should not cost speed for good) no
    more are asked for."""
    import torch

    if not _pinning["ok"]:
        return None
    try:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    except RuntimeError as exc:
        _pinning["failed"] += 1
        if _pinning["failed"] >= _PIN_TRIES:
            _pinning["ok"] = False
            log.warning("cannot pin host memory (%s, %d times): copies to and from the GPU "
                        "wait for it from now on, which costs speed, not results",
                        type(exc).__name__, _PIN_TRIES)
        return None


def on_cuda(device: Any) -> bool:
    """Whether ``device`` (a name such as "cuda:1", or a torch.device) is a CUDA GPU."""
    import torch

    return device is not None and torch.device(device).type == "cuda"


def start_event(device: Any) -> Any:
    """A timing event queued on ``device``'s current stream at a job's start (its GPU seconds
    end at its images' copy, ``InFlight.start_copy``); None off CUDA."""
    if not on_cuda(device):
        return None
    import torch

    ev = torch.cuda.Event(enable_timing=True)
    ev.record(torch.cuda.current_stream(device))
    return ev


def to_device(tensor: Any, device: Any) -> Any:
    """A CPU tensor on ``device``; on a CUDA device sent from pinned memory without waiting
    for the GPU's queued work (a plain copy waits for all of it)."""
    if not on_cuda(device):
        return tensor.to(device)
    host = _pinned(tensor.shape, tensor.dtype)
    if host is None:
        return tensor.to(device)
    host.copy_(tensor)
    return host.to(device, non_blocking=True)


def to_uint8(images: Any) -> Any:
    """(n, C, H, W) in [0, 1] -> (n, H, W, C) uint8, as diffusers' numpy_to_pil computes it
    (float32, x 255, rounded half to even), on the tensor's own device."""
    import torch

    return images.permute(0, 2, 3, 1).float().mul(255).round().to(torch.uint8)


class InFlight:
    """Images on their way to the host; ``wait()`` gives them as PIL images (once)."""

    def __init__(self, images: list[Image.Image] | None = None, *, host: Any = None,
                 done: Any = None, start: Any = None,
                 on_done: Callable[[float], None] | None = None, t0: float | None = None
                 ) -> None:
        self._images = images
        self._host, self._done, self._start = host, done, start
        self._on_done = on_done
        self._t0 = t0 if t0 is not None else time.perf_counter()

    @classmethod
    def ready(cls, images: list[Image.Image]) -> InFlight:
        """Images already on the host (CPU jobs, upscales, a strength-0 img2img)."""
        return cls(list(images))

    @classmethod
    def start_copy(cls, images: Any, *, start_event: Any = None, start_device: Any = None,
                   on_done: Callable[[float], None] | None = None,
                   t0: float | None = None) -> InFlight:
        """Queue the 8-bit conversion of a pipeline's (n, C, H, W) [0, 1] tensor and its copy
        to the host. On a CUDA device nothing here waits for the GPU: the copy and the event
        that ends it go on the stream of the GPU holding the images (torch's caching allocator
        reuses the device tensor's memory only after that stream's copy). ``on_done`` gets the
        job's GPU seconds (``start_event``, recorded on ``start_device``; the wall clock where
        the images end on another GPU) or its wall seconds, once the images are in."""
        import torch

        pixels = to_uint8(images)
        host = _pinned(pixels.shape, torch.uint8) if pixels.device.type == "cuda" else None
        if host is None:
            return cls(host=pixels.cpu(), on_done=on_done, t0=t0)
        stream = torch.cuda.current_stream(pixels.device)
        with torch.cuda.stream(stream):
            host.copy_(pixels, non_blocking=True)
        if start_event is not None and torch.device(start_device) != pixels.device:
            start_event = None  # the two events must be on one GPU to be compared
        done = torch.cuda.Event(enable_timing=start_event is not None)
        done.record(stream)
        return cls(host=host, done=done, start=start_event, on_done=on_done, t0=t0)

    def wait(self) -> list[Image.Image]:
        if self._images is not None:
            return self._images
        if self._done is not None:
            self._done.synchronize()
            seconds = (self._start.elapsed_time(self._done) / 1000.0
                       if self._start is not None else time.perf_counter() - self._t0)
        else:
            seconds = time.perf_counter() - self._t0
        arr = self._host.numpy()
        if arr.shape[-1] == 1:
            images = [Image.fromarray(a[..., 0], mode="L") for a in arr]
        else:
            images = [Image.fromarray(a) for a in arr]
        self._host = None
        self._images = images
        if self._on_done is not None:
            self._on_done(seconds)
        return images


class Pacer:
    """Inside one job on a CUDA device: an event after each step; the engine's thread waits
    for the step ``lead`` steps back, so it never queues more than ``AHEAD_S`` of GPU work
    ahead (at least one step). ``stepped`` returns how many steps the GPU has finished."""

    def __init__(self, step_s: float | None, *, event: Callable[[], Any] | None = None) -> None:
        self.lead = 2 if not step_s or step_s <= 0 else max(
            1, min(_MAX_LEAD_STEPS, math.ceil(AHEAD_S / step_s - 1e-9)))
        self._events: deque[tuple[int, Any]] = deque()
        self._event = event  # torch.cuda.Event unless given
        self.finished = 0

    @classmethod
    def for_device(cls, device: Any, step_s: float | None) -> Pacer | None:
        return cls(step_s) if on_cuda(device) else None

    def stepped(self, step: int) -> int:
        """After step ``step`` is queued (on the current CUDA device, the UNet's)."""
        if self._event is None:
            import torch

            self._event = torch.cuda.Event
        ev = self._event()
        ev.record()
        self._events.append((step, ev))
        while len(self._events) > self.lead:
            done_step, old = self._events.popleft()
            old.synchronize()
            self.finished = done_step + 1
        return self.finished
