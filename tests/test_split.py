"""Short runs split evenly: the controller's real decisions (state.py) over simulated GPUs
(bench/swarmsim.py), in simulated time, so no timing of this machine is involved."""

from __future__ import annotations

import math

import pytest

from bench.swarmsim import SimGPU, simulate


def _best_whole_batches(gpus: list[SimGPU], images: int, max_batch: int = 8) -> float:
    """The best makespan with whole batches of at most max_batch on equal GPUs: split the
    images as evenly as possible, each GPU's share in as few batches as it needs."""
    g = gpus[0]
    share = math.ceil(images / len(gpus))
    batches = math.ceil(share / max_batch)
    per = math.ceil(share / batches)
    full, last = divmod(share, per)
    return (full * g.job_seconds(per) + (g.job_seconds(last) if last else 0.0)
            + batches * g.overhead)


@pytest.mark.parametrize("images", [9, 16, 25, 32, 40, 64, 81])
def test_a_short_run_on_two_equal_gpus_finishes_together(images):
    gpus = [SimGPU("g0"), SimGPU("g1")]
    two = simulate(gpus, images)
    one = simulate(gpus[:1], images)
    best = _best_whole_batches(gpus, images)
    assert two.makespan <= 1.1 * best, (two.makespan, best, two.jobs)
    assert one.makespan / two.makespan >= 1.8, (one.makespan, two.makespan, two.jobs)
    assert abs(two.images["g0"] - two.images["g1"]) <= max(2, images // 8), two.images


def test_the_tail_goes_to_the_idle_gpu_not_behind_a_busy_one():
    """40 images, batches of 8: 8+8+8 on one GPU and 8+8 on the other was the old tail."""
    r = simulate([SimGPU("g0"), SimGPU("g1")], 40)
    assert max(r.images.values()) <= 21, r.jobs
