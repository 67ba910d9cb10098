"""An ASGI app served by uvicorn on a free loopback port, on a daemon thread: the base of the
test's stand-in workers (a lying one, an old one)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


class LoopbackServer:
    def __init__(self, app: Any, name: str) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    lifespan="off", interface="asgi3"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                       name=name, daemon=True)

    def start(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self._sock.close()


# ----- for proxies in front of a real worker (the compatibility tests' old workers) ----------
async def read_body(receive) -> bytes:
    """The whole request body of an ASGI http request."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


async def reply(send, status: int, content: bytes, ctype: str, extra=()) -> None:
    """One whole ASGI response."""
    headers = [(b"content-type", ctype.encode()),
               (b"content-length", str(len(content)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


async def relay(send, r, content: bytes) -> None:
    """Pass on the real worker's answer `r` (an httpx.Response) with this content."""
    extra = [(b"x-seed", r.headers["x-seed"].encode())] if "x-seed" in r.headers else []
    await reply(send, r.status_code, content, r.headers.get("content-type", ""), extra)
