"""All GPUs of one machine: one worker process per GPU (CPU workers here), as CI can run it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from colabswarm.swarm import Swarm
from colabswarm.swarm.local import detect_gpus, start_local_workers
from tests.conftest import wait_until


def _gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                   for p in pids)


def test_two_local_workers_start_serve_crash_restart_and_stop(tmp_path):
    swarm = Swarm(output_dir=None, health_every=0.3)
    group = start_local_workers([0, 1], "tiny", swarm, env={"OMP_NUM_THREADS": "1"})
    pids = [w.pid for w in group]
    try:
        names = [b["name"] for b in swarm.backends]
        assert names == [w.name for w in group] and len(names) == 2, "registered in GPU order"
        assert all(b["status"] == "running" for b in swarm.backends)
        r = swarm.generate("local", images=8, seed=0, width=64, height=64, steps=2)
        assert {g.backend for g in r.images} == set(names)
        assert "Share string" in group.logs(), "worker logs are readable from the controller"
        assert "#token=<hidden>" in group.logs() and group[0].token not in group.logs()
        for w in group:  # the token never sits on a world-readable command line
            cmdline = " ".join(psutil.Process(w.pid).cmdline())
            assert "--name" in cmdline and w.token not in cmdline
            if not detect_gpus():  # CPU workers are never shown a GPU their owner hid
                visible = psutil.Process(w.pid).environ().get("CUDA_VISIBLE_DEVICES")
                assert visible == os.environ.get("CUDA_VISIBLE_DEVICES"), visible

        os.kill(group[1].pid, signal.SIGKILL)
        wait_until(lambda: group.crashed() == [group[1]], what="crash noticed")
        assert group[1].returncode == -signal.SIGKILL
        wait_until(lambda: swarm.backends[1]["status"] == "errored", what="swarm shows it")
        r = swarm.generate("one left", images=3, seed=50, width=64, height=64, steps=2)
        assert {g.backend for g in r.images} == {names[0]}

        group[1].restart()
        pids.append(group[1].pid)
        assert group.crashed() == []
        wait_until(lambda: swarm.backends[1]["status"] == "running", what="back after restart")
        # enough work that one worker alone would clearly be slower than both
        r = swarm.generate("both again", images=24, seed=90, width=128, height=128, steps=8)
        assert {g.backend for g in r.images} == set(names)
    finally:
        swarm.close()
        group.stop()
    wait_until(lambda: _gone(pids), timeout=15, what="no leftover worker processes")


def test_workers_exit_when_the_controller_is_killed(tmp_path):
    """A kernel killed with -9 leaves no worker behind (they watch their parent)."""
    script = tmp_path / "controller.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from colabswarm.swarm.local import start_local_workers
        group = start_local_workers([0, 1], "tiny", env={"OMP_NUM_THREADS": "1"})
        print(" ".join(str(w.pid) for w in group), flush=True)
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    finally:
        proc.kill()
        proc.wait(10)
    wait_until(lambda: _gone(pids), timeout=20, what="workers to notice their parent died")


def test_cli_gpus_flag_starts_one_worker_per_device(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "colabswarm", "worker", "--gpus", "0,1", "--model", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    shares: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while len(shares) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "#token=" in line:
                shares.append(line.strip())
        assert len(shares) == 2, "one share string per worker"
        with Swarm(output_dir=None) as swarm:
            for s in shares:
                swarm.add(s)
            assert len(swarm.generate("cli", images=2, seed=1, width=64, height=64,
                                      steps=2)) == 2
    finally:
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("worker --gpus did not stop on SIGINT")
    wait_until(lambda: _gone(children), timeout=20, what="child workers stopped")


@pytest.mark.parametrize("visible, gpus", [("", []), ("-1", []), ("1,3", [1, 3]),
                                           ("0,-1,2", [0]), (" 2 ", [2])])
def test_hidden_gpus_stay_hidden(monkeypatch, visible, gpus):
    """CUDA_VISIBLE_DEVICES is obeyed (nvidia-smi lists every GPU regardless): on a GPU
    machine with the GPUs hidden, local workers are CPU workers named local0, local1..."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert detect_gpus() == gpus

