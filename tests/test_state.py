"""The swarm's decisions with no servers and no clock: events in, actions out (state.py).

Each scenario feeds a SwarmState the events a controller would see and checks the actions and
the final state; a hypothesis test feeds arbitrary sequences (flights succeeding, failing with
every kind, cancelled, racing their cancellation; health checks; pauses; the user's word) and
checks that every image is delivered exactly once or its run fails with a reason, and that
nothing is left stuck while a healthy backend could serve it.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colabswarm.errors import ErrorKind, JobFailed, JobInterrupted, ModelNotAvailable
from colabswarm.protocol import Info, JobRequest, Limits
from colabswarm.swarm.backends import Backend, BackendStatus
from colabswarm.swarm.state import (
    FAILURE_RULES,
    BackendAdded,
    BackendSettings,
    CancelFlight,
    CheckHealth,
    Deliver,
    FinishRun,
    FlightCancelled,
    FlightFailed,
    FlightProgress,
    FlightSucceeded,
    HealthChecked,
    HealthFailed,
    InterruptAll,
    NewRun,
    StartFlight,
    SwarmConfig,
    SwarmState,
    Tick,
)

TPL = JobRequest(prompt="p", width=64, height=64, steps=4)


def _info(name: str, models=("tiny",), **kw) -> Info:
    return Info(name=name, version="1", device="cpu", models=list(models),
                capabilities=["txt2img", "img2img", "upscale", "tiles"], upscalers=["lanczos"],
                limits=Limits(), queue_depth=0, running=0, jobs_served=0, **kw)


def _state(*names: str, allow_idle: bool = False, **config) -> SwarmState:
    s = SwarmState(SwarmConfig(**config))
    for n in names:
        s.handle(BackendAdded(Backend(n, f"http://{n}", allow_idle=allow_idle), 0.0, _info(n)))
    return s


def _of(actions, cls):
    return [a for a in actions if isinstance(a, cls)]


def _run(s: SwarmState, rid: int, n: int, now: float = 0.0, tpl: JobRequest = TPL):
    return s.handle(NewRun(rid, "generate", tpl, tuple(range(100 * rid, 100 * rid + n)), now))


def _ok(f, now: float, run_s: float = 0.1):
    return FlightSucceeded(f.id, tuple(("img", it.seed) for it in f.items), run_s, 0.0, now)


def test_a_new_run_goes_out_at_once_and_comes_back_in_order():
    s = _state("a")
    started = _of(_run(s, 1, 3), StartFlight)
    assert len(started) == 1 and [it.seed for it in started[0].flight.items] == [100, 101, 102]
    out = s.handle(_ok(started[0].flight, 1.0))
    assert [d.seed for d in _of(out, Deliver)] == [100, 101, 102]
    assert _of(out, FinishRun) == [FinishRun(1, None)]
    assert not s.flights and not s.queue and not s.runs


def test_a_worker_dies_mid_batch_while_a_copy_runs_elsewhere():
    s = _state("a", "b", health_every=1000, batching=False, straggler_guard=False)
    for b in s.backends:
        b.speed.observe(1, 1.0, TPL.steps * 64 * 64 / 1e6)  # both timed, alike
    first = _of(_run(s, 1, 2), StartFlight)
    assert [x.flight.backend.name for x in first] == ["a", "a"], "in order, two slots"
    raced, other = first[1].flight, first[0].flight
    copies = _of(s.handle(Tick(100.0)), StartFlight)  # a is overdue: b races one batch
    assert len(copies) == 1 and copies[0].flight.copy_of in (raced, other)
    copy = copies[0].flight
    raced = copy.copy_of
    other = first[0].flight if raced is first[1].flight else first[1].flight
    out = s.handle(FlightFailed(raced.id, ErrorKind.UNREACHABLE, "connection reset", 101.0))
    assert s.backends[0].status is BackendStatus.ERRORED
    assert "connection reset" in s.backends[0].reason
    assert [a.flight_id for a in _of(out, CancelFlight)] == [other.id], "its other job too"
    assert raced.items[0].status.value == "flying", "the copy still has it: not requeued"
    out = s.handle(FlightCancelled(other.id, 101.1))
    moved = _of(out, StartFlight)
    assert [x.flight.backend.name for x in moved] == ["b"], "its own image goes to b"
    out = s.handle(_ok(copy, 102.0)) + s.handle(_ok(moved[0].flight, 103.0))
    assert sorted(d.seed for d in _of(out, Deliver)) == [100, 101], "each exactly once"
    assert _of(out, FinishRun) == [FinishRun(1, None)]


def test_a_copy_that_loses_the_race_but_lands_anyway_delivers_nothing():
    s = _state("a", "b", health_every=1000, batching=False, straggler_guard=False)
    for b in s.backends:
        b.speed.observe(1, 1.0, TPL.steps * 64 * 64 / 1e6)
    first = _of(_run(s, 1, 2), StartFlight)  # a: 2 flights, b: idle
    copy = _of(s.handle(Tick(100.0)), StartFlight)[0].flight
    original = copy.copy_of
    out = s.handle(_ok(original, 101.0))
    assert copy.id in [a.flight_id for a in _of(out, CancelFlight)], "the loser is called off"
    out = s.handle(_ok(copy, 101.5))  # it finished before its cancellation arrived
    assert not _of(out, Deliver) and not _of(out, FinishRun)
    rest = [x.flight for x in first if x.flight is not original]
    out = sum((s.handle(_ok(f, 102.0)) for f in rest), [])
    assert _of(out, FinishRun) == [FinishRun(1, None)]
    assert s.runs == {}
    left = set(s.flights)  # other copies: called off, to land as cancelled
    assert left <= {a.flight_id for a in _of(out, CancelFlight)}
    for fid in left:
        assert not s.handle(FlightCancelled(fid, 103.0))


def test_a_liar_is_quarantined_its_work_goes_elsewhere_and_it_is_not_checked_meanwhile():
    s = _state("liar", "honest", straggler_guard=False, batching=False)
    started = _of(_run(s, 1, 1), StartFlight)
    f = started[0].flight
    assert f.backend.name == "liar"
    out = s.handle(FlightFailed(f.id, ErrorKind.MISBEHAVED, "sent a bad image", 1.0))
    liar = s.backends[0]
    assert liar.status is BackendStatus.ERRORED and "quarantined" in liar.reason
    again = _of(out, StartFlight)
    assert [x.flight.backend.name for x in again] == ["honest"]
    assert f.items[0].failed_on == {"liar"} and f.items[0].attempts == 1
    checks = _of(s.handle(Tick(30.0)), CheckHealth)
    assert "liar" not in [c.name for c in checks], "no check while quarantined"
    s.handle(HealthChecked("liar", _info("liar"), 30.0))  # a check that was under way
    assert liar.status is BackendStatus.ERRORED, "a fine /v1/info does not lift it"
    assert "liar" in [c.name for c in _of(s.handle(Tick(61.5)), CheckHealth)]
    s.handle(HealthChecked("liar", _info("liar"), 62.0))
    assert liar.status is BackendStatus.RUNNING


def test_out_of_memory_halves_the_batch_and_costs_no_attempt():
    s = _state("gpu")
    f = _of(_run(s, 1, 8), StartFlight)[0].flight
    assert len(f.items) == 8
    out = s.handle(FlightFailed(f.id, ErrorKind.OUT_OF_MEMORY, "CUDA out of memory", 1.0))
    assert s.backends[0].batch_cap == 4
    assert all(it.attempts == 0 for it in f.items)
    sizes = [len(x.flight.items) for x in _of(out, StartFlight)]
    assert sizes and max(sizes) <= 4


def test_a_full_queue_pauses_that_worker_and_is_not_remembered():
    s = _state("busy")
    f = _of(_run(s, 1, 2), StartFlight)[0].flight
    out = s.handle(FlightFailed(f.id, ErrorKind.QUEUE_FULL, "queue is full", 10.0,
                                retry_after_s=2.0))
    assert not _of(out, StartFlight) and not _of(out, FinishRun), "waits, fails nothing"
    assert not s.backends[0].refused
    assert not _of(s.handle(Tick(11.0)), StartFlight)
    out = s.handle(Tick(12.1))
    assert [len(x.flight.items) for x in _of(out, StartFlight)] == [2]
    assert all(it.attempts == 0 for it in f.items)


def test_a_worker_cannot_pause_itself_for_ever():
    s = _state("busy")
    f = _of(_run(s, 1, 1), StartFlight)[0].flight
    s.handle(FlightFailed(f.id, ErrorKind.RATE_LIMITED, "quota", 0.0, retry_after_s=86400.0))
    assert s.backends[0].paused_until <= 300.0


def test_a_refusal_holds_until_the_workers_info_changes():
    s = _state("w")
    f = _of(_run(s, 1, 1), StartFlight)[0].flight
    out = s.handle(FlightFailed(f.id, ErrorKind.INVALID, "steps over 4", 1.0))
    fails = _of(out, FinishRun)
    assert len(fails) == 1 and "No backend can run this job" in str(fails[0].error)
    out = _run(s, 2, 1, now=2.0)
    assert isinstance(_of(out, FinishRun)[0].error, Exception), "still refused, at once"
    s.handle(HealthChecked("w", _info("w", models=("tiny", "new")), 3.0))
    assert not s.backends[0].refused
    assert _of(_run(s, 3, 1, now=4.0), StartFlight), "its info changed: it is asked again"


def test_a_job_no_backend_has_the_model_for_fails_as_model_not_available():
    s = _state("a", "b")
    out = _run(s, 1, 1, tpl=TPL.model_copy(update={"model": "xl"}))
    err = _of(out, FinishRun)[0].error
    assert isinstance(err, ModelNotAvailable) and err.kind is ErrorKind.MODEL_NOT_AVAILABLE


def test_retries_end_with_a_failed_run_and_a_reason():
    s = _state("a", max_attempts=3)
    out = _run(s, 1, 1)
    for t in range(3):
        f = _of(out, StartFlight)[0].flight
        out = s.handle(FlightFailed(f.id, ErrorKind.CRASH, "segfault", float(t)))
    err = _of(out, FinishRun)[0].error
    assert isinstance(err, JobFailed) and "failed 3 times" in str(err) and "segfault" in str(err)
    assert not s.queue and not s.runs


def test_an_allow_idle_peer_goes_quietly_idle_and_comes_back():
    s = _state("peer", allow_idle=True)
    f = _of(_run(s, 1, 2), StartFlight)[0].flight
    out = s.handle(FlightFailed(f.id, ErrorKind.UNREACHABLE, "refused", 1.0))
    assert s.backends[0].status is BackendStatus.IDLE
    assert all(a.level != "warning" for a in out if hasattr(a, "level"))
    assert not _of(out, StartFlight) and not _of(out, FinishRun), "waits for it"
    checks = _of(s.handle(Tick(2.0)), CheckHealth)
    assert [c.name for c in checks] == ["peer"]
    out = s.handle(HealthChecked("peer", _info("peer"), 2.1))
    assert s.backends[0].status is BackendStatus.RUNNING
    assert [len(x.flight.items) for x in _of(out, StartFlight)] == [2]


def test_a_revoked_token_errors_an_allow_idle_peer_too():
    s = _state("peer", allow_idle=True)
    s.handle(HealthFailed("peer", ErrorKind.UNAUTHORIZED, "refused the token", 1.0))
    assert s.backends[0].status is BackendStatus.ERRORED


def test_interrupt_finishes_every_run_and_calls_off_every_flight():
    s = _state("a", "b")
    out = _run(s, 1, 6) + _run(s, 2, 6)
    flights = {x.flight.id for x in _of(out, StartFlight)}
    out = s.handle(InterruptAll(1.0))
    assert {a.run_id for a in _of(out, FinishRun)} == {1, 2}
    assert all(isinstance(a.error, JobInterrupted) for a in _of(out, FinishRun))
    assert {a.flight_id for a in _of(out, CancelFlight)} == flights
    for fid in flights:
        out = s.handle(FlightCancelled(fid, 2.0))
        assert not _of(out, StartFlight), "nothing comes back after an interrupt"
    assert not s.queue and not s.flights


def test_disabling_calls_its_flights_off_and_enabling_lifts_a_quarantine():
    s = _state("a", "b", straggler_guard=False, batching=False)
    f = _of(_run(s, 1, 1), StartFlight)[0].flight
    out = s.handle(BackendSettings("a", 1.0, enabled=False))
    assert _of(out, CancelFlight) and s.backends[0].status is BackendStatus.DISABLED
    out = s.handle(FlightCancelled(f.id, 1.1))
    assert [x.flight.backend.name for x in _of(out, StartFlight)] == ["b"]
    assert f.items[0].attempts == 0, "called off by the user: no blame"
    s.backends[0].quarantine_until = 1e9
    s.handle(BackendSettings("a", 2.0, enabled=True))
    assert s.backends[0].quarantine_until == 0.0


def test_every_error_kind_has_a_rule():
    assert set(FAILURE_RULES) == set(ErrorKind)


def test_progress_is_clamped_and_does_not_dispatch():
    s = _state("a")
    f = _of(_run(s, 1, 1), StartFlight)[0].flight
    s.handle(FlightProgress(f.id, 10**12, -5))
    assert f.step == 1_000_000 and f.total_steps == 0


# ----- any sequence of events ----------------------------------------------------------------
KINDS = sorted(ErrorKind, key=lambda k: k.value)
ops = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 10**6), st.sampled_from(KINDS)),
               max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, runs=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       allow_idle=st.booleans(), max_attempts=st.integers(1, 4))
def test_any_sequence_delivers_each_image_once_or_fails_its_run_with_a_reason(
        ops, runs, allow_idle, max_attempts):
    s = SwarmState(SwarmConfig(max_attempts=max_attempts, health_every=1.0))
    now = 0.0
    flights: dict[int, object] = {}       # flight id -> Flight, as the I/O layer holds them
    cancelling: set[int] = set()
    checks: list[str] = []
    delivered: Counter = Counter()
    finished: dict[int, object] = {}

    def feed(event) -> None:
        for a in s.handle(event):
            if isinstance(a, StartFlight):
                flights[a.flight.id] = a.flight
            elif isinstance(a, CancelFlight):
                cancelling.add(a.flight_id)
            elif isinstance(a, CheckHealth):
                checks.append(a.name)
            elif isinstance(a, Deliver):
                assert a.result == ("img", a.seed), "an image goes to its own seed"
                assert a.run_id not in finished, "nothing after a run finished"
                delivered[(a.run_id, a.index)] += 1
            elif isinstance(a, FinishRun):
                assert a.run_id not in finished, "a run finishes once"
                finished[a.run_id] = a.error

    for name in ("a", "b", "c"):
        feed(BackendAdded(Backend(name, f"http://{name}", allow_idle=allow_idle), now,
                          _info(name)))
    sizes = {}
    for rid, n in enumerate(runs, 1):
        sizes[rid] = n
        feed(NewRun(rid, "generate", TPL, tuple(range(rid * 100, rid * 100 + n)), now))

    for op, r, kind in ops:
        now += 0.05 + (r % 100) / 50
        live = sorted(flights)
        if op <= 3 and live:  # a flight ends: success, failure of any kind, or cancelled
            fid = live[r % len(live)]
            f = flights.pop(fid)
            cancelling.discard(fid)
            if op == 0:
                feed(_ok(f, now))
            elif op == 3 and fid in cancelling:
                feed(FlightCancelled(fid, now))
            else:
                feed(FlightFailed(fid, kind, f"failed: {kind.value}", now,
                                  retry_after_s=(r % 5) or None))
        elif op == 4 and checks:
            name = checks.pop(r % len(checks))
            if r % 3:
                feed(HealthChecked(name, _info(name), now))
            else:
                feed(HealthFailed(name, kind, "no answer", now))
        elif op == 5:
            name = "abc"[r % 3]
            feed(BackendSettings(name, now, enabled=bool(r % 4)))
        elif op == 6 and r % 10 == 0:
            feed(InterruptAll(now))
        else:
            feed(Tick(now))

    # then the world heals: every backend answers, every job succeeds
    for name in "abc":
        feed(BackendSettings(name, now, enabled=True))
    for _ in range(200):
        now += 2.0
        for name in list(dict.fromkeys(checks)):
            feed(HealthChecked(name, _info(name), now))
        checks.clear()
        for fid in sorted(flights):
            f = flights.pop(fid)
            if fid in cancelling:
                cancelling.discard(fid)
                feed(FlightCancelled(fid, now))
            else:
                feed(_ok(f, now))
        feed(Tick(now))
        if len(finished) == len(sizes) and not flights:
            break
    assert len(finished) == len(sizes), "every run ends: nothing is left stuck"
    assert all(v == 1 for v in delivered.values()), "each image is delivered once at most"
    for rid, n in sizes.items():
        err = finished[rid]
        if err is None:
            assert sum(delivered[(rid, i)] for i in range(n)) == n, "a finished run is whole"
        else:
            assert str(err), "a failed run says why"
    assert not s.queue and not s.runs


@pytest.mark.parametrize("kind", [k for k in ErrorKind if FAILURE_RULES[k].blame])
def test_a_blamed_failure_moves_the_image_to_another_backend(kind):
    s = _state("a", "b", straggler_guard=False, batching=False)
    f = _of(_run(s, 1, 1), StartFlight)[0].flight
    assert f.backend.name == "a"
    out = s.handle(FlightFailed(f.id, kind, "no", 1.0))
    again = _of(out, StartFlight) or _of(s.handle(Tick(1.5)), StartFlight)
    assert [x.flight.backend.name for x in again] == ["b"], kind
