"""Two raw diffusers loops at once, one process per GPU, no colabswarm: the host's own ceiling.

Two colabswarm workers reached 0.82-0.84x the sum of two GPUs' raw throughput measured one at a
time (docs/BENCHMARKS.md, "Multi-GPU"). This measures what two plain pipelines reach when they
run simultaneously in two processes on the same host, so the loss can be split between host
contention and colabswarm. Run on the device, after bench_multigpu built /tmp/sd15-random:

    python3 -m bench.raw_pair --model-dir /tmp/sd15-random --batch 8 --images 48
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _child(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.bench_multigpu import load_pipe, time_loop

    pipe = load_pipe(a.model_dir, "cuda:0")  # CUDA_VISIBLE_DEVICES picks the GPU
    time_loop(pipe, a.batch, a.batch * 2, a, warm=1)
    while time.time() < a.start_at:  # both loops start together
        time.sleep(0.005)
    r = time_loop(pipe, a.batch, a.images, a, warm=0)
    print(json.dumps({"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), **r}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", default="/tmp/sd15-random")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--gpus", default="0,1")
    p.add_argument("--start-at", type=float, default=0.0)
    p.add_argument("--child", action="store_true")
    a = p.parse_args()
    if a.child:
        _child(a)
        return 0
    start = time.time() + 45  # load and warm up first
    procs = []
    for g in a.gpus.split(","):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": g}
        cmd = [sys.executable, "-m", "bench.raw_pair", "--child", "--start-at", str(start),
               "--model-dir", a.model_dir, "--batch", str(a.batch), "--images", str(a.images),
               "--size", str(a.size), "--steps", str(a.steps), "--cfg", str(a.cfg)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    rows = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]
    total = sum(r["img_s"] for r in rows)
    print(json.dumps({"together": rows, "sum_img_s": round(total, 3)}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
