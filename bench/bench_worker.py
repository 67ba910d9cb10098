"""Worker overhead (issue 2): the raw diffusers loop against the same work through the worker.

One GPU, one pipeline object. The worker is started in this process with
``start_worker(model=<diffusers folder>)``; the raw loop calls that worker's own loaded txt2img
pipeline directly (while the worker is idle), so every path runs the very same modules. Each path
makes the same images from the same seeds (one CPU generator per image, as the engine does):

* ``raw``          ``pipe(...)`` in a loop, nothing else;
* ``inproc/N``     ``WorkerClient.run`` from this process (its asyncio loop on the main thread),
                   N jobs in flight (1: one at a time like raw; 2: HTTP overlaps the next job);
* ``remote/N``     the same client in a separate process, as a controller on another machine
                   would be (its JSON and PNG decoding then take no GIL time from the worker);
* ``...+fastpng+offload/N``  what-if, the worker patched by this script (not shipped code):
                   PNGs written by :func:`fast_png` (``fastpng``) on a pool thread while the
                   engine thread starts the next job (``offload``); ``quiet`` publishes step
                   progress at most every 0.5 s. See docs/BENCHMARKS.md.

Throughput is images per second over the timed calls, after warm-up calls of every path and batch
size. Paths are interleaved over several rounds; a path's ratio is the mean over rounds of its
img/s over the raw img/s of the same round. The worker's engine thread is instrumented (time
inside the pipeline call, time writing PNGs) to say where the difference goes. The images of
all paths are compared with raw's, pixel for pixel.

    python -m bench.bench_worker --build sd15 --model-dir /tmp/sd15-random      # on a GPU
    python -m bench.bench_worker --tiny-check                                   # CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import socket
import statistics
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
DEFAULT_PATHS = "inproc/1,inproc/2,inproc+fastpng+offload/2,remote/2,remote+fastpng+offload/2"
QUIET_INTERVAL_S = 0.5


# ----- a PNG writer that holds the GIL only briefly --------------------------------------------
def fast_png(image: Any, level: int = 1) -> bytes:
    """RGB8 PNG with the 'Up' filter done in numpy and zlib outside the GIL.

    About 4x faster than Pillow's ``save(format="PNG", compress_level=1)`` on a 512x512 image,
    the same size within a few percent, and zlib releases the GIL while it compresses, so a
    CPU-bound pipeline thread beside it barely slows down. Lossless: Pillow reads it back equal.
    """
    import numpy as np

    a = np.asarray(image.convert("RGB"), dtype=np.uint8)
    h, w, _ = a.shape
    rows = a.reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), dtype=np.uint8)
    raw[:, 0] = 2  # filter 'Up': each byte minus the byte above it (row 0: above is zero)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])
    data = zlib.compress(raw.tobytes(), level)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


# ----- small helpers ---------------------------------------------------------------------------
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _chunks(seeds: list[int], batch: int) -> list[list[int]]:
    return [seeds[i:i + batch] for i in range(0, len(seeds), batch)]


def _digest(image: Any) -> str:
    import numpy as np

    return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def _request(seeds: list[int], a: argparse.Namespace) -> Any:
    from colabswarm.protocol import JobRequest

    return JobRequest(prompt=PROMPT, width=a.width, height=a.height, steps=a.steps, cfg=a.cfg,
                      seeds=seeds)


async def _client_jobs(
    client: Any, calls: list[list[int]], a: argparse.Namespace, inflight: int
) -> tuple[float, dict[int, str]]:
    """Run every call through the worker with at most `inflight` jobs outstanding."""
    digests: dict[int, str] = {}
    todo = list(calls)

    async def lane() -> None:
        while todo:
            seeds = todo.pop(0)
            for s, im in zip(seeds, await client.run(_request(seeds, a)), strict=True):
                digests[s] = _digest(im)

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(inflight)))
    return time.perf_counter() - t0, digests


# ----- the raw loop ----------------------------------------------------------------------------
def _raw_call(pipe: Any, seeds: list[int], a: argparse.Namespace) -> list[Any]:
    import torch

    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.inference_mode():
        out = pipe(
            prompt=PROMPT, negative_prompt=None, num_inference_steps=a.steps,
            guidance_scale=a.cfg, num_images_per_prompt=len(seeds), generator=gens,
            width=a.width, height=a.height,
        )
    return list(out.images)


def time_raw(pipe: Any, calls: list[list[int]], a: argparse.Namespace) -> tuple[float, dict, list]:
    by_seed: dict[int, Any] = {}
    _sync(a.device)
    t0 = time.perf_counter()
    for seeds in calls:
        by_seed.update(zip(seeds, _raw_call(pipe, seeds, a), strict=True))
    _sync(a.device)
    seconds = time.perf_counter() - t0
    return seconds, {s: _digest(im) for s, im in by_seed.items()}, list(by_seed.values())


# ----- the worker, instrumented ----------------------------------------------------------------
class Probe:
    """Wraps the worker's engine.launch, PNG writer and job runner: timings and what-if switches.
The engine's time per job is its thread's (``launch``, until the job's GPU work is queued; the
images arrive later through ``InFlight.wait`` on the PNG thread, as in the shipped worker).

    ``offload`` (what-if) writes a job's PNGs on a pool thread and frees the engine thread at
    once, so the next queued job starts while the last one's images are encoded. It mirrors
    ``JobManager._run`` of the shipped code except for that hand-over.
    """

    def __init__(self, engine: Any, job_manager: Any) -> None:
        import colabswarm.backend.jobs as jobs

        self.quiet = False
        self.fastpng = False
        self.offload = False
        self.engine_s = 0.0
        self.png_s = 0.0
        self.pngs = 0
        self.jobs = 0
        self._orig_png = jobs.encode_png
        self._orig_run = engine.launch
        engine.launch = self._run
        jobs.encode_png = self._png
        self._jm = job_manager
        self._orig_job_run = job_manager._run
        job_manager._run = self._run_job
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bench-png")

    def reset(self) -> None:
        self.engine_s = self.png_s = 0.0
        self.pngs = self.jobs = 0

    def _run(self, req: Any, init_images: Any = None, on_step: Any = None,
             should_stop: Any = None, *, scope: str = "owner") -> Any:
        if self.quiet and on_step is not None:
            on_step = _throttled(on_step, QUIET_INTERVAL_S)
        t0 = time.perf_counter()
        try:
            return self._orig_run(req, init_images, on_step, should_stop, scope=scope)
        finally:
            self.engine_s += time.perf_counter() - t0
            self.jobs += 1

    def _run_job(self, job: Any) -> None:
        if not self.offload:
            return self._orig_job_run(job)
        jm = self._jm

        def on_step(step: int, total: int) -> None:
            with jm._lock:
                job.step, job.total_steps = step, total
                jm._changed(job)

        try:
            images = jm.runner.run(job.req, job.init_images, on_step, lambda: job.stop)
        except Exception as exc:  # same outcome as the shipped code
            failed = "interrupted" if job.stop or type(exc).__name__ == "Interrupted" else "failed"
            self._finish(job, [], failed, f"{type(exc).__name__}: {exc}")
            return None
        with jm._lock:
            jm.running = None
        self._pool.submit(self._encode_and_finish, job, images)
        return None

    def _encode_and_finish(self, job: Any, images: list[Any]) -> None:
        try:
            pngs = [self._png(im) for im in images]
            self._finish(job, pngs, "done", None)
        except Exception as exc:
            self._finish(job, [], "failed", f"{type(exc).__name__}: {exc}")

    def _finish(self, job: Any, pngs: list[bytes], state: str, error: str | None) -> None:
        jm = self._jm
        with jm._lock:
            job.pngs = pngs if job.id in jm._jobs else []
            job.state, job.error = state, error
            job.finished = time.monotonic()
            job.init_images = []
            if jm.running is job:
                jm.running = None
            if state == "done":
                jm.jobs_served += 1
            jm._changed(job)

    def _png(self, image: Any) -> bytes:
        t0 = time.perf_counter()
        data = fast_png(image) if self.fastpng else self._orig_png(image)
        self.png_s += time.perf_counter() - t0
        self.pngs += 1
        return data


def _throttled(on_step: Any, interval: float) -> Any:
    last = [0.0]

    def step(done: int, total: int) -> None:
        now = time.monotonic()
        if done in (0, total) or now - last[0] >= interval:
            last[0] = now
            on_step(done, total)

    return step


class RemoteClient:
    """A WorkerClient in a child process, driven over JSON lines on its stdin/stdout."""

    def __init__(self, share: str, a: argparse.Namespace) -> None:
        cmd = [sys.executable, "-m", "bench.bench_worker", "--client-of", share,
               "--width", str(a.width), "--height", str(a.height), "--steps", str(a.steps),
               "--cfg", str(a.cfg)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the client process ended (exit {self.proc.wait()})")
        return json.loads(line)

    def jobs(self, calls: list[list[int]], inflight: int) -> tuple[float, dict[int, str]]:
        self.proc.stdin.write(json.dumps({"calls": calls, "inflight": inflight}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        return reply["seconds"], {int(k): v for k, v in reply["digests"].items()}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def client_main(a: argparse.Namespace) -> int:
    """The child side of RemoteClient."""

    async def serve() -> None:
        from colabswarm.backend.client import WorkerClient

        client = WorkerClient(a.client_of, timeout=120.0)
        info = await client.info()
        print(json.dumps({"ready": info.model_loaded}), flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                break
            cmd = json.loads(line)
            seconds, digests = await _client_jobs(client, cmd["calls"], a, cmd["inflight"])
            print(json.dumps({"seconds": seconds, "digests": digests}), flush=True)
        await client.aclose()

    asyncio.run(serve())
    return 0


# ----- reporting helpers -----------------------------------------------------------------------
def _image_stats(images: list[Any]) -> dict[str, Any]:
    import io

    import numpy as np

    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images[:8]])
    sizes, secs = [], []
    for im in images[:4]:
        buf = io.BytesIO()
        t0 = time.perf_counter()
        im.save(buf, format="PNG", compress_level=1)
        secs.append(time.perf_counter() - t0)
        sizes.append(buf.tell())
    return {"pixel_mean": round(float(arr.mean()), 1), "pixel_std": round(float(arr.std()), 1),
            "flat_images": int(sum(float(np.asarray(im).std()) < 1.0 for im in images)),
            "pillow_png_ms": round(1000 * statistics.median(secs), 1),
            "png_kib": round(statistics.median(sizes) / 1024, 1),
            "fast_png_kib": round(len(fast_png(images[0])) / 1024, 1)}


def _versions(device: str) -> dict[str, Any]:
    import diffusers
    import fastapi
    import httpx
    import PIL
    import pydantic
    import torch
    import transformers
    import uvicorn

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
            "httpx": httpx.__version__, "pydantic": pydantic.__version__,
            "pillow": PIL.__version__, "device": device, "gpu": None}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _prepare_model(a: argparse.Namespace) -> str:
    if a.tiny_check and not a.model_dir:
        return "tiny"
    folder = Path(a.model_dir)
    if (folder / "model_index.json").exists() and not a.rebuild:
        print(f"using existing model folder {folder}", flush=True)
        return str(folder)
    from bench.fullsize import build_sd15, build_sdxl

    build = build_sd15 if a.build == "sd15" else build_sdxl
    build(folder, a.dtype, scale="tiny" if a.tiny_check else "full")
    return str(folder)


def _listeners(handle: Any) -> list[Any]:
    return list(handle._server.servers[0].sockets)


async def _rtt_ms(client: Any, n: int = 20) -> float:
    """Median round trip of GET /v1/info on one kept-alive connection."""
    await client.info()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.info()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 2)


def _parse_paths(text: str) -> list[tuple[str, str, int]]:
    out = []
    for item in text.split(","):
        variant, _, n = item.strip().partition("/")
        flags = set(variant.split("+"))
        known = {"inproc", "remote", "quiet", "fastpng", "offload"}
        if not flags & {"inproc", "remote"} or flags - known:
            raise SystemExit(f"bad path {item!r}: inproc|remote[+quiet][+fastpng][+offload]/N")
        out.append((item.strip(), variant, int(n or 1)))
    return out


# ----- the benchmark ---------------------------------------------------------------------------
async def _bench(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from colabswarm.backend.client import WorkerClient
    from colabswarm.backend.serve import start_worker

    paths = _parse_paths(a.paths)
    model = _prepare_model(a)
    t0 = time.perf_counter()
    handle = start_worker(model=model, device=a.device, compile="off")  # eager, as raw
    load_s = time.perf_counter() - t0
    engine = handle.worker.engine
    pipe = engine._loaded.txt2img  # the worker's own pipeline object: same modules, same memory
    pipe.set_progress_bar_config(disable=True)
    probe = Probe(engine, handle.worker.jobs)
    if a.nodelay:  # Linux: accepted sockets inherit TCP_NODELAY from the listening socket
        for s in _listeners(handle):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    result: dict[str, Any] = {
        "config": {"model": model, "width": a.width, "height": a.height, "steps": a.steps,
                   "cfg": a.cfg, "dtype": str(pipe.unet.dtype), "batches": a.batches,
                   "calls_per_measure": a.calls, "rounds": a.rounds, "warmup": a.warmup,
                   "paths": [p[0] for p in paths], "forced_nodelay": bool(a.nodelay),
                   "attn": type(next(iter(pipe.unet.attn_processors.values()))).__name__},
        "versions": _versions(a.device), "worker_load_s": round(load_s, 2), "rows": [],
    }
    print(json.dumps(result["config"]), flush=True)
    print(json.dumps(result["versions"]), flush=True)
    print(f"worker loaded {model} in {load_s:.1f}s at {handle.local_url}", flush=True)
    inproc = WorkerClient(handle.share, timeout=120.0)
    remote = None
    try:
        result["info_rtt_ms"] = await _rtt_ms(inproc)
        if any("remote" in v.split("+") for _, v, _ in paths):
            remote = RemoteClient(handle.share, a)
        print(f"GET /v1/info round trip {result['info_rtt_ms']} ms (median)", flush=True)

        async def run_path(variant: str, calls: list[list[int]], n: int) -> tuple[float, dict]:
            flags = set(variant.split("+"))
            probe.quiet, probe.fastpng = "quiet" in flags, "fastpng" in flags
            probe.offload = "offload" in flags
            _sync(a.device)
            try:
                if "remote" in flags:
                    assert remote is not None
                    return remote.jobs(calls, n)
                return await _client_jobs(inproc, calls, a, n)
            finally:
                _sync(a.device)
                probe.quiet = probe.fastpng = probe.offload = False

        for batch in a.batches:
            seeds = list(range(1000, 1000 + a.calls * batch))
            calls = _chunks(seeds, batch)
            warm = _chunks(list(range(10, 10 + batch * a.warmup)), batch)
            tw = time.perf_counter()
            time_raw(pipe, warm, a)
            for _name, variant, n in paths:
                await run_path(variant, warm[:max(1, min(len(warm), n))], n)
            print(f"batch {batch}: warm-up {time.perf_counter() - tw:.1f}s", flush=True)
            names = ["raw"] + [p[0] for p in paths]
            ips: dict[str, list[float]] = {k: [] for k in names}
            ratios: dict[str, list[float]] = {k: [] for k in names[1:]}
            engine_s: dict[str, list[float]] = {k: [] for k in names[1:]}
            png_ms: dict[str, list[float]] = {k: [] for k in names[1:]}
            same: dict[str, int] = {k: 0 for k in names[1:]}
            raw_images: list[Any] = []
            for r in range(a.rounds):
                s, raw_dig, raw_images = time_raw(pipe, calls, a)
                ips["raw"].append(len(seeds) / s)
                raw_call_s = s / len(calls)
                for name, variant, n in paths:
                    probe.reset()
                    s, dig = await run_path(variant, calls, n)
                    ips[name].append(len(seeds) / s)
                    ratios[name].append(ips[name][-1] / ips["raw"][-1])
                    engine_s[name].append(probe.engine_s / max(1, probe.jobs) / raw_call_s)
                    png_ms[name].append(1000 * probe.png_s / max(1, probe.pngs))
                    same[name] += sum(dig.get(k) == v for k, v in raw_dig.items())
                print(f"batch {batch} round {r}: " + "  ".join(
                    f"{k} {v[-1]:.3f}" for k, v in ips.items()) + " img/s", flush=True)
            row: dict[str, Any] = {
                "batch": batch, "images": len(seeds), "calls": len(calls),
                "img_s": {k: statistics.mean(v) for k, v in ips.items()},
                "ratio": {k: statistics.mean(v) for k, v in ratios.items()},
                "ratio_median": {k: statistics.median(v) for k, v in ratios.items()},
                "ratio_range": {k: [round(min(v), 4), round(max(v), 4)]
                                for k, v in ratios.items()},
                "engine_call_over_raw_call": {k: round(statistics.mean(v), 4)
                                              for k, v in engine_s.items()},
                "png_ms_per_image": {k: round(statistics.mean(v), 1) for k, v in png_ms.items()},
                "per_round_img_s": {k: [round(x, 4) for x in v] for k, v in ips.items()},
                "identical_to_raw": {k: f"{v}/{len(seeds) * a.rounds}" for k, v in same.items()},
                "raw_images": _image_stats(raw_images),
            }
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
        if a.device.startswith("cuda"):
            result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    finally:
        if remote is not None:
            remote.close()
        await inproc.aclose()
        handle.stop()
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown: per path img/s and ratio to raw (mean of per-round ratios)."""
    names = result["config"]["paths"]
    head = ["batch", "raw img/s"] + [f"{n} img/s (ratio)" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for r in result["rows"]:
        cells = [str(r["batch"]), f"{r['img_s']['raw']:.3f}"]
        cells += [f"{r['img_s'][n]:.3f} ({100 * r['ratio'][n]:.1f}%)" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None, help="diffusers folder (built if missing)")
    p.add_argument("--build", default="sd15", choices=["sd15", "sdxl"],
                   help="what to build when --model-dir holds no pipeline")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="dtype the folder is saved in (the worker loads fp16 on CUDA)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    p.add_argument("--calls", type=int, default=6, help="pipeline calls per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all paths")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls of the raw loop")
    p.add_argument("--paths", default=DEFAULT_PATHS,
                   help="inproc|remote[+quiet][+fastpng][+offload]/jobs-in-flight, ...")
    p.add_argument("--nodelay", action="store_true",
                   help="force TCP_NODELAY on the worker's sockets (a fix the shipped code lacks)")
    p.add_argument("--json", default=None, help="write the full result here")
    p.add_argument("--tiny-check", action="store_true",
                   help="CPU smoke run: tiny model, 64x64, 2 steps, 2 calls, 1 round")
    p.add_argument("--client-of", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.client_of:
        return client_main(a)
    a.batches = [int(x) for x in a.batches.split(",") if x]
    if a.tiny_check:
        a.width = a.height = 64
        a.steps, a.calls, a.rounds, a.warmup = 2, 2, 1, 1
        a.device = a.device or "cpu"
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not a.tiny_check and not a.model_dir:
        p.error("--model-dir is required (a diffusers folder, built there if missing)")
    result = asyncio.run(_bench(a))
    result["command"] = " ".join([Path(sys.executable).name, "-m", "bench.bench_worker",
                                  *(argv if argv is not None else sys.argv[1:])])
    print()
    print(table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
