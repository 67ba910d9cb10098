"""Which compiled UNet runs fastest, and does a dynamic batch cost speed? (issue 14, device)

When this was written the worker compiled the UNet and the VAE decoder as diffusers builds them
(``dynamic=False``, one graph per batch size, default memory format); from its results the
worker now uses channels_last on a GPU. This compares, with plain ``torch.compile`` of the UNet
and ``vae.decode`` (the worker compiles ``vae.decoder`` only) in CUDA graphs mode
(``reduce-overhead``), SD 1.5 at 512 px, 20 steps, CFG 7, fp16, random weights from its config
(bench/fullsize.py):

- ``plain``: as the worker compiled before;
- ``cl``: the UNet and the whole VAE in ``channels_last`` memory format (the worker: the UNet and
  the decoder);
- ``clfused``: ``channels_last`` and fused QKV projections (``pipe.fuse_qkv_projections()``);
- ``dynamic``: the UNet's batch dimension marked dynamic (one trace for every batch size);
- ``clbench``: ``cl`` with ``torch.backends.cudnn.benchmark`` on (cuDNN times its convolution
  algorithms on a shape's first call; inductor leaves convolutions to cuDNN). It shares ``cl``'s
  inductor cache when both run on one GPU (the flag is read at run time, not traced);
- ``clcudnn``: ``cl`` with cuDNN's fused attention first in SDPA's order (flash attention
  after it, for shapes cuDNN does not take);
- ``cl1x1``: ``cl`` with inductor's ``conv_1x1_as_mm`` (1x1 convolutions as matrix multiplies).

``--model sdxl`` runs SDXL at 1024 px instead (batch 1 only, unless ``--batches`` says more).

Each variant runs in a process of its own with an empty inductor cache: batch 1 first (the
first call's seconds are its compile, then one untimed call, then ``--images-b1`` images),
then batch 8 likewise (``--calls-b8`` calls). Variants are split across the GPUs named in
``--gpus`` (one list per GPU, run in order), each GPU's list within ``--budget-s``.

    python3 -m bench.diag_layout --gpus "plain,cl;clfused,dynamic" --out $OUT
    python3 -m bench.diag_layout --gpus "cl,clbench,clcudnn,cl1x1" --out $OUT   # one GPU
    python3 -m bench.diag_layout --model sdxl --gpus "cl,clcudnn" --out $OUT
    python3 -m bench.diag_layout --tiny --gpus "plain,dynamic" --out /tmp/dl   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

VARIANTS = ("plain", "cl", "clfused", "dynamic", "clbench", "clcudnn", "cl1x1")
SHARES_CACHE = {"clbench": "cl"}  # a variant whose traced graphs are another's


def build(name: str, a: argparse.Namespace) -> Any:
    """The pipeline of variant `name`, its UNet and VAE decode compiled (not yet traced: the
    first call compiles). `a` needs model_dir, model and tiny. bench/diag_floor.py uses it too."""
    import torch

    from bench.bench_multigpu import load_pipe, prepare_folder

    folder = prepare_folder(a.model_dir, a.model, tiny=a.tiny)
    device = "cpu" if a.tiny else "cuda"
    pipe = load_pipe(folder, device)
    if name == "clbench":
        torch.backends.cudnn.benchmark = True
    if name == "clcudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        sdpa_kernel(order, set_priority=True).__enter__()  # for the whole process
    if name == "cl1x1":
        import torch._inductor.config as icfg

        icfg.conv_1x1_as_mm = True
    if name.startswith("cl"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if name == "clfused":
        pipe.fuse_qkv_projections()
    mode = None if a.tiny else "reduce-overhead"
    backend = "eager" if a.tiny else "inductor"
    unet = pipe.unet
    cu = torch.compile(type(unet).forward, mode=mode, backend=backend,
                       dynamic=None if name == "dynamic" else False, fullgraph=True)

    def forward(sample: Any, timestep: Any, encoder_hidden_states: Any, *args: Any,
                **kw: Any) -> Any:
        if name == "dynamic":
            torch._dynamo.mark_dynamic(sample, 0)
            torch._dynamo.mark_dynamic(encoder_hidden_states, 0)
        return cu(unet, sample, timestep, encoder_hidden_states, *args, **kw)

    unet.forward = forward
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, backend=backend, dynamic=False)
    return pipe


def _variant(name: str, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.bench_multigpu import raw_call, time_loop

    device = "cpu" if a.tiny else "cuda"
    pipe = build(name, a)
    run = SimpleNamespace(steps=a.steps, cfg=7.0, size=a.size)
    out: dict[str, Any] = {"variant": name}
    for batch in a.batch_list:
        n = a.images_b1 if batch == 1 else a.calls_b8 * batch
        t0 = time.perf_counter()
        first = raw_call(pipe, list(range(batch)), run)  # PIL images: the GPU is done
        compile_s = time.perf_counter() - t0
        # one untimed call (CUDA graphs are recorded on the second), then n images
        timed = time_loop(pipe, batch, n, run, warm=1)
        if a.png_prefix:
            first[0].save(f"{a.png_prefix}-b{batch}.png")
        out[f"b{batch}"] = {"first_call_s": round(compile_s, 1),
                            "img_s": round(timed["img_s"], 3), "first_image": _digest(first[0])}
        print(f"[{name}] batch {batch}: first call {compile_s:.1f} s, "
              f"{out[f'b{batch}']['img_s']} img/s", flush=True)
    if device == "cuda":
        out["sdpa"] = _sdpa_choices(a.model, a.size)
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _sdpa_choices(model: str, size: int) -> dict[str, str]:
    """The SDPA backend torch picks for the model's self-attention shapes at this image size
    (batch 2: one image with CFG)."""
    import torch

    side = size // 8  # the latent's side
    shapes = ([(8, side ** 2, 40), (8, (side // 2) ** 2, 80), (8, (side // 4) ** 2, 160)]
              if model == "sd15" else [(10, (side // 2) ** 2, 64), (20, (side // 4) ** 2, 64)])
    names = {int(v): k for k, v in torch.nn.attention.SDPBackend.__members__.items()}
    out = {}
    for heads, seq, dim in shapes:
        q = torch.zeros(2, heads, seq, dim, dtype=torch.float16, device="cuda")
        try:
            out[f"{heads}x{seq}x{dim}"] = names.get(int(torch._fused_sdp_choice(q, q, q)), "?")
        except Exception as exc:  # noqa: BLE001 - a diagnostic
            out[f"{heads}x{seq}x{dim}"] = type(exc).__name__
    return out


def _digest(image: Any) -> list[int]:
    """A few pixel values of an image, to see that variants agree (not a test)."""
    import numpy as np

    return np.asarray(image.convert("RGB").resize((4, 4))).reshape(-1)[:12].tolist()



def _compare(base: Path, other: Path) -> dict[str, Any] | None:
    """``bench_compile.compare`` of one saved image against another (largest difference, PSNR,
    ...); None if either is missing."""
    if not (base.exists() and other.exists()):
        return None
    import numpy as np
    from PIL import Image

    from bench.bench_compile import compare

    def load(path: Path) -> dict[str, dict[int, Any]]:
        return {"image": {0: np.asarray(Image.open(path).convert("RGB"))}}

    return compare(load(other), load(base))["image"]


def _child(a: argparse.Namespace) -> int:
    try:
        res = _variant(a.child, a)
    except Exception as exc:  # noqa: BLE001 - a diagnostic: report and go on
        res = {"variant": a.child, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


def _gpu_list(a: argparse.Namespace, gpu: int, names: list[str], deadline: float,
              work: Path) -> list[dict[str, Any]]:
    """The variants of one GPU, one process each, in order: their results."""
    results = []
    for name in names:
        left = deadline - time.time()
        if left < 60:
            results.append({"variant": name, "skipped": f"{left:.0f} s left"})
            continue
        path = work / f"{gpu}-{name}.json"
        cache = SHARES_CACHE.get(name) if SHARES_CACHE.get(name) in names else name
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / f"inductor-{gpu}-{cache}"))
        if not a.tiny:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        cmd = [sys.executable, "-m", "bench.diag_layout", "--child", name, "--json", str(path),
               "--model-dir", a.model_dir, "--steps", str(a.steps), "--size", str(a.size),
               "--images-b1", str(a.images_b1), "--calls-b8", str(a.calls_b8),
               "--model", a.model, "--batches", a.batches,
               "--png-prefix", str(work / f"{gpu}-{name}")]
        if a.tiny:
            cmd.append("--tiny")
        proc = subprocess.Popen(cmd, env=env)
        try:
            proc.wait(left)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stopped = {"variant": name, "error": f"stopped at the budget (rc {proc.returncode})"}
        results.append(json.loads(path.read_text()) if path.exists() else stopped)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="plain,cl;clfused,dynamic",
                    help="variants per GPU: lists separated by ';', GPU 0 first")
    ap.add_argument("--out", default=os.environ.get("OUT", "diag-layout-out"))
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--model-dir", default=None, help="default /tmp/<model>-random")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=None, help="default 512 (SDXL 1024)")
    ap.add_argument("--batches", default=None, help="default 1,8 (SDXL 1)")
    ap.add_argument("--images-b1", type=int, default=12)
    ap.add_argument("--calls-b8", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: numbers mean nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--png-prefix", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.size = a.size or (1024 if a.model == "sdxl" else 512)
    a.batches = a.batches or ("1" if a.model == "sdxl" else "1,8")
    a.batch_list = [int(b) for b in a.batches.split(",") if b]
    if a.tiny:
        a.steps, a.size, a.images_b1, a.calls_b8 = 2, 64, 2, 1
        a.model_dir = a.model_dir or f"/tmp/cs-tiny-{a.model}"
    a.model_dir = a.model_dir or f"/tmp/{a.model}-random"
    if a.child:
        return _child(a)
    lists = [[v for v in part.split(",") if v] for part in a.gpus.split(";")]
    for names in lists:
        for v in names:
            if v not in VARIANTS:
                ap.error(f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}")
            owner = SHARES_CACHE.get(v)
            if owner in names and names.index(owner) > names.index(v):
                ap.error(f"{v!r} uses {owner!r}'s compiled graphs: list {owner!r} first")
    from bench.bench_multigpu import prepare_folder

    prepare_folder(a.model_dir, a.model, tiny=a.tiny)  # once, before the GPUs start
    deadline = time.time() + a.budget_s
    work = Path(tempfile.mkdtemp(prefix="diag-layout-"))
    with ThreadPoolExecutor(len(lists)) as pool:  # the GPUs at once, each its list in order
        rows = pool.map(lambda g: _gpu_list(a, g, lists[g], deadline, work), range(len(lists)))
        results = {f"gpu{g}": r for g, r in enumerate(rows)}
    for g, names in enumerate(lists):  # each variant's first image against the first variant's
        for r in results[f"gpu{g}"][1:]:
            for b in a.batch_list:
                if f"b{b}" in r:
                    r[f"b{b}"]["vs_" + names[0]] = _compare(work / f"{g}-{names[0]}-b{b}.png",
                                                            work / f"{g}-{r['variant']}-b{b}.png")
    import torch

    merged = {"command": "python3 -m bench.diag_layout " + " ".join(
        argv if argv is not None else sys.argv[1:]), "torch": torch.__version__,
        "budget_s": a.budget_s, "results": results}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "diag-layout.json").write_text(json.dumps(merged, indent=1))
    for gpu, done in results.items():
        for r in done:
            print(gpu, json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
