"""What every tunnel shares: the Tunnel handle, deadlines, process cleanup, and the reachability
check that proves a public URL really leads to this worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import httpx

from ..errors import TunnelError
from ..protocol import API_PREFIX, SKIP_NGROK_WARNING

__all__ = ["Tunnel", "wait_until_reachable"]

log = logging.getLogger("colabswarm.tunnel")
T = TypeVar("T")

def _alternatives(failed: str) -> str:
    """What to try instead, ending every error about opening a tunnel."""
    options = {
        "cloudflare": "tunnel='cloudflare' (no account needed)",
        "ngrok": "tunnel='ngrok' (with a free authtoken in NGROK_AUTHTOKEN)",
    }
    others = [text for name, text in options.items() if name != failed]
    return (
        "Try " + " or ".join(others) + "; set HTTPS_PROXY if this machine reaches the internet "
        "only through a proxy; or use tunnel='none' when the controller can reach this machine "
        "directly (same machine, LAN, SSH port forwarding)."
    )


class Tunnel(ABC):
    """A local port published at ``public_url`` (https, no trailing slash) until close()."""

    provider: str
    public_url: str

    @abstractmethod
    def alive(self) -> bool:
        """Whether the tunnel's process still runs (a dead tunnel never comes back: reopen)."""

    @abstractmethod
    def close(self) -> None:
        """Stop the tunnel; safe to call twice."""

    @property
    def pid(self) -> int | None:
        """The tunnel process id, if there is one (tests kill it to simulate a crash)."""
        return None

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "alive" if self.alive() else "closed/dead"
        return f"<{type(self).__name__} {self.provider} {self.public_url} {state}>"


class _Deadline:
    """One budget for every step of opening a tunnel (download, start, handshake)."""

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"deadline_s must be positive, got {seconds!r}")
        self.total = float(seconds)
        self._end = time.monotonic() + self.total

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return self.remaining() <= 0.0


def _tunnel_target(host: str, port: int) -> str:
    """host:port the tunnel forwards to; a wildcard bind is reached through loopback."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{int(port)}"


def _tail(lines: Iterable[str], n: int = 15) -> str:
    """The last lines a process printed, indented for an error message."""
    kept = [line for line in lines if line.strip()][-n:]
    return "\n".join("    " + line for line in kept) if kept else "    (it printed nothing)"


def _stop_process(proc: subprocess.Popen[Any], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL to the whole process group; returns once the process is reaped.

    Tunnel binaries run in their own session (so a notebook's interrupt does not kill them),
    which makes their process group ours to clean up.
    """
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _call_with_deadline(
    fn: Callable[[], T], deadline: _Deadline, *, name: str,
    on_timeout: Callable[[], None] | None = None, join_s: float = 5.0,
) -> T:
    """Run a blocking library call on a helper thread and stop waiting at the deadline.

    on_timeout must make the call return (typically by killing the process it reads from), so
    no thread stays blocked; we then give the thread join_s to finish before raising. Without
    on_timeout the call must be bounded by itself (socket timeouts) and is left to finish.
    """
    box: dict[str, Any] = {}

    def _target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=_target, name=name, daemon=True)
    thread.start()
    thread.join(deadline.remaining())
    if thread.is_alive():
        if on_timeout is not None:
            on_timeout()
            thread.join(join_s)
        raise TimeoutError(f"{name} did not finish within {deadline.total:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _describe_connect_error(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    dns_markers = ("name or service not known", "nodename nor servname", "name resolution",
                   "getaddrinfo", "no address associated", "no such host", "errno -2",
                   "errno -3", "errno -5", "errno 8", "errno 11001")
    if any(m in text.lower() for m in dns_markers):
        return (f"the host name does not resolve yet ({text}). New trycloudflare/ngrok names can "
                "take up to a minute to appear in DNS; a longer deadline usually helps")
    return f"could not connect ({text})"


def _describe_status(resp: httpx.Response) -> str:
    code = resp.status_code
    body = resp.text[:200].replace("\n", " ").strip()
    if code in (502, 503):
        return (f"HTTP {code}: the tunnel is up but could not reach the local server behind it "
                "(is the worker still running on the port the tunnel forwards to?)")
    if code == 524:
        return "HTTP 524: Cloudflare timed out waiting for the worker"
    if code == 530:
        return ("HTTP 530 (Cloudflare error 1033): Cloudflare has no live connection for this "
                "tunnel yet (cloudflared may still be connecting, or it died)")
    if code == 404:
        return (f"HTTP 404 ({body or 'no body'}): the tunnel is not online yet, or it forwards to "
                "something that is not a colabswarm worker")
    if code == 429:
        return "HTTP 429: the tunnel provider is rate limiting this tunnel"
    return f"HTTP {code}: {body or 'no body'}"


async def wait_until_reachable(
    public_url: str,
    token: str,
    deadline_s: float = 60.0,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """GET {public_url}/v1/info as a controller would, retrying until it answers or time is up.

    A tunnel process that printed its URL is not yet a working address: DNS may not know the
    name, the provider's edge may not have the connection, or the URL may lead elsewhere. Only
    this round trip, with the real token, proves the share string will work. Returns the info.
    ``transport`` lets a caller route the requests (a proxy, or a test's local stand-in).
    Raises TunnelError at once on 401/403 (retrying cannot fix a wrong token), else at the
    deadline with the last failure and what to try.
    """
    deadline = _Deadline(deadline_s)
    url = public_url.rstrip("/") + f"{API_PREFIX}/info"
    headers = {"Authorization": f"Bearer {token}", **SKIP_NGROK_WARNING}
    delay, attempts, last = 0.25, 0, "no attempt finished"
    async with httpx.AsyncClient(transport=transport, headers=headers,
                                 follow_redirects=False) as client:
        while True:
            attempts += 1
            timeout = max(0.5, min(10.0, deadline.remaining()))
            try:
                resp = await client.get(url, timeout=timeout)
            except httpx.ConnectError as exc:
                last = _describe_connect_error(exc)
            except httpx.TimeoutException:
                last = f"no answer within {timeout:.1f} s"
            except httpx.TransportError as exc:
                last = f"connection failed ({type(exc).__name__}: {exc or 'closed early'})"
            else:
                if resp.status_code in (401, 403):
                    raise TunnelError(
                        f"{public_url} answered HTTP {resp.status_code}: the token was refused. "
                        "The tunnel works, but it leads to a worker with a different token "
                        "(an old worker still on this port?). Use the share string the worker "
                        "printed, or restart it with the token you mean."
                    )
                if resp.status_code == 200:
                    try:
                        info = resp.json()
                    except ValueError:
                        info = None
                    if isinstance(info, dict):
                        log.debug("%s reachable after %d attempt(s)", public_url, attempts)
                        return info
                    last = ("HTTP 200 but not a colabswarm worker's JSON (an interstitial or "
                            "another service on that port?)")
                else:
                    last = _describe_status(resp)
            log.debug("%s not reachable yet (attempt %d): %s", public_url, attempts, last)
            if deadline.remaining() <= 0:
                break
            await asyncio.sleep(min(delay, deadline.remaining()))
            delay = min(delay * 1.6, 3.0)
            if deadline.remaining() <= 0:
                break
    raise TunnelError(
        f"{public_url} did not lead to this worker within {deadline.total:.0f} s "
        f"({attempts} attempts). Last result: {last}. Try a longer deadline, reopen the tunnel "
        "(a new URL), or another provider: " + _alternatives("")
    )
