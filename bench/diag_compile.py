"""Which compiled variant gives the eager pictures, and how fast: the worker's engine with
compile off, reduce-overhead (compiled on the background thread), default, and reduce-overhead
compiled on the engine's own thread. A diagnostic for the compiled fast path (GPU only).

    python -m bench.diag_compile --model-dir /tmp/sd15-random --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    import torch

    from bench.fullsize import build_sd15
    from colabswarm.backend.engine import Engine
    from colabswarm.protocol import JobRequest

    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", default="/tmp/sd15-random")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variants", default="off,reduce-overhead,same-thread,default")
    p.add_argument("--out", default=".")
    p.add_argument("--device", default="cuda")
    p.add_argument("--scale", default="full")
    a = p.parse_args()
    import os
    if not os.path.exists(a.model_dir):
        build_sd15(a.model_dir, "fp16" if a.device == "cuda" else "fp32", scale=a.scale)
    res: dict = {}
    ref: dict = {}
    seeds = [500, 501]

    def req(s):
        return JobRequest(prompt="a red fox", width=a.size, height=a.size, steps=a.steps,
                          cfg=7.0, seeds=[s])

    start = time.perf_counter()
    for v in a.variants.split(","):
        if time.perf_counter() - start > 420:
            print("SKIP", v, "(time)", flush=True)
            continue
        try:
            one(v, a, req, seeds, ref, res)
        except Exception as exc:  # noqa: BLE001 - a diagnostic: report and go on
            import traceback
            res[v] = {"error": traceback.format_exc()[-3000:]}
            print(v, "ERROR", res[v]["error"], flush=True)
    with open(os.path.join(a.out, "diag.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


def _timed(module, label, stats) -> None:
    import torch

    inner = module.__dict__.get("forward") or type(module).forward.__get__(module)

    def forward(*args, **kwargs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        torch.cuda.synchronize()
        stats[label].append(time.perf_counter() - t)
        return out

    module.forward = forward


def rawc(a, res) -> None:
    """The raw pipeline, UNet calls timed eager and then torch.compile'd on this thread."""
    import torch

    from bench.bench_multigpu import load_pipe

    pipe = load_pipe(a.model_dir, a.device)
    out = {}
    for label in ("eager", "compiled"):
        if label == "compiled":
            pipe.unet = torch.compile(pipe.unet)
            pipe("a red fox", num_inference_steps=2, width=a.size, height=a.size)
        stats = {"unet": []}
        _timed(pipe.unet, "unet", stats)
        t = time.perf_counter()
        for i in range(3):
            pipe("a red fox", num_inference_steps=a.steps, width=a.size, height=a.size)
        out[label] = {"img_s": round(3 / (time.perf_counter() - t), 3),
                      "unet_ms": round(1000 * float(np.median(stats["unet"])), 2)}
        pipe.unet.__dict__.pop("forward", None)
    res["rawc"] = out
    print("rawc", out, flush=True)


def one(v, a, req, seeds, ref, res) -> None:
    if v == "rawc":
        return rawc(a, res)
    import gc
    import os

    import torch

    from colabswarm.backend.engine import Engine
    if True:
        t0 = time.perf_counter()
        mode = {"same-thread": "reduce-overhead", "off2": "off", "rg": "off", "frompipe": "off",
                "attached": "default", "ro-log": "reduce-overhead"}.get(v, v)
        if v == "ro-log":
            torch._logging.set_logs(perf_hints=True, cudagraphs=True)
        eng = Engine(models=[a.model_dir], device=a.device, compile=mode, compile_batches=(1,))
        if v in ("same-thread", "attached"):
            eng._compiler.background = False
        if v in ("rg", "frompipe"):
            eng.run(req(1))
            pipe = eng._loaded.txt2img
            if v == "rg":
                pipe.unet.requires_grad_(False)
                pipe.vae.decoder.requires_grad_(False)
            else:
                import copy
                type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
        imgs0 = [np.asarray(eng.run(req(s))[0]) for s in seeds]  # loads; eager while compiling
        if v == "same-thread":
            eng._compiler.compile_now()
        while mode != "off" and v != "attached" and eng.compile_info().state == "compiling":
            time.sleep(0.5)
        info = eng.compile_info()
        stats: dict = {"unet": [], "decoder": []}
        if a.device == "cuda":
            pipe = eng._loaded.txt2img
            _timed(pipe.unet, "unet", stats)
            _timed(pipe.vae.decoder, "decoder", stats)
        calls0 = dict(eng._compiler.calls)
        imgs = [np.asarray(eng.run(req(s))[0]) for s in seeds]
        a.device == "cuda" and torch.cuda.synchronize()
        t1 = time.perf_counter()
        n = 6
        for i in range(n):
            eng.run(req(600 + i))
        a.device == "cuda" and torch.cuda.synchronize()
        ips = n / (time.perf_counter() - t1)
        row = {"img_s": round(ips, 3), "ready_after_s": round(t1 - t0, 1),
               "compile": info.model_dump() if hasattr(info, "model_dump") else str(info),
               "ms_median": {k: round(1000 * float(np.median(v)), 2) for k, v in stats.items()
                             if v},
               "calls_before": calls0, "calls_after": dict(eng._compiler.calls)}
        if v == "off":
            ref.update(zip(seeds, imgs))
        else:
            d = [int(np.abs(im.astype(int) - ref[s].astype(int)).max()) for s, im in
                 zip(seeds, imgs)]
            m = [float(np.abs(im.astype(int) - ref[s].astype(int)).mean()) for s, im in
                 zip(seeds, imgs)]
            d0 = [int(np.abs(im.astype(int) - ref[s].astype(int)).max()) for s, im in
                  zip(seeds, imgs0)]
            row.update(max_abs=d, mean_abs=[round(x, 3) for x in m], eager_phase_max_abs=d0)
        res[v] = row
        print(v, json.dumps(row, default=str), flush=True)
        eng.close()
        del eng
        gc.collect()
        torch._dynamo.reset()
        a.device == "cuda" and torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
