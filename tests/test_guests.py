"""Guest tokens on a real worker process: what a guest may and may not do, revocation, the
hourly limit (refused with the reset time, nothing already made lost), the owner's view of
who used the GPU, tokens kept out of logs, and the guests file (0600, atomic, refused when
loose). Plus the token book's constant-time lookup and the pure limit checks."""

from __future__ import annotations

import os
import re
import stat

import httpx
import pytest

from colabswarm.backend import guests as guests_mod
from colabswarm.backend.guests import TokenBook, Who, guest_refusal, hour_window
from colabswarm.backend.serve import start_worker
from colabswarm.errors import (
    AuthError,
    Busy,
    ColabSwarmError,
    ErrorKind,
    Forbidden,
    InvalidRequest,
    JobInterrupted,
)
from colabswarm.protocol import ErrorDetail, GuestLimits, Info, JobRequest
from colabswarm.swarm import Swarm
from tests.conftest import wait_until

SIZE = {"width": 64, "height": 64, "steps": 2}
JOB = {"prompt": "p", **SIZE}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _guest_shares(proc) -> dict[str, str]:
    wait_until(lambda: sum(ln.startswith("guest ") for ln in proc.lines) >= 2, 10,
               "the guests' share strings")
    return {ln.split()[1]: ln.rsplit(" ", 1)[1] for ln in proc.lines if ln.startswith("guest ")}


def _detail(r: httpx.Response, kind: ErrorKind) -> str:
    d = ErrorDetail.model_validate(r.json())
    assert d.kind is kind, r.text
    return d.detail


@pytest.fixture
def shared(spawn):
    """A worker process with two guests: alice (3 images an hour) and bob (no limits)."""
    proc = spawn("--model", "tiny", "--guest", "alice:3", "--guest", "bob", name="shared")
    shares = _guest_shares(proc)
    tokens = {n: s.split("#token=")[1] for n, s in shares.items()}
    http = httpx.Client(base_url=f"http://127.0.0.1:{proc.port}", timeout=60)
    yield proc, shares, tokens, http
    http.close()


def test_a_guest_generates_and_cannot_touch_others_jobs_or_the_owners_routes(shared):
    proc, shares, tok, http = shared
    swarm = Swarm(output_dir=None)
    try:
        swarm.add(shares["bob"], name="friend")
        made = swarm.generate("a red fox", images=2, seed=5, **SIZE)
        assert [g.seed for g in made.images] == [5, 6]
        assert swarm.backends[0]["role"] == "guest"
    finally:
        swarm.close()
    owners = http.post("/v1/jobs", headers=_auth(proc.token),
                       json={**JOB, "width": 256, "height": 256, "steps": 30,
                             "seeds": [1]}).json()
    # bob may not read, fetch, stop or drop the owner's job: 403 with the reason
    for method, path in (("GET", f"/v1/jobs/{owners['id']}"),
                         ("POST", f"/v1/jobs/{owners['id']}/interrupt"),
                         ("DELETE", f"/v1/jobs/{owners['id']}"),
                         ("GET", f"/v1/jobs/{owners['id']}/images/0"),
                         ("GET", f"/v1/jobs/{owners['id']}/images")):
        r = http.request(method, path, headers=_auth(tok["bob"]))
        assert r.status_code == 403, (method, path, r.text)
        assert "only its own jobs" in _detail(r, ErrorKind.FORBIDDEN)
    # nor do any of the owner's actions
    for method, path, what in (("POST", "/v1/free", "free the GPU's memory"),
                               ("POST", "/v1/interrupt", "interrupt every job"),
                               ("GET", "/v1/logs", "read the worker's log"),
                               ("GET", "/v1/guests", "list the guests"),
                               ("DELETE", "/v1/guests/alice", "revoke guests")):
        r = http.request(method, path, headers=_auth(tok["bob"]))
        assert r.status_code == 403, (method, path, r.text)
        detail = _detail(r, ErrorKind.FORBIDDEN)
        assert f"Only the worker's owner may {what}" in detail and "'bob'" in detail
    r = http.post("/v1/guests", headers=_auth(tok["bob"]), json={"name": "mallory"})
    assert r.status_code == 403
    # the owner's job was untouched by all that
    status = http.get(f"/v1/jobs/{owners['id']}", headers=_auth(proc.token)).json()
    assert status["state"] in ("queued", "running", "done"), status
    # what bob sees of the worker: its own limits and use, nobody else's, no controllers
    info = Info.model_validate(http.get("/v1/info", headers=_auth(tok["bob"])).json())
    assert info.role == "guest" and [u.name for u in info.usage] == ["bob"]
    assert info.usage[0].images == 2 and info.controllers == []
    # the owner sees everyone, and the controllers that came by
    owner = Info.model_validate(http.get("/v1/info", headers=_auth(proc.token)).json())
    assert owner.role == "owner"
    rows = {u.name: u for u in owner.usage}
    assert set(rows) == {"owner", "alice", "bob"}
    assert rows["bob"].images == 2 and rows["bob"].gpu_seconds > 0
    assert rows["bob"].last_seen is not None and rows["alice"].last_seen is None
    assert any(c.token == "bob" and re.fullmatch("[0-9a-f]{12}", c.client)
               for c in owner.controllers)
    # and no token, guest's or owner's, is in the worker's log or its printed output
    lines = http.get("/v1/logs", headers=_auth(proc.token)).json()["lines"]
    text = "\n".join(ln["message"] for ln in lines)
    assert "guest 'alice' added" in text and "images(s)" not in text
    assert "2 txt2img image(s) 64x64 for bob" in text
    printed = [ln for ln in proc.lines if "#token=" not in ln]  # all but the share strings
    for secret in (*tok.values(), proc.token):
        assert secret not in text and secret[4:20] not in text
        assert not any(secret in ln for ln in printed)


def test_a_revoked_guest_gets_401_on_its_next_request(shared):
    proc, shares, tok, http = shared
    swarm = Swarm(output_dir=None, health_every=0.3)
    try:
        swarm.add(shares["bob"], name="friend")
        assert http.get("/v1/info", headers=_auth(tok["bob"])).status_code == 200
        # the owner takes bob's token back, from a controller holding the admin token
        owner = Swarm(output_dir=None)
        try:
            owner.add(proc.share, name="mine")
            owner.backend("mine").revoke("bob")
            assert "bob" not in [u.name for u in owner.backend("mine").usage()
                                 if not u.revoked]
        finally:
            owner.close()
        r = http.get("/v1/info", headers=_auth(tok["bob"]))
        assert r.status_code == 401 and "revoked" in _detail(r, ErrorKind.UNAUTHORIZED)
        r = http.post("/v1/jobs", headers=_auth(tok["bob"]), json={**JOB, "seeds": [1]})
        assert r.status_code == 401
        # bob's controller sees it at its next health check: errored, with the reason
        wait_until(lambda: swarm.backends[0]["status"] == "errored", 10, "bob's backend "
                   "to turn red")
        assert "refused the token" in swarm.backends[0]["reason"]
        # alice is unaffected
        assert http.get("/v1/info", headers=_auth(tok["alice"])).status_code == 200
    finally:
        swarm.close()


def test_a_guest_over_its_hourly_limit_is_refused_with_the_reset_time_and_keeps_its_images(
        shared):
    proc, shares, tok, http = shared
    swarm = Swarm(output_dir=None, max_batch=1)
    got = []
    try:
        swarm.add(shares["alice"], name="friend")
        future = swarm.submit_generate("a red fox", 5, seed=10, on_image=got.append,
                                       save=False, **SIZE)
        # three are made; the fourth is refused: the backend is paused until the hour frees
        wait_until(lambda: len(got) == 3 and any("is busy" in m and "images_per_hour 3" in m
                                                 for _, _, m in swarm.logs), 60, "the refusal")
        assert not future.done()
        snap = swarm.backends[0]
        assert snap["status"] == "running", snap  # paused, not errored: it is not at fault
        # the wire: 429, kind rate_limited, Retry-After, which limit and when it resets
        r = http.post("/v1/jobs", headers=_auth(tok["alice"]), json={**JOB, "seeds": [99]})
        assert r.status_code == 429
        detail = _detail(r, ErrorKind.RATE_LIMITED)
        assert "images_per_hour 3" in detail
        assert re.search(r"fit from \d\d:\d\d:\d\d UTC, in (59|60) min", detail), detail
        assert 3000 < int(r.headers["retry-after"]) <= 3600
        assert 3000 < r.json()["retry_after_s"] <= 3600
        # the run is called off by its user: the three images made are in its error
        swarm.interrupt()
        with pytest.raises(JobInterrupted) as err:
            future.result(timeout=30)
        assert sorted(g.seed for g in err.value.partial.images) == [10, 11, 12]
        # the guest's own view: 3 of 3 used, and when the oldest stops counting
        info = Info.model_validate(http.get("/v1/info", headers=_auth(tok["alice"])).json())
        assert info.guest.images_last_hour == 3 and info.guest.next_free_at is not None
        assert info.limits.max_images == 3  # its controller batches within its hour
    finally:
        swarm.close()


def test_guests_file_keeps_guests_across_a_restart_and_must_be_private(tmp_path):
    path = tmp_path / "guests.json"
    h = start_worker("tiny", name="keeper", guests_file=str(path))
    try:
        share = h.add_guest("carol", images_per_hour=7, max_steps=9)
        token = share.split("#token=")[1]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in tmp_path.iterdir()] == ["guests.json"]  # no temp file left
        owner = h.token
    finally:
        h.stop()
    h = start_worker("tiny", name="keeper", token=owner, guests_file=str(path))
    try:
        assert h.guests()["carol"].images_per_hour == 7
        with httpx.Client(base_url=h.local_url, timeout=30) as http:
            info = http.get("/v1/info", headers=_auth(token)).json()
            assert info["role"] == "guest" and info["limits"]["max_steps"] == 9
        h.revoke("carol")
        assert "carol" not in path.read_text()
    finally:
        h.stop()
    os.chmod(path, 0o644)
    with pytest.raises(ColabSwarmError, match=r"chmod 600"):
        start_worker("tiny", name="keeper", guests_file=str(path))


def test_a_guests_file_others_can_read_stops_the_cli_with_what_to_do(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    path = tmp_path / "guests.json"
    path.write_text('{"colabswarm_guests": 1, "guests": []}')
    os.chmod(path, 0o640)
    r = subprocess.run([sys.executable, "-m", "colabswarm", "worker", "--simulate-speed", "1",
                        "--port", "0", "--guests-file", str(path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "chmod 600" in r.stderr and "Traceback" not in r.stderr


def test_the_token_book_compares_every_token_every_time(monkeypatch):
    book = TokenBook("owner-token-0123456789")
    tokens = [book.add(f"g{i}") for i in range(5)]
    calls = []
    real = guests_mod.hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(guests_mod.hmac, "compare_digest", counting)
    for given, who in ((b"owner-token-0123456789", "owner"), (tokens[2].encode(), "g2"),
                       (b"nobody-0123456789abcdef", None), (b"", None)):
        calls.clear()
        found = book.identify(given)
        assert (found.name if found else None) == who
        assert len(calls) == 6, "every token is compared, whichever matched (or none)"
    book.revoke("g2")
    assert book.identify(tokens[2].encode()) is None
    assert tokens[2] in book.known_tokens()  # still masked in logs after revocation
    for text in (repr(book), repr(book._entries)):
        assert not any(t in text for t in tokens) and "owner-token-0123456789" not in text


def test_limit_refusals_say_which_limit_and_when_it_resets():
    who = Who("dan", "guest", GuestLimits(images_per_hour=4, max_pixels=128 * 128,
                                          max_steps=10, max_queued=2))
    req = JobRequest(width=64, height=64, steps=4, seeds=[1, 2])

    def refusal(r=req, queued=0, accepted=()):
        return guest_refusal(who, r, queued=queued, accepted=list(accepted), now=5000.0,
                             now_wall=1_800_000_000.0, next_slot_s=12.0)

    assert refusal() is None
    big = refusal(JobRequest(width=256, height=256, steps=4, seeds=[1]))
    assert isinstance(big, InvalidRequest) and "max_pixels 16384" in str(big)
    assert "does not reset" in str(big)
    steps = refusal(JobRequest(width=64, height=64, steps=20, seeds=[1]))
    assert "max_steps 10" in str(steps)
    # 3 images 20 min ago and 1 just now: 2 more fit once the 3 age out, 40 min from now
    hour = refusal(accepted=[(5000.0 - 1200, 3), (4999.0, 1)])
    assert isinstance(hour, Busy) and hour.kind is ErrorKind.RATE_LIMITED
    assert hour.retry_after_s == 2400.0 and "in 40 min 0 s" in str(hour)
    assert "images_per_hour 4" in str(hour) and "UTC" in str(hour)
    assert hour_window([(5000.0 - 3600, 9), (4000.0, 2)], 5000.0) == (2, 7600.0)
    full = refusal(queued=2)
    assert isinstance(full, Busy) and full.kind is ErrorKind.QUEUE_FULL
    assert "max_queued 2" in str(full) and full.retry_after_s == 12.0
    owner = guest_refusal(Who("owner", "owner"), JobRequest(width=4096, height=4096,
                                                             seeds=list(range(16))),
                          queued=999, accepted=[], now=0.0, now_wall=0.0, next_slot_s=1.0)
    assert owner is None


def test_the_controller_reads_a_guest_refusal_by_its_kind():
    """Forbidden and rate_limited come back as the exceptions the swarm's rules expect."""
    from colabswarm.backend.client import error_for
    from colabswarm.swarm.state import FAILURE_RULES, Verdict

    assert isinstance(error_for(ErrorKind.FORBIDDEN, "x"), Forbidden)
    assert isinstance(error_for(ErrorKind.FORBIDDEN, "x"), AuthError)
    assert error_for(ErrorKind.RATE_LIMITED, "x", 60.0).retry_after_s == 60.0
    assert FAILURE_RULES[ErrorKind.RATE_LIMITED].verdict is Verdict.PAUSE
    assert not FAILURE_RULES[ErrorKind.RATE_LIMITED].blame
    assert FAILURE_RULES[ErrorKind.FORBIDDEN].verdict is Verdict.ERRORED


def test_the_worker_panel_adds_copies_and_revokes_guests_and_shows_who_used_the_gpu():
    from colabswarm.widgets import WorkerPanel

    h = start_worker("tiny", name="panel")
    panel = WorkerPanel(h, refresh_every=None)
    g = panel.guests
    try:
        g.name.value, g.images_per_hour.value, g.max_steps.value = "erin", 5, 4
        g.add_button.click()
        share = h.guest_share("erin")
        assert "erin" in g.rows and share in g.rows["erin"].copy.value  # the copy button's
        assert "5 img/h, ≤4 steps" in g.rows["erin"].label.value
        swarm = Swarm(output_dir=None)
        try:
            swarm.add(share, name="w")
            swarm.generate("x", images=2, seed=1, **SIZE)
        finally:
            swarm.close()
        panel.refresh()
        assert re.search(r"<td[^>]*>erin</td><td[^>]*>2</td>", g.usage.value), g.usage.value
        assert "erin" in g.controllers.value and "Idle stop: off" in g.idle.value
        g.name.value = "owner"
        g.add_button.click()
        assert "another name" in g.message.value and "Traceback" not in g.message.value
        token = share.split("#token=")[1]
        g.rows["erin"].revoke.click()
        assert "erin" not in g.rows and "Revoked erin" in g.message.value
        assert "erin (revoked)" in g.usage.value
        with httpx.Client(base_url=h.local_url, timeout=30) as http:
            assert http.get("/v1/info", headers=_auth(token)).status_code == 401
    finally:
        panel.close()
        h.stop()


def test_no_repr_on_the_worker_side_shows_a_guest_token():
    from colabswarm.protocol import GuestGrant

    h = start_worker(name="reprs", simulate_speed=1.0)
    try:
        token = h.add_guest("fay", images_per_hour=2).split("#token=")[1]
        things = (h, h.worker, h.worker.tokens, h.worker.tokens.guests(), h.worker.log,
                  h.worker.usage, h.guests(), h.usage(), GuestGrant(name="fay", token=token))
        for thing in things:
            assert token not in repr(thing) and token[4:16] not in repr(thing), repr(thing)
    finally:
        h.stop()
