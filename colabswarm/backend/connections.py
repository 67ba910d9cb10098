"""Connection limits for the worker's HTTP server: what uvicorn's own settings do not cover.

uvicorn (0.54, ``uvicorn/protocols/http/h11_impl.py``) offers a keep-alive timeout between
requests (``timeout_keep_alive``), a cap on header size (``h11_max_incomplete_event_size``) and
a 503 past ``limit_concurrency`` *once a request's headers are complete*. The worker uses the
first two (``serve.py``). Nothing there closes a connection that sends nothing or only part
of its headers, caps the number of open connections, or drops a request body that stops
arriving (the app then waits in ``receive()`` forever, holding what it has read), or a client
that stops reading its answer (asyncio's ``close()`` waits for the buffer to drain). This
module adds those as a subclass of uvicorn's h11 protocol:

- **header timeout**: a request's headers must be complete within ``header_timeout_s`` of the
  connection opening, or of the first byte of a later request on a kept-alive connection;
  trickling bytes does not extend it;
- **connection cap**: past ``max_connections`` open connections a new one is answered at once
  with 429 (kind ``queue_full``, Retry-After) and closed, never queued;
- **stall timeout**: a request body that makes no progress for ``stall_timeout_s`` (while the
  app waits for it), or an answer the client does not read for as long, drops the connection;
  the app sees a disconnect and lets go of what it read.

Only these hooks of ``H11Protocol`` are overridden: ``connection_made``, ``data_received``,
``connection_lost``, ``on_response_complete``, ``pause_writing`` and ``resume_writing``, and it
reads ``conn`` (the h11 connection), ``connections``, ``flow`` and ``transport``. The h11
protocol is pinned (not httptools) so that every connection is under these rules.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..protocol import STATUS_OF_KIND, ErrorDetail, ErrorKind, Limits

__all__ = ["guarded_protocol"]

log = logging.getLogger("colabswarm.server")


def guarded_protocol(limits: Limits) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` under these limits."""
    return type("GuardedH11Protocol", (_Guarded,), {"limits": limits,
                                                    "refusal": _refusal(limits)})


def _refusal(limits: Limits) -> bytes:
    retry = max(1, math.ceil(limits.header_timeout_s))
    body = ErrorDetail(
        detail=f"This worker has {limits.max_connections} open connections, its limit; retry "
        f"in {retry} s (idle connections are closed after {limits.header_timeout_s:g} s).",
        kind=ErrorKind.QUEUE_FULL, retry_after_s=float(retry),
    ).model_dump_json(exclude_none=True).encode()
    status = STATUS_OF_KIND[ErrorKind.QUEUE_FULL]
    head = (f"HTTP/1.1 {status} Too Many Requests\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: {retry}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class _Guarded(H11Protocol):
    limits: Limits
    refusal: bytes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._request_started: float | None = None  # first byte of a request not yet parsed
        self._last_progress = 0.0                    # last body bytes received
        self._write_paused_since: float | None = None
        lim = self.limits
        self._tick = max(0.05, min(lim.header_timeout_s, lim.stall_timeout_s) / 4)

    # ----- asyncio protocol hooks ----------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            transport.write(self.refusal)
            transport.close()
            return
        super().connection_made(transport)
        now = self.loop.time()
        self._request_started = now  # the first request's headers are due from the connect
        self._last_progress = now
        self._timer = self.loop.call_later(self._tick, self._check)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        now = self.loop.time()
        if self.conn.their_state is h11.IDLE and self._request_started is None:
            self._request_started = now  # a later request on a kept-alive connection begins
        self._last_progress = now
        super().data_received(data)
        self._note_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._note_state()
        if (self.conn.their_state is h11.IDLE and self._request_started is None
                and self.conn.trailing_data[0]):
            self._request_started = self.loop.time()  # part of a pipelined request waits

    def pause_writing(self) -> None:
        if self._refused:
            return
        if self._write_paused_since is None:
            self._write_paused_since = self.loop.time()
        super().pause_writing()

    def resume_writing(self) -> None:
        self._write_paused_since = None
        if not self._refused:
            super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._refused:
            return
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (broken or too long headers): answered as every other
        error, with a kind, then closed."""
        body = ErrorDetail(
            detail="Malformed HTTP request (broken headers, or headers over "
            f"{self.limits.max_header_bytes} bytes).", kind=ErrorKind.INVALID,
        ).model_dump_json(exclude_none=True).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        try:
            out = self.conn.send(h11.Response(status_code=400, headers=headers,
                                              reason=b"Bad Request"))
            out = (out or b"") + (self.conn.send(h11.Data(data=body)) or b"")
            out += self.conn.send(h11.EndOfMessage()) or b""
            self.transport.write(out)
        except h11.LocalProtocolError:
            pass  # a response was already under way: just close
        self.transport.close()

    # ----- the watchdog --------------------------------------------------------------------
    def _note_state(self) -> None:
        if self.conn.their_state is not h11.IDLE:
            self._request_started = None  # headers complete

    def _check(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None:
            return
        now = self.loop.time()
        if transport.is_closing():
            # close() waits for the write buffer to drain: a client that reads nothing would
            # hold the connection (and its slot) forever
            if not transport.get_write_buffer_size():
                return  # connection_lost follows
            if self._write_paused_since is None:
                self._write_paused_since = now
            if now - self._write_paused_since > self.limits.stall_timeout_s:
                transport.abort()
                return
        else:
            reason = self._verdict(now)
            if reason is not None:
                log.info("closing a connection from %s: %s", _peer(self.client), reason)
                if transport.get_write_buffer_size():
                    transport.abort()
                else:
                    transport.close()
                return
        self._timer = self.loop.call_later(self._tick, self._check)

    def _verdict(self, now: float) -> str | None:
        """Why this connection should be dropped now, or None."""
        lim = self.limits
        since = self._write_paused_since
        if since is not None and now - since > lim.stall_timeout_s:
            return f"it read none of the answer for {lim.stall_timeout_s:g} s"
        state = self.conn.their_state
        if state is h11.IDLE:
            started = self._request_started
            if started is not None and now - started > lim.header_timeout_s:
                return f"no complete request headers within {lim.header_timeout_s:g} s"
        elif state is h11.SEND_BODY:
            if self.flow is not None and self.flow.read_paused:
                self._last_progress = now  # we are not reading: not the client's stall
            elif now - self._last_progress > lim.stall_timeout_s:
                return f"its request body stalled for {lim.stall_timeout_s:g} s"
        return None


def _peer(client: Any) -> str:
    try:
        host, port = client
        return f"{host}:{int(port)}"
    except (TypeError, ValueError):
        return "an unknown peer"

