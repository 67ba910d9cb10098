"""A PNG writer that keeps the GIL free for the pipeline thread beside it.

On a fast GPU, Stable Diffusion at 512 px is bound by the host CPU launching kernels, so every
millisecond another thread holds the GIL is lost throughput. Pillow's PNG encoder spends most
of its time filtering rows in C while holding the GIL; here the filter ('Up', one numpy
subtraction) and zlib (which releases the GIL while it compresses) do the work. About 4x faster
than ``Image.save(format="PNG", compress_level=1)`` at 512x512, about the same size, lossless.
(Measured on the H100 device: docs/BENCHMARKS.md, "Worker overhead".)
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

__all__ = ["check_png", "encode_png", "with_text"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def encode_png(image: Image.Image, level: int = 1) -> bytes:
    """8-bit RGB PNG of an image (other modes go through Pillow's own encoder)."""
    if image.mode != "RGB":
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=level)
        return buf.getvalue()
    a = np.asarray(image, dtype=np.uint8)
    h, w, _ = a.shape
    rows = a.reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), dtype=np.uint8)
    raw[:, 0] = 2  # filter type 'Up': each byte minus the one above (the first row: minus 0)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, level))
            + _chunk(b"IEND", b""))


_COLOUR_MODES = {0: "L", 2: "RGB", 6: "RGBA"}  # 8-bit colour types a worker may send
_MAX_CHUNKS = 8192


def check_png(data: bytes, size: tuple[int, int]) -> str | None:
    """Why these bytes are not a whole 8-bit L/RGB/RGBA PNG of `size`, or None if they are.

    Walks the chunks only (no pixels decoded): the signature, IHDR first with this size and an
    8-bit grey, RGB or RGBA colour type, every chunk's CRC, IDATs in one run, IEND last with
    nothing after it. A broken zlib stream inside valid chunks shows only when the pixels are
    decoded. At most _MAX_CHUNKS chunks are read."""
    if not data.startswith(_SIGNATURE):
        return "not a PNG (no PNG signature)"
    pos, end = len(_SIGNATURE), len(data)
    seen_idat = ended_idat = False
    for count in range(_MAX_CHUNKS + 1):
        if count == _MAX_CHUNKS:
            return f"more than {_MAX_CHUNKS} chunks"
        if pos + 12 > end:
            return "cut short (no IEND chunk)"
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag = data[pos + 4:pos + 8]
        if length > end - pos - 12:
            return f"a {tag!r} chunk of {length} bytes runs past the end"
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(tag + body) != crc:
            return f"a {tag!r} chunk has a wrong CRC"
        if count == 0:
            if tag != b"IHDR" or length != 13:
                return "the first chunk is not IHDR"
            w, h, depth, colour, _comp, _filt, interlace = struct.unpack(">IIBBBBB", body)
            if (w, h) != tuple(size):
                return f"size {(w, h)}, expected {tuple(size)}"
            if depth != 8 or colour not in _COLOUR_MODES or interlace > 1:
                return f"bit depth {depth}, colour type {colour} (8-bit L/RGB/RGBA expected)"
        elif tag == b"IDAT":
            if ended_idat:
                return "IDAT chunks are not in one run"
            seen_idat = True
        elif seen_idat:
            ended_idat = True
        pos += 12 + length
        if tag == b"IEND":
            if not seen_idat:
                return "no image data (IDAT)"
            return None if pos == end else f"{end - pos} bytes after IEND"
    return "cut short"


def with_text(png: bytes, key: str, text: str) -> bytes:
    """The PNG with a text chunk (key: text) added after IHDR, the pixels left as they are:
    tEXt where the text is Latin-1, iTXt (UTF-8) otherwise, as Pillow writes them."""
    try:
        chunk = _chunk(b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:
        chunk = _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))
    (length,) = struct.unpack(">I", png[8:12])
    at = 8 + 12 + length  # after the signature and IHDR
    return png[:at] + chunk + png[at:]
