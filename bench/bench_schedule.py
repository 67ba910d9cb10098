"""Scheduling benchmark: makespan of colabswarm vs the fluid bound and SwarmUI's plain rule.

Three workers with the bench-only simulated engine (``--simulate-speed``) at speeds 1x, 1x and
0.25x, each its own process on loopback. The simulated cost of a job of n images is
``steps * mpix * step_s * (1 + 0.35 (n - 1)) / speed``, so batching pays as on a real GPU.

    .venv/bin/python bench/bench_schedule.py --images 40

Reports, in one run:
- the fluid lower bound: all images at the best batch efficiency, spread over the total speed;
- colabswarm (batching, speed-sized batches, straggler guard, copies), cold (speeds unknown)
  and warm (speeds measured by the cold run);
- the plain ordered rule: 2 slots each, no batching, no copies, no guard (StableSwarmUI's);
- controller CPU time per image.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from colabswarm.swarm import Swarm  # noqa: E402
from colabswarm.swarm.local import LocalWorker  # noqa: E402

SPEEDS = (1.0, 1.0, 0.25)
BATCH_COST = 0.35


def _job_seconds(n: int, speed: float, steps: int, mpix: float, step_s: float) -> float:
    return steps * mpix * step_s * (1 + BATCH_COST * (n - 1)) / speed


def _start_workers(step_s: float) -> list[LocalWorker]:
    workers = [
        LocalWorker(None, ["tiny"], f"sim{i}-x{s:g}",
                    extra_args=("--simulate-speed", str(s), "--simulate-step-seconds",
                                str(step_s)),
                    env={"OMP_NUM_THREADS": "1"})
        for i, s in enumerate(SPEEDS)
    ]
    for w in workers:
        w.start()
    return workers


def _run(workers: list[LocalWorker], images: int, steps: int, size: int, **swarm_kw) -> dict:
    swarm = Swarm(output_dir=None, trace=True, **swarm_kw)
    try:
        for w in workers:
            swarm.add(w.share, name=w.name, slots=2)
        results = []
        for _ in range(2):  # cold: speeds unknown; warm: measured by the first run
            cpu0, t0 = time.process_time(), time.perf_counter()
            r = swarm.generate("bench", images=images, seed=0, width=size, height=size,
                               steps=steps, save=False)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            assert [g.seed for g in r.images] == list(range(images))
            by: dict[str, int] = {}
            for g in r.images:
                by[g.backend] = by.get(g.backend, 0) + 1
            results.append({"wall": wall, "cpu_ms_per_image": 1000 * cpu / images, "by": by})
            if os.environ.get("BENCH_TRACE"):  # one line per job: who, how many, when
                base = min(s for _, _, s, *_ in swarm.trace)
                for name, k, s, e, outcome, copy in swarm.trace:
                    print(f"    {name:12} n={k} {s - base:6.2f} -> {e - base:6.2f} {outcome}"
                          f"{' copy' if copy else ''}")
                swarm.trace.clear()
        return {"cold": results[0], "warm": results[1]}
    finally:
        swarm.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--step-seconds", type=float, default=0.1,
                    help="simulated seconds per step per megapixel at speed 1, batch 1")
    ap.add_argument("--max-batch", type=int, default=4)
    args = ap.parse_args()
    mpix = args.size * args.size / 1e6
    one = _job_seconds(1, 1.0, args.steps, mpix, args.step_seconds)
    best = _job_seconds(args.max_batch, 1.0, args.steps, mpix, args.step_seconds) / args.max_batch
    bound = args.images * best / sum(SPEEDS)
    print(f"{args.images} images, {args.size}px, {args.steps} steps; speeds {SPEEDS}; "
          f"one image at 1x: {one:.3f}s alone, {best:.3f}s in a batch of {args.max_batch}")
    print(f"fluid lower bound (best batch efficiency): {bound:.2f}s")
    workers = _start_workers(args.step_seconds)
    try:
        ours = _run(workers, args.images, args.steps, args.size, max_batch=args.max_batch)
        plain = _run(workers, args.images, args.steps, args.size, batching=False,
                     copies=False, straggler_guard=False)
    finally:
        for w in workers:
            w.stop()
    rows = [("colabswarm, cold", ours["cold"]), ("colabswarm, warm", ours["warm"]),
            ("plain ordered rule, cold", plain["cold"]),
            ("plain ordered rule, warm", plain["warm"])]
    print(f"{'policy':28} {'makespan':>9} {'x bound':>8} {'ctl CPU/img':>12}  images per backend")
    for name, r in rows:
        print(f"{name:28} {r['wall']:8.2f}s {r['wall'] / bound:7.2f}x "
              f"{r['cpu_ms_per_image']:10.2f}ms  {r['by']}")
    gain = plain["warm"]["wall"] / ours["warm"]["wall"]
    print(f"speed-up over the plain rule (warm): {gain:.2f}x")
    print(f"cpu count {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
