"""How much of a cached restart is dynamo tracing, and would one trace cover every batch size?

A compiled worker's restart from the compile cache skips AOTAutograd and inductor, but dynamo
still traces the UNet once per compiled shape (6.3 s of each SD 1.5 shape on the device hosts,
12.2 s for SDXL: docs/BENCHMARKS.md). The worker compiles with ``dynamic=False``, one trace per
batch size. This measures, on any machine (the CPU is enough: tracing runs on fake tensors and
costs the same Python work), the full-size SD 1.5 UNet (random weights from its config,
bench/fullsize.py) traced for UNet batch sizes 2, 4, 8 and 16 (1, 2, 4 and 8 images with
CFG):

- ``static``: ``dynamic=False``, as the worker compiles: one trace per batch size;
- ``dynamic``: the batch dimension marked dynamic, so a trace may serve several sizes.

The backend is a stand-in that records each graph and returns zeros of the UNet's output
shape, so nothing is compiled or computed: each call's time is dynamo's (tracing, guards).
Small latents (``--latent``, 16 = 128 px) keep it quick; the graph does not depend on them.
Prints one line per call and the recompile reasons dynamo logs; ``--json`` writes them.
``--device cuda`` traces the fp16 UNet on the GPU, as a worker does (a guard may come from a
device's own attention path).

    python -m bench.diag_trace [--latent 16] [--device cpu|cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from typing import Any

BATCHES = (2, 4, 8, 16)


class _Reasons(logging.Handler):
    """Dynamo's recompile reasons, as logged (``torch._logging`` "recompiles")."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("- "):
                self.lines.append(line[:300])


def measure(mode: str, latent: int, device: str = "cpu") -> dict[str, Any]:
    import torch
    import torch._logging
    from diffusers import UNet2DConditionModel

    from bench.fullsize import sd15_configs

    torch._dynamo.reset()
    torch._logging.set_logs(recompiles=True)
    reasons = _Reasons()
    logging.getLogger("torch._dynamo").addHandler(reasons)
    torch.manual_seed(0)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    unet = UNet2DConditionModel(**sd15_configs(518)["unet"]).eval().to(device, dtype)
    graphs: list[int] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        graphs.append(len(gm.graph.nodes))

        def run(*args: Any) -> Any:
            sample = next(a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4
                          and a.shape[1] == 4)
            return (torch.zeros_like(sample),)
        return run

    fn = torch.compile(unet, backend=backend, dynamic=False if mode == "static" else None)
    calls = []
    try:
        for b in BATCHES:
            x = torch.randn(b, 4, latent, latent, device=device, dtype=dtype)
            enc = torch.randn(b, 77, 768, device=device, dtype=dtype)
            if mode == "dynamic":
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(enc, 0)
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(x, torch.tensor(999, device=device), enc, return_dict=False)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(x, torch.tensor(999, device=device), enc, return_dict=False)
            again = time.perf_counter() - t0
            row = {"unet_batch": b, "first_s": round(first, 2), "again_s": round(again, 3),
                   "graphs_so_far": len(graphs)}
            calls.append(row)
            print(f"{mode:8s} UNet batch {b:2d}: first call {first:6.2f} s, again {again:.3f} s,"
                  f" graphs traced so far {len(graphs)}", flush=True)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(reasons)
        torch._logging.set_logs()
    return {"calls": calls, "graphs": len(graphs), "graph_nodes": graphs,
            "recompile_reasons": reasons.lines}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latent", type=int, default=16, help="latent side (16 = 128 px)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (fp16) as a worker traces")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    import torch

    out: dict[str, Any] = {
        "command": "python -m bench.diag_trace " + " ".join(argv if argv is not None
                                                            else sys.argv[1:]),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "latent": args.latent, "device": args.device,
    }
    for mode in ("static", "dynamic"):
        out[mode] = measure(mode, args.latent, args.device)
        for line in out[mode]["recompile_reasons"]:
            print(f"  recompiled because: {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
