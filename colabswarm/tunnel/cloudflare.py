"""tunnel='cloudflare': a trycloudflare quick tunnel (no account) through pycloudflared's binary.

We use pycloudflared to know where the cloudflared binary lives and where it comes from, but
launch and read it ourselves, because its try_cloudflare() cannot be bounded in time: it
downloads with no timeout, blocks forever on a binary that prints nothing, and caches tunnels
by port (a reopened tunnel would come back as the dead one). Everything here runs under one
deadline and the child is killed on any failure.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import queue
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.request import urlopen

from ..errors import TunnelError
from .base import (
    Tunnel,
    _alternatives,
    _call_with_deadline,
    _Deadline,
    _stop_process,
    _tail,
    _tunnel_target,
)

__all__ = ["ENV_BINARY", "CloudflareTunnel", "open_cloudflare"]

log = logging.getLogger("colabswarm.tunnel.cloudflare")

#: Path of a cloudflared binary to use instead of pycloudflared's (e.g. one from a package).
ENV_BINARY = "COLABSWARM_CLOUDFLARED"

# The quick tunnel's own name. Not api.trycloudflare.com, which failure lines also mention.
_URL_RE = re.compile(r"https://(?!api\.)[a-z0-9-]+\.trycloudflare\.com\b")
_METRICS_RE = re.compile(r"(127\.0\.0\.1:\d+)/metrics")
# Printed once an edge connection carries traffic; before that the URL answers 530.
_REGISTERED = "Registered tunnel connection"
# If a cloudflared version words that line differently, do not fail a working tunnel over it.
_REGISTER_GRACE_S = 15.0
_TAIL_LINES = 200
_download_lock = threading.Lock()
_HINT = _alternatives("cloudflare")


class CloudflareTunnel(Tunnel):
    """A running cloudflared process and the trycloudflare URL it announced."""

    provider = "cloudflare"

    def __init__(self, proc: subprocess.Popen[str], public_url: str, metrics_url: str | None,
                 lines: collections.deque[str], reader: threading.Thread) -> None:
        self.public_url = public_url
        self.metrics_url = metrics_url
        self._proc = proc
        self._lines = lines
        self._reader = reader
        self._closed = False
        self._lock = threading.Lock()
        atexit.register(self.close)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def alive(self) -> bool:
        return not self._closed and self._proc.poll() is None

    def last_lines(self, n: int = 20) -> list[str]:
        """cloudflared's most recent log lines, for diagnosing a tunnel that died."""
        return list(self._lines)[-n:]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        _stop_process(self._proc)
        _close_pipe(self._proc, self._reader)
        log.info("cloudflare tunnel %s closed", self.public_url)


def _binary(deadline: _Deadline) -> str:
    """The cloudflared executable: our override, else pycloudflared's, downloaded if missing."""
    override = os.environ.get(ENV_BINARY)
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise TunnelError(f"{ENV_BINARY}={override!r} is not an executable file. Point it at "
                              "a cloudflared binary, or unset it to use pycloudflared's.")
        return override
    try:
        from pycloudflared import util
    except ImportError as exc:
        raise TunnelError("tunnel='cloudflare' needs pycloudflared: pip install pycloudflared "
                          "(or colabswarm[tunnel]). " + _HINT) from exc
    try:
        info = util.get_info()
    except RuntimeError as exc:
        raise TunnelError(f"pycloudflared has no cloudflared for this machine ({exc}). Install "
                          f"cloudflared yourself and set {ENV_BINARY}. " + _HINT) from exc
    exe = Path(info.executable)
    if not exe.exists():
        try:
            _call_with_deadline(lambda: _download(info.url, exe, deadline), deadline,
                                name="colabswarm-cloudflared-download")
        except TimeoutError as exc:
            raise TunnelError(
                f"cloudflared is not installed at {exe} and downloading it from {info.url} did "
                f"not finish within {deadline.total:.0f} s (no internet, or a very slow one?). "
                + _HINT) from exc
    return str(exe)


def _download(url: str, dest: Path, deadline: _Deadline) -> None:
    """Fetch cloudflared to a temporary name, then rename: a half-written binary never stays at
    the path pycloudflared trusts (it would fail with 'exec format error' ever after)."""
    with _download_lock:
        if dest.exists():  # another tunnel fetched it meanwhile
            return
        log.info("cloudflared not found at %s; downloading %s", dest, url)
        tmp: str | None = None
        try:
            with urlopen(url, timeout=max(1.0, min(30.0, deadline.remaining()))) as resp:
                fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part",
                                           dir=dest.parent)
                with os.fdopen(fd, "wb") as out:
                    while chunk := resp.read(1 << 16):
                        out.write(chunk)
                        if deadline.expired():
                            raise TimeoutError("download too slow")
            os.chmod(tmp, 0o755)
            os.replace(tmp, dest)
            tmp = None
        except TimeoutError:
            raise
        except PermissionError as exc:
            raise TunnelError(
                f"cloudflared is missing and {dest.parent} is not writable ({exc}). Install "
                f"cloudflared yourself and set {ENV_BINARY} to its path. " + _HINT
            ) from exc
        except (OSError, ValueError) as exc:
            raise TunnelError(
                f"cloudflared is not installed at {dest} and could not be downloaded from {url} "
                f"({exc}). This machine may have no internet access. Copy the binary there (or "
                f"set {ENV_BINARY}). " + _HINT
            ) from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _close_pipe(proc: subprocess.Popen[str], reader: threading.Thread) -> None:
    """Once the process is gone its stderr ends: let the reader finish, then close the pipe."""
    reader.join(2.0)
    if not reader.is_alive() and proc.stderr is not None:
        with contextlib.suppress(OSError):
            proc.stderr.close()


def _read_lines(stream: object, lines: collections.deque[str],
                startup: queue.Queue[str | None], started: threading.Event) -> None:
    """Drain cloudflared's stderr for its whole life: a full pipe would stall the tunnel.

    Lines go to the startup queue until the tunnel is up, then only to the bounded tail.
    """
    try:
        for raw in stream:  # type: ignore[attr-defined]
            line = raw.rstrip()
            lines.append(line)
            log.debug("cloudflared: %s", line)
            if not started.is_set():
                startup.put(line)
    except (OSError, ValueError):
        pass
    finally:
        startup.put(None)


def _await_url(
    startup: queue.Queue[str | None], deadline: _Deadline
) -> tuple[str | None, str | None, bool, bool]:
    """Read start-up lines until the URL and an edge connection are known, the output ends, or
    time is up. Returns (url, metrics_url, registered, output_ended)."""
    url: str | None = None
    metrics: str | None = None
    registered = False
    url_at = 0.0
    while not (url and registered):
        wait = deadline.remaining()
        if url:
            wait = min(wait, url_at + _REGISTER_GRACE_S - time.monotonic())
        if wait <= 0:
            break
        try:
            line = startup.get(timeout=wait)
        except queue.Empty:
            continue
        if line is None:
            return url, metrics, registered, True
        if url is None and (m := _URL_RE.search(line)):
            url, url_at = m.group(0), time.monotonic()
        if m := _METRICS_RE.search(line):
            metrics = "http://" + m.group(1) + "/metrics"
        registered = registered or _REGISTERED in line
    return url, metrics, registered, False


def open_cloudflare(port: int, *, host: str = "127.0.0.1",
                    deadline_s: float = 60.0) -> CloudflareTunnel:
    """Start cloudflared for host:port and wait (at most deadline_s) for its public URL."""
    deadline = _Deadline(deadline_s)
    exe = _binary(deadline)
    target = f"http://{_tunnel_target(host, port)}"
    cmd = [exe, "tunnel", "--no-autoupdate", "--url", target]
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace", start_new_session=True,
        )
    except OSError as exc:
        raise TunnelError(f"Could not run cloudflared at {exe} ({exc}). If the file is damaged, "
                          "delete it so it is downloaded again. " + _HINT) from exc
    lines: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    startup: queue.Queue[str | None] = queue.Queue()
    started = threading.Event()
    reader = threading.Thread(target=_read_lines, args=(proc.stderr, lines, startup, started),
                              name=f"colabswarm-cloudflared-{proc.pid}", daemon=True)
    reader.start()

    try:
        url, metrics, registered, eof = _await_url(startup, deadline)
    except BaseException:  # an interrupt (Ctrl-C in a notebook) must not leave it running
        _stop_process(proc, grace_s=0.5)
        _close_pipe(proc, reader)
        raise
    started.set()

    if url and not eof and proc.poll() is None:
        if not registered:
            log.warning("cloudflared announced %s but reported no edge connection yet; "
                        "continuing (the reachability check will tell)", url)
        log.info("cloudflare tunnel %s -> %s (pid %d)", url, target, proc.pid)
        return CloudflareTunnel(proc, url, metrics, lines, reader)

    if eof:  # stderr closed: the process is exiting; give it a moment to report its code
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(min(2.0, max(0.1, deadline.remaining())))
    code = proc.poll()
    _stop_process(proc, grace_s=0.5)
    _close_pipe(proc, reader)
    if code is not None:
        what = f"cloudflared exited with code {code} before its tunnel was up"
    elif url:
        what = f"cloudflared closed its output after announcing {url}"
    else:
        what = f"cloudflared printed no tunnel URL within {deadline.total:.0f} s (killed it)"
    raise TunnelError(
        f"{what}. Its last lines:\n{_tail(lines)}\nCloudflare may be unreachable from here "
        "(no internet, or outbound UDP/7844 blocked: cloudflared then needs more time to fall "
        "back to HTTP/2; a longer deadline may help). " + _HINT
    )
