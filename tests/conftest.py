"""Shared fixtures: real workers (in-process threads or subprocesses) on loopback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SHARE_RE = re.compile(r"^(https?://\S+#token=[A-Za-z0-9_\-]+)$")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tiny models are built once per test session in a temporary cache, never in ~/.cache."""
    if not os.environ.get("COLABSWARM_CACHE"):
        os.environ["COLABSWARM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture
def worker():
    """A tiny-model worker served from a background thread of this process."""
    from colabswarm.backend.serve import start_worker

    handle = start_worker("tiny", name="thread-worker")
    yield handle
    handle.stop()


class WorkerProcess:
    """A worker in its own process, as on a separate machine; kill() is a real SIGKILL."""

    def __init__(self, *args: str, name: str = "proc", token: str | None = None,
                 port: int = 0, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.args, self.name, self.token, self.port = list(args), name, token, port
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd or ROOT
        if cwd is not None:  # this checkout's code, wherever the worker runs
            self.env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(ROOT), self.env.get("PYTHONPATH")) if p)
        self.proc: subprocess.Popen[str] | None = None
        self.share = ""
        self.lines: list[str] = []

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        cmd = [sys.executable, "-m", "colabswarm", "worker", "--port", str(self.port),
               "--name", self.name, *self.args]
        if self.token:
            cmd += [f"--token={self.token}"]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
            cwd=self.cwd,
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip())
            m = _SHARE_RE.match(line.strip())
            if m:
                self.share = m.group(1)
                self.token = self.share.split("#token=")[1]
                self.port = int(self.share.split("#")[0].rsplit(":", 1)[1])
                import threading

                threading.Thread(target=self._drain, daemon=True).start()
                return self
        self.kill()
        raise RuntimeError("worker did not print a share string:\n" + "\n".join(self.lines))

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_until(cond, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll cond() until it is true; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_all(procs: list[WorkerProcess]) -> list[WorkerProcess]:
    """Start worker processes in parallel (each imports torch: minutes if done one by one)."""
    import threading

    threads = [threading.Thread(target=p.start) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = [p.name for p in procs if not p.share]
    if missing:
        for p in procs:
            p.kill()
        raise RuntimeError(f"workers did not start: {missing}")
    return procs


@pytest.fixture
def worker_procs() -> Iterator[list[WorkerProcess]]:
    """Collects WorkerProcess objects a test starts, and makes sure none outlive it."""
    procs: list[WorkerProcess] = []
    yield procs
    for p in procs:
        p.kill()


@pytest.fixture
def spawn(worker_procs: list[WorkerProcess]):
    def _spawn(*args: str, **kw) -> WorkerProcess:
        p = WorkerProcess(*args, **kw)
        worker_procs.append(p)
        return p.start()

    return _spawn
