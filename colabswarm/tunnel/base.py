"""What every tunnel shares: the Tunnel handle, the typed failure (TunnelFailure with a
TunnelProblem), secret redaction for messages and logs, one deadline per start, process cleanup,
and the reachability check that proves a public URL really leads to this worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from ..errors import TunnelError
from ..protocol import API_PREFIX, SKIP_NGROK_WARNING

__all__ = [
    "Tunnel",
    "TunnelFailure",
    "TunnelProblem",
    "redact",
    "remember_secret",
    "wait_until_reachable",
]

log = logging.getLogger("colabswarm.tunnel")
T = TypeVar("T")


class TunnelProblem(StrEnum):
    """Why a tunnel could not be opened or reached, for code: callers and tests decide on this
    field, never on the message text (which is for people)."""

    UNKNOWN_PROVIDER = "unknown_provider"  # not one of cloudflare, ngrok, none
    MISSING_PACKAGE = "missing_package"    # pycloudflared / pyngrok is not installed
    BINARY_MISSING = "binary_missing"      # the program is not there and could not be downloaded
    BINARY_CORRUPT = "binary_corrupt"      # the program file cannot run (exec format error)
    NO_DNS = "no_dns"                      # the provider's host names do not resolve (no DNS)
    NO_NETWORK = "no_network"              # the provider's servers cannot be connected to
    TLS_INTERCEPTED = "tls_intercepted"    # something on the way shows its own TLS certificate
    RATE_LIMITED = "rate_limited"          # trycloudflare: too many quick tunnels (429, 1015)
    PROVIDER_ERROR = "provider_error"      # the provider's service itself failed (1101, no id)
    EDGE_UNREACHABLE = "edge_unreachable"  # cloudflared has a URL but no edge connection
    AUTHTOKEN_MISSING = "authtoken_missing"  # ngrok: no authtoken anywhere (ERR_NGROK_4018)
    AUTHTOKEN_INVALID = "authtoken_invalid"  # ngrok: malformed or revoked (ERR_NGROK_105/107)
    AGENT_SESSION_IN_USE = "agent_session_in_use"  # ngrok: the account's agent runs elsewhere
    ENDPOINT_LIMIT = "endpoint_limit"      # ngrok: endpoint already online / limit (324, 334)
    TIMEOUT = "timeout"                    # the deadline passed and nothing more is known
    NOT_REACHABLE = "not_reachable"        # the public URL did not lead to this worker in time
    TOKEN_REFUSED = "token_refused"        # the URL leads to a worker with another token
    FAILED = "failed"                      # anything else: the provider's own words say what

    @property
    def retry_may_help(self) -> bool:
        """Whether the same start may work later without changing anything here."""
        return self in _RETRY_MAY_HELP


_RETRY_MAY_HELP = frozenset({
    TunnelProblem.RATE_LIMITED, TunnelProblem.PROVIDER_ERROR, TunnelProblem.EDGE_UNREACHABLE,
    TunnelProblem.NO_NETWORK, TunnelProblem.TIMEOUT, TunnelProblem.NOT_REACHABLE,
    TunnelProblem.AGENT_SESSION_IN_USE, TunnelProblem.ENDPOINT_LIMIT,
})


# -- redaction --------------------------------------------------------------------------------

REDACTED = "[redacted]"
# a log line's leading time stamp: cloudflared's "2026-05-29T09:25:34Z ", ngrok's "t=... "
_STAMP = re.compile(r"^(?:t=)?\d{4}-\d\d-\d\dT\S+ ")
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
# Words that introduce a secret in the providers' output or in command lines we show:
# ngrok's ERR_NGROK_105/107 print "Your authtoken: <token>"; argv has "--authtoken <token>";
# a share string has "#token=<token>".
_AFTER_WORD = re.compile(
    r"(?i)(--authtoken\s+|\bbearer\s+|"
    r"(?:authtoken|auth_token|api_key|password|secret|token)(?:\\?[\"'])?\s*[:=]\s*(?:\\?[\"'`])?)"
    r"([^\s\"'`\\,;)\]}]{6,})"
)
# Anything token-shaped: 20+ URL-safe characters mixing upper case, lower case and digits.
# (Host names, paths, hex ids and UUIDs are lower case and stay readable.)
_SHAPED = re.compile(r"(?<![A-Za-z0-9_\-~])[A-Za-z0-9_\-~]{20,}(?![A-Za-z0-9_\-~])")


def remember_secret(value: str | None) -> None:
    """Never show this value again: every TunnelFailure message and every log line of the
    tunnel code (and of pyngrok) has it replaced by [redacted]."""
    if value and len(value.strip()) >= 6:
        with _secrets_lock:
            _secrets.add(value.strip())


def _token_shaped(word: str) -> bool:
    return (any(c.isdigit() for c in word) and any(c.isupper() for c in word)
            and any(c.islower() for c in word))


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """text without known secrets, values that follow words like 'authtoken:' or '--authtoken',
    and token-shaped strings."""
    if not text:
        return text
    with _secrets_lock:
        known = set(_secrets)
    known.update(s.strip() for s in secrets if s and len(s.strip()) >= 6)
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _AFTER_WORD.sub(lambda m: m.group(1) + (
        m.group(2) if m.group(2).startswith(("http://", "https://", "[redacted")) else REDACTED),
        text)
    return _SHAPED.sub(lambda m: REDACTED if _token_shaped(m.group(0)) else m.group(0), text)


class _RedactingFilter(logging.Filter):
    """Rewrites a log record's text (and its traceback) without secrets before any handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a broken format string: leave it to logging's own error path
            return True
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


#: Loggers whose records may carry a provider's output. A logger's filter only sees records
#: logged to that logger itself, so each one gets the filter (pyngrok logs every ngrok line,
#: including "Your authtoken: ...", to pyngrok.process.ngrok).
REDACTED_LOGGERS = (
    "colabswarm.tunnel", "colabswarm.tunnel.cloudflare", "colabswarm.tunnel.ngrok",
    "colabswarm.serve", "pyngrok", "pyngrok.process", "pyngrok.process.ngrok", "pyngrok.ngrok",
    "pyngrok.installer", "pyngrok.conf",
)
_FILTER = _RedactingFilter()
for _name in REDACTED_LOGGERS:
    if _FILTER not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_FILTER)


class TunnelFailure(TunnelError):
    """A tunnel could not be opened or reached. ``problem`` says why (a TunnelProblem),
    ``provider`` which tunnel, ``last_line`` the provider's own last error line (redacted).
    The message says what happened and what to do, and never contains a secret."""

    def __init__(self, message: str, *, problem: TunnelProblem, provider: str,
                 last_line: str | None = None, secrets: Iterable[str | None] = ()) -> None:
        secrets = tuple(secrets)
        super().__init__(redact(message, secrets))
        self.problem = TunnelProblem(problem)
        self.provider = provider
        self.last_line = redact(last_line, secrets) if last_line else None

    def __repr__(self) -> str:
        return (f"TunnelFailure(problem={self.problem.value!r}, provider={self.provider!r}, "
                f"message={str(self)!r})")


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
    """One budget for every step of starting a tunnel (download, start, handshake, check)."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not seconds > 0:
            raise ValueError(f"deadline_s must be positive, got {seconds!r}")
        self.total = float(seconds)
        self._clock = clock
        self._end = clock() + self.total

    def remaining(self) -> float:
        return max(0.0, self._end - self._clock())

    def elapsed(self) -> float:
        return self.total - self.remaining()

    def expired(self) -> bool:
        return self.remaining() <= 0.0


def _tunnel_target(host: str, port: int) -> str:
    """host:port the tunnel forwards to; a wildcard bind is reached through loopback."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{int(port)}"


def _tail(lines: Iterable[str], n: int = 8) -> str:
    """The last distinct lines a process printed (a retry loop prints the same ones again and
    again), indented for an error message; secrets are redacted by TunnelFailure."""
    kept: list[str] = []
    for line in (line.rstrip() for line in lines):
        if line.strip():
            key = _STAMP.sub("", line)
            kept = [k for k in kept if _STAMP.sub("", k) != key] + [line]
    kept = kept[-n:]
    return "\n".join("    " + line for line in kept) if kept else "    (it printed nothing)"


def _quote(text: str, n: int = 3) -> str:
    """A provider's own error, its first n lines indented, for an error message."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()][:n]
    return "\n".join("    " + line for line in lines)


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


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
        raise TimeoutError(f"{name} did not finish within {_seconds(deadline.total)}")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _provider_of(url: str) -> str:
    host = (urlsplit(url).hostname or "").lower()
    if host.endswith(".trycloudflare.com"):
        return "cloudflare"
    if "ngrok" in host:
        return "ngrok"
    return "none"


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
    Raises TunnelFailure at once on 401/403 (TOKEN_REFUSED: retrying cannot fix a wrong token),
    else at the deadline (NOT_REACHABLE) with the last failure and what to try.
    """
    remember_secret(token)
    provider = _provider_of(public_url)
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
                    raise TunnelFailure(
                        f"{public_url} answered HTTP {resp.status_code}: the token was refused. "
                        "The tunnel works, but it leads to a worker with a different token "
                        "(an old worker still on this port?). Use the share string the worker "
                        "printed, or restart it with the token you mean.",
                        problem=TunnelProblem.TOKEN_REFUSED, provider=provider, secrets=[token],
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
    raise TunnelFailure(
        f"{public_url} did not lead to this worker within {_seconds(deadline.total)} "
        f"({attempts} attempts). Last result: {last}. Reopen the tunnel (a new URL) with a "
        "longer deadline (tunnel_deadline_s=..., or --tunnel-deadline), or use another "
        "provider; tunnel='none' works when the controller can reach this machine directly "
        "(same machine, LAN, SSH port forwarding).",
        problem=TunnelProblem.NOT_REACHABLE, provider=provider, last_line=last, secrets=[token],
    )
