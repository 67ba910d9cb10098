"""CPU time per request of the HTTP clients a controller could use, against a local uvicorn.

The controller makes a few requests per image (submit, long-polls, one bundle of PNGs, delete),
so its CPU per image is bounded below by its client's CPU per request. This compares httpx
(what the controller used) with aiohttp (what it uses now) on the same loopback server, the
body read as a stream as the controller reads it.

    .venv/bin/python -m bench.bench_http_client [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

_SERVER = """
import uvicorn
from fastapi import FastAPI
app = FastAPI()
@app.get('/healthz')
async def h(): return {'ok': True}
uvicorn.run(app, host='127.0.0.1', port=int(__import__('sys').argv[1]), log_level='warning')
"""


async def _httpx(url: str, n: int) -> float:
    import httpx

    async with httpx.AsyncClient(base_url=url, headers={"Accept-Encoding": "identity"}) as c:
        for _ in range(50):
            await c.get("/healthz")
        t = time.process_time()
        for _ in range(n):
            async with c.stream("GET", "/healthz") as r:
                async for _ in r.aiter_bytes():
                    pass
        return (time.process_time() - t) / n * 1000


async def _aiohttp(url: str, n: int) -> float:
    import aiohttp

    async with aiohttp.ClientSession(headers={"Accept-Encoding": "identity"}) as c:
        for _ in range(50):
            async with c.get(url + "/healthz") as r:
                await r.read()
        t = time.process_time()
        for _ in range(n):
            async with c.get(url + "/healthz") as r:
                async for _ in r.content.iter_chunked(65536):
                    pass
        return (time.process_time() - t) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--port", type=int, default=18765)
    args = ap.parse_args()
    srv = subprocess.Popen([sys.executable, "-c", _SERVER, str(args.port)])
    try:
        time.sleep(3)
        url = f"http://127.0.0.1:{args.port}"
        for _ in range(2):
            for name, fn in (("httpx", _httpx), ("aiohttp", _aiohttp)):
                print(f"{name:8} {asyncio.run(fn(url, args.requests)):.3f} ms CPU per request")
    finally:
        srv.kill()


if __name__ == "__main__":
    main()
