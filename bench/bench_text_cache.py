"""What the text cache is worth in the engine itself, on one machine (issue 14, device)

Two engines on one GPU load the same model (random SD 1.5 weights from its config,
bench/fullsize.py), one with the text cache (``text_cache_bytes`` default) and one without (0),
compile off (a compiled engine needs minutes to compile; the cache saves the same encoder time
either way, a larger share of a compiled image). Batch-1 jobs of 512 px, 20 Euler steps, CFG 7
run alternately on the two, after two untimed jobs each, so the GPU's and the host's drift
falls on both alike:

- ``repeat``: the same prompt every job (a swarm run): the cached engine answers from memory;
- ``new``: a new prompt every job: the cached engine encodes it (a miss: the prompt and its
  negative prompt are one ``encode_prompt`` call, cached together).

It prints and writes ``text-cache.json``: each row's median and mean seconds per job, the
saving per job, and every job's seconds (an eager batch-1 job is bound by kernel launches on
the host, and its spread between jobs can exceed the encoder's share). ``--tiny`` runs the same
on a CPU with the tiny model: it checks the script, its numbers mean nothing.

    python3 -m bench.bench_text_cache --out $OUT
    python3 -m bench.bench_text_cache --tiny --out /tmp/tc
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "text-cache-out"))
    ap.add_argument("--jobs", type=int, default=8, help="timed jobs per row and engine")
    ap.add_argument("--model-dir", default="/tmp/sd15-random")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: numbers mean nothing")
    a = ap.parse_args(argv)

    from bench.bench_multigpu import PROMPT, prepare_folder, versions
    from colabswarm.backend.engine import Engine
    from colabswarm.protocol import JobRequest

    size, steps = (64, 3) if a.tiny else (512, 20)
    model = "tiny" if a.tiny else prepare_folder(a.model_dir, "sd15")
    engines = {"cache": Engine(models=[model]), "none": Engine(models=[model], text_cache_bytes=0)}
    for eng in engines.values():
        eng.load()

    def job(eng: Engine, prompt: str, seed: int) -> float:
        t0 = time.perf_counter()
        eng.run(JobRequest(prompt=prompt, seeds=[seed], width=size, height=size, steps=steps,
                           cfg=7.0))
        return time.perf_counter() - t0

    for eng in engines.values():  # untimed: first calls, and the cached prompt's first encoding
        for seed in range(2):
            job(eng, PROMPT, seed)
    rows: dict[str, dict[str, list[float]]] = {"repeat": {"cache": [], "none": []},
                                               "new": {"cache": [], "none": []}}
    for i in range(a.jobs):
        for row, times in rows.items():
            prompt = PROMPT if row == "repeat" else f"{PROMPT}, variation {i}"
            for name in ("cache", "none") if i % 2 == 0 else ("none", "cache"):
                times[name].append(job(engines[name], prompt, 100 + i))
    out: dict[str, Any] = {"command": "python3 -m bench.bench_text_cache " + " ".join(
        argv if argv is not None else sys.argv[1:]), "size": size, "steps": steps,
        "versions": versions(["cuda:0" if not a.tiny else "cpu"]), "rows": {}}
    for row, times in rows.items():
        med = {k: statistics.median(v) for k, v in times.items()}
        out["rows"][row] = {
            "cache_s_median": round(med["cache"], 4), "none_s_median": round(med["none"], 4),
            "cache_s_mean": round(statistics.fmean(times["cache"]), 4),
            "none_s_mean": round(statistics.fmean(times["none"]), 4),
            "saved_ms_median": round((med["none"] - med["cache"]) * 1000, 2),
            "saved_share": round(1 - med["cache"] / med["none"], 4), "jobs": a.jobs,
            "cache_s": [round(t, 4) for t in times["cache"]],
            "none_s": [round(t, 4) for t in times["none"]]}
    out["cache_stats"] = engines["cache"].text_cache_stats()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "text-cache.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("rows", "cache_stats")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
