"""A long-running worker switching LoRAs and samplers keeps its memory flat: adapters are
unloaded past the cache, and no job's scheduler or adapter outlives its use."""

from __future__ import annotations

import asyncio

import psutil

from colabswarm.backend.client import WorkerClient
from colabswarm.backend.loras import addnet_hash
from colabswarm.backend.tiny import build_tiny_lora
from colabswarm.protocol import JobRequest, LoraRef

SAMPLERS = ("Euler", "DPM++ 2M Karras", "Euler a", "DPM++ SDE Karras", "Heun", "DDIM", "UniPC")


async def _jobs(share: str, loras: list[LoraRef], n: int, start: int) -> None:
    async with WorkerClient(share) as c:
        sem = asyncio.Semaphore(4)

        async def one(i: int) -> None:
            # three LoRAs through a cache of two: nearly every LoRA job loads one and
            # unloads another; every 4th job has none
            lora = [] if i % 4 == 3 else [loras[i % len(loras)]]
            req = JobRequest(prompt=f"memory {i}", width=64, height=64, steps=2, seeds=[i],
                             sampler=SAMPLERS[i % len(SAMPLERS)], loras=lora)
            async with sem:
                assert len(await c.run(req)) == 1

        await asyncio.gather(*(one(start + i) for i in range(n)))


def test_memory_is_flat_over_200_jobs_switching_loras_and_samplers(spawn, tmp_path):
    files = [build_tiny_lora(tmp_path / f"m{i}.safetensors", "tiny", 10 + i) for i in range(3)]
    loras = [LoraRef(name=f.stem, weight=0.7, hash=addnet_hash(f)) for f in files]
    worker = spawn("--loras-dir", str(tmp_path), "--lora-cache", "2", name="lora-mem",
                   env={"OMP_NUM_THREADS": "1"})
    proc = psutil.Process(worker.pid)
    asyncio.run(_jobs(worker.share, loras, 60, 0))  # warm-up: every sampler, pools, imports
    before = proc.memory_info().rss
    asyncio.run(_jobs(worker.share, loras, 200, 1000))
    after = proc.memory_info().rss

    async def held() -> int:
        async with WorkerClient(worker.share) as c:
            info = await c.info()
            return info.results_held + info.queue_depth

    growth_mb = (after - before) / 2**20
    print(f"worker RSS {before / 2**20:.1f} MB -> {after / 2**20:.1f} MB over 200 jobs "
          f"switching LoRAs and samplers ({growth_mb:+.1f} MB)")
    assert asyncio.run(held()) == 0
    assert growth_mb < 8, f"worker memory grew by {growth_mb:.1f} MB over 200 jobs"
