"""Model switching: the controller's rule (weigh each worker's measured load time against the
expected wait) against "never switch" and "always load where free" (SwarmUI's way).

Three simulated GPUs (bench/swarmsim.py: the controller's real decisions, the GPUs and the wire
simulated, so this runs in well under a second and does not depend on this machine): two with
model A loaded, one with B, each able to load either. A job of n images takes 0.12 + 0.105 n
seconds (SD1.5 512px on an H200 at batch n, roughly); a model load takes --load seconds.
Requests are submitted one after the other at time 0, in the order given.

    .venv/bin/python -m bench.bench_switching [--load 8]
"""

from __future__ import annotations

import argparse

from bench.swarmsim import SimGPU, simulate
from colabswarm.swarm.state import SwarmConfig

SCENARIOS = [
    [("A", 60), ("B", 4)],
    [("A", 400), ("B", 8)],
    [("B", 8), ("A", 400)],
    [("A", 400), ("B", 40)],
    [("A", 40), ("B", 40)],
    [("B", 200)],
    [("A", 100), ("B", 100)],
]


def _gpus(load: float) -> list[SimGPU]:
    return [SimGPU("g0", models=("A", "B"), loaded="A", load_s=load),
            SimGPU("g1", models=("A", "B"), loaded="A", load_s=load),
            SimGPU("g2", models=("A", "B"), loaded="B", load_s=load)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--load", type=float, default=8.0, help="seconds to load a model")
    args = ap.parse_args()
    print(f"3 GPUs (A, A, B loaded), model load {args.load:g} s; makespan in seconds "
          "(loads made)")
    print(f"{'requests':28} {'cost (ours)':>14} {'never':>14} {'always':>14}")
    worst = 0.0
    for reqs in SCENARIOS:
        cells = {}
        for policy in ("cost", "never", "always"):
            r = simulate(_gpus(args.load), reqs,
                         config=SwarmConfig(health_every=1e9, switching=policy))
            cells[policy] = (r.makespan, len(r.loads))
        best_other = min(cells["never"][0], cells["always"][0])
        worst = max(worst, cells["cost"][0] / best_other)
        label = " then ".join(f"{n} {m}" for m, n in reqs)
        print(f"{label:28} " + " ".join(f"{t:8.2f}s ({k})" for t, k in cells.values()))
    print(f"ours vs the better of the two others, worst case: {worst:.2f}x")


if __name__ == "__main__":
    main()
