"""The tunnel package on top of fake cloudflared/ngrok binaries (tests/fakes), never the internet.

The real wrapper code runs; only the binaries are stand-ins, and they print the real programs'
lines (each fake cites its sources). cloudflared is found where pycloudflared says it lives
(pycloudflared.util.get_info, patched to a temporary folder so nothing is written into
site-packages); ngrok through pyngrok's own PYNGROK_NGROK_PATH. The fake cloudflared announces a
real-looking https://<name>.trycloudflare.com URL, which no resolver here knows, so end-to-end
checks route that host to a local TcpProxy through an httpx transport passed to
wait_until_reachable (the same hook a caller behind a proxy would use).

Each real failure scenario has one test: the TunnelProblem a caller decides on, the advice a
user reads (and the wrong advice they must not read), and that no secret (the worker token, the
ngrok authtoken) appears in the message, the repr, the printed traceback or any log line.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tarfile
import threading
import time
import traceback
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from colabswarm.errors import ErrorKind, TunnelError
from colabswarm.tunnel import (
    Tunnel,
    TunnelFailure,
    TunnelProblem,
    open_tunnel,
    publish,
    redact,
    wait_until_reachable,
)
from colabswarm.tunnel import cloudflare as cf_module
from colabswarm.tunnel.ngrok import classify_ngrok, clean_ngrok_error

sys.path.insert(0, str(Path(__file__).parent))
from tcpproxy import TcpProxy  # noqa: E402

FAKES = Path(__file__).parent / "fakes"
TOKEN = "test-token-0123456789abcdef"
# a worker token of the real shape (secrets.token_urlsafe(24)) and an ngrok authtoken's shape
WORKER_TOKEN = "Q3m_x9TzLk2VbN8rWq4YpH1sJd6FgA0e"
AUTHTOKEN = "2Xk9PqLmZr4TnW8vYb3Hc6Jd_5sQeR7tUyI1oA2zXc4Vb6N"
TRYCF_RE = re.compile(r"^https://[a-z0-9-]+\.trycloudflare\.com$")


# -- helpers ----------------------------------------------------------------------------------


def _closed_port() -> int:
    """A local port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and " Z " in Path(f"/proc/{pid}/stat").read_text()


def _wait_for(cond: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


def _threads(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


def _no_secret_anywhere(err: BaseException, caplog: pytest.LogCaptureFixture,
                        *secrets: str) -> None:
    """None of the secrets in the message, the repr, the traceback a notebook prints (with its
    whole chain of causes), the provider's last line, or any log line of the run."""
    shown = "\n".join([str(err), repr(err), "".join(traceback.format_exception(err)),
                       str(getattr(err, "last_line", "")), caplog.text])
    for secret in secrets:
        assert secret not in shown, f"{secret[:6]}... leaked"


def _readable(msg: str) -> None:
    """No raw JSON and no escaped line breaks reach the user."""
    assert "\\r\\n" not in msg and "\\n" not in msg, msg
    assert '"error_code"' not in msg and '{"' not in msg, msg


class _Worker(BaseHTTPRequestHandler):
    """The slice of a worker a tunnel check touches: /healthz and bearer-checked /v1/info."""

    token = TOKEN
    status: int | None = None  # force an answer (a tunnel provider's error page)
    body: bytes | None = None

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.status is not None:
            self._reply(self.status, self.body or b"error page", "text/html")
        elif self.path == "/healthz":
            self._reply(200, b'{"ok": true}')
        elif self.path == "/v1/info":
            if self.headers.get("Authorization") != f"Bearer {self.token}":
                self._reply(401, b'{"detail": "bad token"}')
            elif self.headers.get("ngrok-skip-browser-warning") is None:
                self._reply(200, b"<html>ngrok interstitial</html>", "text/html")
            else:
                self._reply(200, b'{"version": "1", "name": "fake-worker"}')
        else:
            self._reply(404, b'{"detail": "not found"}')

    def _reply(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def worker_server() -> Iterator[ThreadingHTTPServer]:
    handler = type("Handler", (_Worker,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(worker_server: ThreadingHTTPServer) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", worker_server.server_address[1]) as p:
        yield p


class _RouteTo(httpx.AsyncBaseTransport):
    """Send every request to one local address, keeping the Host header (as an edge does)."""

    def __init__(self, target: str) -> None:
        self._target = httpx.URL(target)
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.url = request.url.copy_with(scheme=self._target.scheme, host=self._target.host,
                                            port=self._target.port)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Fails(httpx.AsyncBaseTransport):
    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        raise self.exc


@pytest.fixture
def opened() -> Iterator[list[Tunnel]]:
    """Tunnels a test opens; all closed afterwards whatever happened."""
    tunnels: list[Tunnel] = []
    yield tunnels
    for t in tunnels:
        t.close()


# -- cloudflare -------------------------------------------------------------------------------


def _serve_files(files: dict[str, bytes]) -> ThreadingHTTPServer:
    """A local download server (the machine has no internet): GET /<name> -> bytes."""

    class Files(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            data = files.get(self.path.lstrip("/"))
            self.send_response(200 if data is not None else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def _tgz(name: str, data: bytes) -> bytes:
    """A .tgz holding one executable file, as cloudflared's macOS downloads are."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def cf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """pycloudflared's binary location moved to tmp_path, holding the fake cloudflared.

    get_info() is pycloudflared's one answer to "where is the binary, where does it come
    from"; the download URL points at a refused local port, so a fetch fails fast.
    """
    folder = tmp_path / "pycloudflared"
    folder.mkdir()
    exe = folder / "cloudflared-linux-amd64"
    shutil.copy(FAKES / "cloudflared", exe)
    info = types.SimpleNamespace(
        executable=str(exe), url=f"http://127.0.0.1:{_closed_port()}/cloudflared-linux-amd64"
    )
    import pycloudflared.util

    monkeypatch.setattr(pycloudflared.util, "get_info", lambda: info)
    monkeypatch.delenv(cf_module.ENV_BINARY, raising=False)
    monkeypatch.setenv("FAKE_PIDFILE", str(tmp_path / "cloudflared.pid"))
    monkeypatch.setenv("FAKE_CLOUDFLARED_REQUESTS", str(tmp_path / "metrics-requests.txt"))
    for var in ("FAKE_CLOUDFLARED_MODE", "FAKE_CLOUDFLARED_PUBLIC_URL", "TUNNEL_LOGLEVEL"):
        monkeypatch.delenv(var, raising=False)
    return types.SimpleNamespace(info=info, exe=exe, pidfile=tmp_path / "cloudflared.pid",
                                 requests=tmp_path / "metrics-requests.txt")


def test_none_is_the_local_url() -> None:
    t = open_tunnel("none", 7801)
    assert (t.provider, t.public_url, t.alive(), t.pid) == ("none", "http://127.0.0.1:7801",
                                                            True, None)
    t.close()
    t.close()
    assert not t.alive()
    assert open_tunnel("none", 5, host="0.0.0.0").public_url == "http://127.0.0.1:5"


def test_unknown_provider() -> None:
    with pytest.raises(TunnelError, match="cloudflare, ngrok, none") as err:
        open_tunnel("localtunnel", 7801)
    assert err.value.problem is TunnelProblem.UNKNOWN_PROVIDER  # type: ignore[attr-defined]
    assert err.value.kind is ErrorKind.TUNNEL


def test_cloudflare_starts_once_ready_and_closes(cf: types.SimpleNamespace,
                                                 opened: list[Tunnel]) -> None:
    t = open_tunnel("cloudflare", 7801, deadline_s=10)
    opened.append(t)
    assert t.provider == "cloudflare"
    assert TRYCF_RE.match(t.public_url), t.public_url
    assert t.alive() and t.pid == int(cf.pidfile.read_text())
    assert t.metrics_url.startswith("http://127.0.0.1:")  # type: ignore[attr-defined]
    cmdline = Path(f"/proc/{t.pid}/cmdline").read_bytes().split(b"\0")
    assert b"--url" in cmdline and b"http://127.0.0.1:7801" in cmdline
    # told its log level and a loopback metrics server; ready only once /ready said so
    assert cmdline[cmdline.index(b"--loglevel") + 1] == b"info"
    assert cmdline[cmdline.index(b"--metrics") + 1] == b"127.0.0.1:0"
    assert "/ready" in cf.requests.read_text().split()
    pid = t.pid
    t.close()
    t.close()
    assert not t.alive() and _gone(pid)
    assert not _threads(f"colabswarm-cloudflared-{pid}")


def test_cloudflare_log_level_in_the_environment_cannot_hide_the_url(
    cf: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch, opened: list[Tunnel]
) -> None:
    import subprocess

    # cloudflared reads TUNNEL_LOGLEVEL; at warn the INF lines with the URL are not printed
    env = {**os.environ, "TUNNEL_LOGLEVEL": "warn", "FAKE_CLOUDFLARED_MODE": "no-tunnel-id"}
    quiet = subprocess.run([str(cf.exe), "tunnel", "--url", "http://127.0.0.1:1"], env=env,
                           capture_output=True, text=True, timeout=30)
    assert "Requesting new quick Tunnel" not in quiet.stderr
    monkeypatch.setenv("TUNNEL_LOGLEVEL", "warn")
    t = open_tunnel("cloudflare", 7801, deadline_s=10)  # we pass --loglevel info
    opened.append(t)
    assert TRYCF_RE.match(t.public_url)


async def test_cloudflare_url_leads_to_the_worker(
    cf: types.SimpleNamespace, proxy: TcpProxy, opened: list[Tunnel]
) -> None:
    t = open_tunnel("cloudflare", 7801, deadline_s=10)
    opened.append(t)
    info = await wait_until_reachable(t.public_url, TOKEN, 10, transport=_RouteTo(proxy.url))
    assert info["name"] == "fake-worker"


# one real scenario per row: the fake's mode, the problem, what the user must read (the
# provider's own line and the advice), what they must not read (advice for another cause)
CLOUDFLARE_SCENARIOS = {
    "rate-limited": (TunnelProblem.RATE_LIMITED,
                     ["error code: 1015", "429 Too Many Requests", "Wait a few minutes",
                      "tunnel='ngrok'"],
                     ["7844", "HTTPS_PROXY", "longer deadline", "DNS"]),
    "service-error": (TunnelProblem.PROVIDER_ERROR,
                      ["error code: 1101", "Cloudflare's side", "try again in a minute",
                       "tunnel='ngrok'"],
                      ["7844", "HTTPS_PROXY", "DNS"]),
    "no-tunnel-id": (TunnelProblem.PROVIDER_ERROR,
                     ["invalid UUID length: 0", "Cloudflare's side"],
                     ["7844", "HTTPS_PROXY", "DNS"]),
    "no-dns": (TunnelProblem.NO_DNS,
               ["lookup api.trycloudflare.com: no such host", "no working DNS",
                "no internet access"],
               ["7844", "HTTPS_PROXY", "rate limit"]),
    "no-edge": (TunnelProblem.EDGE_UNREACHABLE,
                ["Failed to dial a quic connection", "no recent network activity",
                 "UDP port 7844", "longer deadline", "tunnel='ngrok'"],
                ["HTTPS_PROXY", "DNS", "rate limit"]),
    "silent": (TunnelProblem.TIMEOUT,
               ["printed no tunnel URL within 1.0 s (killed it)", "(it printed nothing)",
                "Run it by hand"],
               ["HTTPS_PROXY", "7844"]),
}


@pytest.mark.parametrize("mode", list(CLOUDFLARE_SCENARIOS))
def test_cloudflare_failure_says_what_happened_and_what_to_do(
    mode: str, cf: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    problem, says, never = CLOUDFLARE_SCENARIOS[mode]
    monkeypatch.setenv("FAKE_CLOUDFLARED_MODE", mode)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TunnelFailure) as err:
        publish("cloudflare", 7801, WORKER_TOKEN, deadline_s=1.0)  # as start_worker does
    failure = err.value
    assert failure.problem is problem and failure.provider == "cloudflare"
    assert failure.kind is ErrorKind.TUNNEL
    msg = str(failure)
    for text in says:
        assert text in msg, f"{text!r} missing from:\n{msg}"
    for text in never:
        assert text not in msg.split("Its last lines:")[0], f"{text!r} in:\n{msg}"
    if mode != "silent":  # the provider's own last error line travels with the error
        assert failure.last_line and failure.last_line in {ln.strip() for ln in msg.split("\n")}
    assert failure.problem.retry_may_help == (mode in ("rate-limited", "service-error",
                                                       "no-tunnel-id", "no-edge", "silent"))
    _no_secret_anywhere(failure, caplog, WORKER_TOKEN)
    assert _wait_for(lambda: _gone(int(cf.pidfile.read_text())))
    assert _wait_for(lambda: not _threads("colabswarm-cloudflared"))


def test_cloudflare_missing_binary_and_no_network(cf: types.SimpleNamespace) -> None:
    cf.exe.unlink()
    with pytest.raises(TunnelFailure) as err:
        open_tunnel("cloudflare", 7801, deadline_s=10)
    msg = str(err.value)
    assert err.value.problem is TunnelProblem.BINARY_MISSING
    assert "could not be downloaded" in msg and cf.info.url in msg
    assert "tunnel='ngrok'" in msg and "tunnel='none'" in msg and "HTTPS_PROXY" not in msg
    assert list(cf.exe.parent.iterdir()) == []  # no half-written binary left behind


def test_cloudflare_downloads_a_missing_binary(cf: types.SimpleNamespace,
                                               opened: list[Tunnel]) -> None:
    cf.exe.unlink()
    server = _serve_files({"cloudflared-linux-amd64": (FAKES / "cloudflared").read_bytes()})
    try:
        cf.info.url = f"http://127.0.0.1:{server.server_address[1]}/cloudflared-linux-amd64"
        t = open_tunnel("cloudflare", 7801, deadline_s=10)
        opened.append(t)
    finally:
        server.shutdown()
        server.server_close()
    assert TRYCF_RE.match(t.public_url)
    assert os.access(cf.exe, os.X_OK)
    assert [p.name for p in cf.exe.parent.iterdir()] == [cf.exe.name]


def test_cloudflare_macos_archive_is_unpacked(cf: types.SimpleNamespace,
                                             opened: list[Tunnel]) -> None:
    # pycloudflared 0.3.0 on macOS: executable <pkg>/cloudflared, url ...-darwin-amd64.tgz
    cf.exe.unlink()
    exe = cf.exe.parent / "cloudflared"
    server = _serve_files({"cloudflared-darwin-amd64.tgz":
                           _tgz("cloudflared", (FAKES / "cloudflared").read_bytes())})
    try:
        cf.info.executable = str(exe)
        cf.info.url = f"http://127.0.0.1:{server.server_address[1]}/cloudflared-darwin-amd64.tgz"
        t = open_tunnel("cloudflare", 7801, deadline_s=10)
        opened.append(t)
    finally:
        server.shutdown()
        server.server_close()
    assert TRYCF_RE.match(t.public_url)
    assert exe.read_bytes() == (FAKES / "cloudflared").read_bytes()  # the program, not the .tgz
    assert [p.name for p in exe.parent.iterdir()] == ["cloudflared"]


def test_cloudflare_corrupt_binary_is_replaced_by_itself(
    cf: types.SimpleNamespace, opened: list[Tunnel], caplog: pytest.LogCaptureFixture
) -> None:
    # what a raw write of the macOS .tgz left at the executable path: "Exec format error"
    cf.exe.write_bytes(_tgz("cloudflared", b"#!/bin/sh\n"))
    cf.exe.chmod(0o755)
    server = _serve_files({"cloudflared-linux-amd64": (FAKES / "cloudflared").read_bytes()})
    caplog.set_level(logging.INFO)
    try:
        cf.info.url = f"http://127.0.0.1:{server.server_address[1]}/cloudflared-linux-amd64"
        t = open_tunnel("cloudflare", 7801, deadline_s=10)
        opened.append(t)
    finally:
        server.shutdown()
        server.server_close()
    assert TRYCF_RE.match(t.public_url)
    assert cf.exe.read_bytes() == (FAKES / "cloudflared").read_bytes()
    assert "cannot run" in caplog.text and "downloading it again" in caplog.text


def test_cloudflare_corrupt_binary_that_cannot_be_fetched_again(
    cf: types.SimpleNamespace,
) -> None:
    cf.exe.write_bytes(b"<html>Not Found</html>")  # a saved error page, marked executable
    cf.exe.chmod(0o755)
    with pytest.raises(TunnelFailure) as err:
        open_tunnel("cloudflare", 7801, deadline_s=10)
    assert err.value.problem is TunnelProblem.BINARY_CORRUPT
    msg = str(err.value)
    assert "cannot run" in msg and "could not be downloaded" in msg
    assert "delete" not in msg.lower()  # deleting would only repeat the failure


def test_cloudflare_process_killed_later(cf: types.SimpleNamespace, opened: list[Tunnel]) -> None:
    t = open_tunnel("cloudflare", 7801, deadline_s=10)
    opened.append(t)
    assert t.alive()
    assert t.pid is not None
    os.kill(t.pid, signal.SIGKILL)
    assert _wait_for(lambda: not t.alive())
    assert TRYCF_RE.match(t.public_url)  # still readable, for the error message


def test_cloudflare_binary_override(
    cf: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch, opened: list[Tunnel],
    tmp_path: Path,
) -> None:
    import pycloudflared.util

    def _unused() -> None:
        raise AssertionError("the override must not consult pycloudflared")

    monkeypatch.setattr(pycloudflared.util, "get_info", _unused)
    monkeypatch.setenv(cf_module.ENV_BINARY, str(FAKES / "cloudflared"))
    t = open_tunnel("cloudflare", 7801, deadline_s=10)
    opened.append(t)
    assert TRYCF_RE.match(t.public_url)
    monkeypatch.setenv(cf_module.ENV_BINARY, str(cf.exe.parent / "nope"))
    with pytest.raises(TunnelFailure, match="COLABSWARM_CLOUDFLARED") as err:
        open_tunnel("cloudflare", 7801, deadline_s=10)
    assert err.value.problem is TunnelProblem.BINARY_MISSING
    mine = tmp_path / "my-cloudflared"  # the user's own file: reported, never replaced
    mine.write_bytes(b"\x7fELF garbage")
    mine.chmod(0o755)
    monkeypatch.setenv(cf_module.ENV_BINARY, str(mine))
    with pytest.raises(TunnelFailure) as err:
        open_tunnel("cloudflare", 7801, deadline_s=10)
    assert err.value.problem is TunnelProblem.BINARY_CORRUPT
    assert mine.read_bytes() == b"\x7fELF garbage"


# -- one deadline for the whole start ---------------------------------------------------------


def test_one_deadline_covers_opening_and_the_check(
    cf: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import colabswarm.tunnel as tunnel_pkg

    given: list[float] = []
    real_check = tunnel_pkg.wait_until_reachable
    dns = _Fails(httpx.ConnectError("[Errno -2] Name or service not known"))

    async def check(url: str, token: str, deadline_s: float = 60.0, **kw: Any) -> Any:
        given.append(deadline_s)
        return await real_check(url, token, deadline_s, transport=dns)

    monkeypatch.setattr(tunnel_pkg, "wait_until_reachable", check)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TunnelFailure) as err:
        publish("cloudflare", 7801, WORKER_TOKEN, deadline_s=2.0)
    # the check got what opening left of the one deadline, not a deadline of its own
    assert len(given) == 1 and 0 < given[0] < 2.0
    assert err.value.problem is TunnelProblem.NOT_REACHABLE
    assert "of the 2 s deadline that covers the whole start" in str(err.value)
    assert "does not resolve yet" in str(err.value)
    _no_secret_anywhere(err.value, caplog, WORKER_TOKEN)
    assert _wait_for(lambda: _gone(int(cf.pidfile.read_text())))  # the tunnel was closed


# -- ngrok ------------------------------------------------------------------------------------


@pytest.fixture
def ng(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """The fake ngrok at a path of its own (pyngrok keys its agents by path), pyngrok's config
    file in tmp_path, and no authtoken anywhere unless a test provides one."""
    exe = tmp_path / "ngrok"
    shutil.copy(FAKES / "ngrok", exe)
    from pyngrok import conf

    monkeypatch.setenv("PYNGROK_NGROK_PATH", str(exe))
    config = tmp_path / "xdg" / "ngrok" / "ngrok.yml"  # where ngrok itself looks by default
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(conf, "DEFAULT_NGROK_CONFIG_PATH", str(config))
    monkeypatch.delenv("NGROK_AUTHTOKEN", raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", None)  # not on Colab
    monkeypatch.setenv("FAKE_PIDFILE", str(tmp_path / "ngrok.pid"))
    monkeypatch.setenv("FAKE_NGROK_REQUESTS", str(tmp_path / "requests.jsonl"))
    for var in ("FAKE_NGROK_MODE", "FAKE_NGROK_PUBLIC_URL"):
        monkeypatch.delenv(var, raising=False)
    return types.SimpleNamespace(exe=exe, pidfile=tmp_path / "ngrok.pid", config=config,
                                 requests=tmp_path / "requests.jsonl")


def _requests(ng: types.SimpleNamespace) -> list[dict[str, Any]]:
    if not ng.requests.exists():
        return []
    return [json.loads(line) for line in ng.requests.read_text().splitlines()]


def _token_was_used_but_not_on_the_command_line(t: Tunnel, token: str) -> None:
    """The agent started with the token (the fake fails with ERR_NGROK_4018 without one), yet
    no user of the machine can read it in /proc/<pid>/cmdline: it sits in a config file only
    this user can read, removed with the agent."""
    assert t.alive()
    assert token not in Path(f"/proc/{t.pid}/cmdline").read_text()
    private = [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("colabswarm-ngrok-*")
               if token in (p / "ngrok.yml").read_text()]
    assert len(private) == 1
    assert private[0].stat().st_mode & 0o777 == 0o700
    assert (private[0] / "ngrok.yml").stat().st_mode & 0o777 == 0o600
    t.close()
    assert not private[0].exists(), "removed with the agent"


def test_ngrok_starts_and_closes(ng: types.SimpleNamespace, opened: list[Tunnel],
                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        t = open_tunnel("ngrok", 7801, deadline_s=10, authtoken=AUTHTOKEN)
    opened.append(t)
    assert t.provider == "ngrok"
    assert re.match(r"^https://[0-9a-f]+\.ngrok-free\.app$", t.public_url)
    assert t.alive() and t.pid == int(ng.pidfile.read_text())
    posts = [r for r in _requests(ng) if r["method"] == "POST"]
    assert posts and posts[0]["body"]["upstream"]["url"] == "http://127.0.0.1:7801"
    assert AUTHTOKEN not in caplog.text
    pid = t.pid
    _token_was_used_but_not_on_the_command_line(t, AUTHTOKEN)  # and closes it
    t.close()
    assert not t.alive() and _gone(pid)


async def test_ngrok_url_leads_to_the_worker(
    ng: types.SimpleNamespace, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch,
    opened: list[Tunnel]
) -> None:
    monkeypatch.setenv("FAKE_NGROK_PUBLIC_URL", proxy.url)
    t = open_tunnel("ngrok", 7801, deadline_s=10, authtoken="tok-from-argument")
    opened.append(t)
    assert t.public_url == proxy.url
    info = await wait_until_reachable(t.public_url, TOKEN, deadline_s=10)
    assert info["version"] == "1"


def test_ngrok_without_authtoken_says_where_to_put_one(ng: types.SimpleNamespace) -> None:
    with pytest.raises(TunnelFailure) as err:
        open_tunnel("ngrok", 7801, deadline_s=10)
    msg = str(err.value)
    assert err.value.problem is TunnelProblem.AUTHTOKEN_MISSING
    assert "NGROK_AUTHTOKEN" in msg and "Colab secret" in msg and "tunnel='cloudflare'" in msg
    assert not ng.pidfile.exists()  # failed before starting anything


def test_ngrok_authtoken_from_env(ng: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
                                  opened: list[Tunnel]) -> None:
    monkeypatch.setenv("NGROK_AUTHTOKEN", "tok-from-env")
    t = open_tunnel("ngrok", 7801, deadline_s=10)
    opened.append(t)
    assert t.alive()
    _token_was_used_but_not_on_the_command_line(t, "tok-from-env")


def test_ngrok_authtoken_from_colab_secrets(
    ng: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch, opened: list[Tunnel]
) -> None:
    asked: list[str] = []

    def get(name: str) -> str:
        asked.append(name)
        return "tok-from-colab"

    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=get)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    t = open_tunnel("ngrok", 7801, deadline_s=10)
    opened.append(t)
    assert asked == ["NGROK_AUTHTOKEN"]
    _token_was_used_but_not_on_the_command_line(t, "tok-from-colab")


def test_ngrok_colab_secret_errors_mean_no_token(
    ng: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    class SecretNotFoundError(Exception):
        pass

    def get(name: str) -> str:
        raise SecretNotFoundError(name)

    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=get)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    with pytest.raises(TunnelFailure, match="NGROK_AUTHTOKEN"):
        open_tunnel("ngrok", 7801, deadline_s=10)


def test_ngrok_authtoken_in_ngrok_config_is_enough(
    ng: types.SimpleNamespace, tmp_path: Path, opened: list[Tunnel]
) -> None:
    ng.config.parent.mkdir(parents=True, exist_ok=True)
    ng.config.write_text('version: "3"\nagent:\n  authtoken: tok-in-config\n')
    t = open_tunnel("ngrok", 7801, deadline_s=10)
    opened.append(t)
    assert t.alive()


NGROK_SCENARIOS = {
    "bad-authtoken": (TunnelProblem.AUTHTOKEN_INVALID,
                      ["does not look like a proper ngrok authtoken", "ERR_NGROK_105",
                       "dashboard.ngrok.com/get-started/your-authtoken", "tunnel='cloudflare'"],
                      ["one agent at a time", "DNS"]),
    "revoked-authtoken": (TunnelProblem.AUTHTOKEN_INVALID,
                          ["properly formed, but it is invalid", "ERR_NGROK_107",
                           "reset or revoked", "dashboard.ngrok.com/get-started/your-authtoken"],
                          ["one agent at a time", "DNS"]),
    "session-in-use": (TunnelProblem.AGENT_SESSION_IN_USE,
                       ["limited to 1 simultaneous ngrok agent sessions", "one agent at a time",
                        "another notebook", "dashboard.ngrok.com/agents", "tunnel='cloudflare'"],
                       ["Check the authtoken", "Copy the current one", "DNS"]),
    "no-dns": (TunnelProblem.NO_DNS,
               ["did not open a tunnel within 1.0 s", "kept retrying",
                "lookup connect.ngrok-agent.com on 127.0.0.53:53: no such host",
                "no working DNS"],
               ["authtoken", "certificate"]),
    "tls-intercepted": (TunnelProblem.TLS_INTERCEPTED,
                        ["x509: certificate signed by unknown authority", "inspects TLS",
                         "tunnel='cloudflare'"],
                        ["authtoken", "DNS"]),
    "silent": (TunnelProblem.TIMEOUT,
               ["did not open a tunnel within 1.0 s (killed it); it printed nothing"],
               ["authtoken", "DNS"]),
}


@pytest.mark.parametrize("mode", list(NGROK_SCENARIOS))
def test_ngrok_failure_says_what_happened_and_what_to_do(
    mode: str, ng: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    problem, says, never = NGROK_SCENARIOS[mode]
    monkeypatch.setenv("FAKE_NGROK_MODE", mode)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TunnelFailure) as err:
        publish("ngrok", 7801, WORKER_TOKEN, deadline_s=1.0, authtoken=AUTHTOKEN)
    failure = err.value
    assert failure.problem is problem and failure.provider == "ngrok"
    msg = str(failure)
    for text in says:
        assert text in msg, f"{text!r} missing from:\n{msg}"
    for text in never:
        assert text not in msg, f"{text!r} in:\n{msg}"
    _readable(msg)
    if mode in ("bad-authtoken", "revoked-authtoken"):
        assert "Your authtoken: [redacted]" in msg  # ngrok printed it; we do not
    _no_secret_anywhere(failure, caplog, AUTHTOKEN, WORKER_TOKEN)
    assert _wait_for(lambda: _gone(int(ng.pidfile.read_text())))
    assert _wait_for(lambda: not _threads("colabswarm-ngrok"))


def test_ngrok_revoked_authtoken_from_its_config_file_is_not_shown(
    ng: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stored = "2ZyxWvUtSrQp_9876543210aBcDeFgHiJkLmNoPq"  # we never passed it: ngrok read it
    ng.config.parent.mkdir(parents=True, exist_ok=True)
    ng.config.write_text(f'version: "3"\nagent:\n  authtoken: {stored}\n')
    monkeypatch.setenv("FAKE_NGROK_MODE", "revoked-authtoken")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TunnelFailure) as err:
        open_tunnel("ngrok", 7801, deadline_s=5)
    assert err.value.problem is TunnelProblem.AUTHTOKEN_INVALID
    _no_secret_anywhere(err.value, caplog, stored)


@pytest.mark.parametrize(("mode", "code"), [("domain-in-use", "334"), ("endpoint-limit", "324")])
def test_ngrok_second_worker_on_a_free_account(
    mode: str, code: str, ng: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
    opened: list[Tunnel], caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("FAKE_NGROK_MODE", mode)
    caplog.set_level(logging.DEBUG)
    first = open_tunnel("ngrok", 7801, deadline_s=10, authtoken=AUTHTOKEN)
    opened.append(first)
    with pytest.raises(TunnelFailure) as err:
        publish("ngrok", 7802, WORKER_TOKEN, deadline_s=5, authtoken=AUTHTOKEN)
    failure = err.value
    assert failure.problem is TunnelProblem.ENDPOINT_LIMIT
    msg = str(failure)
    assert f"ERR_NGROK_{code}" in msg and "one ngrok worker per free account" in msg
    assert "tunnel='cloudflare'" in msg
    assert first.public_url in msg  # ngrok's own words name the endpoint already online
    _readable(msg)
    _no_secret_anywhere(failure, caplog, AUTHTOKEN, WORKER_TOKEN)
    assert first.alive()  # the failed second endpoint did not take the shared agent down


def test_ngrok_silent_binary_is_killed(
    ng: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NGROK_MODE", "silent")  # also ignores SIGTERM
    with pytest.raises(TunnelFailure, match="did not open a tunnel within 1.0 s"):
        open_tunnel("ngrok", 7801, deadline_s=1.0, authtoken="tok")
    assert _wait_for(lambda: _gone(int(ng.pidfile.read_text())))
    assert _wait_for(lambda: not _threads("colabswarm-ngrok"))


def test_ngrok_agent_killed_later(ng: types.SimpleNamespace, opened: list[Tunnel]) -> None:
    t = open_tunnel("ngrok", 7801, deadline_s=10, authtoken="tok")
    opened.append(t)
    assert t.pid is not None
    os.kill(t.pid, signal.SIGKILL)
    assert _wait_for(lambda: not t.alive())
    t.close()
    reopened = open_tunnel("ngrok", 7801, deadline_s=10, authtoken="tok")  # a fresh agent
    opened.append(reopened)
    assert reopened.alive() and reopened.pid != t.pid


def test_ngrok_tunnels_share_one_agent(ng: types.SimpleNamespace, opened: list[Tunnel]) -> None:
    a = open_tunnel("ngrok", 7801, deadline_s=10, authtoken="tok")
    b = open_tunnel("ngrok", 7802, deadline_s=10, authtoken="tok")
    opened += [a, b]
    assert a.pid == b.pid and a.public_url != b.public_url
    a.close()
    assert b.alive()
    assert any(r["method"] == "DELETE" for r in _requests(ng))
    b.close()
    assert b.pid is not None and _wait_for(lambda: _gone(b.pid))  # type: ignore[arg-type]


def test_ngrok_error_text_is_cleaned_and_classified() -> None:
    # the agent API's body (bubenshchykov/ngrok#313) and a logfmt value as pyngrok leaves it
    body = ('ngrok client exception, API returned 502: {"error_code":103,"status_code":502,'
            '"msg":"failed to start tunnel","details":{"err":"failed to start tunnel: Your '
            'account may not run more than 3 tunnels over a single ngrok agent session.\\nThe '
            'tunnels already running on this session are:\\ntn_2U71j\\n\\r\\n\\r\\n'
            'ERR_NGROK_324\\r\\n"}}')
    assert clean_ngrok_error(body) == (
        "failed to start tunnel: Your account may not run more than 3 tunnels over a single "
        "ngrok agent session.\nThe tunnels already running on this session are:\ntn_2U71j")
    assert classify_ngrok(body) is TunnelProblem.ENDPOINT_LIMIT
    logfmt = ("authentication failed: Usage of ngrok requires a verified account and authtoken."
              "\\n\\nSign up for an account: https://dashboard.ngrok.com/signup\\r\\n\\r\\n"
              "ERR_NGROK_4018\\r\\n")
    assert clean_ngrok_error(logfmt).endswith("signup") and "\\" not in clean_ngrok_error(logfmt)
    assert classify_ngrok(logfmt) is TunnelProblem.AUTHTOKEN_MISSING
    assert classify_ngrok('err="read tcp 10.0.0.2:41798->3.15.55.144:443: i/o timeout"') is \
        TunnelProblem.NO_NETWORK


# -- redaction --------------------------------------------------------------------------------


def test_redaction_of_known_secrets_and_token_shaped_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert redact("Your authtoken: abc123def456\nnext") == "Your authtoken: [redacted]\nnext"
    assert redact("ngrok start --authtoken s3cr3t-value --log stdout") == \
        "ngrok start --authtoken [redacted] --log stdout"
    assert redact(f"https://x.trycloudflare.com#token={WORKER_TOKEN}") == \
        "https://x.trycloudflare.com#token=[redacted]"
    assert redact(f"id {AUTHTOKEN} end") == "id [redacted] end"
    assert redact("a lowercase-only-secret-value", ["lowercase-only-secret-value"]) == \
        "a [redacted]"
    keep = ("https://brave-river-pixel-lemon.trycloudflare.com /tmp/pytest-of-root/test_x0 "
            "0f3c1d0e-1111-4222-8333-123456789abc the token was refused")
    assert redact(keep) == keep  # addresses, paths, UUIDs and prose stay readable
    caplog.set_level(logging.DEBUG)
    logging.getLogger("pyngrok.process.ngrok").error(
        't=1 lvl=eror err="Your authtoken: %s"', AUTHTOKEN)
    assert "Your authtoken: [redacted]" in caplog.text and AUTHTOKEN not in caplog.text


# -- wait_until_reachable ---------------------------------------------------------------------


async def test_reachable_through_a_flaky_proxy(worker_server: ThreadingHTTPServer) -> None:
    with TcpProxy("127.0.0.1", worker_server.server_address[1], drop_probability=0.6,
                  seed=3) as flaky:
        info = await wait_until_reachable(flaky.url + "/", TOKEN, deadline_s=15)
        assert info["name"] == "fake-worker"
        assert flaky.drops >= 1 and flaky.connections > flaky.drops


async def test_wrong_token_fails_at_once(proxy: TcpProxy) -> None:
    start = time.monotonic()
    with pytest.raises(TunnelFailure, match="401: the token was refused") as err:
        await wait_until_reachable(proxy.url, "not-the-token-0123456789", deadline_s=20)
    assert time.monotonic() - start < 3
    assert err.value.problem is TunnelProblem.TOKEN_REFUSED
    assert not err.value.problem.retry_may_help
    assert "not-the-token" not in str(err.value)


async def test_gateway_errors_until_the_deadline(
    worker_server: ThreadingHTTPServer, proxy: TcpProxy
) -> None:
    worker_server.RequestHandlerClass.status = 530  # type: ignore[attr-defined]
    start = time.monotonic()
    with pytest.raises(TunnelError) as err:
        await wait_until_reachable(proxy.url, TOKEN, deadline_s=0.6)
    assert time.monotonic() - start < 2.5
    assert "HTTP 530" in str(err.value) and "attempts" in str(err.value)
    assert err.value.problem is TunnelProblem.NOT_REACHABLE  # type: ignore[attr-defined]


async def test_not_json_is_not_a_worker(worker_server: ThreadingHTTPServer,
                                        proxy: TcpProxy) -> None:
    worker_server.RequestHandlerClass.status = 200  # type: ignore[attr-defined]
    with pytest.raises(TunnelError, match="not a colabswarm worker"):
        await wait_until_reachable(proxy.url, TOKEN, deadline_s=0.5)


async def test_unresolved_name_is_reported_as_dns() -> None:
    dns = _Fails(httpx.ConnectError("[Errno -2] Name or service not known"))
    with pytest.raises(TunnelError, match="does not resolve yet") as err:
        await wait_until_reachable("https://brave-river.trycloudflare.com", TOKEN,
                                   deadline_s=0.6, transport=dns)
    assert dns.calls >= 2  # it retried
    assert "tunnel='none'" in str(err.value)


async def test_nothing_listening_is_a_connect_error() -> None:
    with pytest.raises(TunnelError, match="could not connect"):
        await wait_until_reachable(f"http://127.0.0.1:{_closed_port()}", TOKEN, deadline_s=0.6)


async def test_worker_coming_up_late_is_found(worker_server: ThreadingHTTPServer) -> None:
    with TcpProxy("127.0.0.1", worker_server.server_address[1], drop_probability=1.0) as down:
        import asyncio

        async def _recover() -> None:
            await asyncio.sleep(0.6)
            down.drop_probability = 0.0

        task = asyncio.create_task(_recover())
        info = await wait_until_reachable(down.url, TOKEN, deadline_s=10)
        await task
        assert info["version"] == "1" and down.drops >= 2


def test_tcpproxy_close_connections(worker_server: ThreadingHTTPServer) -> None:
    with TcpProxy("127.0.0.1", worker_server.server_address[1]) as p:
        with httpx.Client() as client:
            assert client.get(p.url + "/healthz").json() == {"ok": True}
        assert p.connections == 1 and p.drops == 0
        assert _wait_for(lambda: p.open_connections == 0)
        idle = socket.create_connection(("127.0.0.1", p.port))  # a connection held open
        assert _wait_for(lambda: p.open_connections == 1)
        assert p.close_connections() == 1
        idle.settimeout(5)
        try:
            assert idle.recv(1) == b""
        except ConnectionResetError:
            pass
        idle.close()
    p.stop()  # idempotent
