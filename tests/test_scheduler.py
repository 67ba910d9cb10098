"""Scheduling decisions with made-up backends: no servers, no clocks."""

from __future__ import annotations

from colabswarm.protocol import Info, JobRequest, Limits
from colabswarm.swarm.backends import Backend, BackendStatus, next_check_delay
from colabswarm.swarm.controller import SwarmStatus, format_duration
from colabswarm.swarm.scheduler import (
    Flight,
    Item,
    estimate_eta,
    job_units,
    pick_copies,
    plan_dispatch,
)


def _backend(name: str, unit_s: float | None = None, slots: int = 2, models=("tiny",),
             max_pixels: int = 1024 * 1024, max_images: int = 16,
             capabilities=("txt2img", "img2img", "upscale", "tiles")) -> Backend:
    info = Info(name=name, version="0", device="cpu", models=list(models),
                capabilities=list(capabilities), upscalers=["lanczos"],
                limits=Limits(max_pixels=max_pixels, max_images=max_images), queue_depth=0,
                running=0, jobs_served=0)
    return Backend(name=name, url=f"http://{name}", slots=slots,
                   status=BackendStatus.RUNNING, info=info, unit_seconds_hint=unit_s,
                   overhead_s=0.0)


def _items(n: int, size: int = 512, **kw) -> list[Item]:
    """Images of 512x512, 10 steps: 2.6 units each."""
    tpl = JobRequest(prompt="p", width=size, height=size, steps=10, **kw)
    return [Item(1, i, 100 + i, tpl) for i in range(n)]


def _assigned(plan) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for b, batch in plan:
        out.setdefault(b.name, []).append(len(batch))
    return out


def test_one_image_goes_to_the_first_backend():
    bs = [_backend("a"), _backend("b"), _backend("c")]
    plan, _ = plan_dispatch(_items(1), bs, [], 0.0)
    assert [(b.name, len(x)) for b, x in plan] == [("a", 1)]


def test_without_batching_backends_fill_in_order_up_to_their_slots():
    bs = [_backend("a"), _backend("b"), _backend("c")]
    for b in bs:
        b.speed.observe(1, 0.5, 1.0)  # timed, all alike
    plan, _ = plan_dispatch(_items(5), bs, [], 0.0, batching=False)
    assert [b.name for b, _ in plan] == ["a", "a", "b", "b", "c"]
    plan, _ = plan_dispatch(_items(9), bs, [], 0.0, batching=False)
    assert len(plan) == 6, "never more jobs than slots"


def test_busy_slots_are_respected():
    a, b = _backend("a"), _backend("b")
    a.speed.observe(1, 0.5, 1.0)
    b.speed.observe(1, 0.5, 1.0)
    busy = _items(2)
    flights = [Flight(a, [it], started=0.0, estimate=it.units) for it in busy]
    a.running = 2
    plan, _ = plan_dispatch(_items(2), [a, b], flights, 0.0, batching=False)
    assert [x.name for x, _ in plan] == ["b", "b"]


def test_a_backend_not_yet_timed_runs_one_job_at_a_time():
    timed, new = _backend("timed", unit_s=0.01), _backend("new", unit_s=0.01)
    timed.speed.observe(1, 0.05, 1.0)
    plan, _ = plan_dispatch(_items(20), [new, timed], [], 0.0, batching=False)
    assert [b.name for b, _ in plan].count("new") == 1
    assert [b.name for b, _ in plan].count("timed") == 2
    plan, _ = plan_dispatch(_items(20), [new, timed], [], 0.0, batching=False,
                            straggler_guard=False)
    assert [b.name for b, _ in plan].count("new") == 2, "the plain rule fills every slot"


def test_batches_follow_measured_speed():
    fast, slow = _backend("fast", unit_s=0.01), _backend("slow", unit_s=0.04)
    unit = _items(1)[0].units
    fast.speed.observe(4, 0.04 * unit, unit)
    slow.speed.observe(4, 0.16 * unit, unit)
    plan, _ = plan_dispatch(_items(40), [fast, slow], [], 0.0, max_batch=8)
    sizes = _assigned(plan)
    assert sum(sizes["fast"]) > sum(sizes.get("slow", [0]))
    assert max(sizes["fast"]) <= 8
    plan, _ = plan_dispatch(_items(40), [fast, slow], [], 0.0, max_batch=8, batching=False)
    assert all(len(batch) == 1 for _, batch in plan)


def test_batch_respects_the_backend_image_limit():
    a = _backend("a", max_images=2)
    plan, _ = plan_dispatch(_items(10), [a], [], 0.0, max_batch=8)
    assert all(len(batch) <= 2 for _, batch in plan)
    b = _backend("b")
    b.batch_cap = 3  # what an out-of-memory answer leaves behind
    plan, _ = plan_dispatch(_items(10), [b], [], 0.0, max_batch=8)
    assert max(len(batch) for _, batch in plan) == 3


def test_straggler_guard_keeps_the_last_images_off_a_slow_backend():
    fast, slow = _backend("fast", unit_s=0.01), _backend("slow", unit_s=1.0)
    unit = _items(1)[0].units
    fast.speed.observe(1, 0.01 * unit, unit)
    slow.speed.observe(1, 1.0 * unit, unit)
    plan, skips = plan_dispatch(_items(2), [slow, fast], [], 0.0, batching=False)
    assert {b.name for b, _ in plan} == {"fast"}
    assert any("straggler" in str(why) for _, _, why in skips)
    plan, _ = plan_dispatch(_items(2), [slow, fast], [], 0.0, batching=False,
                            straggler_guard=False)
    assert plan[0][0].name == "slow"


def test_model_and_size_filters_with_reasons():
    a = _backend("a", models=("tiny",), max_pixels=64 * 64)
    b = _backend("b", models=("tiny", "xl"))
    plan, skips = plan_dispatch(_items(2, size=64, model="xl"), [a, b], [], 0.0)
    assert {x.name for x, _ in plan} == {"b"}
    assert any(x.name == "a" and "model 'xl'" in str(why) for x, _, why in skips)
    big = [Item(1, 0, 1, JobRequest(width=128, height=128))]
    plan, skips = plan_dispatch(big, [a, b], [], 0.0)
    assert plan[0][0].name == "b"
    assert any("pixels" in str(why) for _, _, why in skips)


def test_unusable_backends_get_nothing():
    a, b = _backend("a"), _backend("b")
    a.status = BackendStatus.IDLE
    b.enabled = False
    assert plan_dispatch(_items(3), [a, b], [], 0.0)[0] == []


def test_an_image_avoids_the_backend_that_failed_it_unless_none_other():
    a, b = _backend("a"), _backend("b")
    items = _items(1)
    items[0].failed_on.add("a")
    plan, _ = plan_dispatch(items, [a, b], [], 0.0)
    assert plan[0][0].name == "b"
    plan, _ = plan_dispatch(items, [a], [], 0.0)
    assert plan[0][0].name == "a", "the only backend left may retry it"


def test_copies_race_the_slowest_flight_when_the_queue_is_empty():
    fast, slow = _backend("fast", unit_s=0.01), _backend("slow", unit_s=1.0)
    items = _items(2)
    f = Flight(slow, items, started=0.0, estimate=sum(i.units for i in items) * 1.0)
    slow.running = 1
    picks = pick_copies([], [fast, slow], [f], now=0.01)
    assert picks and picks[0][0] is fast and picks[0][1] is f
    assert pick_copies(_items(1), [fast, slow], [f], now=0.01) == [], "not while work is queued"
    f.has_copy = True
    assert pick_copies([], [fast, slow], [f], now=0.01) == [], "one copy per flight"


def test_no_copy_when_the_idle_backend_would_not_win():
    fast, slow = _backend("fast", unit_s=0.01), _backend("slow", unit_s=1.0)
    items = _items(2)
    f = Flight(fast, items, started=0.0, estimate=sum(i.units for i in items) * 0.01)
    assert pick_copies([], [fast, slow], [f], now=0.0) == []


def test_eta_uses_measured_speeds():
    a, b = _backend("a", unit_s=1.0), _backend("b", unit_s=1.0)
    items = _items(8)
    eta = estimate_eta(items, [a, b], [], 0.0)
    assert abs(eta - 8 * job_units(items[0].template) * a.unit_seconds / 2) < 1e-9
    a.speed.observe(4, 40.0, items[0].units)  # a turns out slower: the estimate grows
    assert estimate_eta(items, [a, b], [], 0.0) > eta
    assert estimate_eta([], [a, b], [], 0.0) == 0.0


def test_speed_model_learns_the_batch_line():
    from colabswarm.swarm.speed import SpeedModel

    m = SpeedModel()
    assert m.job_seconds(4, 1.0) is None
    for n, t in [(1, 0.49), (4, 0.63), (2, 0.54), (4, 0.63)]:  # an H200's shape
        m.observe(n, t, 1.0)
    assert abs(m.job_seconds(1, 1.0) - 0.49) < 0.02
    assert abs(m.job_seconds(4, 1.0) - 0.63) < 0.02
    assert m.unit_seconds(4) < m.unit_seconds(1) / 2, "batches are cheaper per image"


def test_status_line_reads_like_swarmui():
    s = SwarmStatus(current=10, running=4, queued=6, eta_s=230, backends=[])
    assert s.line == "10 current generations, 4 running, 6 queued (est. 3m 50s)"
    assert SwarmStatus(0, 0, 0, 0.0, []).line == "0 current generations, 0 running, 0 queued"
    assert format_duration(3725) == "1h 2m"


def test_backoff_is_quicker_for_allow_idle_peers():
    idle = [next_check_delay(BackendStatus.IDLE, k, 2.0) for k in range(8)]
    err = [next_check_delay(BackendStatus.ERRORED, k, 2.0) for k in range(8)]
    assert idle == sorted(idle) and err == sorted(err)
    assert max(idle) <= 8.0 and max(err) <= 60.0
    assert all(i <= e for i, e in zip(idle, err, strict=True))


def test_tiles_skip_a_worker_that_cannot_cut_them():
    old = _backend("old", capabilities=("txt2img", "img2img", "upscale"))
    new = _backend("new")
    tpl = JobRequest(kind="img2img", width=64, height=64, steps=10, strength=0.5,
                     upscaler="lanczos", scale=2)
    src = b"png"
    items = [Item(1, i, i, tpl, src, (0, 0, 64, 64)) for i in range(3)]
    plan, skips = plan_dispatch(items, [old, new], [], 0.0)
    assert {b.name for b, _ in plan} == {"new"}
    assert any(b.name == "old" and "update colabswarm" in str(why) for b, _, why in skips)


def test_tiles_of_different_sources_never_share_a_job():
    tpl = JobRequest(kind="img2img", width=64, height=64, steps=10, strength=0.5,
                     upscaler="lanczos", scale=2)
    one, two = b"source one", b"source two"
    items = [Item(1, i, i, tpl, one if i % 2 else two, (0, 0, 64, 64)) for i in range(8)]
    plan, _ = plan_dispatch(items, [_backend("a", unit_s=0.1, slots=4)], [], 0.0)
    assert plan
    for _, batch in plan:
        assert len({id(it.init_png) for it in batch}) == 1
