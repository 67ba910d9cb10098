"""A local TCP proxy for tests: a stand-in for a tunnel, flaky on demand.

    with TcpProxy("127.0.0.1", worker_port, drop_probability=0.3, seed=1) as proxy:
        client.get(proxy.url + "/healthz")      # some connections are cut, as on a free tunnel
        proxy.close_connections()               # a tunnel hiccup: every open connection dies
        proxy.drop_probability = 1.0            # or the tunnel is down for a while

It runs its own asyncio loop on a daemon thread, so sync and async tests can both use it.
A dropped connection is accepted, its first bytes are read (the client has sent its request),
then it is reset: the client sees the request fail mid-flight, never a clean refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from typing import Any

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forward 127.0.0.1:<port> to target_host:target_port, cutting connections at random."""

    def __init__(self, target_host: str, target_port: int, drop_probability: float = 0.0,
                 seed: int | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = int(target_port)
        self.drop_probability = float(drop_probability)
        self.host = host
        self.port = int(port)
        self.connections = 0  #: connections accepted, dropped ones included
        self.drops = 0  #: connections cut on purpose
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> TcpProxy:
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="tcpproxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), loop).result(10)
        return self

    def stop(self) -> None:
        """Close the listener and every connection; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def close_connections(self) -> int:
        """Reset every open connection now (the listener stays); returns how many."""
        if self._loop is None:
            return 0
        return asyncio.run_coroutine_threadsafe(self._abort_all(), self._loop).result(10)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside the proxy's loop ------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._abort_all()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _abort_all(self) -> int:
        pairs = list(self._open)
        for pair in pairs:
            for writer in pair:
                writer.transport.abort()
        self._open.clear()
        return len(pairs)

    def _should_drop(self) -> bool:
        with self._lock:
            self.connections += 1
            drop = self.drop_probability > 0 and self._rng.random() < self.drop_probability
            if drop:
                self.drops += 1
            return drop

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._should_drop():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.read(65536), 1.0)
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host,
                                                                 self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._open.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._open.discard(pair)
            for w in pair:
                w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        """Copy one direction; pass a clean EOF on as a half-close, an error as a reset."""
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError, asyncio.IncompleteReadError):
            writer.transport.abort()
