"""Multi-GPU (issue 7): ways to use two GPUs of one machine, side by side in one run.

Random-weight full-size SD 1.5 (``bench/fullsize.py``), fp16 diffusers folder, txt2img 512x512,
20 Euler steps, CFG 7 (the UNet runs at twice the batch). Rows, all on the same machine:

* ``raw``           ``pipe(...)`` in a loop on one GPU, batch 1 and batches ``--batches``;
                    also the best batch on the second GPU (the "sum of both GPUs" reference);
* ``DataParallel``  the UNet wrapped in ``torch.nn.DataParallel(device_ids=[0, 1])`` (SD.Next's
                    way): its batch (2x for CFG) is split over both GPUs every step; the rest of
                    the pipeline stays on GPU 0;
* ``layer split``   UNet down blocks + mid on GPU 0, up blocks + output convs on GPU 1, the
                    activations moved between them by forward hooks (approximates ComfyUI's
                    multi-GPU/"TP" nodes: one pipeline, two GPUs in turn);
* ``colabswarm``    ``start_local_workers`` (one worker process per GPU, each loading the folder
                    itself: not timed) and ``Swarm().generate``: one worker; two workers with
                    batching (default Swarm, and max_batch 8); two workers with
                    ``Swarm(batching=False, copies=False, straggler_guard=False)``, i.e. plain
                    ordered dispatch with 2 slots each and no batching (SwarmUI's way).

Every path is warmed up first (a swarm by one untimed generate, which also teaches it the
workers' speeds). Results go to ``--json`` after every stage, so a run cut short keeps what it
measured. Later stages, each skipped when the ``--budget-s`` left is too small:
``upscale`` (issue 5, bench/bench_upscale.py with the same workers), ``balanced`` (one worker
with ``device_map="balanced"``: does it load and generate across both GPUs?), ``overhead``
(issue 2's bench_worker at batch 4, in a subprocess) and ``sdxl`` (raw vs two workers, 1024 px).

With ``--compile MODE`` (issue 14) the workers run compiled: they start with ``--compile MODE
--compile-batches B --compile-sizes S`` and a shared compile cache, the swarm rows wait until
every worker's ``Info.compile`` is ready (the compile seconds are recorded, not timed in a row),
and a ``rawc`` stage measures the raw loop with the same compiled modules on each GPU (one
after the other, ``bench/bench_compile.py``'s ``raw compiled`` stage, from the workers' cache):
the bar for compiled workers.

    python -m bench.bench_multigpu --json $OUT/multigpu.json          # on a 2-GPU machine
    python -m bench.bench_multigpu --stages workers,rawc,upscale --compile reduce-overhead
    python -m bench.bench_multigpu --tiny                             # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
STAGES = "raw,dp,split,workers,rawc,upscale,balanced,overhead,sdxl"
T_START = time.monotonic()


_WORKER_LOG_RE = re.compile(r"compil|first run|queued|WARNING|ERROR|Traceback")


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T_START:6.1f}s] {msg}", flush=True)


# ----- model folders and pipelines -------------------------------------------------------------
def prepare_folder(folder: str, kind: str = "sd15", *, tiny: bool = False) -> str:
    """A random-weight diffusers folder (built once; reused when it is already there)."""
    path = Path(folder)
    if (path / "model_index.json").exists():
        return str(path)
    from bench.fullsize import build_sd15, build_sdxl

    build = build_sd15 if kind == "sd15" else build_sdxl
    build(path, "fp16", scale="tiny" if tiny else "full")
    return str(path)


def load_pipe(folder: str, device: str) -> Any:
    import torch
    from diffusers import AutoPipelineForText2Image

    from colabswarm.backend.engine import _dtype_kwarg

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = AutoPipelineForText2Image.from_pretrained(folder, use_safetensors=True,
                                                     **{_dtype_kwarg(): dtype})
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def raw_call(pipe: Any, seeds: list[int], a: argparse.Namespace, size: int | None = None) -> list:
    """One pipeline call, one CPU generator per image (as the worker's engine does)."""
    import torch

    side = size or a.size
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.inference_mode():
        out = pipe(prompt=PROMPT, negative_prompt=None, num_inference_steps=a.steps,
                   guidance_scale=a.cfg, num_images_per_prompt=len(seeds), generator=gens,
                   width=side, height=side)
    return list(out.images)


def time_loop(pipe: Any, batch: int, images: int, a: argparse.Namespace, *, warm: int = 1,
              size: int | None = None) -> dict[str, Any]:
    """img/s of `images` images in calls of `batch`, after `warm` untimed calls."""
    for w in range(warm):
        raw_call(pipe, list(range(10 + w * batch, 10 + (w + 1) * batch)), a, size)
    calls = max(1, images // batch)
    seeds = list(range(1000, 1000 + calls * batch))
    _sync()
    t0 = time.perf_counter()
    per_call = []
    for i in range(calls):
        t1 = time.perf_counter()
        raw_call(pipe, seeds[i * batch:(i + 1) * batch], a, size)
        per_call.append(time.perf_counter() - t1)
    _sync()
    s = time.perf_counter() - t0
    return {"batch": batch, "images": len(seeds), "seconds": round(s, 3),
            "img_s": len(seeds) / s, "call_s_median": round(statistics.median(per_call), 4)}


# ----- DataParallel and the layer split --------------------------------------------------------
def wrap_data_parallel(pipe: Any, device_ids: list[int]) -> Any:
    """Make pipe.unet run through nn.DataParallel; returns an undo function.

    The pipeline keeps its UNet object (it reads .config, .dtype, ...); only the UNet's forward
    is routed through DataParallel of a thin module that calls the class's forward, so the
    replicas never see the patched instance attribute. The scalar timestep is expanded to the
    batch, since DataParallel splits every tensor argument along dim 0.
    """
    import torch

    unet = pipe.unet

    class _Inner(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, *args: Any, **kw: Any) -> Any:
            return type(self.m).forward(self.m, *args, **kw)

    dp = torch.nn.DataParallel(_Inner(unet), device_ids=device_ids or None)

    def forward(sample: Any, timestep: Any, encoder_hidden_states: Any, *args: Any,
                **kw: Any) -> Any:
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        t = t.to(sample.device).reshape(-1).expand(sample.shape[0]).contiguous()
        # DataParallel runs replicas on threads, where the caller's (thread-local) inference
        # mode is off: leave it here too, so replicas and inputs are ordinary no-grad tensors
        with torch.inference_mode(False), torch.no_grad():
            return dp(sample, t, encoder_hidden_states, *args, **kw)

    unet.forward = forward

    def undo() -> None:
        del unet.forward

    return undo


def _move(obj: Any, dev: Any) -> Any:
    import torch

    if torch.is_tensor(obj):
        return obj.to(dev, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(_move(o, dev) for o in obj)
    if isinstance(obj, list):
        return [_move(o, dev) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, dev) for k, v in obj.items()}
    return obj


def split_unet(pipe: Any, dev0: str, dev1: str) -> Any:
    """Down blocks + mid block on dev0, up blocks + conv_norm_out + conv_out on dev1.

    Pre-hooks move each up block's inputs (hidden states, skip connections, time embedding,
    text embeddings) to dev1; a hook on conv_out brings the noise prediction back to dev0.
    Returns an undo function.
    """
    unet = pipe.unet
    tail = [*unet.up_blocks, unet.conv_out]
    if unet.conv_norm_out is not None:
        tail.append(unet.conv_norm_out)
    for m in tail:
        m.to(dev1)
    handles = []
    for blk in unet.up_blocks:
        handles.append(blk.register_forward_pre_hook(
            lambda m, args, kw: (_move(args, dev1), _move(kw, dev1)), with_kwargs=True))
    handles.append(unet.conv_out.register_forward_hook(lambda m, i, o: o.to(dev0)))

    def undo() -> None:
        for h in handles:
            h.remove()
        for m in tail:
            m.to(dev0)

    return undo


def params_on(module: Any) -> dict[str, int]:
    c: Counter[str] = Counter()
    for p in module.parameters():
        c[str(p.device)] += p.numel()
    return dict(c)


# ----- colabswarm ------------------------------------------------------------------------------
def swarm_row(members: list[tuple[str, str]], images: int, a: argparse.Namespace, *,
              size: int | None = None, warm_images: int | None = None, reps: int | None = None,
              **swarm_kw: Any) -> dict[str, Any]:
    """img/s of Swarm.generate over these workers, after one untimed generate."""
    from colabswarm.swarm import Swarm

    side = size or a.size
    sw = Swarm(output_dir=None, trace=True, **swarm_kw)
    try:
        for name, share in members:
            sw.add(share, name=name, slots=2)
        kw = dict(width=side, height=side, steps=a.steps, cfg=a.cfg, save=False)
        t0 = time.perf_counter()
        warm_n = warm_images or max(4, images // 2)
        sw.generate(PROMPT, images=warm_n, seed=10, **kw)
        warm_s = time.perf_counter() - t0
        rates, secs, jobs = [], [], Counter()
        per_backend: Counter[str] = Counter()
        reps = reps or a.reps
        for r in range(reps):
            mark = len(sw.trace or [])
            t0 = time.perf_counter()
            res = sw.generate(PROMPT, images=images, seed=1000 + 100000 * r, **kw)
            s = time.perf_counter() - t0
            assert len(res.images) == images, (len(res.images), images)
            secs.append(s)
            rates.append(images / s)
            per_backend.update(g.backend for g in res.images)
            for b, n, _s, _e, outcome, copy in (sw.trace or [])[mark:]:
                jobs[f"{b}:{n}{'(copy)' if copy else ''}:{outcome}"] += 1
        return {"workers": [n for n, _ in members], "images": images, "reps": reps,
                "warmup_images": warm_n, "warmup_s": round(warm_s, 3),
                "seconds": [round(s, 3) for s in secs], "img_s": statistics.mean(rates),
                "img_s_each": [round(x, 4) for x in rates], "images_by_worker": dict(per_backend),
                "jobs": dict(jobs), "swarm": {k: v for k, v in swarm_kw.items()}}
    finally:
        sw.close()


# ----- the run ---------------------------------------------------------------------------------
class Run:
    """Stages in order; each writes its results to the JSON file as soon as it ends."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.result: dict[str, Any] = {"config": {}, "rows": {}, "skipped": {}, "errors": {}}
        self.deadline = T_START + a.budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        if self.a.json:
            tmp = Path(self.a.json + ".tmp")
            tmp.write_text(json.dumps(self.result, indent=1, default=str))
            os.replace(tmp, self.a.json)

    def stage(self, name: str, need_s: float, fn: Any, *args: Any, key: str | None = None) -> Any:
        """Run fn(*args) if stage `name` was asked for and `need_s` seconds are left; `key`
        names it in the results (default: the stage's name)."""
        if name not in self.a.stages:
            return None
        name = key or name
        if self.left() < need_s:
            self.result["skipped"][name] = f"{self.left():.0f}s left, needs ~{need_s:.0f}s"
            log(f"SKIP {name}: {self.result['skipped'][name]}")
            self.save()
            return None
        log(f"stage {name} ({self.left():.0f}s left)")
        t0 = time.monotonic()
        try:
            return fn(*args)
        except Exception as exc:
            self.result["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            log(f"ERROR in {name}: {type(exc).__name__}: {exc}")
            return None
        finally:
            self.result.setdefault("stage_s", {})[name] = round(time.monotonic() - t0, 1)
            self.save()

    def row(self, key: str, value: dict[str, Any]) -> None:
        self.result["rows"][key] = value
        img_s = value.get("img_s")
        log(f"{key}: " + (f"{img_s:.3f} img/s " if img_s is not None else "")
            + json.dumps({k: v for k, v in value.items() if k != "img_s"}, default=str))
        self.save()


def _commit() -> str | None:
    """The checkout's commit (None where there is no git), with '+' when tracked files changed."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+" if dirty else "")) or None


def source_digest(root: Path | None = None) -> str:
    """SHA-256 over the paths and bytes of colabswarm/ and bench/ Python files: what ran, even
    where the checkout's git is not the tree's (a device's copy can carry an older .git). To
    check a result against a commit: ``git worktree add /tmp/c COMMIT`` and
    ``python3 -c "from bench.bench_multigpu import source_digest; print(source_digest())"``
    there."""
    import hashlib

    root = root or Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted([*root.glob("colabswarm/**/*.py"), *root.glob("bench/*.py")]):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def versions(devices: list[str]) -> dict[str, Any]:
    import diffusers
    import PIL
    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "diffusers": diffusers.__version__,
                            "transformers": transformers.__version__, "pillow": PIL.__version__,
                            "cpus": os.cpu_count(), "devices": devices, "commit": _commit(),
                            "source_sha256": source_digest()}
    try:
        import fastapi
        import httpx
        import uvicorn

        info.update(fastapi=fastapi.__version__, uvicorn=uvicorn.__version__,
                    httpx=httpx.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            info["nvidia_smi"] = smi.stdout.strip().splitlines()
            topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                  timeout=20)
            info["topo"] = topo.stdout.strip().splitlines()[:4]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f
                               if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def stage_raw(run: Run, folder: str) -> dict[str, Any]:
    a = run.a
    d0, d1 = a.devices
    pipe = load_pipe(folder, d0)
    run.result["config"]["attn"] = type(next(iter(pipe.unet.attn_processors.values()))).__name__
    run.row("raw GPU0 b1", time_loop(pipe, 1, a.images_b1, a, warm=2))
    best: dict[str, Any] | None = None
    for b in a.batches:
        r = time_loop(pipe, b, a.images, a)
        run.row(f"raw GPU0 b{b}", r)
        if best is None or r["img_s"] > best["img_s"]:
            best = r
    assert best is not None
    run.result["best_batch"] = best["batch"]
    pipes = {"gpu0": pipe}
    if d1 != d0 or a.tiny:
        pipe1 = load_pipe(folder, d1)
        pipes["gpu1"] = pipe1
        for b in a.batches:
            run.row(f"raw GPU1 b{b}", time_loop(pipe1, b, a.images, a))
    if "cuda" in d0:
        import torch

        run.result["raw_max_memory_gib"] = round(torch.cuda.max_memory_allocated(0) / 2**30, 2)
    return pipes


def stage_dp(run: Run, pipe: Any) -> None:
    a = run.a
    ids = [int(d.split(":")[1]) for d in a.devices if d.startswith("cuda")]
    undo = wrap_data_parallel(pipe, ids)
    try:
        for b in sorted({run.result.get("best_batch", a.batches[-1]), *a.dp_batches}):
            r = time_loop(pipe, b, max(a.dp_images, b), a)
            r["device_ids"] = ids
            run.row(f"DataParallel b{b}", r)
    finally:
        undo()


def stage_split(run: Run, pipe: Any) -> None:
    a = run.a
    undo = split_unet(pipe, a.devices[0], a.devices[1])
    try:
        placement = params_on(pipe.unet)
        b = run.result.get("best_batch", a.batches[-1])
        r = time_loop(pipe, b, a.dp_images, a)
        r["unet_params_by_device"] = placement
        run.row(f"layer split b{b}", r)
    finally:
        undo()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compile_args(a: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Worker arguments and environment for --compile (eager workers: --compile off)."""
    if a.compile == "off":
        return ["--compile", "off"], {}
    args = ["-v", "--compile", a.compile, "--compile-batches", a.compile_batches,
            "--compile-cache", str(Path(a.compile_work) / "compile-cache")]
    if a.compile_sizes:
        args += ["--compile-sizes", a.compile_sizes]
    env = {"TORCHINDUCTOR_CACHE_DIR": str(Path(a.compile_work) / "inductor")}
    if a.tiny:
        env["COLABSWARM_COMPILE_BACKEND"] = "eager"
    return args, env


def wait_compiled(run: Run, group: Any) -> None:
    """Until every worker's Info.compile is no longer compiling (or the budget runs out)."""
    import asyncio

    from colabswarm.backend.client import WorkerClient

    async def one(share: str) -> dict[str, Any]:
        async with WorkerClient(share) as c:
            while run.left() > 60:
                comp = (await c.info()).compile
                if comp is None or comp.state != "compiling":
                    return comp.model_dump() if comp else {}
                await asyncio.sleep(1.0)
            return {"state": "still compiling when the budget ran low"}

    async def both() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one(w.share or "") for w in group)))

    t0 = time.perf_counter()
    states = asyncio.run(both())
    run.result["compile"] = {"mode": run.a.compile, "wait_s": round(time.perf_counter() - t0, 1),
                             "workers": states}
    log(f"compiled workers after {run.result['compile']['wait_s']}s: "
        f"{[s.get('detail') for s in states]}")


def stage_workers(run: Run, folder: str) -> Any:
    from colabswarm.swarm.local import start_local_workers

    args, env = compile_args(run.a)
    t0 = time.perf_counter()
    group = start_local_workers(run.a.gpus, model=folder, extra_args=args, env=env)
    run.result["workers_load_s"] = round(time.perf_counter() - t0, 1)
    log(f"workers {[w.name for w in group]} loaded in {run.result['workers_load_s']}s "
        "(not timed in any row)")
    if run.a.compile != "off":
        wait_compiled(run, group)
    return group


def stage_raw_compiled(run: Run, folder: str) -> None:
    """The raw loop with the workers' compiled modules, on each GPU alone (a subprocess each,
    bench_compile's 'raw compiled' stage; its compile comes from the workers' cache)."""
    a = run.a
    best = run.result.get("best_batch", a.batches[-1])
    for i, gpu in enumerate(a.gpus):
        out = Path(a.compile_work) / f"rawc-gpu{gpu}.json"
        cmd = [sys.executable, "-m", "bench.bench_compile", "--child", "sd15", "--only", "rawc",
               "--deadline", str(time.time() + max(30.0, run.left() - 10)), "--json", str(out),
               "--model-dir", folder, "--size", str(a.size), "--steps", str(a.steps),
               "--cfg", str(a.cfg), "--batches", rawc_batches(a.rawc_batches, best),
               "--images-b1", str(a.images_b1), "--images-bn", str(max(1, a.images // best)),
               "--modes", a.compile, "--work", str(a.compile_work),
               "--device", "cpu" if a.tiny else "cuda:0"]
        if a.tiny:
            cmd.append("--tiny")
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "CUDA_VISIBLE_DEVICES": "" if a.tiny else str(gpu),
               "TORCHINDUCTOR_CACHE_DIR": str(Path(a.compile_work) / "inductor")}
        rc = subprocess.run(cmd, env=env, timeout=max(30.0, run.left())).returncode
        res = json.loads(out.read_text()) if out.exists() else {}
        st = res.get("stages", {}).get(f"raw compiled {a.compile}", {})
        for key, row in st.items():
            if key.startswith("b") and isinstance(row, dict):
                run.row(f"raw compiled GPU{i} {key}", row)
        if not st:
            run.result["errors"][f"rawc GPU{i}"] = f"exit {rc}: {res.get('errors') or res}"


def rawc_batches(spec: str, best: int) -> str:
    """The rawc stage's batch sizes: `spec` with 'best' as the best raw batch, deduplicated."""
    sizes = [best if b == "best" else int(b) for b in spec.split(",") if b]
    return ",".join(str(b) for b in sorted(set(sizes)))


def stage_swarm_rows(run: Run, members: list[tuple[str, str]], extra: bool = False) -> None:
    """The three rows the targets need; with `extra`, two more (max_batch 8, 1 worker plain)."""
    a = run.a
    one, two = members[:1], members[:2]
    rows: list[tuple[str, float, Any]] = [
        ("colabswarm 1 worker", 0, lambda: swarm_row(one, a.images, a)),
        ("colabswarm 2 workers, batching", 0, lambda: swarm_row(two, a.swarm_images, a)),
        ("colabswarm 2 workers, no batching (SwarmUI rule)", 0,
         lambda: swarm_row(two, a.images, a, batching=False, copies=False,
                           straggler_guard=False)),
    ]
    if extra:
        rows = [
            ("colabswarm 2 workers, batching, max_batch 8", 30,
             lambda: swarm_row(two, a.swarm_images, a, max_batch=8)),
            ("colabswarm 1 worker, no batching", 45,
             lambda: swarm_row(one, a.images_b1, a, warm_images=max(2, a.images_b1 // 2),
                               reps=1, batching=False, copies=False, straggler_guard=False)),
        ]
    for key, need, fn in rows:
        if run.left() < need:
            run.result["skipped"][key] = f"{run.left():.0f}s left, needs ~{need:.0f}s"
            continue
        try:
            run.row(key, fn())
        except Exception as exc:
            run.result["errors"][key] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            log(f"ERROR in {key}: {type(exc).__name__}: {exc}")
            run.save()


def stage_upscale(run: Run, members: list[tuple[str, str]]) -> None:
    from bench.bench_upscale import measure_upscale, upscale_ns

    res = measure_upscale({"1 worker": members[:1], "2 workers": members[:2]},
                          upscale_ns(run.a), log=log)
    run.result["upscale"] = res
    if run.a.upscale_json:
        Path(run.a.upscale_json).write_text(json.dumps(res, indent=1))


def stage_balanced(run: Run, folder: str) -> None:
    """One in-process worker with device_map='balanced': load, one image, where things went."""
    import asyncio

    from colabswarm.backend.client import WorkerClient
    from colabswarm.backend.serve import start_worker
    from colabswarm.protocol import JobRequest

    out: dict[str, Any] = {"device_map": run.a.device_map, "ok": False}
    run.result["balanced"] = out
    t0 = time.perf_counter()
    handle = start_worker(model=folder, device_map=run.a.device_map)
    try:
        out["load_s"] = round(time.perf_counter() - t0, 1)
        eng = handle.worker.engine
        pipe = eng._loaded.txt2img
        out["hf_device_map"] = {k: str(v) for k, v in (getattr(pipe, "hf_device_map", None)
                                                       or {}).items()}
        out["modules"] = {n: sorted(params_on(m)) for n, m in pipe.components.items()
                          if hasattr(m, "parameters")}
        out["engine_device"] = eng.device

        async def one() -> tuple[float, Any]:
            client = WorkerClient(handle.share, timeout=300.0)
            try:
                req = JobRequest(prompt=PROMPT, width=run.a.size, height=run.a.size,
                                 steps=run.a.steps, cfg=run.a.cfg, seeds=[7])
                t1 = time.perf_counter()
                imgs = await client.run(req)
                return time.perf_counter() - t1, imgs
            finally:
                await client.aclose()

        secs, imgs = asyncio.run(one())
        import numpy as np

        arr = np.asarray(imgs[0])
        out.update(ok=True, image_s=round(secs, 3), size=list(imgs[0].size),
                   pixel_std=round(float(arr.std()), 1))
        log(f"balanced: {json.dumps(out)}")
    finally:
        handle.stop()
        run.save()


def stage_overhead(run: Run, folder: str) -> None:
    a = run.a
    cmd = [sys.executable, "-m", "bench.bench_worker_compat", "--model-dir", folder,
           "--batches", a.overhead_batches, "--paths", "inproc/2,remote/2",
           "--rounds", "3" if run.left() > 130 else "2"]
    if a.overhead_json:
        cmd += ["--json", a.overhead_json]
    if a.tiny:
        cmd += ["--tiny-check"]
    run.result["overhead_command"] = " ".join(cmd)
    limit = max(30.0, run.left() - 5)
    try:
        rc = subprocess.run(cmd, timeout=limit).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    run.result["overhead_rc"] = rc
    if a.overhead_json and Path(a.overhead_json).exists():
        res = json.loads(Path(a.overhead_json).read_text())
        run.result["overhead"] = {"rows": [{k: r[k] for k in ("batch", "img_s", "ratio",
                                                               "ratio_range")}
                                           for r in res.get("rows", [])]}


def stage_sdxl(run: Run) -> None:
    from colabswarm.swarm.local import start_local_workers

    a = run.a
    folder = prepare_folder(a.sdxl_dir, "sdxl", tiny=a.tiny)
    side = a.sdxl_size
    pipe = load_pipe(folder, a.devices[0])
    try:
        run.row("sdxl raw GPU0 b1", time_loop(pipe, 1, a.sdxl_images, a, warm=2, size=side))
        if run.left() > 120:
            run.row("sdxl raw GPU0 b4", time_loop(pipe, 4, a.sdxl_images, a, size=side))
    finally:
        del pipe
        free_memory()
    t0 = time.perf_counter()
    group = start_local_workers(a.gpus, model=folder, extra_args=["--compile", "off"])
    run.result["sdxl_workers_load_s"] = round(time.perf_counter() - t0, 1)
    try:
        members = [(w.name, w.share or "") for w in group]
        run.row("sdxl colabswarm 2 workers, batching",
                swarm_row(members[:2], a.sdxl_images * 2, a, size=side,
                          warm_images=a.sdxl_images, reps=1))
    finally:
        group.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/sd15-random", help="built there if missing")
    p.add_argument("--sdxl-dir", default="/tmp/sdxl-random")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--batches", default="4,8", help="raw batch sizes besides 1 (best is used)")
    p.add_argument("--dp-batches", default="", help="extra DataParallel batch sizes")
    p.add_argument("--images-b1", type=int, default=16, help="images of the batch-1 rows")
    p.add_argument("--images", type=int, default=32, help="images of most rows")
    p.add_argument("--dp-images", type=int, default=16,
                   help="images of the DataParallel and layer-split rows")
    # a run pays ~0.4 s once (first job's start, last job's PNGs); at 64 images over two GPUs
    # that alone is 7 % (bench/bench_run_length.py), so the steady rate needs a longer run
    p.add_argument("--swarm-images", type=int, default=256, help="images of 2-worker batching")
    p.add_argument("--reps", type=int, default=2, help="timed generates per swarm row")
    p.add_argument("--devices", default="cuda:0,cuda:1")
    p.add_argument("--gpus", default="0,1", help="worker GPUs (CUDA_VISIBLE_DEVICES each)")
    p.add_argument("--device-map", default="balanced")
    p.add_argument("--stages", default=STAGES)
    p.add_argument("--budget-s", type=float, default=520.0,
                   help="stages that would not fit in what is left are skipped")
    p.add_argument("--overhead-batches", default="4")
    p.add_argument("--overhead-json", default=None)
    p.add_argument("--upscale-json", default=None)
    p.add_argument("--sdxl-size", type=int, default=1024)
    p.add_argument("--sdxl-images", type=int, default=8)
    p.add_argument("--json", default=None)
    p.add_argument("--compile", default="off",
                   choices=["off", "auto", "reduce-overhead", "default"],
                   help="the workers' compile mode (issue 14); default off, the eager rows")
    p.add_argument("--compile-batches", default="1,8", help="compiled batch sizes")
    p.add_argument("--compile-sizes", default="512x512,576x576",
                   help="sizes the workers compile (upscale tiles are 576x576)")
    p.add_argument("--rawc-batches", default="1,best",
                   help="batch sizes of the rawc rows ('best': the best raw batch, all the "
                        "0.95x bar needs)")
    p.add_argument("--compile-work", default="/tmp/bench-multigpu-compile",
                   help="the workers' compile cache and inductor cache (kept between runs)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: tiny-width SD 1.5 layout, 64 px, 2 steps, few images")
    from bench.bench_upscale import add_upscale_args

    add_upscale_args(p)
    a = p.parse_args(argv)
    a.stages = set(a.stages.split(","))
    a.batches = [int(x) for x in a.batches.split(",") if x]
    a.dp_batches = [int(x) for x in a.dp_batches.split(",") if x]
    a.devices = a.devices.split(",")
    a.gpus = [int(g) for g in a.gpus.split(",")]
    if a.compile == "off":
        a.stages.discard("rawc")
    if a.tiny:
        a.compile_sizes = "64x64"  # the smoke run's size
        a.size, a.steps = 64, 2
        a.images_b1, a.images, a.swarm_images, a.reps, a.dp_images = 4, 8, 8, 1, 8
        a.batches = [2, 4]
        a.devices = ["cpu", "cpu"]
        a.sdxl_size, a.sdxl_images = 64, 2
        if a.model_dir == "/tmp/sd15-random":
            a.model_dir = "/tmp/cs-tiny-sd15"
        if a.sdxl_dir == "/tmp/sdxl-random":
            a.sdxl_dir = "/tmp/cs-tiny-sdxl"
    run = Run(a)
    run.result["command"] = " ".join(["python3", "-m", "bench.bench_multigpu",
                                      *(argv if argv is not None else sys.argv[1:])])
    run.result["versions"] = versions(a.devices)
    run.result["config"].update(size=a.size, steps=a.steps, cfg=a.cfg, prompt=PROMPT,
                                dtype="fp16" if not a.tiny else "fp32", tiny=a.tiny,
                                images=a.images, images_b1=a.images_b1,
                                swarm_images=a.swarm_images, reps=a.reps)
    log(json.dumps(run.result["versions"]))
    t0 = time.perf_counter()
    folder = prepare_folder(a.model_dir, "sd15", tiny=a.tiny)
    run.result["build_s"] = round(time.perf_counter() - t0, 1)
    pipes = run.stage("raw", 0, stage_raw, run, folder) or {}
    if "gpu0" in pipes:
        run.stage("dp", 25, stage_dp, run, pipes["gpu0"])
        run.stage("split", 20, stage_split, run, pipes["gpu0"])
    pipes.clear()
    free_memory()
    needs_workers = {"workers", "upscale", "rawc"} & a.stages
    group = (run.stage(min(needs_workers), 60, stage_workers, run, folder, key="start workers")
             if needs_workers else None)
    if group is not None:
        try:
            members = [(w.name, w.share or "") for w in group]
            if "workers" in a.stages:
                run.stage("workers", 60, stage_swarm_rows, run, members, key="swarm")
            if a.compile != "off":
                run.stage("rawc", 60, stage_raw_compiled, run, folder)
            run.stage("upscale", 40, stage_upscale, run, members)
            if "workers" in a.stages:
                run.stage("workers", 75, stage_swarm_rows, run, members, True,
                          key="swarm extra")
        finally:
            # what each worker logged (compiled shapes, first runs, sizes queued, warnings)
            run.result["worker_logs"] = {
                w.name: [line for line in list(w.log) if _WORKER_LOG_RE.search(line)][-80:]
                for w in group}
            group.stop()
    summarise(run)
    run.stage("balanced", 45, stage_balanced, run, folder)
    free_memory()
    run.stage("overhead", 90, stage_overhead, run, folder)
    run.stage("sdxl", 200, stage_sdxl, run)
    summarise(run)
    log("done")
    print(json.dumps(run.result.get("summary", {}), indent=1), flush=True)
    return 0


def summarise(run: Run) -> None:
    """The issue's two targets, from the rows that were measured."""
    rows = run.result["rows"]
    s: dict[str, Any] = {}

    def ips(key: str) -> float | None:
        return rows[key]["img_s"] if key in rows else None

    raw_b1 = ips("raw GPU0 b1")
    best0 = max((r["img_s"] for k, r in rows.items() if k.startswith("raw GPU0 b")), default=None)
    best1 = max((r["img_s"] for k, r in rows.items() if k.startswith("raw GPU1 b")), default=None)
    nob = ips("colabswarm 2 workers, no batching (SwarmUI rule)")
    bat = [v for v in (ips("colabswarm 2 workers, batching"),
                       ips("colabswarm 2 workers, batching, max_batch 8")) if v is not None]
    if raw_b1 and nob:
        s["no_batching_over_raw_b1"] = nob / raw_b1
        s["no_batching_target_1.9x_met"] = nob / raw_b1 >= 1.9
    if best0 and best1 and bat:
        s["best_raw_sum"] = best0 + best1
        s["batching_over_raw_sum"] = max(bat) / (best0 + best1)
        s["batching_target_0.95_met"] = max(bat) / (best0 + best1) >= 0.95
    rawc = [max((r["img_s"] for k, r in rows.items() if k.startswith(f"raw compiled GPU{g} ")),
                default=None) for g in (0, 1)]
    if all(rawc) and bat:
        s["compiled_raw_best_sum"] = sum(rawc)
        s["batching_over_compiled_raw_sum"] = max(bat) / sum(rawc)
        s["compiled_target_0.95_met"] = max(bat) / sum(rawc) >= 0.95
    for k, r in rows.items():
        if raw_b1 and "img_s" in r:
            s.setdefault("x_raw_b1", {})[k] = round(r["img_s"] / raw_b1, 3)
    run.result["summary"] = s
    run.save()


if __name__ == "__main__":
    raise SystemExit(main())
