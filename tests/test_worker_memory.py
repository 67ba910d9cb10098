"""A long-running worker's memory stays flat: results are dropped once collected."""

from __future__ import annotations

import asyncio

import psutil

from colabswarm.backend.client import WorkerClient
from colabswarm.protocol import JobRequest


async def _jobs(share: str, n: int, start: int) -> None:
    async with WorkerClient(share) as c:
        sem = asyncio.Semaphore(4)

        async def one(i: int) -> None:
            async with sem:
                req = JobRequest(prompt=f"memory {i}", width=64, height=64, steps=2, seeds=[i])
                assert len(await c.run(req)) == 1

        await asyncio.gather(*(one(start + i) for i in range(n)))


def test_memory_is_flat_over_200_jobs(spawn):
    worker = spawn(name="mem", env={"OMP_NUM_THREADS": "1"})
    proc = psutil.Process(worker.pid)
    asyncio.run(_jobs(worker.share, 60, 0))  # warm-up: allocator pools, caches, imports
    before = proc.memory_info().rss
    asyncio.run(_jobs(worker.share, 200, 1000))
    after = proc.memory_info().rss

    async def held() -> int:
        async with WorkerClient(worker.share) as c:
            info = await c.info()
            return info.results_held + info.queue_depth

    growth_mb = (after - before) / 2**20
    print(f"worker RSS {before / 2**20:.1f} MB -> {after / 2**20:.1f} MB over 200 jobs "
          f"({growth_mb:+.1f} MB)")
    assert asyncio.run(held()) == 0
    assert growth_mb < 20, f"worker memory grew by {growth_mb:.1f} MB over 200 jobs"
