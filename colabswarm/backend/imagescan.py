"""A cheap walk over an uploaded PNG's chunks or a JPEG's segments, before Pillow reads them.

Pillow parses a PNG's metadata chunks, and a JPEG's segments up to the image data, one by one
in Python: a 29 MiB PNG of two million empty text chunks cost 21 s of CPU before it could be
refused. This walk only reads the 8-byte chunk headers (4 bytes per JPEG segment), stops as
soon as a count passes its limit, and so costs at most ``max_segments + max_data_chunks`` steps
whatever the file holds. What it does not look at (CRCs, the pixels, WebP) is left to Pillow,
whose remaining work is then bounded by those counts and by the byte and pixel caps.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["Scan", "scan_image"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
_JPEG_SOS = 0xDA
_JPEG_EOI = 0xD9
# markers that stand alone (no length field): TEM, RST0-7
_JPEG_BARE = {0x01, *range(0xD0, 0xD8)}


@dataclass(frozen=True)
class Scan:
    """What the walk saw. ``steps`` is the number of chunk headers, segment headers and stray
    bytes it read: the whole of its work, bounded by the limits it was given."""

    format: str | None      # "PNG", "JPEG", or None for anything else (not walked)
    segments: int = 0       # PNG chunks other than IDAT; JPEG segments before the image data
    data_chunks: int = 0    # PNG IDAT chunks
    stray_bytes: int = 0    # JPEG bytes between segments that start no marker (Pillow skips
                            # them one by one in Python)
    steps: int = 0
    over: str | None = None  # which limit was passed, if one was: the walk stopped there

    @property
    def ok(self) -> bool:
        return self.over is None


def scan_image(data: bytes, max_segments: int, max_data_chunks: int) -> Scan:
    """Walk a PNG's or JPEG's structure with bounded work; other formats are not walked.

    A truncated or malformed structure just ends the walk (Pillow then refuses the file with
    its own error); only the counts decide here.
    """
    if data.startswith(_PNG_SIGNATURE):
        return _scan_png(data, max_segments, max_data_chunks)
    if data.startswith(_JPEG_SOI):
        return _scan_jpeg(data, max_segments)
    return Scan(format=None)


def _scan_png(data: bytes, max_segments: int, max_data_chunks: int) -> Scan:
    pos, end = len(_PNG_SIGNATURE), len(data)
    segments = data_chunks = steps = 0
    while pos + 8 <= end:
        length, tag = struct.unpack_from(">I4s", data, pos)
        steps += 1
        if tag == b"IDAT":
            data_chunks += 1
            if data_chunks > max_data_chunks:
                return Scan("PNG", segments, data_chunks, 0, steps, "max_png_data_chunks")
        else:
            segments += 1
            if segments > max_segments:
                return Scan("PNG", segments, data_chunks, 0, steps, "max_image_segments")
        if tag == b"IEND":
            break
        pos += 12 + length  # length, tag, body, crc
    return Scan("PNG", segments, data_chunks, 0, steps)


def _scan_jpeg(data: bytes, max_segments: int) -> Scan:
    """Segments up to the first start-of-scan: what Pillow's JPEG reader walks in Python."""
    pos, end = 2, len(data)
    segments = stray = steps = 0
    while pos + 2 <= end:
        if data[pos] != 0xFF or data[pos + 1] in (0x00, 0xFF):
            # junk, a fill byte or an escaped 0xFF: Pillow steps over each in Python
            stray += 1
            steps += 1
            if stray > max_segments:
                return Scan("JPEG", segments, 0, stray, steps, "max_image_segments")
            pos += 1
            continue
        marker = data[pos + 1]
        steps += 1
        segments += 1
        if segments > max_segments:
            return Scan("JPEG", segments, 0, stray, steps, "max_image_segments")
        if marker in (_JPEG_SOS, _JPEG_EOI):
            break
        if marker in _JPEG_BARE:
            pos += 2
            continue
        if pos + 4 > end:
            break
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + max(length, 2)
    return Scan("JPEG", segments, 0, stray, steps)
