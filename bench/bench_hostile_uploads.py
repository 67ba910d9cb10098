"""CPU time to refuse a hostile upload: Pillow opening it (what the worker did before) against
the chunk-header walk (`backend/imagescan.py`, what it does now). CPU only, no server.

    python bench/bench_hostile_uploads.py [--chunks 2000000]

Prints one row per file: its size, Pillow's CPU seconds to open it, the walk's CPU seconds and
steps to refuse it. docs/BENCHMARKS.md ("Hostile uploads") quotes a run.
"""

from __future__ import annotations

import argparse
import io
import struct
import time
import zlib

from PIL import Image

from colabswarm.backend.imagescan import scan_image
from colabswarm.protocol import Limits


def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def files(n: int) -> dict[str, bytes]:
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    p, j = png.getvalue(), jpeg.getvalue()
    return {
        f"PNG, {n} tEXt chunks": p[:33] + _chunk(b"tEXt", b"k\x00v") * n + p[33:],
        f"PNG, {n} empty IDAT chunks": p[:33] + _chunk(b"IDAT", b"") * n + p[33:],
        f"JPEG, {n} comments": j[:2] + b"\xff\xfe\x00\x03x" * n + j[2:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", type=int, default=2_000_000)
    args = ap.parse_args()
    lim = Limits()
    print("| file | MiB | Pillow open+load, CPU s | walk, CPU s | walk steps |")
    print("| --- | --- | --- | --- | --- |")
    for name, data in files(args.chunks).items():
        t0 = time.process_time()
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except Exception:
            pass  # some are refused by Pillow in the end, after the work
        pillow = time.process_time() - t0
        t0 = time.process_time()
        scan = scan_image(data, lim.max_image_segments, lim.max_png_data_chunks)
        walk = time.process_time() - t0
        assert not scan.ok
        print(f"| {name} | {len(data) / 2**20:.1f} | {pillow:.2f} | {walk:.4f} | {scan.steps} |")


if __name__ == "__main__":
    main()
