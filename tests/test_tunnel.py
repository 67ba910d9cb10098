"""The tunnel package on top of fake cloudflared/ngrok binaries (tests/fakes), never the internet.

The real wrapper code runs; only the binaries are stand-ins. cloudflared is found where
pycloudflared says it lives (pycloudflared.util.get_info, patched to a temporary folder so
nothing is written into site-packages); ngrok through pyngrok's own PYNGROK_NGROK_PATH.
The fake cloudflared announces a real-looking https://<name>.trycloudflare.com URL, which no
resolver here knows, so end-to-end checks route that host to a local TcpProxy through an httpx
transport passed to wait_until_reachable (the same hook a caller behind a proxy would use).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from colabswarm.errors import TunnelError
from colabswarm.tunnel import Tunnel, open_tunnel, wait_until_reachable
from colabswarm.tunnel import cloudflare as cf_module

sys.path.insert(0, str(Path(__file__).parent))
from tcpproxy import TcpProxy  # noqa: E402

FAKES = Path(__file__).parent / "fakes"
TOKEN = "test-token-0123456789abcdef"
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
    for var in ("FAKE_CLOUDFLARED_MODE", "FAKE_CLOUDFLARED_PUBLIC_URL"):
        monkeypatch.delenv(var, raising=False)
    return types.SimpleNamespace(info=info, exe=exe, pidfile=tmp_path / "cloudflared.pid")


def test_none_is_the_local_url() -> None:
    t = open_tunnel("none", 7801)
    assert (t.provider, t.public_url, t.alive(), t.pid) == ("none", "http://127.0.0.1:7801",
                                                            True, None)
    t.close()
    t.close()
    assert not t.alive()
    assert open_tunnel("none", 5, host="0.0.0.0").public_url == "http://127.0.0.1:5"


def test_unknown_provider() -> None:
    with pytest.raises(TunnelError, match="cloudflare, ngrok, none"):
        open_tunnel("localtunnel", 7801)


def test_cloudflare_starts_and_closes(cf: types.SimpleNamespace, opened: list[Tunnel]) -> None:
    t = open_tunnel("cloudflare", 7801, deadline_s=10)
    opened.append(t)
    assert t.provider == "cloudflare"
    assert TRYCF_RE.match(t.public_url), t.public_url
    assert t.alive() and t.pid == int(cf.pidfile.read_text())
    assert t.metrics_url.startswith("http://127.0.0.1:")  # type: ignore[attr-defined]
    cmdline = Path(f"/proc/{t.pid}/cmdline").read_bytes().split(b"\0")
    assert b"--url" in cmdline and b"http://127.0.0.1:7801" in cmdline
    pid = t.pid
    t.close()
    t.close()
    assert not t.alive() and _gone(pid)
    assert not _threads(f"colabswarm-cloudflared-{pid}")


async def test_cloudflare_url_leads_to_the_worker(
    cf: types.SimpleNamespace, proxy: TcpProxy, opened: list[Tunnel]
) -> None:
    t = open_tunnel("cloudflare", 7801, deadline_s=10)
    opened.append(t)
    info = await wait_until_reachable(t.public_url, TOKEN, 10, transport=_RouteTo(proxy.url))
    assert info["name"] == "fake-worker"


def test_cloudflare_missing_binary_and_no_network(cf: types.SimpleNamespace) -> None:
    cf.exe.unlink()
    start = time.monotonic()
    with pytest.raises(TunnelError) as err:
        open_tunnel("cloudflare", 7801, deadline_s=10)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "could not be downloaded" in msg and cf.info.url in msg
    assert "tunnel='ngrok'" in msg and "tunnel='none'" in msg and "HTTPS_PROXY" in msg
    assert list(cf.exe.parent.iterdir()) == []  # no half-written binary left behind


def test_cloudflare_downloads_a_missing_binary(
    cf: types.SimpleNamespace, tmp_path: Path, opened: list[Tunnel]
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(FAKES / "cloudflared", served / "cloudflared-linux-amd64")
    cf.exe.unlink()

    class Files(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            data = (served / "cloudflared-linux-amd64").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
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


def test_cloudflare_crash_reports_code_and_last_lines(
    cf: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_MODE", "crash")
    with pytest.raises(TunnelError) as err:
        open_tunnel("cloudflare", 7801, deadline_s=10)
    msg = str(err.value)
    assert "exited with code 1" in msg
    assert "failed to request quick Tunnel" in msg  # its own words, for the user
    assert "tunnel='ngrok'" in msg


def test_cloudflare_silent_binary_fails_by_the_deadline(
    cf: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_MODE", "silent")  # also ignores SIGTERM
    deadline = 1.0
    start = time.monotonic()
    with pytest.raises(TunnelError) as err:
        open_tunnel("cloudflare", 7801, deadline_s=deadline)
    assert time.monotonic() - start < deadline + 2.0
    assert "printed no tunnel URL within 1 s (killed it)" in str(err.value)
    assert "printed nothing" in str(err.value)
    pid = int(cf.pidfile.read_text())
    assert _gone(pid)
    assert not _threads("colabswarm-cloudflared")


def test_cloudflare_without_registration_line_still_opens(
    cf: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch, opened: list[Tunnel]
) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_MODE", "noconnect")
    monkeypatch.setattr(cf_module, "_REGISTER_GRACE_S", 0.2)
    t = open_tunnel("cloudflare", 7801, deadline_s=10)
    opened.append(t)
    assert TRYCF_RE.match(t.public_url) and t.alive()


def test_cloudflare_ignores_the_api_host_in_error_lines(
    cf: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_PUBLIC_URL", "https://api.trycloudflare.com")
    with pytest.raises(TunnelError, match="no tunnel URL"):
        open_tunnel("cloudflare", 7801, deadline_s=0.6)


def test_cloudflare_process_killed_later(cf: types.SimpleNamespace, opened: list[Tunnel]) -> None:
    t = open_tunnel("cloudflare", 7801, deadline_s=10)
    opened.append(t)
    assert t.alive()
    assert t.pid is not None
    os.kill(t.pid, signal.SIGKILL)
    assert _wait_for(lambda: not t.alive())
    assert TRYCF_RE.match(t.public_url)  # still readable, for the error message


def test_cloudflare_binary_override(
    cf: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch, opened: list[Tunnel]
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
    with pytest.raises(TunnelError, match="COLABSWARM_CLOUDFLARED"):
        open_tunnel("cloudflare", 7801, deadline_s=10)


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


def test_ngrok_starts_and_closes(ng: types.SimpleNamespace, opened: list[Tunnel],
                                 caplog: pytest.LogCaptureFixture) -> None:
    secret = "2abcDEFsecretNGROKtoken_0123456789"
    with caplog.at_level(logging.DEBUG):
        t = open_tunnel("ngrok", 7801, deadline_s=10, authtoken=secret)
    opened.append(t)
    assert t.provider == "ngrok"
    assert re.match(r"^https://[0-9a-f]+\.ngrok-free\.app$", t.public_url)
    assert t.alive() and t.pid == int(ng.pidfile.read_text())
    posts = [r for r in _requests(ng) if r["method"] == "POST"]
    assert posts and posts[0]["body"]["upstream"]["url"] == "http://127.0.0.1:7801"
    assert secret not in caplog.text
    pid = t.pid
    t.close()
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
    with pytest.raises(TunnelError) as err:
        open_tunnel("ngrok", 7801, deadline_s=10)
    msg = str(err.value)
    assert "NGROK_AUTHTOKEN" in msg and "Colab secret" in msg and "tunnel='cloudflare'" in msg
    assert not ng.pidfile.exists()  # failed before starting anything


def test_ngrok_authtoken_from_env(ng: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
                                  opened: list[Tunnel]) -> None:
    monkeypatch.setenv("NGROK_AUTHTOKEN", "tok-from-env")
    t = open_tunnel("ngrok", 7801, deadline_s=10)
    opened.append(t)
    assert t.alive()
    assert "tok-from-env" in Path(f"/proc/{t.pid}/cmdline").read_text()


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
    assert "tok-from-colab" in Path(f"/proc/{t.pid}/cmdline").read_text()


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
    with pytest.raises(TunnelError, match="NGROK_AUTHTOKEN"):
        open_tunnel("ngrok", 7801, deadline_s=10)


def test_ngrok_authtoken_in_ngrok_config_is_enough(
    ng: types.SimpleNamespace, tmp_path: Path, opened: list[Tunnel]
) -> None:
    ng.config.parent.mkdir(parents=True, exist_ok=True)
    ng.config.write_text('version: "3"\nagent:\n  authtoken: tok-in-config\n')
    t = open_tunnel("ngrok", 7801, deadline_s=10)
    opened.append(t)
    assert t.alive()


def test_ngrok_agent_error(ng: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NGROK_MODE", "crash")
    with pytest.raises(TunnelError) as err:
        open_tunnel("ngrok", 7801, deadline_s=10, authtoken="tok-rejected")
    msg = str(err.value)
    assert "ERR_NGROK_4018" in msg and "Check the authtoken" in msg
    assert "tok-rejected" not in msg


def test_ngrok_silent_binary_fails_by_the_deadline(
    ng: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NGROK_MODE", "silent")
    deadline = 1.0
    start = time.monotonic()
    with pytest.raises(TunnelError, match="did not open a tunnel within 1 s"):
        open_tunnel("ngrok", 7801, deadline_s=deadline, authtoken="tok")
    assert time.monotonic() - start < deadline + 2.0
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


# -- wait_until_reachable ---------------------------------------------------------------------


async def test_reachable_through_a_flaky_proxy(worker_server: ThreadingHTTPServer) -> None:
    with TcpProxy("127.0.0.1", worker_server.server_address[1], drop_probability=0.6,
                  seed=3) as flaky:
        info = await wait_until_reachable(flaky.url + "/", TOKEN, deadline_s=15)
        assert info["name"] == "fake-worker"
        assert flaky.drops >= 1 and flaky.connections > flaky.drops


async def test_wrong_token_fails_at_once(proxy: TcpProxy) -> None:
    start = time.monotonic()
    with pytest.raises(TunnelError, match="401: the token was refused") as err:
        await wait_until_reachable(proxy.url, "not-the-token-0123456789", deadline_s=20)
    assert time.monotonic() - start < 3
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
