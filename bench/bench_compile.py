"""The compiled fast path (issue 14): raw diffusers against the worker in each compile mode, on
two GPUs at once, in one command.

Two child processes run side by side, one per GPU: SD 1.5 at 512x512 on GPU 0 and SDXL at
1024x1024 on GPU 1 (random weights built from the published configs, ``bench/fullsize.py``;
20 Euler steps, CFG 7, fp16, one CPU generator per image as the engine does). Each child, in
order, skipping a stage its time budget cannot fit (and saying so in the JSON):

1. ``raw``: ``pipe(...)`` in a loop at batch 1 and the best batch (8 for SD 1.5; SDXL: 1 only
   unless ``--sdxl-batches`` adds one), then the same with fused QKV projections and
   channels_last (eager), to decide whether those help;
2. ``off``: a worker process (``python -m colabswarm worker --compile off``) driven through
   HTTP by ``WorkerClient`` from the child (2 jobs in flight, as a Swarm's 2 slots);
3. ``reduce-overhead`` (CUDA graphs), cold: a fresh inductor cache and an empty compile cache
   folder; time from the worker's share string (model loaded, serving) until its
   ``Info.compile`` is ready, each shape's seconds from its log; then throughput, and the
   largest pixel difference and PSNR of its images against the eager worker's (same seeds,
   same batch sizes);
4. the same mode, restarted: a new worker process with the same compile cache folder but an
   empty inductor cache (what a new Colab session with a Drive folder has): its compile seconds,
   and batch-1 jobs sent while it compiles (their latency shows whether a job ever waits
   behind compilation);
4b. ``quiet``: restarted once more the same way, with no job sent while it compiles: the
   compile from the cache alone (the issue's "cached restart's compile <= 20 s"), where 4
   shows it while serving (eager jobs hold the interpreter that dynamo's tracing needs);
5. ``raw compiled``: the raw loop with the worker's own compiled modules
   (``Compiler(background=False)``, from the cache), the bar for the swarm's compiled rows;
6. ``default`` (inductor without CUDA graphs), cold, as 3 (the first stage the budget drops);
7. ``tuned`` (only when ``--only`` names it): as 5, but cold, with its own compile cache
   folder and the inductor settings of diffusers' former "Accelerate inference of text-to-image
   diffusion models" tutorial (``TUNED_INDUCTOR``: 1x1 convolutions as matrix multiplies,
   coordinate-descent tuning of kernel block sizes, no epilogue fusion), to decide whether the
   worker should use them: compare its rows with ``raw`` and 5 of the same run.

The parent merges both children's JSON into ``--out``/compile.json and prints a table.

    python3 -m bench.bench_compile --out $OUT                    # nvidia-h200-x2, ~8 minutes
    python -m bench.bench_compile --tiny --out /tmp/bc           # CPU smoke run of every stage

``--tiny`` builds tiny-width models (same layouts), runs 64 px, 2 steps, batches 1 and 2 on the
CPU, and compiles with dynamo's "eager" backend (COLABSWARM_COMPILE_BACKEND=eager): it checks
the code end to end; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
# --only's names; "warm" and "warmwait": a worker from the compile cache left by an earlier run
# on this machine, measured at every batch, with the GPU fed across jobs (the default) and with
# the engine's thread waiting for each job's images (COLABSWARM_OVERLAP=off), one after another
STAGES = ("raw", "off", "cold", "restart", "quiet", "rawc", "tuned", "warm", "warmwait")
T0 = time.monotonic()
_SHARE_RE = re.compile(r"^(https?://\S+#token=[A-Za-z0-9_\-]+)$")
_SHAPE_RE = re.compile(
    r"compiled (\d+x\d+ batch \d+) in ([\d.]+) s( from the cache)?(?: \((.*)\))?")
_CACHE_RE = re.compile(r"compile cache: (loaded \d+ of \d+ files .* in [\d.]+ s|wrote .*)")
# seconds, before anything is measured (the H200 figures, rounded up)
PRIOR_COMPILE_S = {"sd15": {1: 70.0, "more": 100.0}, "sdxl": {1: 130.0, "more": 130.0}}
# stage 7's inductor settings (torch._inductor.config attributes)
TUNED_INDUCTOR = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                  "epilogue_fusion": False}


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


# ----- a worker process ------------------------------------------------------------------------
class Worker:
    """``python -m colabswarm -v worker`` on this child's GPU; its log lines are kept (with the
    time they came) so compile seconds per shape can be read from them."""

    def __init__(self, a: argparse.Namespace, mode: str, name: str,
                 inductor_dir: Path | None = None, overlap: bool = True) -> None:
        self.a, self.mode, self.name = a, mode, name
        cmd = [sys.executable, "-m", "colabswarm", "-v", "worker", "--model", a.model_dir,
               "--port", "0", "--name", name, "--compile", mode,
               "--compile-batches", ",".join(str(b) for b in a.batches),
               "--compile-sizes", f"{a.size}x{a.size}",
               "--compile-cache", str(a.cache_dir), "--parent-pid", str(os.getpid()),
               "--text-cache-mb", str(a.text_cache_mb)]
        # a crash in native code prints every thread's Python stack (kept in the JSON)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
        if inductor_dir is not None:
            env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_dir)
        if a.tiny:
            env["COLABSWARM_COMPILE_BACKEND"] = "eager"
        if not overlap:
            env["COLABSWARM_OVERLAP"] = "off"
        self.lines: list[tuple[float, str]] = []
        self.share = ""
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self._found = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip()
            self.lines.append((time.monotonic(), line))
            m = _SHARE_RE.match(line.strip())
            if m:
                self.share = m.group(1)
                self._found.set()
        self._found.set()

    def wait_serving(self, timeout: float) -> float:
        """Seconds from start until the worker printed its share string (model loaded)."""
        if not self._found.wait(timeout) or not self.share:
            tail = "\n".join(line for _, line in self.lines[-20:])
            raise RuntimeError(f"worker {self.name} did not start:\n{tail}")
        return time.monotonic() - self.t_start

    def shape_seconds(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for _, line in self.lines:
            m = _SHAPE_RE.search(line)
            if m:
                out[m.group(1)] = {"s": float(m.group(2)), "from_cache": bool(m.group(3)),
                                   "phases": m.group(4) or ""}
        return out

    def cache_lines(self) -> list[str]:
        return [m.group(1) for _, line in self.lines if (m := _CACHE_RE.search(line))]

    def warnings(self) -> list[str]:
        return [line[:300] for _, line in self.lines
                if " WARNING " in line or " ERROR " in line or "Traceback" in line][:20]

    def died(self) -> dict[str, Any] | None:
        """The exit code and the last log lines, when the worker ended before stop()."""
        code = self.proc.poll()
        if code is None:
            return None
        return {"exit_code": code, "log_tail": [line[:300] for _, line in self.lines[-60:]]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ----- measuring through HTTP ------------------------------------------------------------------
def _req(a: argparse.Namespace, seeds: list[int]) -> Any:
    from colabswarm.protocol import JobRequest

    return JobRequest(prompt=PROMPT, width=a.size, height=a.size, steps=a.steps, cfg=a.cfg,
                      seeds=seeds)


async def _jobs(client: Any, a: argparse.Namespace, calls: list[list[int]],
                inflight: int) -> tuple[float, dict[int, Any]]:
    import numpy as np

    todo = list(calls)
    images: dict[int, Any] = {}

    async def lane() -> None:
        while todo:
            seeds = todo.pop(0)
            for s, im in zip(seeds, await client.run(_req(a, seeds)), strict=True):
                images[s] = np.asarray(im.convert("RGB"), dtype=np.uint8)

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(inflight)))
    return time.perf_counter() - t0, images


def _chunks(seeds: list[int], n: int) -> list[list[int]]:
    return [seeds[i:i + n] for i in range(0, len(seeds), n)]


async def measure_worker(share: str, a: argparse.Namespace, batches: list[int]
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """img/s per batch size (2 jobs in flight, after warm-up jobs), and the images of the
    comparison seeds at each batch size."""
    from colabswarm.backend.client import WorkerClient

    rows: dict[str, Any] = {}
    images: dict[str, Any] = {}
    async with WorkerClient(share, timeout=600.0) as client:
        for b in batches:
            n = a.images_b1 if b == 1 else a.images_bn * b
            await _jobs(client, a, _chunks(list(range(10, 10 + 2 * b)), b), 2)  # warm-up
            secs, _ = await _jobs(client, a, _chunks(list(range(1000, 1000 + n)), b), 2)
            rows[f"b{b}"] = {"batch": b, "images": n, "seconds": round(secs, 3),
                             "img_s": n / secs}
            _, got = await _jobs(client, a, _chunks(_cmp_seeds(a, b), b), 1)
            images[f"b{b}"] = got
            log(f"  worker b{b}: {n / secs:.3f} img/s")
    return rows, images


def _cmp_seeds(a: argparse.Namespace, b: int) -> list[int]:
    return list(range(500, 500 + max(b, a.compare_images)))


def compare(got: dict[str, Any], want: dict[str, Any]) -> dict[str, Any]:
    """Largest pixel difference and PSNR of compiled against eager, per batch size."""
    import numpy as np

    out: dict[str, Any] = {}
    for key, imgs in got.items():
        ref = want.get(key)
        if not ref:
            continue
        diffs, psnrs = [], []
        for seed, im in imgs.items():
            if seed not in ref:
                continue
            d = np.abs(im.astype(np.int16) - ref[seed].astype(np.int16))
            diffs.append(d)
            mse = float((d.astype(np.float64) ** 2).mean())
            psnrs.append(float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse))
        if not diffs:
            continue
        allv = np.concatenate([d.ravel() for d in diffs])
        finite = [p for p in psnrs if p != float("inf")]
        out[key] = {"images": len(diffs), "max_abs": int(allv.max()),
                    "mean_abs": round(float(allv.mean()), 3),
                    "share_over_2": round(float((allv > 2).mean()), 5),
                    "psnr_min": round(min(finite), 2) if finite else "inf",
                    "psnr_mean": round(sum(finite) / len(finite), 2) if finite else "inf",
                    "identical": sum(int(d.max()) == 0 for d in diffs)}
    return out


async def wait_compiled(share: str, timeout: float, a: argparse.Namespace,
                        serve: bool = False) -> dict[str, Any]:
    """Poll Info.compile until it is no longer compiling; with `serve`, batch-1 jobs one after
    another meanwhile (their latencies)."""
    from colabswarm.backend.client import WorkerClient

    out: dict[str, Any] = {"done": False}
    t0 = time.monotonic()
    deadline = t0 + timeout
    latencies: list[float] = []
    async with WorkerClient(share, timeout=600.0) as client:
        async def poll() -> None:
            while time.monotonic() < deadline:
                comp = (await client.info()).compile
                if comp is None or comp.state != "compiling":
                    out.update(done=True, state=comp.state if comp else None,
                               detail=comp.detail if comp else None,
                               shapes=[s.model_dump() for s in comp.shapes] if comp else [])
                    return
                out["last_detail"] = comp.detail
                await asyncio.sleep(0.25)

        async def jobs() -> None:
            seed = 3000
            while not out["done"] and time.monotonic() < deadline:
                t1 = time.perf_counter()
                await client.run(_req(a, [seed]))
                latencies.append(time.perf_counter() - t1)
                seed += 1

        tasks = [poll()] + ([jobs()] if serve else [])
        await asyncio.gather(*tasks)
    out["compile_s"] = round(time.monotonic() - t0, 2)
    if serve:
        out["jobs_while_compiling"] = {
            "jobs": len(latencies),
            "latency_s_max": round(max(latencies), 3) if latencies else None,
            "latency_s_median": round(sorted(latencies)[len(latencies) // 2], 3)
            if latencies else None}
    return out


# ----- the child: one model on one GPU -----------------------------------------------------------
class Child:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.res: dict[str, Any] = {"model": a.child, "size": a.size, "steps": a.steps,
                                    "cfg": a.cfg, "batches": a.batches, "stages": {},
                                    "skipped": {}, "errors": {}, "stage_s": {}}
        self.images: dict[str, Any] = {}
        self.measured_compile: dict[int, float] = {}

    def left(self) -> float:
        return self.a.deadline - time.time()

    def save(self) -> None:
        tmp = Path(self.a.json + ".tmp")
        tmp.write_text(json.dumps(self.res, indent=1, default=str))
        os.replace(tmp, self.a.json)

    def compile_estimate(self) -> float:
        prior = PRIOR_COMPILE_S["sdxl" if self.a.child == "sdxl" else "sd15"]
        total = 0.0
        for b in self.a.batches:
            total += self.measured_compile.get(b, prior[1] if b == 1 else prior["more"])
        return 0.1 * total if self.a.tiny else total

    def stage(self, name: str, need_s: float, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.left() < need_s:
            self.res["skipped"][name] = f"{self.left():.0f} s left, needs ~{need_s:.0f} s"
            log(f"SKIP {name}: {self.res['skipped'][name]}")
            self.save()
            return None
        log(f"stage {name} ({self.left():.0f} s left, needs ~{need_s:.0f} s)")
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - record it, go on with the next stage
            self.res["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            log(f"ERROR in {name}: {type(exc).__name__}: {exc}")
            return None
        finally:
            self.res["stage_s"][name] = round(time.monotonic() - t0, 1)
            self.save()

    # ----- stages ------------------------------------------------------------------------------
    def raw(self) -> None:
        import torch

        from bench.bench_multigpu import load_pipe, time_loop

        a = self.a
        pipe = load_pipe(a.model_dir, a.device)
        out: dict[str, Any] = {}
        self.res["stages"]["raw"] = out
        self.res["attn"] = type(next(iter(pipe.unet.attn_processors.values()))).__name__
        for b in a.batches:
            n = a.images_b1 if b == 1 else a.images_bn * b
            out[f"b{b}"] = time_loop(pipe, b, n, a, warm=2 if b == 1 else 1, size=a.size)
            log(f"  raw b{b}: {out[f'b{b}']['img_s']:.3f} img/s")
        self.save()
        if a.fused and self.left() > 60:
            fused: dict[str, Any] = {}
            self.res["stages"]["raw fused qkv + channels_last"] = fused
            try:
                for m in (pipe.unet, pipe.vae):
                    m.fuse_qkv_projections()
                    m.to(memory_format=torch.channels_last)
                for b in a.batches:
                    n = a.images_b1 if b == 1 else a.images_bn * b
                    fused[f"b{b}"] = time_loop(pipe, b, n, a, warm=1, size=a.size)
                    log(f"  raw fused+channels_last b{b}: {fused[f'b{b}']['img_s']:.3f} img/s")
            except Exception as exc:  # noqa: BLE001 - a diffusers without it: say so
                fused["error"] = f"{type(exc).__name__}: {exc}"
        if a.device.startswith("cuda"):
            self.res["raw_max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        del pipe
        _free()

    def worker(self, mode: str, key: str, *, fresh_cache: bool, measure: bool,
               serve_while_compiling: bool = False, compile_timeout: float | None = None,
               batches: list[int] | None = None, overlap: bool = True) -> None:
        a = self.a
        if fresh_cache:
            shutil.rmtree(a.cache_dir, ignore_errors=True)
        inductor = Path(a.work) / f"inductor-{key.replace(' ', '-')}"
        shutil.rmtree(inductor, ignore_errors=True)  # every worker starts with an empty one
        out: dict[str, Any] = {"mode": mode, "overlap": overlap}
        self.res["stages"][key] = out
        w = Worker(a, mode, f"{a.child}-{key.replace(' ', '-')}", inductor, overlap)
        try:
            out["serving_s"] = round(w.wait_serving(min(300.0, max(10.0, self.left() - 20))), 2)
            log(f"  {key}: serving after {out['serving_s']} s")
            if mode != "off":
                after = 40 if measure else 10  # what measuring needs once it is compiled
                limit = min(compile_timeout or 1e9, max(10.0, self.left() - after))
                comp = asyncio.run(wait_compiled(w.share, limit, a, serve_while_compiling))
                comp["shape_s"] = w.shape_seconds()
                comp["cache_log"] = w.cache_lines()
                out["compile"] = comp
                log(f"  {key}: compile {comp.get('state')} after {comp['compile_s']} s "
                    f"{comp['shape_s']}")
                self.save()
                if not comp["done"]:
                    out["note"] = "compile did not finish in the time left; not measured"
                    return
                if fresh_cache:
                    for shape, v in comp["shape_s"].items():
                        b = int(shape.rsplit(" ", 1)[1])
                        self.measured_compile[b] = max(self.measured_compile.get(b, 0), v["s"])
            if measure:
                rows, imgs = asyncio.run(measure_worker(w.share, a, batches or a.batches))
                out.update(rows)
                if mode == "off":
                    self.images = imgs
                else:
                    out["vs_eager"] = compare(imgs, self.images)
                    log(f"  {key}: vs eager {out['vs_eager']}")
        finally:
            died = w.died()
            if died:
                out["worker_died"] = died
                log(f"  {key}: the worker ended with exit code {died['exit_code']}")
            w.stop()
            out["worker_warnings"] = w.warnings()

    def raw_compiled(self, mode: str, *, tuned: bool = False) -> None:
        """The raw loop with the worker's compiled modules (same graphs: cache hits); with
        ``tuned``, compiled cold with ``TUNED_INDUCTOR`` into a compile cache of its own."""
        import torch

        from bench.bench_multigpu import load_pipe, time_loop
        from colabswarm.backend.compiled import Compiler

        a = self.a
        key = f"raw compiled {mode}" + (" tuned" if tuned else "")
        cache_dir = a.cache_dir
        applied: dict[str, Any] = {}
        if tuned:
            import torch._inductor.config as icfg

            for name, value in TUNED_INDUCTOR.items():
                if hasattr(icfg, name):  # inductor's cache keys include its settings
                    setattr(icfg, name, value)
                    applied[name] = value
            cache_dir = Path(a.work) / "compile-cache-tuned"
            shutil.rmtree(cache_dir, ignore_errors=True)
        # an inductor cache of its own, unless the caller shares one: the compile cache folder
        # (the workers' artifact files) is what makes this a cache hit
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(a.work) / "inductor-raw"))
        if a.tiny:
            os.environ["COLABSWARM_COMPILE_BACKEND"] = "eager"
        pipe = load_pipe(a.model_dir, a.device)
        comp = Compiler(mode, "bench", batches=tuple(a.batches), sizes=((a.size, a.size),),
                        cache_dir=cache_dir, background=False)
        t0 = time.perf_counter()
        comp.attach(pipe, Path(a.model_dir).name, lambda: False)
        comp.compile_now()
        out: dict[str, Any] = {"mode": mode, "compile_s": round(time.perf_counter() - t0, 2),
                               "compile": comp.info().model_dump()}
        if tuned:
            out["inductor"] = applied
        self.res["stages"][key] = out

        class Compiled:  # pipe(...) with this thread's calls going to the compiled shapes
            def __init__(self, pipe: Any, n: int) -> None:
                self.pipe, self.n = pipe, n

            def __call__(self, **kw: Any) -> Any:
                with comp.job(a.size, a.size, self.n, loras=False, adapters_loaded=False):
                    return self.pipe(**kw)

        for b in a.batches:
            n = a.images_b1 if b == 1 else a.images_bn * b
            out[f"b{b}"] = time_loop(Compiled(pipe, b), b, n, a, warm=1, size=a.size)
            log(f"  {key} b{b}: {out[f'b{b}']['img_s']:.3f} img/s")
        out["calls"] = dict(comp.calls)
        if a.device.startswith("cuda"):
            out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        del pipe
        _free()

    def run(self) -> None:
        a = self.a
        from bench.bench_multigpu import prepare_folder, versions

        self.res["versions"] = versions([a.device])
        self.res["switch_ms_env"] = os.environ.get("COLABSWARM_COMPILE_SWITCH_MS")
        self.res["text_cache_mb"] = a.text_cache_mb
        t0 = time.perf_counter()
        prepare_folder(a.model_dir, "sdxl" if a.child == "sdxl" else "sd15", tiny=a.tiny)
        self.res["build_s"] = round(time.perf_counter() - t0, 1)
        start_s, measure_s = (20.0, 30.0) if not a.tiny else (10.0, 10.0)
        only = a.only
        if "raw" in only:
            self.stage("raw", 30, self.raw)
        if "off" in only:
            self.stage("off", start_s + measure_s, self.worker, "off", "off",
                       fresh_cache=False, measure=True)
        modes = [m for m in a.modes if m != "off"]
        for i, mode in enumerate(modes):
            need = start_s + self.compile_estimate() + measure_s
            if "cold" in only:
                self.stage(f"{mode} cold", need, self.worker, mode, f"{mode} cold",
                           fresh_cache=True, measure=True)
            if i == 0 and "restart" in only and f"{mode} cold" in self.res["stages"]:
                # restarted: same compile cache folder, empty inductor cache; b1 jobs meanwhile
                self.stage(f"{mode} restart", start_s + 60 + 10, self.worker, mode,
                           f"{mode} restart", fresh_cache=False, measure=True,
                           serve_while_compiling=True, compile_timeout=min(
                               120.0, max(30.0, self.left() - 45)), batches=[1])
            if i == 0 and "quiet" in only and f"{mode} cold" in self.res["stages"]:
                # restarted again, no job meanwhile: the compile from the cache alone
                self.stage(f"{mode} restart quiet", start_s + 40, self.worker, mode,
                           f"{mode} restart quiet", fresh_cache=False, measure=False,
                           compile_timeout=min(120.0, max(30.0, self.left() - 45)))
            if i == 0:
                for stage, overlap in (("warm", True), ("warmwait", False)):
                    if stage in only:
                        self.stage(f"{mode} {stage}", start_s + 60 + measure_s, self.worker,
                                   mode, f"{mode} {stage}", fresh_cache=False, measure=True,
                                   compile_timeout=min(150.0, max(30.0, self.left() - 45)),
                                   overlap=overlap)
            if i == 0 and a.raw_compiled and "rawc" in only:
                self.stage(f"raw compiled {mode}", 60, self.raw_compiled, mode)
            if i == 0 and "tuned" in only:
                self.stage(f"raw compiled {mode} tuned", 1.5 * self.compile_estimate() + 60,
                           self.raw_compiled, mode, tuned=True)
        self.res["left_s"] = round(self.left(), 1)
        self.save()


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def child_main(a: argparse.Namespace) -> int:
    child = Child(a)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        child.run()
    except KeyboardInterrupt:
        child.res["errors"]["stopped"] = "stopped by the parent at its deadline"
    finally:
        child.save()
    return 0


# ----- the parent --------------------------------------------------------------------------------
def _child_cmd(a: argparse.Namespace, model: str, deadline: float, json_path: Path) -> list[str]:
    xl = model == "sdxl"
    cmd = [sys.executable, "-m", "bench.bench_compile", "--child", model,
           "--deadline", str(deadline), "--json", str(json_path),
           "--model-dir", a.sdxl_dir if xl else a.model_dir,
           "--size", str(a.sdxl_size if xl else a.size), "--steps", str(a.steps),
           "--cfg", str(a.cfg), "--batches", a.sdxl_batches if xl else a.sd15_batches,
           "--images-b1", str(a.images_b1), "--images-bn", str(a.images_bn),
           "--compare-images", str(a.compare_images), "--modes", ",".join(a.modes),
           "--work", str(Path(a.work) / model), "--device", "cpu" if a.tiny else "cuda:0",
           "--only", a.only]
    if a.tiny:
        cmd.append("--tiny")
    if not a.fused:
        cmd.append("--no-fused")
    cmd += ["--text-cache-mb", str(a.text_cache_mb)]
    if not a.raw_compiled:
        cmd.append("--no-raw-compiled")
    return cmd


def _pump(proc: subprocess.Popen[str], tag: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"[{tag}] {line.rstrip()}", flush=True)


def parent_main(a: argparse.Namespace) -> int:
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + a.budget_s
    procs: list[tuple[str, subprocess.Popen[str], Path]] = []
    for model, gpu in zip(a.models, a.gpus, strict=False):
        path = out_dir / f"compile-{model}.json"
        path.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "CUDA_VISIBLE_DEVICES": "" if a.tiny else str(gpu)}
        if a.tiny:  # two CPU children (and their workers) share the cores
            env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.Popen(_child_cmd(a, model, deadline, path), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=_pump, args=(proc, model), daemon=True).start()
        procs.append((model, proc, path))
        log(f"started {model} on GPU {gpu} (pid {proc.pid})")
    for model, proc, _ in procs:
        try:
            proc.wait(max(1.0, deadline + 20 - time.time()))
        except subprocess.TimeoutExpired:
            log(f"{model} runs past the budget: stopping it")
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    merged: dict[str, Any] = {"command": " ".join(["python3", "-m", "bench.bench_compile",
                                                   *sys.argv[1:]]),
                              "budget_s": a.budget_s,
                              "wall_s": round(time.monotonic() - T0, 1)}
    for model, proc, path in procs:
        merged[model] = (json.loads(path.read_text()) if path.exists()
                         else {"error": f"no result (exit {proc.returncode})"})
    merged["summary"] = summary(merged)
    (out_dir / "compile.json").write_text(json.dumps(merged, indent=1, default=str))
    print()
    print(table(merged))
    print()
    print(json.dumps(merged["summary"], indent=1, default=str))
    return 0


def _img_s(stage: dict[str, Any] | None, b: int) -> float | None:
    row = (stage or {}).get(f"b{b}")
    return row.get("img_s") if isinstance(row, dict) else None


def summary(merged: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets from what was measured (None where a row is missing)."""
    s: dict[str, Any] = {}
    targets = {"sd15": {1: 4.0, 8: 1.5}, "sdxl": {1: 1.6}}
    for model, want in targets.items():
        res = merged.get(model) or {}
        stages = res.get("stages", {})
        raw = stages.get("raw")
        for mode in ("reduce-overhead", "default"):
            for stage in ("cold", "warm", "warmwait"):
                got = stages.get(f"{mode} {stage}")
                if not got:
                    continue
                name = mode if stage == "cold" else f"{mode} {stage}"
                for b, factor in want.items():
                    r, c = _img_s(raw, b), _img_s(got, b)
                    if r and c:
                        s[f"{model} {name} b{b} x raw"] = round(c / r, 2)
                        s[f"{model} {name} b{b} target {factor}x met"] = c / r >= factor
        tuned = stages.get("raw compiled reduce-overhead tuned")
        for b in want:
            r, c = _img_s(raw, b), _img_s(tuned, b)
            if r and c:
                s[f"{model} raw compiled tuned b{b} x raw"] = round(c / r, 2)
        for key in ("restart", "restart quiet"):  # with jobs served meanwhile; with none
            restart = stages.get(f"reduce-overhead {key}", {}).get("compile", {})
            if restart:
                done = restart.get("done") is True
                s[f"{model} {key} compile s"] = restart.get("compile_s") if done else None
                s[f"{model} {key} compile <= 20 s"] = done and restart.get("compile_s",
                                                                           1e9) <= 20
    return s


def table(merged: dict[str, Any]) -> str:
    head = ["model", "path", "b1 img/s (x raw)", "best batch img/s (x raw)", "compile s",
            "max diff / PSNR vs eager (b1; best)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for model in ("sd15", "sdxl"):
        res = merged.get(model) or {}
        stages = res.get("stages", {})
        raw = stages.get("raw")
        best = max(res.get("batches") or [1])
        for key, st in stages.items():
            if not isinstance(st, dict):
                continue

            def cell(b: int, st: dict[str, Any] = st, raw: Any = raw) -> str:
                v, r = _img_s(st, b), _img_s(raw, b)
                if v is None:
                    return "-"
                return f"{v:.3f}" + (f" ({v / r:.2f}x)" if r and st is not raw else "")

            comp = st.get("compile") or {}
            csec = comp.get("compile_s", st.get("compile_s", ""))
            cmp = st.get("vs_eager") or {}
            diffs = "; ".join(f"{v['max_abs']}/255, {v['psnr_min']} dB" for k, v in cmp.items())
            lines.append(f"| {model} | {key} | {cell(1)} | "
                         f"{cell(best) if best != 1 else '-'} | {csec} | {diffs or '-'} |")
        for key, why in (res.get("skipped") or {}).items():
            lines.append(f"| {model} | {key} | skipped: {why} | | | |")
        for key in (res.get("errors") or {}):
            lines.append(f"| {model} | {key} | ERROR (see JSON) | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"),
                   help="folder for compile.json (default $OUT)")
    p.add_argument("--budget-s", type=float, default=470.0,
                   help="both children end their stages within this many seconds")
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--gpus", default="0,1", help="one GPU per model, in order")
    p.add_argument("--modes", default="off,reduce-overhead,default",
                   help="compile modes measured, in order (off is the eager reference)")
    p.add_argument("--model-dir", default="/tmp/sd15-random")
    p.add_argument("--sdxl-dir", default="/tmp/sdxl-random")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--sdxl-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--sd15-batches", default="1,8", help="SD 1.5: batch 1 and the best batch")
    p.add_argument("--sdxl-batches", default="1")
    p.add_argument("--batches", default="1", help=argparse.SUPPRESS)
    p.add_argument("--images-b1", type=int, default=12, help="images of a batch-1 row")
    p.add_argument("--images-bn", type=int, default=4, help="calls of a larger-batch row")
    p.add_argument("--compare-images", type=int, default=4,
                   help="seeds compared at batch 1 (at a larger batch: one job of them)")
    p.add_argument("--work", default="/tmp/bench-compile")
    p.add_argument("--text-cache-mb", type=float, default=64.0,
                   help="the workers' text cache (0: off, to measure what it is worth)")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="skip the raw fused-QKV + channels_last rows")
    p.add_argument("--no-raw-compiled", dest="raw_compiled", action="store_false",
                   help="skip the raw loop with the compiled modules")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: tiny widths, 64 px, 2 steps, batches 1,2, eager backend")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda:0", help=argparse.SUPPRESS)
    p.add_argument("--only", default="raw,off,cold,restart,quiet,rawc",
                   help="the stages run (e.g. 'cold,restart' for the cache alone; "
                        "bench_multigpu runs 'rawc' alone; 'raw,tuned' compares the "
                        "tuned inductor settings with raw diffusers)")
    a = p.parse_args(argv)
    stages = {s for s in a.only.split(",") if s}
    unknown = stages - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) in --only: {', '.join(sorted(unknown))} "
                f"(stages: {', '.join(STAGES)})")
    a.models = [m for m in a.models.split(",") if m]
    a.modes = [m for m in a.modes.split(",") if m]
    a.gpus = [g for g in a.gpus.split(",") if g]
    if a.tiny and not a.child:
        a.size = a.sdxl_size = 64
        a.steps = 2
        a.sd15_batches, a.sdxl_batches = "1,2", "1,2"
        a.images_b1, a.images_bn, a.compare_images = 2, 1, 2
        if a.model_dir == "/tmp/sd15-random":
            a.model_dir = "/tmp/cs-tiny-sd15"
        if a.sdxl_dir == "/tmp/sdxl-random":
            a.sdxl_dir = "/tmp/cs-tiny-sdxl"
    if a.child:
        a.batches = [int(b) for b in a.batches.split(",") if b]
        a.only = stages
        a.cache_dir = Path(a.work) / "compile-cache"
        Path(a.work).mkdir(parents=True, exist_ok=True)
        return child_main(a)
    return parent_main(a)


if __name__ == "__main__":
    raise SystemExit(main())
