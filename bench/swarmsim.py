"""A discrete-event simulation of the controller's pure state (colabswarm.swarm.state).

No servers and no clock: simulated GPUs take `a + b*n` seconds for a job of n images (divided by
their speed), run one job at a time in the order they got them, and report their run time as
a worker does. The state's decisions are the real ones; only the wire is simulated. Used by
tests (a short run splits evenly) and benchmarks (scheduling policies at any scale, in
milliseconds).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from colabswarm.protocol import CompiledShape, CompileInfo, Info, JobRequest, Limits
from colabswarm.swarm.backends import Backend
from colabswarm.swarm.state import (
    BackendAdded,
    FinishRun,
    FlightSucceeded,
    NewRun,
    StartFlight,
    SwarmConfig,
    SwarmState,
    Tick,
)

__all__ = ["SimGPU", "SimResult", "simulate"]


@dataclass
class SimGPU:
    """A simulated worker: a job of n images takes (a + b*n) / speed seconds, plus overhead;
    a job for a model it does not have loaded first loads it (load_s)."""

    name: str
    speed: float = 1.0
    a: float = 0.12
    b: float = 0.105
    overhead: float = 0.02
    slots: int = 2
    max_images: int = 16
    models: tuple[str, ...] = ("m",)
    loaded: str | None = "m"
    load_s: float = 10.0
    buckets: tuple[int, ...] = ()  # compiled batch sizes (for 512x512), empty: any

    def job_seconds(self, n: int) -> float:
        return (self.a + self.b * n) / self.speed


@dataclass
class SimResult:
    makespan: float
    images: dict[str, int]          # images made per GPU (copies included)
    jobs: list[tuple[str, int, float, float]] = field(default_factory=list)  # who, n, start, end
    loads: list[tuple[str, str, float]] = field(default_factory=list)  # who loaded what, when


def _info(g: SimGPU, hint: float | None = None) -> Info:
    compile_info = None
    if g.buckets:
        compile_info = CompileInfo(mode="reduce-overhead", state="ready", shapes=[
            CompiledShape(width=512, height=512, batches=list(g.buckets))])
    return Info(name=g.name, version="sim", device="sim", models=list(g.models),
                model_loaded=g.loaded, load_seconds={m: g.load_s for m in g.models},
                capabilities=["txt2img", "img2img", "upscale", "tiles"], upscalers=["lanczos"],
                limits=Limits(max_images=g.max_images), queue_depth=0, running=0, jobs_served=0,
                compile=compile_info, step_seconds_per_mpix=hint)


def simulate(gpus: list[SimGPU], images: int | list[tuple[str | None, int]], *,
             template: JobRequest | None = None, timed: bool = True, hinted: bool = False,
             config: SwarmConfig | None = None) -> SimResult:
    """Run requests through a SwarmState over these GPUs: `images` images of one request, or
    (model, images) requests submitted one after the other at time 0. The makespan is when the
    last one is done.

    timed: the controller knows each GPU's speed line already (as after a first run);
    otherwise it knows nothing and learns from the first jobs. hinted (with timed False): each
    GPU's /v1/info gives its own warm-up figure (seconds per step and megapixel at batch 1), as
    a real worker's does, but the controller has measured nothing yet."""
    tpl = template or JobRequest(prompt="sim", width=512, height=512, steps=20)
    requests = [(None, images)] if isinstance(images, int) else list(images)
    state = SwarmState(config or SwarmConfig(health_every=1e9))
    by_name = {g.name: g for g in gpus}
    units = None
    pending: list[tuple[Backend, SimGPU]] = []
    free_at = {g.name: 0.0 for g in gpus}
    events: list[tuple[float, int, object, float]] = []
    now = 0.0
    finished: list[float] = []
    jobs: list[tuple[str, int, float, float]] = []

    def apply(actions: list) -> None:
        for act in actions:
            if isinstance(act, StartFlight):
                f = act.flight
                g = by_name[f.backend.name]
                assert not g.buckets or len(f.items) in g.buckets, "outside its buckets"
                start = max(now, free_at[g.name])
                want = f.items[0].template.model or g.models[0]
                if want != g.loaded:
                    start += g.load_s
                    g.loaded = want
                    loads.append((g.name, want, start))
                end = start + g.job_seconds(len(f.items)) + g.overhead
                free_at[g.name] = end
                heapq.heappush(events, (end, f.id, f, start))
                jobs.append((g.name, len(f.items), start, end))
            elif isinstance(act, FinishRun):
                finished.append(now)

    for g in gpus:
        b = Backend(g.name, f"http://{g.name}", slots=g.slots)
        pending.append((b, g))
        if timed:
            from colabswarm.swarm.scheduler import job_units

            units = units or job_units(tpl)
            for n in (1, 8):
                b.speed.observe(n, g.job_seconds(n), units)
            b.overhead_s = g.overhead
    for b, g in pending:  # registered first, as in use; then the requests, one by one
        hint = None
        if hinted:
            hint = g.job_seconds(1) / (tpl.steps * tpl.width * tpl.height / 1e6)
        apply(state.handle(BackendAdded(b, 0.0, _info(g, hint))))
    loads: list[tuple[str, str, float]] = []
    for rid, (model, count) in enumerate(requests, 1):
        req = tpl if model is None else tpl.model_copy(update={"model": model})
        apply(state.handle(NewRun(rid, "generate", req, tuple(range(count)), 0.0)))
    while events and len(finished) < len(requests):
        end, _, f, start = heapq.heappop(events)
        now = end
        g = by_name[f.backend.name]
        apply(state.handle(FlightSucceeded(
            f.id, tuple(("img", it.seed) for it in f.items), end - start - g.overhead,
            max(start - f.started, 0.0), now)))
        apply(state.handle(Tick(now)))
    made: dict[str, int] = {}
    for name, n, _, _ in jobs:
        made[name] = made.get(name, 0) + n
    done = max(finished) if len(finished) == len(requests) else float("inf")
    return SimResult(done, made, jobs, loads)
