"""Scaling: 2, 4 and 8 simulated workers, up to 1,000 images: makespan against the fluid bound,
the controller's CPU time per image and its memory as the work grows.

Worker processes on loopback run the bench-only simulated engine (``--simulate-speed``), half
at 1x and half at 0.5x, so the controller really speaks HTTP, long-polls, downloads and checks
PNGs, and only the GPU is simulated. For each worker count, one warm-up run (speeds learned),
then runs of growing size on the same Swarm. CPU is the controller process's own CPU time
(time.process_time: all its threads), memory its RSS.

    .venv/bin/python -m bench.bench_scaling [--workers 2,4,8] [--images 100,300,1000]
"""

from __future__ import annotations

import argparse
import gc
import time

import psutil

from bench.bench_schedule import BATCH_COST
from colabswarm.swarm import Swarm
from colabswarm.swarm.local import LocalWorker


def _start(count: int, step_s: float) -> list[LocalWorker]:
    speeds = [1.0 if i % 2 == 0 else 0.5 for i in range(count)]
    workers = [LocalWorker(None, ["tiny"], f"sim{i}-x{s:g}",
                           extra_args=("--simulate-speed", str(s), "--simulate-step-seconds",
                                       str(step_s)),
                           env={"OMP_NUM_THREADS": "1"})
               for i, s in enumerate(speeds)]
    for w in workers:
        w.start()
    return workers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="2,4,8")
    ap.add_argument("--images", default="100,300,1000")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--step-seconds", type=float, default=0.05,
                    help="simulated seconds per step per megapixel at speed 1, batch 1")
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()
    mpix = args.size * args.size / 1e6
    per_image_best = (args.steps * mpix * args.step_seconds
                      * (1 + BATCH_COST * (args.max_batch - 1)) / args.max_batch)
    me = psutil.Process()
    print(f"{args.size}px, {args.steps} steps, batches up to {args.max_batch}; one image at 1x "
          f"in a full batch: {per_image_best * 1000:.0f} ms; {psutil.cpu_count()} CPUs")
    print(f"{'workers':>7} {'images':>7} {'makespan':>9} {'bound':>7} {'x bound':>8} "
          f"{'CPU/img':>8} {'RSS':>8} {'RSS +':>7}")
    for count in (int(x) for x in args.workers.split(",")):
        workers = _start(count, args.step_seconds)
        total_speed = sum(1.0 if i % 2 == 0 else 0.5 for i in range(count))
        try:
            swarm = Swarm(output_dir=None, max_batch=args.max_batch)
            for w in workers:
                swarm.add(w.share, name=w.name, slots=2)
            swarm.generate("warm-up", images=4 * count, seed=0, width=args.size,
                           height=args.size, steps=args.steps, save=False)
            gc.collect()
            rss0 = me.memory_info().rss
            for images in (int(x) for x in args.images.split(",")):
                cpu0, t0 = time.process_time(), time.perf_counter()
                r = swarm.generate("bench", images=images, seed=0, width=args.size,
                                   height=args.size, steps=args.steps, save=False)
                wall = time.perf_counter() - t0
                cpu = time.process_time() - cpu0
                assert [g.seed for g in r.images] == list(range(images))
                del r
                gc.collect()
                rss = me.memory_info().rss
                bound = images * per_image_best / total_speed
                print(f"{count:7d} {images:7d} {wall:8.2f}s {bound:6.2f}s {wall / bound:7.2f}x "
                      f"{1000 * cpu / images:6.2f}ms {rss / 2**20:6.0f}MB "
                      f"{(rss - rss0) / 2**20:+6.1f}MB", flush=True)
            swarm.close()
        finally:
            for w in workers:
                w.stop()


if __name__ == "__main__":
    main()
