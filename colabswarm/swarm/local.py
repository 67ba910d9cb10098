"""All GPUs of one machine: one worker process per GPU, registered in a Swarm in GPU order.

Each process sees one GPU (CUDA_VISIBLE_DEVICES), has its own port and token, and dies with the
controller: the worker watches its parent's pid (``--parent-pid``) and an atexit hook stops
them, so no orphan keeps a GPU busy after the kernel exits, even after a kill -9 of the kernel.
(Linux's parent-death signal is not used: it fires when the *thread* that started the child
ends, which would kill workers started from a notebook's helper thread.)
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ColabSwarmError
from ..protocol import TOKEN_ENV, mask_token, new_token

__all__ = ["LocalWorker", "LocalWorkers", "detect_gpus", "start_local_workers"]

_SHARE_RE = re.compile(r"^(https?://\S+#token=[A-Za-z0-9_\-]+)$")
_ALL: weakref.WeakSet[LocalWorker] = weakref.WeakSet()


def detect_gpus() -> list[int]:
    """GPU indices on this machine, without importing torch in the controller if possible.
    ``CUDA_VISIBLE_DEVICES`` is obeyed: empty or -1 hides every GPU (nvidia-smi lists them all
    the same), a list of indices keeps those."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        parts = [v.strip() for v in visible.split(",") if v.strip()]
        # CUDA stops at the first entry that is not a device (-1 included)
        ids: list[int] = []
        for v in parts:
            if not v.isdigit():
                break
            ids.append(int(v))
        if ids or not parts or parts[0] == "-1":
            return ids
        # GPU UUIDs or MIG names are not mapped to indices: the machine's GPUs, as below
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=10).stdout
            found = [int(m.group(1)) for m in re.finditer(r"^GPU (\d+):", out, re.M)]
            if found:
                return found
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except ImportError:
        return []


@dataclass(eq=False, repr=False)
class LocalWorker:
    """One worker process; its output is kept so the controller can show its log. Its repr
    masks the token and leaves out the share string and the environment."""

    gpu: int | None
    model: list[str]
    name: str
    token: str = field(default_factory=new_token, repr=False)
    port: int = 0
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    share: str | None = None
    log: deque[str] = field(default_factory=lambda: deque(maxlen=500))
    restarts: int = 0

    def __repr__(self) -> str:
        return (f"LocalWorker(name={self.name!r}, gpu={self.gpu!r}, port={self.port}, "
                f"pid={self.pid}, alive={self.alive}, token={mask_token(self.token)!r})")

    def start(self, timeout: float = 300.0) -> str:
        """Start the process and wait for its share string."""
        # the token goes through the environment: a command line is world-readable
        # (/proc/<pid>/cmdline, ps), a process's environment only to its user
        cmd = [sys.executable, "-m", "colabswarm", "worker", "--port", str(self.port),
               "--name", self.name, "--parent-pid", str(os.getpid())]
        for m in self.model:
            cmd += ["--model", m]
        cmd += list(self.extra_args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, TOKEN_ENV: self.token}
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        _ALL.add(self)
        found = threading.Event()
        threading.Thread(target=self._read, args=(self.proc, found), daemon=True,
                         name=f"colabswarm-log-{self.name}").start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(list(self.log)[-15:])
                raise ColabSwarmError(f"Local worker {self.name} did not start "
                                      f"(exit code {self.proc.returncode}):\n{tail}")
        return self.share or ""

    def _read(self, proc: subprocess.Popen[str], found: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            m = _SHARE_RE.match(line)
            if m:
                self.share = m.group(1)
                self.port = int(self.share.split("#", 1)[0].rsplit(":", 1)[1])
                found.set()
                line = line.split("#token=")[0] + "#token=<hidden>"
            self.log.append(line)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def restart(self, timeout: float = 300.0) -> str:
        """Same port and token, so the swarm's entry for it simply comes back."""
        self.stop()
        self.restarts += 1
        return self.start(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class LocalWorkers:
    """The processes started by one start_local_workers call."""

    workers: list[LocalWorker]
    swarm: Any = None

    def __iter__(self):
        return iter(self.workers)

    def __len__(self) -> int:
        return len(self.workers)

    def __getitem__(self, i: int) -> LocalWorker:
        return self.workers[i]

    def crashed(self) -> list[LocalWorker]:
        return [w for w in self.workers if w.proc is not None and not w.alive]

    def logs(self, name: str | None = None, lines: int = 50) -> str:
        out = []
        for w in self.workers:
            if name in (None, w.name):
                out += [f"[{w.name}] {ln}" for ln in list(w.log)[-lines:]]
        return "\n".join(out)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()

    def __enter__(self) -> LocalWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_local_workers(
    gpus: str | int | Sequence[int] = "all",
    model: str | Sequence[str] = "tiny",
    swarm: Any = None,
    *,
    slots: int = 2,
    allow_idle: bool = False,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> LocalWorkers:
    """One worker process per GPU, started together and registered in GPU order.

    gpus: "all", a count (the first that many GPUs to be seen), or indices (as nvidia-smi numbers
    them). On a machine with no GPU, "all" starts one CPU worker and a count or a list starts
    that many CPU workers (how CI tests the process management).
    """
    found = detect_gpus()  # once: it may run nvidia-smi
    if gpus == "all":
        ids: list[int | None] = list(found) if found else [None]
    elif isinstance(gpus, int):
        # the first n GPUs to be seen (CUDA_VISIBLE_DEVICES=1,3: 1 and 3)
        ids = list(found[:gpus]) if len(found) >= gpus else list(range(gpus))
    else:
        ids = [int(g) for g in gpus]
    if not ids:
        raise ColabSwarmError("No GPUs to start workers on; pass gpus=[0] or gpus='all'.")
    models = [model] if isinstance(model, str) else list(model)
    has_gpu = bool(found)
    worker_env = dict(env or {})
    if "OMP_NUM_THREADS" not in os.environ:
        # the workers share the host's cores: oversubscribed OpenMP threads spin and crawl
        # (CPU workers), or steal time from the Python threads that launch GPU kernels
        worker_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(ids))))
    # with no GPU to be seen, indices start CPU workers: pinning one to CUDA_VISIBLE_DEVICES=g
    # would show it a GPU its owner hid
    workers = [
        LocalWorker(g if has_gpu else None, models,
                    f"gpu{g}" if g is not None and has_gpu else f"local{i}",
                    extra_args=tuple(extra_args), env=worker_env)
        for i, g in enumerate(ids)
    ]
    threads = []
    errors: list[BaseException] = []

    def _start(w: LocalWorker) -> None:
        try:
            w.start(timeout)
        except BaseException as exc:
            errors.append(exc)

    for w in workers:  # load models in parallel: each process owns its GPU
        t = threading.Thread(target=_start, args=(w,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    if errors:
        for w in workers:
            w.stop()
        raise errors[0]
    group = LocalWorkers(workers, swarm)
    if swarm is not None:
        for w in workers:
            swarm.add(w.share, name=w.name, allow_idle=allow_idle, slots=slots)
    return group


@atexit.register
def _stop_all() -> None:
    for w in list(_ALL):
        try:
            w.stop(timeout=3)
        except Exception:
            pass
