"""idle_stop: a worker that no controller contacts stops itself (and its tunnel), after a
warning in its log and panel; one that a controller uses keeps serving. Real worker processes
for the stop itself; the decision and the duration parser are pure."""

from __future__ import annotations

import time

import httpx
import pytest

from colabswarm.backend.serve import idle_verdict, parse_duration, start_worker
from colabswarm.errors import InvalidRequest
from colabswarm.swarm import Swarm
from colabswarm.widgets import WorkerPanel
from tests.conftest import WorkerProcess, start_all, wait_until


@pytest.mark.parametrize("text, seconds", [
    ("30m", 1800.0), ("1h", 3600.0), ("1h30m", 5400.0), ("90s", 90.0), ("90", 90.0),
    (" 2m 30s ", 150.0), (45, 45.0), ("off", None), (None, None), ("0", None), (0, None),
])
def test_durations_read_as_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30 minutes", "m", "-5m", "1d", "0.5"])
def test_a_duration_that_cannot_be_read_says_how_to_write_one(text):
    with pytest.raises(InvalidRequest, match="30m|between 1 s"):
        parse_duration(text)


def test_the_verdict_warns_a_fifth_before_and_stops_on_time():
    assert idle_verdict(100.0, 0.0, None) == ("ok", None)
    assert idle_verdict(1000.0, 0.0, 1800.0) == ("ok", 800.0)
    assert idle_verdict(1500.0, 0.0, 1800.0) == ("warn", 300.0)  # 5 min before 30 min
    assert idle_verdict(7000.0, 0.0, 7200.0)[0] == "warn"         # at most 5 min before
    assert idle_verdict(6800.0, 0.0, 7200.0)[0] == "ok"
    assert idle_verdict(1800.0, 0.0, 1800.0) == ("stop", 0.0)
    assert idle_verdict(1800.0, 100.0, 1800.0)[0] == "warn"       # contact moves it on


def test_an_uncontacted_worker_stops_itself_and_a_used_one_keeps_serving(worker_procs):
    lonely = WorkerProcess("--model", "tiny", "--idle-stop", "6s", name="lonely")
    used = WorkerProcess("--model", "tiny", "--idle-stop", "6s", name="used")
    worker_procs.extend([lonely, used])
    start_all([lonely, used])
    swarm = Swarm(output_dir=None, health_every=1.0)
    try:
        swarm.add(used.share, name="used")
        with httpx.Client(base_url=f"http://127.0.0.1:{lonely.port}", timeout=5) as http:
            def stopped() -> bool:  # probed all along: a liveness probe is not a controller
                if lonely.proc.poll() is not None:
                    return True
                try:
                    assert http.get("/healthz").status_code == 200
                except httpx.TransportError:  # stopping right now
                    pass
                return False

            wait_until(stopped, 30, "the lonely worker to stop")
        assert lonely.proc.returncode == 0
        text = "\n".join(lonely.lines)
        assert "WARNING No controller has contacted this worker for" in text
        assert "stopped: idle: no controller contacted this worker for 6s" in text
        assert text.index("No controller has contacted") < text.index("stopped: idle")
        # the used one is well past its 6 s and still serves
        assert used.proc.poll() is None
        made = swarm.generate("still here", images=1, seed=1, width=64, height=64, steps=2)
        assert len(made.images) == 1
    finally:
        swarm.close()
    # once its controller is gone, it stops too
    wait_until(lambda: used.proc.poll() is not None, 30, "the used worker to stop after")
    assert used.proc.returncode == 0


def test_the_worker_panel_warns_before_the_idle_stop_and_says_why_it_stopped():
    h = start_worker(name="panel-idle", idle_stop=2.5, simulate_speed=1.0)
    try:
        panel = WorkerPanel(h, refresh_every=None)
        assert "stops itself in" in panel.guests.idle.value
        wait_until(lambda: h.idle_warning is not None, 10, "the warning")
        panel.refresh()
        assert "it stops itself (and its tunnel) in" in panel.guests.idle.value
        assert any("No controller has contacted" in ln.message and ln.level == "WARNING"
                   for ln in h.logs())
        wait_until(lambda: not h.running, 10, "the stop")
        panel.refresh()
        assert "Stopped: idle" in panel.guests.idle.value
        assert h.stopped_reason.startswith("idle")
        panel.close()
    finally:
        h.stop()


def test_a_request_with_the_token_puts_the_idle_stop_off():
    h = start_worker(name="kept", idle_stop=2.0, simulate_speed=1.0)
    try:
        with httpx.Client(base_url=h.local_url, timeout=5,
                          headers={"Authorization": f"Bearer {h.token}"}) as http:
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:  # 2.5 idle windows, a request every 0.5 s
                assert http.get("/v1/info").status_code == 200
                time.sleep(0.5)
        assert h.running and h.stopped_reason is None
        wait_until(lambda: not h.running, 10, "the stop once the requests end")
    finally:
        h.stop()


def test_giving_the_runtime_back_is_colab_only():
    from colabswarm.backend.serve import release_colab_runtime

    assert release_colab_runtime() is False  # not on Colab: nothing to give back
