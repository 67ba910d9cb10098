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


def test_free_during_a_job_answers_at_once_and_frees_right_after_it():
    """/v1/free never runs during a job (it may be recording CUDA graphs): asked for during
    one, it answers at once that it will free after it, and does."""
    import threading
    import time

    from colabswarm.backend.serve import start_worker

    handle = start_worker("tiny", name="free")
    try:
        engine = handle.worker.engine
        inside, go_on = threading.Event(), threading.Event()

        def on_step(step: int, total: int) -> None:
            if step == 1:
                inside.set()
                assert go_on.wait(30), "the test never let the job go on"

        req = JobRequest(prompt="free me", width=64, height=64, steps=3, seeds=[1])
        job = threading.Thread(target=engine.run, args=(req,), kwargs={"on_step": on_step})
        job.start()
        assert inside.wait(30), "the job never started"
        engine._upscaled[("marker",)] = None  # something free() drops
        t0 = time.monotonic()

        async def free() -> bool:
            async with WorkerClient(handle.share) as c:
                return await c.free()

        answer = asyncio.run(free())
        assert time.monotonic() - t0 < 10, "free waited for the job"
        assert answer is False, answer
        assert ("marker",) in engine._upscaled, "freed during the job"
        go_on.set()
        job.join(30)
        assert not job.is_alive()
        assert ("marker",) not in engine._upscaled, "not freed after the job"
        assert asyncio.run(free()) is True
    finally:
        handle.stop()
