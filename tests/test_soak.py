"""Soak: 300 small images over three worker processes behind flaky proxies, one worker killed
and restarted twice. Every image comes back exactly once, worker memory stays flat, and
nothing (threads, processes) outlives the swarm.

The figures are printed and written to ``<pytest basetemp>/soak-figures.json``.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from colabswarm.swarm import Swarm
from tests.conftest import WorkerProcess
from tests.tcpproxy import TcpProxy

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RUNS = [("a fox", 0), ("a lighthouse", 10_000), ("a boat", 20_000)]  # prompt, first seed
PER_RUN = 100  # 3 runs x 100 = 300 images
KILL_AT = (70, 170)  # delivered images at which worker w0 is killed (then restarted)
DROP_P = 0.2  # chance that a new connection through a proxy is cut mid-request
RSS_SLACK = (0.15, 40 * 2**20)  # growth allowed: 15% or 40 MB, whichever is larger


def _port_outside_ephemeral_range() -> int:
    """A free port the kernel never hands out as a client's source port, so that a restarted
    worker can always bind its old port again (a connection could hold an ephemeral one)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(low - 12000, 1024), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _status(s: Swarm, name: str) -> str:
    return next(b["status"] for b in s.backends if b["name"] == name)


@pytest.mark.timeout(600)
def test_soak_300_images_under_drops_and_kills(tmp_path_factory):
    base_threads = {t.ident for t in threading.enumerate()}
    me = psutil.Process()
    procs: list[WorkerProcess] = []
    spares: list[WorkerProcess] = []
    proxies: list[TcpProxy] = []
    swarm: Swarm | None = None
    figures: dict = {}
    try:
        starters = [WorkerProcess(name=f"w{i}", env=ENV, port=_port_outside_ephemeral_range())
                    for i in range(3)]
        ts = [threading.Thread(target=p.start) for p in starters]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        procs.extend(starters)
        assert all(p.share for p in procs), [p.lines[-3:] for p in procs]
        for i, p in enumerate(procs):
            proxies.append(TcpProxy("127.0.0.1", p.port, drop_probability=0.0, seed=i).start())
        swarm = Swarm(output_dir=None, health_every=0.5, max_batch=1)  # 1 image a job
        for p, proxy in zip(procs, proxies, strict=True):
            swarm.add(proxy.url, token=p.token, name=p.name, allow_idle=True)

        # warm-up (no faults), then each worker's memory is the baseline
        warm = swarm.generate("warm up", images=24, seed=90_000, width=64, height=64, steps=2)
        assert len(warm) == 24
        used = Counter(g.backend for g in warm.images)
        rss_warm = {p.name: _rss(p.pid) for p in procs}

        # the soak: drops on every proxy, tunnel hiccups, and w0 killed twice
        for proxy in proxies:
            proxy.drop_probability = DROP_P
        delivered: Counter = Counter()
        lock = threading.Lock()
        kills: list[int] = []
        restarts: list[float] = []
        restart_errors: list[str] = []
        hiccups = 0
        stop_faults = threading.Event()

        def on_image(run: int):
            def record(g) -> None:
                with lock:
                    delivered[(run, g.seed)] += 1
                    used[g.backend] += 1
            return record

        def kill_and_restart() -> None:
            victim = procs[0]
            victim.kill()
            with lock:
                kills.append(sum(delivered.values()))  # how far the soak was
            time.sleep(0.5)
            back = WorkerProcess(name="w0", token=victim.token, port=victim.port, env=ENV)
            spares.append(back)  # so that cleanup kills it even if start() fails half-way
            try:
                back.start()
            except Exception as exc:  # reported by the main thread, with the worker's output
                restart_errors.append(f"{exc}")
                return
            procs[0] = back
            restarts.append(time.monotonic())

        def faults() -> None:
            nonlocal hiccups
            rng = random.Random(7)
            killer: threading.Thread | None = None
            while not stop_faults.wait(0.4):
                with lock:
                    n = sum(delivered.values())
                if (killer is None or not killer.is_alive()) and len(kills) < len(KILL_AT) \
                        and n >= KILL_AT[len(kills)]:
                    killer = threading.Thread(target=kill_and_restart, name="soak-kill")
                    killer.start()
                proxy = rng.choice(proxies)
                hiccups += 1 if proxy.close_connections() else 0
            if killer is not None:
                killer.join(60)

        fault_thread = threading.Thread(target=faults, name="soak-faults")
        fault_thread.start()
        t0 = time.monotonic()
        futures = [
            swarm.submit_generate(prompt, images=PER_RUN, seed=seed, width=64, height=64,
                                  steps=2, on_image=on_image(i))
            for i, (prompt, seed) in enumerate(RUNS)
        ]
        try:
            results = [f.result(timeout=400) for f in futures]
            _wait(lambda: len(kills) == len(KILL_AT) or sum(delivered.values()) < KILL_AT[-1],
                  30, "kills")
        finally:
            stop_faults.set()
            fault_thread.join(60)
        elapsed = time.monotonic() - t0
        for proxy in proxies:
            proxy.drop_probability = 0.0

        assert not restart_errors, restart_errors
        # w0 came back after its last restart and is used again
        _wait(lambda: _status(swarm, "w0") == "running", 60, "w0 back")
        after = swarm.generate("after", images=12, seed=50_000, width=64, height=64, steps=2)
        assert len(after) == 12
        rss_end = {p.name: _rss(p.pid) for p in procs}

        expected = {(i, seed + k) for i, (_, seed) in enumerate(RUNS) for k in range(PER_RUN)}
        lost = expected - set(delivered)
        dup = {k: n for k, n in delivered.items() if n > 1}
        extra = set(delivered) - expected
        figures = {
            "jobs": len(expected),
            "seconds": round(elapsed, 1),
            "proxy_drops": sum(p.drops for p in proxies),
            "proxy_connections": sum(p.connections for p in proxies),
            "tunnel_hiccups": hiccups,
            "kills": len(kills),
            "delivered_at_kills": kills,
            "restarts": len(restarts),
            "lost": len(lost),
            "duplicated": len(dup),
            "images_by_backend": dict(sorted(used.items())),
            "rss_mb_after_warmup": {k: round(v / 2**20, 1) for k, v in rss_warm.items()},
            "rss_mb_at_end": {k: round(v / 2**20, 1) for k, v in rss_end.items()},
        }
        for i, r in enumerate(results):
            seed = RUNS[i][1]
            assert [g.seed for g in r.images] == list(range(seed, seed + PER_RUN))
            assert all(g.image.size == (64, 64) for g in r.images)
        assert not lost and not dup and not extra, figures
        assert len(kills) == len(restarts) == 2, figures
        assert kills[0] < len(expected), "w0 was killed mid-run at least once"
        assert figures["proxy_drops"] + hiccups > 0, "faults were injected"
        # the workers that lived through the soak: memory flat after warm-up
        for name in ("w1", "w2"):
            grew = rss_end[name] - rss_warm[name]
            allowed = max(RSS_SLACK[0] * rss_warm[name], RSS_SLACK[1])
            assert grew < allowed, f"{name} grew {grew / 2**20:.1f} MB: {figures}"
        # the restarted one is a fresh process: no bigger than the first one was
        assert rss_end["w0"] < rss_warm["w0"] + max(RSS_SLACK[0] * rss_warm["w0"],
                                                    RSS_SLACK[1]), figures
    finally:
        if swarm is not None:
            swarm.close()
        for proxy in proxies:
            proxy.stop()
        for p in procs + spares:
            p.kill()

    # nothing outlives the swarm: threads back to the baseline, no child processes
    def leftovers() -> list[str]:
        return [t.name for t in threading.enumerate()
                if t.ident not in base_threads and t.is_alive()]

    try:
        _wait(lambda: not leftovers(), 15, "threads to end")
    except AssertionError:
        raise AssertionError(f"threads left after swarm.close(): {leftovers()}") from None
    _wait(lambda: not me.children(recursive=True), 15, "child processes to end")
    figures["threads_left"] = leftovers()
    figures["children_left"] = [c.pid for c in me.children(recursive=True)]
    out = Path(tmp_path_factory.getbasetemp()) / "soak-figures.json"
    out.write_text(json.dumps(figures, indent=1))
    print("\nsoak:", json.dumps(figures), "->", out)
