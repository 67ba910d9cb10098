"""Model switching: the controller's rule (weigh each worker's measured load time against the
expected wait) against "never switch" and "always load where free" (SwarmUI's way).

Three simulated GPUs (bench/swarmsim.py: the controller's real decisions, the GPUs and the wire
simulated, so this runs in well under a second and does not depend on this machine): two with
model A loaded, one with B, each able to load either. A job of n images takes 0.12 + 0.105 n
seconds (SD1.5 512px on an H200 at batch n, roughly); a model load takes --load seconds.
Requests are submitted one after the other at time 0, in the order given.

``--processes``: the same three GPUs as real worker processes on loopback running the
bench-only simulated engine (``--simulate-speed 1 --simulate-load-seconds L``, models A and B,
one held at a time), driven by a real Swarm over HTTP: the real controller, wire and workers,
only the GPU simulated. Slower (real time; the default scenarios take a few minutes), and its
job times follow the simulated engine's rule (steps x megapixels x step seconds x (1 + 0.35
(n - 1))), so its figures are its own, not the simulation's.

    .venv/bin/python -m bench.bench_switching [--load 8]
    .venv/bin/python -m bench.bench_switching --processes [--load 8] [--scenarios 0,2,5]
"""

from __future__ import annotations

import argparse
import time

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


def _processes(load: float, step_s: float) -> list:
    from colabswarm.swarm.local import LocalWorker

    workers = []
    for name, models in (("g0", ("A", "B")), ("g1", ("A", "B")), ("g2", ("B", "A"))):
        extra = ("--simulate-speed", "1", "--simulate-step-seconds", str(step_s),
                 "--simulate-load-seconds", str(load))
        workers.append(LocalWorker(None, list(models), name, extra_args=extra,
                                   env={"OMP_NUM_THREADS": "1"}))
    for w in workers:
        w.start()
    return workers


def run_processes(reqs: list[tuple[str, int]], policy: str, load: float,
                  step_s: float) -> tuple[float, int]:
    """Makespan and model loads of one scenario on three simulated-engine worker processes."""
    from colabswarm.swarm import Swarm

    workers = _processes(load, step_s)
    try:
        swarm = Swarm(output_dir=None, max_batch=8, model_switching=policy)
        try:
            for w in workers:
                swarm.add(w.share, name=w.name, slots=2)
            t0 = time.perf_counter()
            runs = [swarm.submit_generate("bench", images=n, model=m, seed=0, width=512,
                                          height=512, steps=20, save=False)
                    for m, n in reqs]
            for r in runs:
                r.result()
            makespan = time.perf_counter() - t0
            loads = sum(sum("simulated load of model" in line.message
                            for line in swarm.backend(w.name).logs(1000)) for w in workers)
        finally:
            swarm.close()
    finally:
        for w in workers:
            w.stop()
    return makespan, loads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--load", type=float, default=8.0, help="seconds to load a model")
    ap.add_argument("--processes", action="store_true",
                    help="real worker processes with the simulated engine (real time)")
    ap.add_argument("--step-seconds", type=float, default=0.05,
                    help="--processes: simulated seconds per step per megapixel at batch 1")
    ap.add_argument("--scenarios", default=None,
                    help="comma-separated indexes into the scenario list (default: all)")
    args = ap.parse_args()
    if args.processes:
        return main_processes(args)
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


def main_processes(args: argparse.Namespace) -> None:
    picked = ([SCENARIOS[int(i)] for i in args.scenarios.split(",")] if args.scenarios
              else SCENARIOS)
    print(f"3 worker processes (A, A, B loaded), simulated engine, model load {args.load:g} s, "
          f"{args.step_seconds:g} s per step and megapixel; makespan (loads made)")
    print(f"{'requests':28} {'cost (ours)':>14} {'never':>14} {'always':>14}", flush=True)
    worst = 0.0
    for reqs in picked:
        cells = {p: run_processes(reqs, p, args.load, args.step_seconds)
                 for p in ("cost", "never", "always")}
        worst = max(worst, cells["cost"][0] / min(cells["never"][0], cells["always"][0]))
        label = " then ".join(f"{n} {m}" for m, n in reqs)
        print(f"{label:28} " + " ".join(f"{t:8.2f}s ({k})" for t, k in cells.values()),
              flush=True)
    print(f"ours vs the better of the two others, worst case: {worst:.2f}x")


if __name__ == "__main__":
    main()
