"""A real worker published through the (fake) cloudflared: the health check and a generation
travel through a second hop (a local TCP proxy standing in for Cloudflare's edge), a dead
tunnel is noticed and reopened with a new URL and the same token, and a tunnel that cannot be
opened stops the start with its TunnelProblem and no token in sight.

Only name resolution is routed by hand: the fake prints a real-looking
``https://<name>.trycloudflare.com`` that no resolver here knows, so requests for it are sent to
the proxy, keeping their Host header (tests/test_tunnel.py's _RouteTo).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

import pytest

import colabswarm.tunnel as tunnel_pkg
from colabswarm.backend.client import WorkerClient
from colabswarm.backend.serve import start_worker
from colabswarm.errors import TunnelError
from colabswarm.protocol import JobRequest, decode_share
from colabswarm.tunnel import TunnelFailure, TunnelProblem

sys.path.insert(0, str(Path(__file__).parent))
from tcpproxy import TcpProxy  # noqa: E402
from test_tunnel import _RouteTo, _wait_for, cf  # noqa: E402,F401  (cf is a fixture)


@pytest.fixture
def published(cf, monkeypatch):  # noqa: F811
    """start_worker(tunnel="cloudflare") with the proxy as the edge in front of it."""
    proxy: TcpProxy | None = None
    real_check = tunnel_pkg.wait_until_reachable

    async def through_proxy(url: str, token: str, deadline_s: float = 60.0, **kw):
        assert proxy is not None
        return await real_check(url, token, deadline_s, transport=_RouteTo(proxy.url))

    monkeypatch.setattr(tunnel_pkg, "wait_until_reachable", through_proxy)
    handle = start_worker("tiny", tunnel="none", name="published")
    proxy = TcpProxy("127.0.0.1", handle.port).start()
    try:
        handle.open_tunnel("cloudflare")
        yield handle, proxy
    finally:
        handle.stop()
        proxy.stop()


async def test_generation_travels_through_the_tunnel_hop(published):
    handle, proxy = published
    url, token = decode_share(handle.share)
    assert url.endswith(".trycloudflare.com") and token == handle.token
    before = proxy.connections
    # the client dials the proxy (the stand-in edge) with the worker's token
    async with WorkerClient(f"{proxy.url}#token={token}") as c:
        images = await c.run(JobRequest(prompt="through", width=64, height=64, steps=2,
                                        seeds=[1, 2]))
    assert len(images) == 2 and images[0].size == (64, 64)
    assert proxy.connections > before, "the requests crossed the proxy"


def test_dead_tunnel_is_reported_and_reopened_with_the_same_token(published):
    handle, _ = published
    old = handle.share
    assert handle.tunnel_alive
    os.kill(handle.tunnel.pid, signal.SIGKILL)
    assert _wait_for(lambda: not handle.tunnel_alive, 5)
    new = handle.reopen()
    assert handle.tunnel_alive and new == handle.share
    assert decode_share(new)[1] == decode_share(old)[1], "the token stays"
    assert decode_share(new)[0] != decode_share(old)[0], "a new public URL"


def test_reopen_without_a_tunnel_says_so():
    handle = start_worker("tiny", tunnel="none")
    try:
        with pytest.raises(TunnelError, match="no tunnel"):
            handle.reopen()
    finally:
        handle.stop()


def test_worker_start_stops_with_the_tunnels_problem_and_no_token(
    cf, monkeypatch, caplog  # noqa: F811
):
    monkeypatch.setenv("FAKE_CLOUDFLARED_MODE", "rate-limited")
    caplog.set_level(logging.DEBUG)
    token = "Zq8_Lm3xT7vRk2NwPq9YbC4Hd6Js1FgA"
    with socket.socket() as s:  # a port we know, to see that the worker let it go
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TunnelFailure) as err:
        start_worker("tiny", tunnel="cloudflare", port=port, token=token, tunnel_deadline_s=5)
    assert err.value.problem is TunnelProblem.RATE_LIMITED
    assert "Wait a few minutes" in str(err.value)
    shown = str(err.value) + repr(err.value) + "".join(traceback.format_exception(err.value))
    assert token not in shown + caplog.text
    with socket.socket() as s:  # the worker that could not be published was stopped
        s.bind(("127.0.0.1", port))
