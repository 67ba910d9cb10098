"""The worker against slow, idle, flooding and stalling clients, and hostile image files: a
real uvicorn server on loopback, raw sockets where no client library would misbehave enough.

No timings are asserted: each test shows what the server did (a connection closed while its
client was still trickling, a count of open connections that never passes the cap, memory
given back, a scan that stopped after a number of chunk headers), and only waits (with generous
bounds that fail the test if the server never acts) for it to happen.
"""

from __future__ import annotations

import io
import socket
import struct
import time
import zlib

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from colabswarm.backend.imagescan import scan_image
from colabswarm.backend.serve import start_worker
from colabswarm.protocol import Limits
from tests.conftest import wait_until

MiB = 2**20


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; fails (socket timeout) if it never does."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


@pytest.fixture
def guarded():
    """A worker (the bench simulator as engine: these tests are about connections) with short
    timeouts and a small connection cap."""
    limits = Limits(header_timeout_s=1.0, idle_timeout_s=2.0, stall_timeout_s=1.0,
                    max_connections=12)
    handle = start_worker(name="guarded", limits=limits, simulate_speed=1.0)
    yield handle
    handle.stop()


def test_idle_and_slowly_trickling_connections_are_closed(guarded):
    idle = [_connect(guarded.port) for _ in range(6)]
    partial = _connect(guarded.port)
    partial.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n")  # and then nothing
    wait_until(lambda: guarded.open_connections == 7, what="the server to hold 7 connections")
    # a slow-loris client: one byte of a long header at a time, never the blank line
    slow = _connect(guarded.port)
    request = b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 5000 + b"\r\n\r\n"
    sent = 0
    try:
        while sent < len(request):
            slow.sendall(request[sent:sent + 1])
            sent += 1
            time.sleep(0.02)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert sent < len(request), "a trickle of header bytes must not keep a connection open"
    for sock in [*idle, partial, slow]:
        assert _closed_by_server(sock) == b"", "closed without an answer"
        sock.close()
    wait_until(lambda: guarded.open_connections == 0, what="every connection to be closed")
    with httpx.Client(base_url=guarded.local_url, headers=_auth(guarded.token)) as http:
        assert http.get("/v1/info").status_code == 200, "honest clients are still served"


def test_a_kept_alive_connection_is_closed_when_idle_but_not_during_a_long_poll(guarded):
    with httpx.Client(base_url=guarded.local_url, headers=_auth(guarded.token),
                      timeout=30) as http:
        job = http.post("/v1/jobs", json={"width": 1024, "height": 1024, "steps": 150,
                                          "seeds": [1]}).json()
        # a long-poll of longer than the header and stall timeouts: the request is complete,
        # the app is working on it, and the connection is left alone
        r = http.get(f"/v1/jobs/{job['id']}", params={"wait": 3, "since": 10**9})
        assert r.status_code == 200 and r.json()["state"] == "running"
        http.post("/v1/interrupt")
    sock = _connect(guarded.port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = _closed_by_server(sock)  # the answer, then the close after idle_timeout_s
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"ok":true}')
    sock.close()


def test_the_connection_cap_holds_and_honest_clients_are_served_after_the_flood():
    limits = Limits(max_connections=10, header_timeout_s=60.0)  # the flood stays put
    handle = start_worker(name="capped", limits=limits, simulate_speed=1.0)
    try:
        flood = [_connect(handle.port) for _ in range(10)]
        wait_until(lambda: handle.open_connections == 10, what="10 open connections")
        refused = []
        for _ in range(40):
            sock = _connect(handle.port)
            refused.append(_closed_by_server(sock))  # answered and closed at once
            sock.close()
        assert handle.open_connections == 10
        for answer in refused:
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429"), answer[:100]
            assert b"retry-after: 60" in head.lower()
            assert b'"kind":"queue_full"' in body and b"10 open connections" in body
        # a client library sees the same: an answer with a kind, not a hang
        with httpx.Client(base_url=handle.local_url, headers=_auth(handle.token)) as http:
            r = http.get("/v1/info")
            assert r.status_code == 429 and r.json()["kind"] == "queue_full"
            assert r.json()["retry_after_s"] == 60 and r.headers["retry-after"] == "60"
        for sock in flood:
            sock.close()
        wait_until(lambda: handle.open_connections == 0, what="the flood's connections to go")
        with httpx.Client(base_url=handle.local_url, headers=_auth(handle.token)) as http:
            assert http.get("/v1/info").json()["name"] == "capped"
    finally:
        handle.stop()


def test_a_client_that_reads_no_answer_is_dropped():
    """A big PNG the client never reads: once the socket buffers are full the server waits
    stall_timeout_s, then aborts (asyncio's close() alone would wait for ever)."""
    limits = Limits(stall_timeout_s=1.0, idle_timeout_s=1.0)
    handle = start_worker("tiny", name="unread", limits=limits)
    try:
        # random pixels: the PNG cannot be compressed below 1536*1536*3 bytes, more than the
        # socket buffers (tcp_wmem's 4 MiB, and a 4 KiB receive buffer) hold
        pixels = np.random.default_rng(0).integers(0, 256, (1536, 1536, 3), np.uint8)
        upload = io.BytesIO()
        Image.fromarray(pixels).save(upload, format="PNG", compress_level=1)
        assert len(upload.getvalue()) > 6 * MiB
        with httpx.Client(base_url=handle.local_url, headers=_auth(handle.token),
                          timeout=60) as http:
            uid = http.post("/v1/uploads", content=upload.getvalue()).json()["id"]
            job = http.post("/v1/jobs", json={"kind": "img2img", "init_images": [uid],
                                              "width": 1536, "height": 1536, "strength": 0,
                                              "seeds": [1]}).json()
            status = job
            for _ in range(30):
                params = {"wait": 10, "since": status["version"]}
                status = http.get(f"/v1/jobs/{job['id']}", params=params).json()
                if status["state"] not in ("queued", "running"):
                    break
            assert status["state"] == "done", status
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
        sock.connect(("127.0.0.1", handle.port))
        sock.sendall((f"GET /v1/jobs/{job['id']}/images/0 HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Bearer {handle.token}\r\n\r\n").encode())
        wait_until(lambda: handle.open_connections == 1, what="the download to start")
        wait_until(lambda: handle.open_connections == 0, timeout=60,
                   what="the server to drop a client that reads nothing")
        sock.close()
    finally:
        handle.stop()


def _stalled_uploads(port: int, token: str, n: int, size: int) -> list[socket.socket]:
    """n uploads that announce `size` bytes and send all but the last one."""
    socks = []
    head = (f"POST /v1/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {size}\r\n\r\n").encode()
    block = b"\x89PNG\r\n\x1a\n" + b"\0" * (MiB - 8)
    for _ in range(n):
        sock = _connect(port)
        sock.sendall(head)
        left = size - 1
        while left:
            part = block[: min(left, len(block))]
            sock.sendall(part)
            left -= len(part)
        socks.append(sock)
    return socks


def test_stalled_uploads_are_dropped_and_their_memory_given_back(spawn):
    """The probe's case: six uploads one byte short. The worker (its own process) holds them
    while they arrive, drops each once it stalls for stall_timeout_s, and its RSS returns."""
    proc = spawn("--simulate-speed", "1", "--stall-timeout", "4", name="stalled")
    rss = psutil.Process(proc.pid)
    with httpx.Client(base_url=f"http://127.0.0.1:{proc.port}", headers=_auth(proc.token),
                      timeout=30) as http:
        png = io.BytesIO()
        Image.new("RGB", (64, 64)).save(png, format="PNG")
        for _ in range(3):  # warm the upload path up
            assert http.post("/v1/uploads", content=png.getvalue()).status_code == 201
        base = rss.memory_info().rss
        socks = []
        pinned = 0
        for _ in range(6):
            socks += _stalled_uploads(proc.port, proc.token, 1, 25 * MiB)
            pinned = max(pinned, rss.memory_info().rss - base)
        assert pinned > 100 * MiB, f"the uploads were not held while arriving ({pinned} B)"
        for sock in socks:
            assert _closed_by_server(sock) == b""
            sock.close()
        wait_until(lambda: rss.memory_info().rss - base < 30 * MiB, timeout=30,
                   what=f"the worker to give back the {pinned // MiB} MiB of stalled uploads")
        assert http.get("/v1/info").json()["name"] == "stalled"


# ----- hostile image files ---------------------------------------------------------------------

def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def _png_with(extra: bytes, size=(8, 8)) -> bytes:
    """A real PNG with `extra` chunks inserted after IHDR."""
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    ihdr_end = 8 + 25
    return data[:ihdr_end] + extra + data[ihdr_end:]


def test_the_chunk_scan_stops_at_the_limit_whatever_the_file_holds():
    text = _png_chunk(b"tEXt", b"k\x00v")
    for count in (2_000, 2_000_000):  # the probe's bomb: 2 million text chunks, ~29 MiB
        scan = scan_image(_png_with(text * count), max_segments=256, max_data_chunks=16384)
        assert not scan.ok and scan.over == "max_image_segments"
        assert scan.steps == 256 + 1, "it reads one chunk header past the limit, then stops"
    ok = scan_image(_png_with(text * 3), 256, 16384)
    assert ok.ok and ok.segments == 3 + 2 and ok.data_chunks == 1  # IHDR, 3 tEXt, IEND
    # empty IDAT chunks are bounded too (Pillow reads each one in Python)
    idat = _png_chunk(b"IDAT", b"")
    many = scan_image(_png_with(idat * 100_000), 256, 1000)
    assert many.over == "max_png_data_chunks" and many.steps <= 1000 + 2
    # a JPEG's segments before the image data, and the stray bytes Pillow skips one by one
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    assert scan_image(jpeg, 256, 16384).ok
    comments = jpeg[:2] + b"\xff\xfe\x00\x03x" * 1_000_000 + jpeg[2:]
    assert scan_image(comments, 256, 16384).steps == 257
    junk = jpeg[:2] + b"\x00" * 5_000_000 + jpeg[2:]
    assert scan_image(junk, 256, 16384).steps == 257
    assert scan_image(b"RIFF....WEBP", 256, 16384).format is None  # not walked


def test_a_chunk_bomb_upload_is_refused_before_pillow_reads_a_chunk(worker, monkeypatch):
    from PIL import JpegImagePlugin, PngImagePlugin

    calls = {"png": 0, "jpeg": 0}
    real_call, real_com = PngImagePlugin.PngStream.call, JpegImagePlugin.COM

    def counted_call(self, cid, pos, length):
        calls["png"] += 1
        return real_call(self, cid, pos, length)

    def counted_com(self, marker):
        calls["jpeg"] += 1
        return real_com(self, marker)

    monkeypatch.setattr(PngImagePlugin.PngStream, "call", counted_call)
    monkeypatch.setitem(JpegImagePlugin.MARKER, 0xFFFE, ("COM", "Comment", counted_com))
    bomb = _png_with(_png_chunk(b"tEXt", b"k\x00v") * 2_000_000)
    assert len(bomb) < worker.worker.limits.max_body_bytes
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    jpeg_bomb = buf.getvalue()[:2] + b"\xff\xfe\x00\x03x" * 2_000_000 + buf.getvalue()[2:]
    with httpx.Client(base_url=worker.local_url, headers=_auth(worker.token), timeout=60) as http:
        for body in (bomb, jpeg_bomb):
            r = http.post("/v1/uploads", content=body)
            assert r.status_code == 422, r.text
            assert r.json()["kind"] == "invalid" and "256" in r.json()["detail"]
        assert calls == {"png": 0, "jpeg": 0}, "refused on the chunk headers alone"
        # the same images with a few metadata chunks are taken, and Pillow does read them
        fine = _png_with(_png_chunk(b"tEXt", b"parameters\x00a red fox") * 3)
        assert http.post("/v1/uploads", content=fine).status_code == 201
        with_comment = buf.getvalue()[:2] + b"\xff\xfe\x00\x03x" + buf.getvalue()[2:]
        assert http.post("/v1/uploads", content=with_comment).status_code == 201
    assert calls["png"] >= 3 and calls["jpeg"] == 1
