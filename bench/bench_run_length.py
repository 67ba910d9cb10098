"""How much of one GPU a colabswarm worker keeps, by run length (issue 7's batching row, on the
one GPU a single-GPU machine has).

The two-worker row of bench_multigpu.py measured 0.84x the sum of both GPUs' best raw rates
with 64 images a run. A run has fixed costs that no GPU can share (the first job's start, the
last job's PNGs, the tail of unequal batches), so a short run understates what the workers
keep. This measures, in one process on one GPU: the raw diffusers loop at its best batch, then
one worker through the whole controller at max_batch 8 for short and long runs, and fits
``seconds = fixed + images / steady_rate``.

    python3 -m bench.bench_run_length --json $OUT/run_length.json      # a GPU
    python3 -m bench.bench_run_length --tiny                           # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/sd15-random")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--batch", type=int, default=8, help="raw batch and the Swarm's max_batch")
    p.add_argument("--runs", default="64,64,256", help="images of each timed generate")
    p.add_argument("--json", default=None)
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.bench_multigpu import (
        PROMPT,
        free_memory,
        load_pipe,
        prepare_folder,
        time_loop,
    )
    from colabswarm.swarm import Swarm
    from colabswarm.swarm.local import start_local_workers

    if a.tiny:
        a.size, a.steps, a.batch, a.runs = 64, 2, 2, "8,8,16"
        if a.model_dir == "/tmp/sd15-random":
            a.model_dir = "/tmp/cs-tiny-sd15"
    runs = [int(x) for x in a.runs.split(",")]
    out: dict[str, Any] = {"config": vars(a).copy()}
    folder = prepare_folder(a.model_dir, "sd15", tiny=a.tiny)
    pipe = load_pipe(folder, "cpu" if a.tiny else "cuda:0")
    out["raw"] = time_loop(pipe, a.batch, max(runs[0], 4 * a.batch), a)
    print(f"raw b{a.batch}: {out['raw']['img_s']:.3f} img/s", flush=True)
    del pipe
    free_memory()
    group = start_local_workers([0] if not a.tiny else 1, model=folder,
                                extra_args=["--compile", "off"])  # eager: issue 2's question
    sw = Swarm(output_dir=None, trace=True, max_batch=a.batch)
    try:
        sw.add(group[0].share or "", name="gpu0", slots=2)
        kw = dict(width=a.size, height=a.size, steps=a.steps, cfg=a.cfg, save=False)
        sw.generate(PROMPT, images=2 * a.batch, seed=1, **kw)  # warm-up; speeds learnt
        rows = []
        for i, n in enumerate(runs):
            mark = len(sw.trace or [])
            t0 = time.perf_counter()
            res = sw.generate(PROMPT, images=n, seed=1000 * (i + 1), **kw)
            s = time.perf_counter() - t0
            assert len(res.images) == n
            jobs = [k for _b, k, *_ in (sw.trace or [])[mark:]]
            rows.append({"images": n, "seconds": round(s, 3), "img_s": n / s,
                         "of_raw": n / s / out["raw"]["img_s"], "jobs": jobs})
            print(f"1 worker, {n} images: {n / s:.3f} img/s = "
                  f"{rows[-1]['of_raw']:.3f} of raw b{a.batch}; jobs {jobs}", flush=True)
        out["worker"] = rows
        short = [r for r in rows if r["images"] == min(runs)]
        long = [r for r in rows if r["images"] == max(runs)]
        if short and long and max(runs) > min(runs):
            ts = sum(r["seconds"] for r in short) / len(short)
            tl = sum(r["seconds"] for r in long) / len(long)
            rate = (max(runs) - min(runs)) / (tl - ts)
            out["fit"] = {"steady_img_s": rate, "steady_of_raw": rate / out["raw"]["img_s"],
                          "fixed_s_per_run": ts - min(runs) / rate}
            print(f"fit: steady {rate:.3f} img/s = {out['fit']['steady_of_raw']:.3f} of raw; "
                  f"fixed {out['fit']['fixed_s_per_run']:.3f} s a run", flush=True)
    finally:
        sw.close()
        group.stop()
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
