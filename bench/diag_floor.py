"""Where a compiled image's time goes: the GPU's floor against the pipeline (issue 14, device)

The compiled worker reaches 95-97 % of a raw loop with the same compiled modules, and that raw
loop is 3.55x raw diffusers at SD 1.5 batch 1 on an H200 (target 4x). This says whether the
rest is the GPU's own time or time the GPU waits for the CPU. For diag_layout's ``cl`` variant
(the worker's compiled modules: channels_last UNet and VAE, CUDA graphs) at each batch size:

- ``pipe_ms``: one ``pipe(...)`` call to PIL images, as the raw loop times it, per call;
- ``latent_ms``: the same call with ``output_type="latent"`` (no decode, no PIL);
- the parts alone, each replayed back to back with the exact arguments the pipeline passed them
  (recorded during one call, so no new trace): ``unet_ms`` (one step), ``decode_ms``,
  ``text_ms`` (``encode_prompt``, eager);
- ``floor_ms`` = steps x unet + decode + text, and ``waits_ms`` = pipe - floor: what the GPU
  waits for the CPU per call (Python between steps, the scheduler, set-up, the PIL images);
- ``pipe_embeds_ms``: the call given the prompt's embeddings (SD 1.5), as a worker whose text
  cache holds the prompt runs it;
- with ``--profile``, from ``torch.profiler`` over one call (CUDA activity): the kernels' busy
  time, their count, and the idle time between them on the GPU, split into gaps under 20 us
  (between the kernels of a graph) and longer ones (the GPU waiting for the host), with the
  longest gaps and the kernels around them. The profiler's own cost per kernel makes a batch-1
  call CPU-bound, so its numbers are only good at batch 8.

    python3 -m bench.diag_floor --out $OUT              # SD 1.5, batch 1 and 8
    python3 -m bench.diag_floor --tiny --out /tmp/df    # CPU smoke run: numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def _record(obj: Any, attr: str, store: dict[str, Any]) -> Callable[[], None]:
    """Wrap obj.attr so its first call's arguments land in store; returns the undo."""
    import torch

    orig = getattr(obj, attr)

    def keep(v: Any) -> Any:
        return v.clone() if isinstance(v, torch.Tensor) else v

    def wrapper(*args: Any, **kw: Any) -> Any:
        if "args" not in store:
            store["args"] = tuple(keep(v) for v in args)
            store["kw"] = {k: keep(v) for k, v in kw.items()}
        return orig(*args, **kw)

    setattr(obj, attr, wrapper)
    return lambda: setattr(obj, attr, orig)


def _timed(fn: Callable[[], Any], n: int, warm: int, sync: Callable[[], None]) -> float:
    """Mean ms of n back-to-back calls after `warm` untimed ones (one sync at each end)."""
    for _ in range(warm):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1000 / n


def _gpu_profile(call: Callable[[], Any], trace: Path) -> dict[str, Any]:
    """Kernel busy time, count and idle gaps of one call, from a profiler trace."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1000
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    kernels = sorted(((float(e["ts"]), float(e["dur"]), e.get("name", "?")) for e in events
                      if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                     key=lambda k: k[0])
    if not kernels:
        return {"error": "no kernels in the trace", "wall_ms": round(wall_ms, 2)}
    busy, small, large, gaps = 0.0, 0.0, 0.0, []
    end = kernels[0][0]
    prev = ""
    for ts, dur, name in kernels:
        if ts > end:
            gap = ts - end
            if gap < 20:
                small += gap
            else:
                large += gap
                gaps.append((gap, prev[:60], name[:60]))
        busy += max(0.0, ts + dur - max(ts, end))
        if ts + dur > end:
            end, prev = ts + dur, name
    span = end - kernels[0][0]
    gaps.sort(reverse=True)
    return {"wall_ms": round(wall_ms, 2), "kernels": len(kernels),
            "gpu_span_ms": round(span / 1000, 2), "busy_ms": round(busy / 1000, 2),
            "idle_small_gaps_ms": round(small / 1000, 2),
            "idle_long_gaps_ms": round(large / 1000, 2), "long_gaps": len(gaps),
            "longest_gaps": [{"us": round(g, 1), "after": a, "before": b}
                             for g, a, b in gaps[:8]]}


def _pipe_call(pipe: Any, a: argparse.Namespace, batch: int, *, output_type: str = "pil",
               embeds: tuple[Any, Any] | None = None) -> Any:
    """One pipeline call of `batch` images, one CPU generator each (as the raw loop): from the
    prompt, or from its (prompt, negative) embeddings as a cached prompt gives them."""
    import torch

    from bench.bench_multigpu import PROMPT

    given = ({"prompt": PROMPT} if embeds is None else
             {"prompt_embeds": embeds[0][:1], "negative_prompt_embeds": embeds[1][:1]})
    gens = [torch.Generator("cpu").manual_seed(s) for s in range(batch)]
    with torch.inference_mode():
        return pipe(**given, num_inference_steps=a.steps, guidance_scale=7.0,
                    num_images_per_prompt=batch, generator=gens, width=a.size, height=a.size,
                    output_type=output_type).images


def _replay(fn: Callable[..., Any], recorded: dict[str, Any]) -> Callable[[], Any]:
    """A call of fn with the arguments _record kept (a new CUDA graph step each time)."""
    import torch

    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)

    def call() -> Any:
        mark()
        with torch.inference_mode():
            return fn(*recorded["args"], **recorded["kw"])

    return call


def measure(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.bench_multigpu import PROMPT, raw_call, time_loop
    from bench.diag_layout import build

    cuda = not a.tiny
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    pipe = build("cl", a)
    run = SimpleNamespace(steps=a.steps, cfg=7.0, size=a.size)
    out: dict[str, Any] = {"variant": "cl", "steps": a.steps, "size": a.size}
    for batch in a.batch_list:
        row: dict[str, Any] = {}
        t0 = time.perf_counter()
        raw_call(pipe, list(range(batch)), run)  # compiles
        row["first_call_s"] = round(time.perf_counter() - t0, 1)
        calls = max(2, a.images // batch)
        timed = time_loop(pipe, batch, calls * batch, run, warm=1)
        row["img_s"] = round(timed["img_s"], 3)
        row["pipe_ms"] = round(timed["seconds"] * 1000 / calls, 2)

        row["latent_ms"] = round(_timed(
            lambda batch=batch: _pipe_call(pipe, a, batch, output_type="latent"), calls, 1,
            sync), 2)
        unet_in: dict[str, Any] = {}
        vae_in: dict[str, Any] = {}
        undo = [_record(pipe.unet, "forward", unet_in), _record(pipe.vae, "decode", vae_in)]
        raw_call(pipe, list(range(batch)), run)
        for u in undo:
            u()
        def text(batch: int = batch) -> Any:
            with torch.inference_mode():
                return pipe.encode_prompt(PROMPT, pipe.device, batch, True, None)

        row["unet_ms"] = round(_timed(_replay(pipe.unet, unet_in), 4 * a.steps, 3, sync), 3)
        row["decode_ms"] = round(_timed(_replay(pipe.vae.decode, vae_in), 6, 2, sync), 2)
        row["text_ms"] = round(_timed(text, 10, 2, sync), 2)
        floor = a.steps * row["unet_ms"] + row["decode_ms"] + row["text_ms"]
        row["floor_ms"] = round(floor, 2)
        row["waits_ms"] = round(row["pipe_ms"] - floor, 2)
        row["floor_img_s"] = round(batch * 1000 / floor, 3)
        if a.model == "sd15":  # the call with the prompt encoded beforehand (a cached prompt)
            embeds = text()
            row["pipe_embeds_ms"] = round(_timed(
                lambda batch=batch, e=embeds: _pipe_call(pipe, a, batch, embeds=e), calls, 1,
                sync), 2)
            row["embeds_img_s"] = round(batch * 1000 / row["pipe_embeds_ms"], 3)
        if cuda and a.profile:
            try:
                row["profile"] = _gpu_profile(
                    lambda batch=batch: raw_call(pipe, list(range(batch)), run),
                    Path(a.out) / f"trace-b{batch}.json")
            except Exception as exc:  # noqa: BLE001 - a diagnostic: report and go on
                row["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        out[f"b{batch}"] = row
        print(f"[floor] batch {batch}: {json.dumps(row)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "diag-floor-out"))
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--model-dir", default=None, help="default /tmp/<model>-random")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=None, help="default 512 (SDXL 1024)")
    ap.add_argument("--batches", default=None, help="default 1,8 (SDXL 1)")
    ap.add_argument("--images", type=int, default=12, help="images timed per batch size")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one call per batch size (its trace into --out; the "
                         "profiler's own cost distorts batch 1)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: numbers mean nothing")
    a = ap.parse_args(argv)
    a.size = a.size or (1024 if a.model == "sdxl" else 512)
    a.batch_list = [int(b) for b in (a.batches or ("1" if a.model == "sdxl" else "1,8")).split(",")]
    if a.tiny:
        a.steps, a.size, a.images = 2, 64, 2
        a.model_dir = a.model_dir or f"/tmp/cs-tiny-{a.model}"
    a.model_dir = a.model_dir or f"/tmp/{a.model}-random"
    a.work = tempfile.mkdtemp(prefix="diag-floor-")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(a.work) / "inductor"))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    import torch

    res = measure(a)
    res.update(command="python3 -m bench.diag_floor " + " ".join(
        argv if argv is not None else sys.argv[1:]), torch=torch.__version__)
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name(0)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "diag-floor.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
