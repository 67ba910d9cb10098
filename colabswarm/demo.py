"""`python -m colabswarm demo`: a local swarm of tiny-model workers, end to end, offline."""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["run_demo"]


def run_demo(workers: int = 3, images: int = 12, out: str = "outputs/demo",
             upscale: bool = True) -> int:
    from .swarm import Swarm
    from .swarm.local import start_local_workers

    out_dir = Path(out)
    print(f"Starting {workers} local tiny-model workers (one process each) ...", flush=True)
    swarm = Swarm(output_dir=out_dir)
    group = start_local_workers(workers, "tiny", swarm)
    try:
        for b in swarm.backends:
            print(f"  {b['name']:8} {b['status']:8} {b['url']}", flush=True)
        print(f"Generating {images} images over {workers} workers ...", flush=True)
        last = [0.0]

        def show(img) -> None:  # noqa: ANN001
            now = time.monotonic()
            if now - last[0] > 0.2:
                last[0] = now
                print(f"  {swarm.status_line()}", flush=True)

        t0 = time.monotonic()
        result = swarm.generate("a lighthouse on a cliff at dusk, oil painting", images=images,
                                seed=1234, width=128, height=128, steps=8, on_image=show)
        took = time.monotonic() - t0
        print(f"  {swarm.status_line()}", flush=True)
        per_backend: dict[str, int] = {}
        for g in result.images:
            per_backend[g.backend] = per_backend.get(g.backend, 0) + 1
        print(f"Got {len(result.images)} images in {took:.1f}s, seeds "
              f"{result.images[0].seed}..{result.images[-1].seed}; made by {per_backend}",
              flush=True)
        if upscale:
            print("Upscaling the first image 4x with tiles spread over the swarm ...", flush=True)
            big = swarm.upscale(result.images[0].image, scale=4, tile=128, overlap=32,
                                denoise=0.3, steps=8, seed=7)
            print(f"  upscaled to {big.image.size[0]}x{big.image.size[1]} ({big.path}) from "
                  f"{big.tiles} tiles on {sorted(set(big.backends))}", flush=True)
        print(f"Images saved in {out_dir.resolve()}", flush=True)
        return 0
    finally:
        swarm.close()
        group.stop()
