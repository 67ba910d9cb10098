"""Tiled upscaling (issue 5): one worker against two, one worker process per GPU.

A 512x512 source is upscaled 4x (Lanczos on the controller) to 2048x2048, cut into 512 px tiles
with 64 px overlap (plus the default 32 px of context padding), every tile is refined by img2img
at denoise 0.3 with 20 steps (so 6 denoising steps a tile) on whichever worker is free, and the
tiles are blended back: ``Swarm.upscale`` end to end, exactly what a user runs. The model is the
random-weight full-size SD 1.5 of ``bench/fullsize.py`` (same arithmetic as the real one).

Workers are started with ``start_local_workers`` (each loads the folder itself; loading is not
timed). Each configuration first runs one untimed upscale (warm-up: kernels for every crop size,
and the swarm learns each worker's speed), then ``--reps`` timed ones with other seeds.

    python -m bench.bench_upscale --model-dir /tmp/sd15-random --json $OUT/upscale.json   # GPU
    python -m bench.bench_upscale --tiny                                                  # CPU

``measure_upscale`` is also called by ``bench/bench_multigpu.py`` with its own workers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def source_image(side: int) -> Any:
    """A deterministic test picture (gradients, discs, fine stripes): content does not change
    the cost of a tile, but a flat image would hide blending mistakes in a look at the output."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1)
    r = 255 * x
    g = 255 * y
    b = 127 + 120 * np.sin(40 * x) * np.cos(30 * y)
    for cx, cy, rad in ((0.3, 0.3, 0.15), (0.7, 0.6, 0.2), (0.5, 0.85, 0.1)):
        disc = (x - cx) ** 2 + (y - cy) ** 2 < rad ** 2
        r[disc], g[disc], b[disc] = 250, 240 - 200 * cx, 40
    rgb = np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def serial_seconds(src: Any, a: argparse.Namespace) -> dict[str, float]:
    """What the controller does alone, before and after the tiles fan out (no worker helps):
    Lanczos upscale, tile planning and cutting, tile PNGs, and the final blend."""
    from PIL import Image

    from colabswarm.swarm.tiles import blend_tiles, cut_tiles, plan_tiles
    from colabswarm.swarm.upscale import _png

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    big = src.resize((src.width * a.scale, src.height * a.scale), Image.Resampling.LANCZOS)
    t["lanczos"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = plan_tiles(big.width, big.height, a.tile, a.overlap, 32)
    crops = cut_tiles(big, plan)
    t["plan_and_cut"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pngs = [_png(c) for c in crops]
    t["tile_pngs"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    blend_tiles(plan, crops)
    t["blend"] = time.perf_counter() - t0
    t["tiles"] = len(crops)
    t["tile_png_kib"] = sum(len(b) for b in pngs) / len(pngs) / 1024
    return {k: round(v, 4) for k, v in t.items()}


def measure_upscale(
    groups: dict[str, list[tuple[str, str]]], a: argparse.Namespace,
    log: Any = print,
) -> dict[str, Any]:
    """Time Swarm.upscale for each group of workers (label -> [(name, share), ...])."""
    from colabswarm.swarm import Swarm

    src = source_image(a.source)
    cfg = {"source": a.source, "scale": a.scale, "tile": a.tile, "overlap": a.overlap,
           "denoise": a.denoise, "steps": a.steps, "cfg": a.cfg, "reps": a.reps,
           "max_batch": a.max_batch}
    out: dict[str, Any] = {"config": cfg, "rows": {}, "controller_serial_s": serial_seconds(src, a)}
    log(f"upscale: controller's own serial work {json.dumps(out['controller_serial_s'])}")
    for label, members in groups.items():
        sw = Swarm(output_dir=None, trace=True, max_batch=a.max_batch)
        try:
            for name, share in members:
                sw.add(share, name=name, slots=2)
            t0 = time.perf_counter()
            warm = sw.upscale(src, scale=a.scale, tile=a.tile, overlap=a.overlap,
                              denoise=a.denoise, steps=a.steps, cfg=a.cfg, prompt=PROMPT,
                              seed=1, save=False)
            warm_s = time.perf_counter() - t0
            log(f"upscale {label}: warm-up {warm_s:.2f}s, {warm.tiles} tiles, "
                f"{warm.image.size[0]}x{warm.image.size[1]}")
            secs, walls, owners, batches = [], [], Counter(), Counter()
            busy: list[dict[str, float]] = []
            for r in range(a.reps):
                mark = len(sw.trace or [])
                t0 = time.perf_counter()
                res = sw.upscale(src, scale=a.scale, tile=a.tile, overlap=a.overlap,
                                 denoise=a.denoise, steps=a.steps, cfg=a.cfg, prompt=PROMPT,
                                 seed=100 + r, save=False)
                walls.append(time.perf_counter() - t0)
                secs.append(res.seconds)
                owners.update(res.tile_backends.values())
                flights = (sw.trace or [])[mark:]
                for b, n, _s, _e, outcome, copy in flights:
                    batches[f"{b}:{n}{'(copy)' if copy else ''}:{outcome}"] += 1
                busy.append(_busy_seconds(flights))
                log(f"upscale {label} rep {r}: {walls[-1]:.2f}s wall ({res.seconds:.2f}s "
                    f"inside), {res.tiles} tiles")
            out["rows"][label] = {
                "workers": [n for n, _ in members], "tiles": res.tiles,
                "output": list(res.image.size), "warmup_s": round(warm_s, 3),
                "seconds": [round(s, 3) for s in walls], "mean_s": statistics.mean(walls),
                "min_s": min(walls), "tiles_per_s": res.tiles / statistics.mean(walls),
                "tiles_by_worker": dict(owners), "jobs": dict(batches),
                # per worker: time with at least one of its jobs in flight (controller's view)
                "busy_s": busy,
            }
            if len(members) == 1:  # the part no second worker could take over
                idle = [w - max(b.values()) for w, b in zip(walls, busy, strict=True)]
                out["rows"][label]["not_on_worker_s"] = [round(x, 3) for x in idle]
                out["rows"][label]["two_worker_fluid_s"] = statistics.mean(
                    x + max(b.values()) / 2 for x, b in zip(idle, busy, strict=True))
        finally:
            sw.close()
    rows = out["rows"]
    if "1 worker" in rows and "2 workers" in rows:
        out["speedup"] = rows["1 worker"]["mean_s"] / rows["2 workers"]["mean_s"]
        out["speedup_best"] = rows["1 worker"]["min_s"] / rows["2 workers"]["min_s"]
        out["target"] = 1.8
        out["met"] = out["speedup"] >= 1.8
        log(f"upscale speed-up 2 workers / 1 worker: {out['speedup']:.2f}x (target 1.8x)")
    return out


def _busy_seconds(flights: list[tuple]) -> dict[str, float]:
    """Union of each backend's in-flight intervals (two slots overlap on one worker)."""
    by: dict[str, list[tuple[float, float]]] = {}
    for b, _n, start, end, outcome, _copy in flights:
        if outcome == "ok":
            by.setdefault(b, []).append((start, end))
    out = {}
    for b, spans in by.items():
        total, cur_s, cur_e = 0.0, None, None
        for st, en in sorted(spans):
            if cur_e is None or st > cur_e:
                if cur_e is not None:
                    total += cur_e - cur_s
                cur_s, cur_e = st, en
            else:
                cur_e = max(cur_e, en)
        if cur_e is not None:
            total += cur_e - cur_s
        out[b] = round(total, 3)
    return out


def add_upscale_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("upscale")
    g.add_argument("--source", type=int, default=512, help="source side in px")
    g.add_argument("--scale", type=int, default=4)
    g.add_argument("--tile", type=int, default=512)
    g.add_argument("--overlap", type=int, default=64)
    g.add_argument("--denoise", type=float, default=0.3)
    g.add_argument("--up-steps", dest="up_steps", type=int, default=20)
    g.add_argument("--up-reps", dest="up_reps", type=int, default=2)
    g.add_argument("--up-max-batch", dest="up_max_batch", type=int, default=4)


def upscale_ns(a: argparse.Namespace) -> argparse.Namespace:
    """The upscale settings of a parsed command line (tiny ones with --tiny)."""
    ns = argparse.Namespace(source=a.source, scale=a.scale, tile=a.tile, overlap=a.overlap,
                            denoise=a.denoise, steps=a.up_steps, cfg=a.cfg, reps=a.up_reps,
                            max_batch=a.up_max_batch)
    if a.tiny:  # 48 -> 192 px, 64 px tiles: 9 tiles of 1 denoising step on a CPU
        ns.source, ns.tile, ns.overlap, ns.steps, ns.reps = 48, 64, 16, 4, 1
    return ns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/sd15-random", help="built there if missing")
    p.add_argument("--gpus", default="0,1", help="GPU indices; the first is the 1-worker run")
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--json", default=None)
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: tiny-width SD 1.5 layout, small image and tiles")
    p.add_argument("--simulate", type=float, default=None, metavar="STEP_S",
                   help="CPU run with 2 simulated workers (the bench-only engine that sleeps "
                        "STEP_S per step per megapixel at batch 1): the controller, HTTP and "
                        "scheduling are real, the GPU is not")
    add_upscale_args(p)
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from colabswarm.swarm.local import LocalWorker, start_local_workers

    t0 = time.perf_counter()
    if a.simulate is not None:
        workers = [LocalWorker(None, ["tiny"], f"sim{i}", env={"OMP_NUM_THREADS": "1"},
                               extra_args=("--simulate-speed", "1", "--simulate-step-seconds",
                                           str(a.simulate))) for i in range(2)]
        for w in workers:
            w.start()
        stop = lambda: [w.stop() for w in workers]  # noqa: E731
    else:
        from bench.bench_multigpu import prepare_folder

        if a.tiny and a.model_dir == "/tmp/sd15-random":  # never leave a tiny model there
            a.model_dir = "/tmp/cs-tiny-sd15"
        folder = prepare_folder(a.model_dir, "sd15", tiny=a.tiny)
        group = start_local_workers([int(g) for g in a.gpus.split(",")], model=folder,
                                    extra_args=["--compile", "off"])
        workers, stop = list(group), group.stop
    print(f"workers loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    try:
        members = [(w.name, w.share or "") for w in workers]
        groups = {"1 worker": members[:1]}
        if len(members) > 1:
            groups[f"{len(members)} workers"] = members
        res = measure_upscale(groups, upscale_ns(a), log=lambda m: print(m, flush=True))
    finally:
        stop()
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
