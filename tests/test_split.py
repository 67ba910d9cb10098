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


# ----- model switching ------------------------------------------------------------------------
def _three(load_s: float = 8.0) -> list[SimGPU]:
    """Two GPUs with model A loaded, one with B; each can load either in load_s seconds."""
    return [SimGPU("g0", models=("A", "B"), loaded="A", load_s=load_s),
            SimGPU("g1", models=("A", "B"), loaded="A", load_s=load_s),
            SimGPU("g2", models=("A", "B"), loaded="B", load_s=load_s)]


def _switching(policy: str):
    from colabswarm.swarm.state import SwarmConfig

    return SwarmConfig(health_every=1e9, switching=policy)


def test_jobs_go_where_their_model_is_loaded_when_that_is_enough():
    r = simulate(_three(), [("A", 40), ("B", 40)], config=_switching("cost"))
    assert r.loads == [], r.loads
    assert r.images["g2"] == 40, "B's images on the GPU that has B"


def test_a_model_is_loaded_elsewhere_only_when_the_queue_makes_it_pay():
    short = simulate(_three(), [("B", 4)], config=_switching("cost"))
    assert short.loads == [], "4 images do not pay an 8 s load"
    long = simulate(_three(), [("B", 200)], config=_switching("cost"))
    assert {who for who, model, _ in long.loads} == {"g0", "g1"}, long.loads
    assert long.makespan < 0.7 * simulate(_three(), [("B", 200)],
                                          config=_switching("never")).makespan


@pytest.mark.parametrize("requests", [
    [("A", 60), ("B", 4)], [("A", 400), ("B", 8)], [("B", 8), ("A", 400)],
    [("A", 400), ("B", 40)], [("A", 40), ("B", 40)], [("B", 200)],
])
def test_weighing_load_time_is_never_far_from_the_better_of_never_and_always(requests):
    best = min(simulate(_three(), requests, config=_switching(p)).makespan
               for p in ("never", "always"))
    ours = simulate(_three(), requests, config=_switching("cost")).makespan
    assert ours <= 1.1 * best, (ours, best)


def test_a_compiled_worker_gets_only_its_batch_sizes():
    """swarmsim asserts every job a bucketed GPU gets is one of its buckets."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(images=st.integers(1, 90), buckets=st.sets(st.sampled_from([2, 4, 6, 8]), max_size=3))
    def check(images, buckets):
        gpus = [SimGPU("compiled", buckets=tuple(sorted({1} | buckets))), SimGPU("eager")]
        r = simulate(gpus, images)
        assert r.makespan < float("inf")
        sizes = {n for who, n, _, _ in r.jobs if who == "compiled"}
        assert sizes <= {1} | buckets, sizes

    check()


def test_an_idle_worker_with_another_model_does_not_load_one_the_others_finish_first():
    """Right after start (speeds known only from the workers' own warm-up figures), 100 images
    for A: the two A workers finish them in about 6 s, so the B worker must not spend 8 s
    loading A (it did: the 2x margin for speed guesses was applied to the load too; found by
    bench_switching --processes). 400 images do pay a load."""
    def run(images: int, policy: str):
        return simulate(_three(), [("A", images)], timed=False, hinted=True,
                        config=_switching(policy))

    short = run(100, "cost")
    assert short.loads == [], short.loads
    long = run(400, "cost")
    assert [g for g, _m, _s in long.loads] == ["g2"], long.loads
    never = run(400, "never")
    assert long.makespan < 0.9 * never.makespan, (long.makespan, never.makespan)
