"""How far a seed's image alone differs from the same seed inside a batch, on this processor.

Batched CPU (and GPU) kernels may round differently from single ones, and which kernels run
depends on the processor, so "same seed, same image" holds exactly only at the same batch size
on the same machine. This prints the largest difference of one 8-bit value and the share of
values that differ, over seeds 0..15 at batch sizes 2, 4 and 8 (tiny model, on the CPU by
default; any model and device with --model/--device).

    .venv/bin/python -m bench.seed_rounding [--threads 1] [--model tiny] [--device cpu]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--sizes", default="64:3,128:4", help="side:steps pairs")
    args = ap.parse_args()
    import torch

    from colabswarm.backend.engine import Engine
    from colabswarm.protocol import JobRequest

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(models=[args.model], device=args.device, warmup=False)
    engine.load()
    worst, differing, total = 0, 0, 0
    seeds = list(range(16))
    for pair in args.sizes.split(","):
        side, steps = (int(x) for x in pair.split(":"))
        req = JobRequest(prompt="a lighthouse", width=side, height=side, steps=steps)
        alone = {s: np.asarray(engine.run(req.model_copy(update={"seeds": [s]}))[0], np.int16)
                 for s in seeds}
        for bs in (2, 4, 8):
            for k in range(0, len(seeds), bs):
                chunk = seeds[k:k + bs]
                for s, im in zip(chunk, engine.run(req.model_copy(update={"seeds": chunk})),
                                 strict=True):
                    d = np.abs(np.asarray(im, np.int16) - alone[s])
                    worst = max(worst, int(d.max()))
                    differing += int((d > 0).sum())
                    total += d.size
    print(f"{args.model} on {engine.device}, {torch.get_num_threads()} threads: largest "
          f"difference {worst}/255, {differing} of {total} values differ "
          f"({differing / total:.1e})")


if __name__ == "__main__":
    main()
