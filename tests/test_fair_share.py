"""Fair shares of one worker between tokens: the pure rule (fairshare.FairQueue), the honest
queue position a job's status reports, and two controllers with different guest tokens on a
real worker process, one queuing 40 images and one 4 shortly after."""

from __future__ import annotations

import threading

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from colabswarm.backend.fairshare import FairQueue
from colabswarm.backend.serve import start_worker
from colabswarm.swarm import Swarm
from tests.conftest import wait_until


def _drain(q: FairQueue) -> list:
    out = []
    while q:
        out.append(q.pop())
    return out


def test_two_owners_take_turns_by_images_and_each_keeps_its_own_order():
    q: FairQueue[str] = FairQueue()
    for i in range(6):
        q.push(f"a{i}", "alice", 8)       # a long run queued first
    q.push("b0", "bob", 4)
    q.push("b1", "bob", 4)
    order = _drain(q)
    # bob's 8 images weigh as much as one of alice's 8-image jobs: b0 and b1 come right after
    # alice's first job, not after all six
    assert order == ["a0", "b0", "b1", "a1", "a2", "a3", "a4", "a5"]
    assert [x for x in order if x[0] == "a"] == [f"a{i}" for i in range(6)]


def test_weights_give_a_token_more_of_the_gpu():
    q: FairQueue[str] = FairQueue()
    q.set_weight("alice", 2.0)
    for i in range(6):
        q.push(f"a{i}", "alice", 1)
        q.push(f"b{i}", "bob", 1)
    order = _drain(q)[:9]
    assert sum(x.startswith("a") for x in order) == 6  # two of every three
    assert sum(x.startswith("b") for x in order) == 3


def test_an_idle_token_saves_up_no_turns():
    q: FairQueue[str] = FairQueue()
    for i in range(4):
        q.push(f"a{i}", "alice", 1)
    assert _drain(q) == ["a0", "a1", "a2", "a3"]   # bob had nothing queued all along
    for i in range(3):
        q.push(f"a{i + 4}", "alice", 1)
    q.push("b0", "bob", 1)
    q.push("b1", "bob", 1)
    # bob is not owed four turns for the time he was away: they alternate
    assert _drain(q) == ["a4", "b0", "a5", "b1", "a6"]


def test_fifo_mode_is_first_come_first_served():
    q: FairQueue[str] = FairQueue(fair=False)
    for i in range(3):
        q.push(f"a{i}", "alice", 8)
    q.push("b0", "bob", 1)
    assert _drain(q) == ["a0", "a1", "a2", "b0"]


ops = st.lists(st.one_of(
    st.tuples(st.just("push"), st.sampled_from(["owner", "alice", "bob"]),
              st.integers(1, 16)),
    st.tuples(st.just("pop"), st.none(), st.none()),
    st.tuples(st.just("remove"), st.none(), st.integers(0, 40)),
    st.tuples(st.just("weight"), st.sampled_from(["alice", "bob"]), st.integers(1, 4)),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_the_order_a_status_reports_is_the_order_jobs_run(seq):
    """order() (what queue_position is read from) always equals what pop() then does."""
    q: FairQueue[int] = FairQueue()
    n = 0
    for op, owner, arg in seq:
        if op == "push":
            q.push(n, owner, arg)
            n += 1
        elif op == "pop" and q:
            q.pop()
        elif op == "remove":
            q.remove(arg)
        elif op == "weight":
            q.set_weight(owner, float(arg))
        predicted = q.order()
        assert [q.position(x) for x in predicted] == list(range(1, len(predicted) + 1))
    predicted = list(q.order())
    assert _drain(q) == predicted


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_queue_positions_are_honest_across_tokens():
    """With the engine busy, alice queues 4 jobs and bob 2: bob's first job is second in line,
    not sixth, every status says where its job really is, and the jobs then start in exactly
    that order."""
    h = start_worker("tiny", name="fair-positions")
    try:
        alice = h.add_guest("alice").split("#token=")[1]
        bob = h.add_guest("bob").split("#token=")[1]
        job = {"prompt": "p", "width": 64, "height": 64, "steps": 2, "seeds": [1, 2]}
        with httpx.Client(base_url=h.local_url, timeout=60) as http:
            for _ in range(5):  # a long owner's job holds the engine while the queue is read
                long = http.post("/v1/jobs", headers=_auth(h.token), json={
                    **job, "width": 512, "height": 512, "steps": 40, "seeds": [0]}).json()
                wait_until(lambda jid=long["id"]: http.get(f"/v1/jobs/{jid}", headers=_auth(
                    h.token)).json()["state"] != "queued", 30, "the long job to start")
                ids = [(http.post("/v1/jobs", headers=_auth(alice), json=job).json()["id"],
                        alice) for _ in range(4)]
                ids += [(http.post("/v1/jobs", headers=_auth(bob), json=job).json()["id"],
                         bob) for _ in range(2)]
                positions = {jid: http.get(f"/v1/jobs/{jid}", headers=_auth(tok)).json()[
                    "queue_position"] for jid, tok in ids}
                still = http.get(f"/v1/jobs/{long['id']}", headers=_auth(h.token)).json()
                if still["state"] == "running":  # the queue did not move while it was read
                    break
                for jid, tok in ids:
                    http.delete(f"/v1/jobs/{jid}", headers=_auth(tok))
            else:
                raise AssertionError("the long job never outlasted reading six statuses")
            http.post(f"/v1/jobs/{long['id']}/interrupt", headers=_auth(h.token))
            assert sorted(positions.values()) == [1, 2, 3, 4, 5, 6]
            by_pos = [jid for jid, _ in sorted(ids, key=lambda x: positions[x[0]])]
            owners = ["alice" if tok == alice else "bob" for jid, tok in
                      sorted(ids, key=lambda x: positions[x[0]])]
            assert owners == ["alice", "bob", "alice", "bob", "alice", "alice"]
            wait_until(lambda: all(h.worker.jobs.get(jid).state == "done" for jid, _ in ids),
                       60, "every job to finish")
            started = sorted((jid for jid, _ in ids), key=lambda j: h.worker.jobs.get(j).started)
            assert started == by_pos
    finally:
        h.stop()


def test_a_short_run_is_not_starved_by_a_long_one_on_a_shared_worker(spawn):
    """Two controllers, each with its own guest token, on one real worker process: A queues
    40 images (20 jobs of 2), then B queues 4 (one job). B's images come back while most of
    A's are still to be made; with one token for both (first come, first served, as before
    guest tokens) B would wait behind all of A's queued jobs. Orders of completion only:
    timings are in bench/bench_fair_share.py."""
    proc = spawn("--model", "tiny", "--guest", "a", "--guest", "b", name="shared")
    wait_until(lambda: sum(ln.startswith("guest ") for ln in proc.lines) == 2, 10,
               "the guests' share strings")
    shares = {ln.split()[1]: ln.rsplit(" ", 1)[1] for ln in proc.lines if ln.startswith("guest ")}
    a = Swarm(output_dir=None, max_batch=2, copies=False, health_every=0.5)
    b = Swarm(output_dir=None, max_batch=4, copies=False, health_every=0.5)
    arrivals: list[str] = []
    lock = threading.Lock()

    def note(who: str):
        def on_image(_g) -> None:
            with lock:
                arrivals.append(who)
        return on_image

    try:
        a.add(shares["a"], name="gpu", slots=20)
        b.add(shares["b"], name="gpu", slots=20)
        size = {"width": 128, "height": 128, "steps": 4}
        fa = a.submit_generate("long run", 40, seed=1, on_image=note("a"), save=False, **size)
        with httpx.Client(base_url=f"http://127.0.0.1:{proc.port}", timeout=30) as http:
            def depth() -> int:
                return http.get("/v1/info", headers=_auth(proc.token)).json()["queue_depth"]
            wait_until(lambda: depth() >= 10, 60, "A's jobs to queue on the worker")
        with lock:
            a_before_b = arrivals.count("a")
        fb = b.submit_generate("short run", 4, seed=2, on_image=note("b"), save=False, **size)
        rb = fb.result(timeout=300)
        with lock:
            a_when_b_done = arrivals.count("a")
        ra = fa.result(timeout=300)
        assert len(rb.images) == 4 and len(ra.images) == 40
        assert a_before_b <= 20  # B joined while at least 10 of A's jobs were queued
        # first come, first served would have made all of A's queued images (>= 20) first
        assert a_when_b_done - a_before_b <= 8, (a_before_b, a_when_b_done, arrivals)
        assert arrivals.index("b") < len(arrivals) - 1 - arrivals[::-1].index("a")
        last_b = len(arrivals) - 1 - arrivals[::-1].index("b")
        assert arrivals[last_b + 1:].count("a") >= 10, arrivals
    finally:
        a.close()
        b.close()
