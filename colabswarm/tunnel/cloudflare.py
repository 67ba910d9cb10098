"""tunnel='cloudflare': a trycloudflare quick tunnel (no account) through pycloudflared's binary.

We use pycloudflared to know where the cloudflared binary lives and where it comes from, but
download, launch and read it ourselves, because its try_cloudflare() cannot be bounded in time:
it downloads with no timeout, writes macOS's .tgz archive where the executable should be (and
then unpacks it), blocks forever on a binary that prints nothing, and caches tunnels by port (a
reopened tunnel would come back as the dead one). Everything here runs under one deadline and
the child is killed on any failure.

What cloudflared is told (flags of cloudflared 2026.8.2, cmd/cloudflared/cliutil/logger.go and
cmd/cloudflared/tunnel/cmd.go): ``--loglevel info`` (a ``TUNNEL_LOGLEVEL=warn`` in the
environment would otherwise hide the INF lines that carry the URL), ``--metrics 127.0.0.1:0``
(its metrics server on loopback, whose ``/ready`` answers 200 once an edge connection is
registered: metrics/readiness.go) and ``--no-autoupdate``. When it fails, its own lines decide
the TunnelProblem (``classify_cloudflared``), and the message quotes its last error line.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import http.client
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

from .base import (
    _STAMP,
    Tunnel,
    TunnelFailure,
    TunnelProblem,
    _call_with_deadline,
    _Deadline,
    _quote,
    _seconds,
    _stop_process,
    _tail,
    _tunnel_target,
)

__all__ = ["ENV_BINARY", "CloudflareTunnel", "classify_cloudflared", "open_cloudflare"]

log = logging.getLogger("colabswarm.tunnel.cloudflare")

#: Path of a cloudflared binary to use instead of pycloudflared's (e.g. one from a package).
ENV_BINARY = "COLABSWARM_CLOUDFLARED"

# The quick tunnel's own name. Not api.trycloudflare.com, which failure lines also mention.
_URL_RE = re.compile(r"https://(?!api\.)[a-z0-9-]+\.trycloudflare\.com\b")
_METRICS_RE = re.compile(r"Starting metrics server on (127\.0\.0\.1:\d+)/metrics")
# Logged (INF) once an edge connection carries traffic: connection/observer.go.
_REGISTERED = "Registered tunnel connection"
# zerolog's console level for errors ("2026-05-29T09:25:34Z ERR ..."), or a bare line printed by
# the command-line layer when the command returns an error ("failed to ...: ...").
_ERROR_LINE = re.compile(r"^\S+Z ERR |^(failed|error|Error) ", re.ASCII)
_TAIL_LINES = 200
_READY_POLL_S = (0.05, 0.5)  # first and longest wait between /ready polls
_download_lock = threading.Lock()
_INSTEAD = ("use tunnel='ngrok' (a free account's authtoken in NGROK_AUTHTOKEN), or tunnel='none' "
            "when the controller can reach this machine directly (same machine, LAN, SSH "
            "port forwarding)")


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


# -- what went wrong: cloudflared's own lines -------------------------------------------------


def _error_lines(lines: Sequence[str]) -> list[str]:
    return [line for line in lines if _ERROR_LINE.search(line)]


def classify_cloudflared(lines: Sequence[str], *,
                         got_url: bool) -> tuple[TunnelProblem, str | None]:
    """Why cloudflared did not bring a tunnel up, from the lines it printed (pure).

    Returns the problem and the line that shows it (its last error line when no rule matched).
    The lines are those of cloudflared 2026.8.2 (cmd/cloudflared/tunnel/quick_tunnel.go,
    supervisor/tunnel.go) as users reported them; tests/fakes/cloudflared replays them.
    """
    errors = _error_lines(lines)
    last = errors[-1] if errors else None
    for line in reversed(errors):
        low = line.lower()
        if 'status_code="429' in low or "error code: 1015" in low:
            return TunnelProblem.RATE_LIMITED, line
        if ("error code: 1101" in low or "invalid uuid length" in low
                or re.search(r'status_code="5\d\d', low)):
            return TunnelProblem.PROVIDER_ERROR, line
        if "failed to request quick tunnel" in low:
            if "no such host" in low or "lookup " in low or "server misbehaving" in low:
                return TunnelProblem.NO_DNS, line
            return TunnelProblem.NO_NETWORK, line
    if got_url:
        edge = [line for line in errors if "quic" in line.lower() or "edge" in line.lower()
                or "serve tunnel error" in line.lower()]
        return TunnelProblem.EDGE_UNREACHABLE, (edge[-1] if edge else last)
    return TunnelProblem.FAILED, last


_ADVICE = {
    TunnelProblem.RATE_LIMITED: (
        "trycloudflare.com is rate limiting quick tunnels from this address (HTTP 429, "
        "Cloudflare error 1015): too many were asked for recently, from here or from others "
        "behind the same address (as on Colab). Wait a few minutes before trying again, or "
        + _INSTEAD + "."),
    TunnelProblem.PROVIDER_ERROR: (
        "trycloudflare.com's quick-tunnel service failed on Cloudflare's side (it gave no "
        "tunnel). Nothing on this machine causes this: try again in a minute, or "
        + _INSTEAD + "."),
    TunnelProblem.NO_DNS: (
        "This machine cannot resolve api.trycloudflare.com: it has no working DNS or no "
        "internet access. Check its network (on Colab: Runtime > Disconnect and delete runtime, "
        "then run again), or " + _INSTEAD + "."),
    TunnelProblem.NO_NETWORK: (
        "cloudflared cannot reach api.trycloudflare.com over HTTPS. Quick tunnels need direct "
        "outbound HTTPS and do not go through HTTP proxies (cloudflared ignores HTTPS_PROXY for "
        "them), so a network that allows only a proxy cannot use them: use a network with "
        "direct internet access, or " + _INSTEAD + "."),
    TunnelProblem.EDGE_UNREACHABLE: (
        "cloudflared got a URL but could not connect to Cloudflare's edge. Outbound UDP port "
        "7844 (QUIC) is probably blocked here; cloudflared falls back to HTTP/2 over TCP port "
        "7844 after a few failed tries, which a longer deadline gives it time for "
        "(tunnel_deadline_s=..., or --tunnel-deadline). Or " + _INSTEAD + "."),
}


def _failure(what: str, problem: TunnelProblem, evidence: str | None, lines: Sequence[str],
             advice: str | None = None) -> TunnelFailure:
    said = f" cloudflared said:\n{_quote(_STAMP.sub('', evidence))}\n" if evidence else " "
    advice = advice or _ADVICE.get(problem) or ("Try again, or " + _INSTEAD + ".")
    return TunnelFailure(
        f"{what}.{said}{advice}\nIts last lines:\n{_tail(lines)}",
        problem=problem, provider="cloudflare", last_line=evidence,
    )


# -- the binary -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Binary:
    path: Path
    url: str | None  # where pycloudflared gets it; None for the user's own (never replaced)


def _binary(deadline: _Deadline) -> _Binary:
    """The cloudflared executable: our override, else pycloudflared's, downloaded if missing."""
    override = os.environ.get(ENV_BINARY)
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise TunnelFailure(
                f"{ENV_BINARY}={override!r} is not an executable file. Point it at a cloudflared "
                "binary, or unset it to use pycloudflared's.",
                problem=TunnelProblem.BINARY_MISSING, provider="cloudflare")
        return _Binary(Path(override), None)
    try:
        from pycloudflared import util
    except ImportError:
        raise TunnelFailure(
            "tunnel='cloudflare' needs pycloudflared: pip install pycloudflared (or "
            "colabswarm[tunnel]). Or " + _INSTEAD + ".",
            problem=TunnelProblem.MISSING_PACKAGE, provider="cloudflare") from None
    try:
        info = util.get_info()
    except RuntimeError as exc:
        raise TunnelFailure(
            f"pycloudflared has no cloudflared for this machine ({exc}). Install cloudflared "
            f"yourself and set {ENV_BINARY} to its path, or " + _INSTEAD + ".",
            problem=TunnelProblem.BINARY_MISSING, provider="cloudflare") from None
    binary = _Binary(Path(info.executable), str(info.url))
    if not binary.path.exists():
        _fetch(binary, deadline, replace=False)
    return binary


def _fetch(binary: _Binary, deadline: _Deadline, *, replace: bool) -> None:
    """Download the binary under the deadline (replace: over an existing, broken one)."""
    assert binary.url is not None
    try:
        _call_with_deadline(lambda: _download(binary.url, binary.path, deadline, replace),
                            deadline, name="colabswarm-cloudflared-download")
    except TimeoutError:
        raise TunnelFailure(
            f"cloudflared is not installed at {binary.path} and downloading it from "
            f"{binary.url} did not finish within {_seconds(deadline.total)} (no internet, or a "
            "very slow one?). Try again with a longer deadline, or " + _INSTEAD + ".",
            problem=TunnelProblem.BINARY_MISSING, provider="cloudflare") from None


def _download(url: str, dest: Path, deadline: _Deadline, replace: bool) -> None:
    """Fetch cloudflared to a temporary name, unpack it if it is an archive (macOS builds are
    .tgz), then rename it into place: a half-written or still-packed file never stays at the
    path pycloudflared trusts (it would fail with 'exec format error' ever after)."""
    with _download_lock:
        if dest.exists() and not replace:  # another tunnel fetched it meanwhile
            return
        log.info("%s cloudflared at %s from %s", "replacing" if replace else "downloading",
                 dest, url)
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
            if url.endswith((".tgz", ".tar.gz")):
                _unpack(tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, dest)
            tmp = None
        except TimeoutError:
            raise
        except PermissionError as exc:
            raise TunnelFailure(
                f"cloudflared is missing at {dest} and {dest.parent} is not writable ({exc}). "
                f"Install cloudflared yourself and set {ENV_BINARY} to its path, or "
                + _INSTEAD + ".", problem=TunnelProblem.BINARY_MISSING,
                provider="cloudflare") from None
        except (OSError, ValueError, tarfile.TarError) as exc:
            raise TunnelFailure(
                f"cloudflared is not installed at {dest} and could not be downloaded from {url} "
                f"({exc}). This machine may have no internet access. Copy a cloudflared binary "
                f"there (or set {ENV_BINARY} to one), or " + _INSTEAD + ".",
                problem=TunnelProblem.BINARY_MISSING, provider="cloudflare") from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _unpack(path: str) -> None:
    """Replace the .tgz at path by the 'cloudflared' file inside it (read as data: no member is
    ever extracted to a path the archive chooses)."""
    with tarfile.open(path, "r:gz") as archive:
        member = next((m for m in archive.getmembers()
                       if m.isfile() and os.path.basename(m.name) == "cloudflared"), None)
        if member is None:
            raise ValueError("the archive has no 'cloudflared' file")
        source = archive.extractfile(member)
        assert source is not None
        with source, open(path + ".bin", "wb") as out:
            shutil.copyfileobj(source, out)
    os.replace(path + ".bin", path)


def _spawn(exe: Path, cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(exe), *cmd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
        start_new_session=True,
    )


def _start(binary: _Binary, cmd: list[str], deadline: _Deadline) -> subprocess.Popen[str]:
    """Run cloudflared; a binary of ours that cannot run is downloaded again, once."""
    try:
        return _spawn(binary.path, cmd)
    except OSError as exc:
        if binary.url is None or exc.errno not in (errno.ENOEXEC, errno.EACCES):
            where = f"{ENV_BINARY}={str(binary.path)!r}" if binary.url is None else binary.path
            raise TunnelFailure(
                f"cloudflared at {where} cannot run on this machine ({exc.strerror}). Point "
                f"{ENV_BINARY} at a cloudflared built for this machine, or " + _INSTEAD + ".",
                problem=TunnelProblem.BINARY_CORRUPT, provider="cloudflare") from None
        log.warning("cloudflared at %s cannot run (%s); downloading it again from %s",
                    binary.path, exc.strerror, binary.url)
    try:
        _fetch(binary, deadline, replace=True)
    except TunnelFailure as exc:
        raise TunnelFailure(
            f"cloudflared at {binary.path} cannot run on this machine (a damaged or foreign "
            f"file), and getting a new one failed: {exc}", problem=TunnelProblem.BINARY_CORRUPT,
            provider="cloudflare") from None
    try:
        return _spawn(binary.path, cmd)
    except OSError as exc:
        raise TunnelFailure(
            f"cloudflared at {binary.path} cannot run on this machine ({exc.strerror}), even "
            f"after downloading it again from {binary.url}. Install cloudflared for this "
            f"machine yourself and set {ENV_BINARY} to its path, or " + _INSTEAD + ".",
            problem=TunnelProblem.BINARY_CORRUPT, provider="cloudflare") from None


# -- reading it -------------------------------------------------------------------------------


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


def _ready(metrics: str, timeout: float) -> bool:
    """Whether cloudflared's /ready says an edge connection is registered (HTTP 200 and
    readyConnections > 0). Plain http.client: no proxy from the environment applies."""
    host, port = metrics.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", "/ready")
        resp = conn.getresponse()
        body = resp.read(4096)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    if resp.status != 200:
        return False
    try:
        return int(json.loads(body).get("readyConnections", 1)) > 0
    except (ValueError, AttributeError, TypeError):
        return True


@dataclass
class _Startup:
    url: str | None = None
    metrics: str | None = None
    ready: bool = False
    ended: bool = False  # its output closed: the process is exiting


def _await_ready(proc: subprocess.Popen[str], startup: queue.Queue[str | None],
                 deadline: _Deadline) -> _Startup:
    """Read start-up lines until the URL and the metrics address are known, then poll /ready
    until an edge connection is registered; stop when the output ends or time is up. (Only a
    cloudflared that printed no metrics address is taken at its "Registered tunnel connection"
    line.)"""
    state = _Startup()
    registered = False
    wait = _READY_POLL_S[0]
    while not (state.url and state.ready) and not deadline.expired():
        polling = state.url is not None and state.metrics is not None
        try:
            line = startup.get(timeout=min(wait, deadline.remaining()) if polling
                               else deadline.remaining())
        except queue.Empty:
            line = ""
        if line is None:
            state.ended = True
            break
        if state.url is None and (m := _URL_RE.search(line)):
            state.url = m.group(0)
        if state.metrics is None and (m := _METRICS_RE.search(line)):
            state.metrics = m.group(1)
        registered = registered or _REGISTERED in line
        if state.url and state.metrics is None:
            state.ready = registered
        elif state.url and state.metrics and startup.empty():
            state.ready = _ready(state.metrics, min(1.0, max(0.1, deadline.remaining())))
            wait = min(wait * 1.5, _READY_POLL_S[1])
    if proc.poll() is not None:
        state.ended = True
    return state


def open_cloudflare(port: int, *, host: str = "127.0.0.1",
                    deadline_s: float = 60.0) -> CloudflareTunnel:
    """Start cloudflared for host:port and wait (at most deadline_s) until its public URL has an
    edge connection; raise TunnelFailure (with a TunnelProblem) otherwise."""
    deadline = _Deadline(deadline_s)
    binary = _binary(deadline)
    target = f"http://{_tunnel_target(host, port)}"
    cmd = ["tunnel", "--no-autoupdate", "--loglevel", "info", "--metrics", "127.0.0.1:0",
           "--url", target]
    proc = _start(binary, cmd, deadline)
    lines: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    startup: queue.Queue[str | None] = queue.Queue()
    started = threading.Event()
    reader = threading.Thread(target=_read_lines, args=(proc.stderr, lines, startup, started),
                              name=f"colabswarm-cloudflared-{proc.pid}", daemon=True)
    reader.start()

    try:
        state = _await_ready(proc, startup, deadline)
    except BaseException:  # an interrupt (Ctrl-C in a notebook) must not leave it running
        _stop_process(proc, grace_s=0.5)
        _close_pipe(proc, reader)
        raise
    started.set()

    if state.url and state.ready and not state.ended:
        log.info("cloudflare tunnel %s -> %s (pid %d)", state.url, target, proc.pid)
        metrics_url = f"http://{state.metrics}/metrics" if state.metrics else None
        return CloudflareTunnel(proc, state.url, metrics_url, lines, reader)

    if state.ended:  # stderr closed: the process is exiting; give it a moment to report its code
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(min(2.0, max(0.1, deadline.remaining())))
    code = proc.poll()
    _stop_process(proc, grace_s=0.5)
    _close_pipe(proc, reader)
    seen = list(lines)
    problem, evidence = classify_cloudflared(seen, got_url=state.url is not None)
    if code is not None:
        what = f"cloudflared exited with code {code} before its tunnel was up"
    elif state.url:
        what = (f"cloudflared announced {state.url} but had no connection to Cloudflare's edge "
                f"within {_seconds(deadline.total)} (killed it)")
    else:
        what = f"cloudflared printed no tunnel URL within {_seconds(deadline.total)} (killed it)"
        if problem is TunnelProblem.FAILED:
            problem = TunnelProblem.TIMEOUT
            advice = (f"Run it by hand to see what it does ({binary.path} tunnel --url {target}),"
                      " or " + _INSTEAD + ".")
            raise _failure(what, problem, evidence, seen, advice)
    raise _failure(what, problem, evidence, seen)
