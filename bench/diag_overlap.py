"""Does the engine's job still wait for the GPU anywhere, and are its images diffusers' own?
(issue 14, device)

On one GPU, an eager engine with SD 1.5's or SDXL's architecture (``--model``; random weights,
bench/fullsize.py):

- ``syncs``: torch's sync debug mode on while the engine queues a job (``Engine.launch``),
  for the first job (its sampler's timesteps and its prompt new) and for repeats; each
  synchronizing call torch reports is listed with where it came from. A repeat should have
  none: the engine's thread then runs ahead of the GPU, bounded by its pacer (inflight.py),
  whose event waits torch does not report; then img2img jobs (the first one's picture as
  the init image, strength 0.5), whose waits are listed the same way;
- ``same``: each job's images against the same pipeline called as diffusers documents it
  (a fresh Euler scheduler, one CPU generator per seed, ``output_type="pil"``), at batch 1
  and 4: the largest pixel difference (0 expected: the same kernels in the same order);
- ``back_to_back``: img/s of 24 batch-1 jobs queued one after another with a thread taking
  the images (as the worker does), and of the same jobs each waited for before the next; and
  how long ``launch`` took to return (far less than a job, unless something in it waits).

    python3 -m bench.diag_overlap --out $OUT
    python3 -m bench.diag_overlap --model sdxl --jobs 8 --out $OUT/xl
    python3 -m bench.diag_overlap --tiny --out /tmp/ov     # CPU: checks the script only
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "overlap-out"))
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--model-dir", default=None, help="default: /tmp/<model>-random")
    ap.add_argument("--jobs", type=int, default=24)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: numbers mean nothing")
    a = ap.parse_args(argv)

    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler

    from bench.bench_multigpu import PROMPT, prepare_folder, source_digest, versions
    from colabswarm.backend.engine import Engine
    from colabswarm.protocol import JobRequest

    size, steps = (64, 3) if a.tiny else (1024 if a.model == "sdxl" else 512, 20)
    model = "tiny-xl" if a.tiny and a.model == "sdxl" else "tiny" if a.tiny else \
        prepare_folder(a.model_dir or f"/tmp/{a.model}-random", a.model)
    eng = Engine(models=[model])
    eng.load()
    cuda = eng.device.startswith("cuda")

    def req(seeds: list[int], prompt: str = PROMPT, **kw: Any) -> Any:
        return JobRequest(prompt=prompt, seeds=seeds, width=size, height=size, steps=steps,
                          cfg=7.0, **kw)

    out: dict[str, Any] = {"command": "python3 -m bench.diag_overlap " + " ".join(
        argv if argv is not None else sys.argv[1:]), "versions": versions(
        [eng.device]), "source_sha256": source_digest(), "syncs": {}, "same": {}}

    # ----- synchronizing calls while a job is queued ------------------------------------
    def syncs(r: Any, inits: Any = None) -> tuple[list[str], Any]:
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                flight = eng.launch(r, inits)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        found = []
        for w in got:
            if "synchroniz" in str(w.message).lower():
                found.append(f"{Path(w.filename).name}:{w.lineno}: {str(w.message)[:90]}")
        flight.wait()
        return found, flight

    init = None
    for label, r in (("first job", req([1])), ("repeat", req([2])), ("repeat, batch 4",
                     req([3, 4, 5, 6])), ("repeat, batch 4 again", req([7, 8, 9, 10])),
                     ("a new prompt", req([11], PROMPT + ", at dusk"))):
        found, flight = syncs(r)
        if init is None:  # the first job's picture: the img2img jobs' init image
            init = flight.wait()[0]
        out["syncs"][label] = found
        print(f"{label}: {len(found)} synchronizing calls", *found[:8], sep="\n  ")
    for label, seeds in (("img2img, first", [31]), ("img2img, repeat", [32]),
                         ("img2img, repeat, batch 4", [33, 34, 35, 36])):
        found, _ = syncs(req(seeds, kind="img2img", strength=0.5), [init])
        out["syncs"][label] = found
        print(f"{label}: {len(found)} synchronizing calls", *found[:8], sep="\n  ")

    # ----- the same images as the pipeline's own ------------------------------------------
    pipe = eng._loaded.txt2img  # noqa: SLF001 - the engine's own pipeline, called plainly
    for seeds in ([21], [21, 22, 23, 24]):
        got = [np.asarray(im, np.int16) for im in eng.run(req(seeds))]
        own, pipe.scheduler = pipe.scheduler, EulerDiscreteScheduler.from_config(
            pipe.scheduler.config)
        try:
            with torch.inference_mode():
                want = pipe(prompt=PROMPT, width=size, height=size, num_inference_steps=steps,
                            guidance_scale=7.0, num_images_per_prompt=len(seeds),
                            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                            output_type="pil").images
        finally:
            pipe.scheduler = own
        diff = max(int(np.abs(g - np.asarray(w, np.int16)).max()) for g, w in zip(
            got, want, strict=True))
        out["same"][f"b{len(seeds)}"] = {"max_abs": diff}
        print(f"batch {len(seeds)}: largest difference from diffusers' own {diff}/255")

    # ----- back to back: handed over vs waited for ----------------------------------------
    launch_s: list[float] = []

    def handed(n: int) -> float:
        box: queue.Queue = queue.Queue()
        taker = threading.Thread(target=lambda: [f.wait() for f in iter(box.get, None)])
        taker.start()
        t0 = time.perf_counter()
        for i in range(n):
            t1 = time.perf_counter()
            flight = eng.launch(req([100 + i]))
            launch_s.append(time.perf_counter() - t1)
            box.put(flight)
        box.put(None)
        taker.join()
        return n / (time.perf_counter() - t0)

    def waited(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            eng.launch(req([100 + i])).wait()
        return n / (time.perf_counter() - t0)

    rows: dict[str, list[float]] = {"handed over": [], "waited for": []}
    try:
        for _ in range(2):
            for name, fn in (("handed over", handed), ("waited for", waited)):
                rows[name].append(round(fn(a.jobs), 3))
    except Exception:  # noqa: BLE001 - keep what was measured
        out["error"] = traceback.format_exc()[-2000:]
    out["back_to_back_img_s"] = rows
    # launch() returns when the job's work is queued: well before its images, if nothing waits
    out["launch_s_median"] = round(sorted(launch_s)[len(launch_s) // 2], 4) if launch_s else None
    print(json.dumps(rows), "launch() returned after a median",
          out["launch_s_median"], "s; a job's images took", {
              k: round(1 / v[-1], 4) for k, v in rows.items() if v}, "s apart")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "overlap.json").write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
