"""Which variant of the worker's compiled path gives the eager pictures, and how fast: a
diagnostic (one GPU), the one that found the compile thread casting an fp16 model to fp32.

Each variant is the worker's own ``Engine`` on one model (SD 1.5 with random weights, built
by ``bench/fullsize.py`` when the folder is missing), batch 1:

- ``off``, ``off2``: compile off, twice (is the engine deterministic here? the reference);
- ``default``, ``reduce-overhead``: compiled on the background thread, as a worker does;
- ``same-thread``: reduce-overhead compiled on the engine's own thread;
- ``attached``: the compiler attached, nothing compiled (only its dispatch);
- ``rg``, ``frompipe``: compile off, then one piece of what attaching does (the UNet frozen;
  a ``from_pipe`` of the pipeline), to find which piece changes the pictures;
- ``rawc``: the raw diffusers pipeline, UNet calls timed eager, then torch.compile'd.

For each: images per second over 6 jobs, the median UNet and decoder call in ms (synchronised
around each call), the engine's compiled/eager call counts, and the largest and mean pixel
difference against ``off`` for the jobs run while compiling and after.

    python -m bench.diag_compile --out $OUT                       # on the device
    python -m bench.diag_compile --device cpu --scale tiny --size 64 --steps 3 \\
        --model-dir /tmp/diag-tiny --out /tmp                     # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import time
import traceback
from typing import Any

import numpy as np

SEEDS = (500, 501)
MODES = {"off": "off", "off2": "off", "rg": "off", "frompipe": "off", "attached": "default",
         "default": "default", "reduce-overhead": "reduce-overhead",
         "same-thread": "reduce-overhead"}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _timed(module: Any, label: str, stats: dict[str, list[float]], device: str) -> None:
    """Time each call of `module` (synchronised), keeping whatever forward it has now."""
    inner = module.__dict__.get("forward") or type(module).forward.__get__(module)

    def forward(*args: Any, **kwargs: Any) -> Any:
        _sync(device)
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        _sync(device)
        stats[label].append(time.perf_counter() - t)
        return out

    module.forward = forward


def _diff(imgs: list[np.ndarray], ref: dict[int, np.ndarray]) -> tuple[list[int], list[float]]:
    d = [np.abs(im.astype(int) - ref[s].astype(int)) for s, im in zip(SEEDS, imgs, strict=True)]
    return [int(x.max()) for x in d], [round(float(x.mean()), 3) for x in d]


def rawc(a: argparse.Namespace) -> dict[str, Any]:
    """The raw pipeline, UNet calls timed eager and then torch.compile'd on this thread."""
    import torch

    from bench.bench_multigpu import load_pipe

    pipe = load_pipe(a.model_dir, a.device)
    out: dict[str, Any] = {}
    for label in ("eager", "compiled"):
        if label == "compiled":
            pipe.unet = torch.compile(pipe.unet)
            pipe("a red fox", num_inference_steps=2, width=a.size, height=a.size)
        stats: dict[str, list[float]] = {"unet": []}
        _timed(pipe.unet, "unet", stats, a.device)
        t = time.perf_counter()
        for _ in range(3):
            pipe("a red fox", num_inference_steps=a.steps, width=a.size, height=a.size)
        out[label] = {"img_s": round(3 / (time.perf_counter() - t), 3),
                      "unet_ms": round(1000 * float(np.median(stats["unet"])), 2)}
        pipe.unet.__dict__.pop("forward", None)
    return out


def variant(v: str, a: argparse.Namespace, ref: dict[int, np.ndarray]) -> dict[str, Any]:
    import torch

    from colabswarm.backend.engine import Engine
    from colabswarm.protocol import JobRequest

    def req(seed: int) -> JobRequest:
        return JobRequest(prompt="a red fox", width=a.size, height=a.size, steps=a.steps,
                          cfg=7.0, seeds=[seed])

    mode = MODES[v]
    t0 = time.perf_counter()
    eng = Engine(models=[a.model_dir], device=a.device, compile=mode, compile_batches=(1,))
    try:
        if v in ("same-thread", "attached"):
            eng._compiler.background = False
        if v in ("rg", "frompipe"):
            eng.run(req(1))  # loads the model
            pipe = eng._loaded.txt2img
            if v == "rg":
                pipe.unet.requires_grad_(False)
                pipe.vae.decoder.requires_grad_(False)
            else:
                type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
        early = [np.asarray(eng.run(req(s))[0]) for s in SEEDS]  # eager while compiling
        if v == "same-thread":
            eng._compiler.compile_now()
        while mode != "off" and v != "attached" and eng.compile_info().state == "compiling":
            eng.idle_work()  # the shapes' first runs (the job thread does this in a worker)
            time.sleep(0.5)
        info = eng.compile_info()
        calls_before = dict(eng._compiler.calls)
        pipe = eng._loaded.txt2img
        stats: dict[str, list[float]] = {"unet": [], "decoder": []}
        _timed(pipe.unet, "unet", stats, a.device)
        _timed(pipe.vae.decoder, "decoder", stats, a.device)
        late = [np.asarray(eng.run(req(s))[0]) for s in SEEDS]
        _sync(a.device)
        t1 = time.perf_counter()
        for i in range(6):
            eng.run(req(600 + i))
        _sync(a.device)
        row: dict[str, Any] = {
            "img_s": round(6 / (time.perf_counter() - t1), 3),
            "ready_after_s": round(t1 - t0, 1), "compile": info.model_dump(),
            "ms_median": {k: round(1000 * float(np.median(x)), 2) for k, x in stats.items() if x},
            "calls_before": calls_before, "calls_after": dict(eng._compiler.calls)}
        if not ref:
            ref.update(zip(SEEDS, late, strict=True))
        else:
            row["max_abs"], row["mean_abs"] = _diff(late, ref)
            row["early_max_abs"], _ = _diff(early, ref)
        return row
    finally:
        eng.close()
        del eng
        gc.collect()
        torch._dynamo.reset()
        if a.device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    from bench.fullsize import build_sd15

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="/tmp/sd15-random")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variants", default="off,off2,default,same-thread,rawc",
                    help=f"comma-separated, 'off' first: {', '.join([*MODES, 'rawc'])}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", default="full", help="bench/fullsize.py's scale when building")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    if not os.path.exists(a.model_dir):
        build_sd15(a.model_dir, "fp16" if a.device == "cuda" else "fp32", scale=a.scale)
    res: dict[str, Any] = {}
    ref: dict[int, np.ndarray] = {}
    start = time.perf_counter()
    for v in a.variants.split(","):
        if time.perf_counter() - start > a.budget_s:
            res[v] = {"skipped": "out of time"}
        else:
            try:
                res[v] = rawc(a) if v == "rawc" else variant(v, a, ref)
            except Exception:  # noqa: BLE001 - a diagnostic: report it and go on
                res[v] = {"error": traceback.format_exc()[-3000:]}
        print(v, json.dumps(res[v], default=str), flush=True)
    with open(os.path.join(a.out, "diag.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
