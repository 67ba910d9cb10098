"""Would loading each shape ahead-of-time compiled make a restart fast enough?

A restarted compiled worker loads inductor's artifacts from its cache, but dynamo still traces
the UNet (and the VAE decoder) once per shape: 6-7 s per SD 1.5 shape and 15 s for SDXL on
the device hosts, so two SD 1.5 shapes took 25.8-33.4 s against the 20 s target
(docs/BENCHMARKS.md). torch's AOT precompile (``torch.compile(fn, fullgraph=True)
.aot_compile(...)``, experimental) saves one shape's traced and compiled function, guards and
kernels as one file that a new process loads without tracing.

This measures it through the worker's own ``colabswarm/backend/precompiled.py``
(``compile_call``, ``dumps``, ``loads``: the loaded UNet asks for CUDA graphs, as a restarted
worker's does) with the worker's own modules and calls (full-size random weights from the
configs, fp16, channels_last on a GPU; the UNet with CUDA graphs as ``reduce-overhead``, the
decoder as ``default``; timesteps as float32, as the worker passes them): in one process each
shape is AOT-compiled and saved; a second, fresh process with an empty inductor cache loads the
files, runs each shape (its first call records the CUDA graphs) and compares it with eager.

    python -m bench.diag_aot --model sd15 --batches 1,8 --out DIR     # on a GPU
    python -m bench.diag_aot --scale tiny --device cpu --batches 1 --out DIR   # CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from colabswarm.backend import precompiled
from colabswarm.backend.compiled import cache_settings


def _build(model: str, scale: str, device: str) -> tuple[Any, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from bench.fullsize import sd15_configs, sdxl_configs

    cfg = (sd15_configs if model == "sd15" else sdxl_configs)(518, scale)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg["unet"]).eval()
        vae = AutoencoderKL(**cfg["vae"]).eval()
    unet.to(dtype).requires_grad_(False)
    vae.to(dtype).requires_grad_(False)
    if device.startswith("cuda"):
        unet.to(memory_format=torch.channels_last)
        vae.decoder.to(memory_format=torch.channels_last)
    return unet, vae.decoder


def _inputs(model: str, unet: Any, batch: int, side: int) -> tuple[tuple, dict]:
    import torch

    dev, dtype = unet.device, unet.dtype
    g = torch.Generator("cpu").manual_seed(batch)
    lat = side // 8
    x = torch.randn(2 * batch, 4, lat, lat, generator=g).to(dev, dtype)
    dim = int(unet.config.cross_attention_dim)
    enc = torch.randn(2 * batch, 77, dim, generator=g).to(dev, dtype)
    t = torch.tensor(500.0, dtype=torch.float32, device=dev)
    kw: dict[str, Any] = dict(encoder_hidden_states=enc, timestep_cond=None,
                              cross_attention_kwargs=None, return_dict=False)
    if model == "sdxl":
        proj = int(unet.config.projection_class_embeddings_input_dim) - 6 * int(
            unet.config.addition_time_embed_dim)
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2 * batch, proj, generator=g).to(dev, dtype),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * (2 * batch),
                                     dtype=dtype, device=dev)}
    return (x, t), kw


def _call_inputs(model: str, name: str, unet: Any, batch: int, side: int) -> tuple[tuple, dict]:
    """A UNet call's inputs (CFG: twice the batch), or the decoder's latents."""
    import torch

    if name == "unet":
        return _inputs(model, unet, batch, side)
    lat = side // 8
    z = torch.randn(batch, 4, lat, lat, generator=torch.Generator("cpu").manual_seed(batch))
    return (z.to(unet.device, unet.dtype),), {}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _calls(fn: Any, args: tuple, kw: dict, n: int, device: str) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(*args, **kw)
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _mode(name: str, device: str) -> str:
    """The worker's mode per module: the UNet with CUDA graphs on a GPU, the decoder without."""
    return "reduce-overhead" if name == "unet" and device.startswith("cuda") else "default"


def _run_loaded(fn: Any, module: Any, *args: Any, **kwargs: Any) -> Any:
    return precompiled.call(fn, module, args, kwargs)


def save_stage(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    cache_settings()
    unet, decoder = _build(a.model, a.scale, a.device)
    side = a.side or (512 if a.model == "sd15" else 1024)
    rows = []
    folder = Path(a.files)
    folder.mkdir(parents=True, exist_ok=True)
    for b in a.batches:
        for name, module in (("unet", unet), ("decoder", decoder)):
            fwd = type(module).forward
            args, kw = _call_inputs(a.model, name, unet, b, side)
            row: dict[str, Any] = {"module": name, "batch": b}
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    aot = precompiled.compile_call(fwd, _mode(name, a.device),
                                                   a.backend or None, module, args, kw)
                row["aot_compile_s"] = round(time.perf_counter() - t0, 2)
                t0 = time.perf_counter()
                path = folder / f"{name}-b{b}.aot"
                path.write_bytes(precompiled.dumps([(name, "call", aot)], {name: fwd}))
                row["save_s"] = round(time.perf_counter() - t0, 2)
                row["file_mib"] = round(path.stat().st_size / 2**20, 1)
            except Exception as exc:  # noqa: BLE001 - the diagnosis is what failed
                row["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"rows": rows}


def load_stage(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    cache_settings()
    t_build = time.perf_counter()
    unet, decoder = _build(a.model, a.scale, a.device)
    side = a.side or (512 if a.model == "sd15" else 1024)
    rows = []
    build_s = round(time.perf_counter() - t_build, 2)
    # one eager call first, as a worker has made before it compiles (CUDA libraries set up)
    t0 = time.perf_counter()
    with torch.inference_mode():
        args, kw = _inputs(a.model, unet, a.batches[0], side)
        unet(*args, **kw)
        _sync(a.device)
    eager_first_s = round(time.perf_counter() - t0, 2)
    t_all = time.perf_counter()
    for b in a.batches:
        for name, module in (("unet", unet), ("decoder", decoder)):
            fwd = type(module).forward
            path = Path(a.files) / f"{name}-b{b}.aot"
            row: dict[str, Any] = {"module": name, "batch": b}
            if not path.exists():
                row["error"] = "no file"
                rows.append(row)
                continue
            args, kw = _call_inputs(a.model, name, unet, b, side)
            try:
                t0 = time.perf_counter()
                ((_, _, aot),) = precompiled.loads(path.read_bytes(), {name: fwd},
                                                    {name: _mode(name, a.device)})
                row["load_s"] = round(time.perf_counter() - t0, 2)
                with torch.inference_mode():
                    row["guard_ok"] = bool(aot.guard_check(module, *args, **kw))
                    run = functools.partial(_run_loaded, aot, module)
                    t0 = time.perf_counter()
                    first = run(*args, **kw)
                    _sync(a.device)
                    row["first_call_s"] = round(time.perf_counter() - t0, 2)
                    first = (first[0] if isinstance(first, tuple) else first).clone()
                    steady = _calls(run, args, kw, a.calls, a.device)
                    ref = fwd(module, *args, **kw)
                    ref = ref[0] if isinstance(ref, tuple) else ref
                    eager = _calls(functools.partial(fwd, module), args, kw, a.calls, a.device)
                row["call_ms"] = round(1000 * statistics.median(steady), 2)
                row["eager_call_ms"] = round(1000 * statistics.median(eager), 2)
                row["max_abs_diff"] = float((first.float() - ref.float()).abs().max())
            except Exception as exc:  # noqa: BLE001 - the diagnosis is what failed
                row["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"rows": rows, "build_s": build_s, "eager_first_s": eager_first_s,
            "load_and_first_calls_s": round(time.perf_counter() - t_all, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--scale", choices=("full", "tiny"), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--side", type=int, default=0, help="image side (default: the model's)")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--backend", default="", help="a dynamo backend instead of inductor")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", choices=("both", "save", "load"), default="both")
    ap.add_argument("--files", default="")
    a = ap.parse_args(argv)
    a.batches = [int(x) for x in a.batches.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.stage != "both":
        result = save_stage(a) if a.stage == "save" else load_stage(a)
        (out / f"{a.stage}.json").write_text(json.dumps(result, indent=1))
        return 0
    import torch

    from bench.bench_multigpu import source_digest

    files = tempfile.mkdtemp(prefix="aot-files-")
    base = [sys.executable, "-m", "bench.diag_aot", "--model", a.model, "--scale", a.scale,
            "--device", a.device, "--batches", ",".join(map(str, a.batches)),
            "--side", str(a.side), "--calls", str(a.calls), "--out", str(out),
            "--files", files] + (["--backend", a.backend] if a.backend else [])
    result: dict[str, Any] = {"command": "python -m bench.diag_aot " + " ".join(
        argv if argv is not None else sys.argv[1:]), "torch": torch.__version__,
        "source_sha256": source_digest(), "has_aot_compile": precompiled.supported()}
    for stage in ("save", "load"):
        env = dict(os.environ)
        # each process its own, empty inductor cache: the load uses the files alone
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"aot-inductor-{stage}-")
        t0 = time.perf_counter()
        proc = subprocess.run(base + ["--stage", stage], env=env, capture_output=True,
                              text=True)
        result[f"{stage}_process_s"] = round(time.perf_counter() - t0, 1)
        result[f"{stage}_rc"] = proc.returncode
        if proc.returncode:
            result[f"{stage}_tail"] = (proc.stdout + proc.stderr)[-3000:]
        path = out / f"{stage}.json"
        if path.exists():
            result[stage] = json.loads(path.read_text())
        print(f"{stage}: rc {proc.returncode}, {result[f'{stage}_process_s']} s", flush=True)
        print(proc.stdout[-4000:], flush=True)
        if proc.returncode:
            print(proc.stderr[-3000:], flush=True)
    (out / "diag_aot.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
