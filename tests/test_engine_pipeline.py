"""The engine's images are the pipeline's own: what it does so that the GPU never waits
between jobs (its starting noise drawn and sent ahead, each sampler's timesteps set ahead, the
prompt's encoding answered from memory, the 8-bit pixels made on the device) changes no pixel.

Each job is compared with a plain diffusers pipeline of the same tiny model, built here on its
own, called as its documentation shows (a fresh scheduler of the sampler's class, one CPU
generator per seed, ``output_type="pil"``). Both run on this machine's CPU, so the comparison
is exact on any processor."""

from __future__ import annotations

import numpy as np
import pytest

from colabswarm.backend.engine import Engine
from colabswarm.backend.inflight import AHEAD_S, Pacer
from colabswarm.backend.schedulers import SCHEDULER_TABLE, available_samplers
from colabswarm.protocol import JobRequest
from tests.imagecheck import assert_identical

# the plain pipelines' DPM++ SDE warns through torchsde on every step (the worker silences it)
pytestmark = [pytest.mark.filterwarnings("ignore:Should have ta>=t0"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept")]


@pytest.fixture(scope="module")
def engine():
    return Engine(models=["tiny", "tiny-xl"])


_plain: dict[str, object] = {}


def _plain_pipe(model: str, img2img: bool):
    import diffusers

    from colabswarm.backend.tiny import tiny_model_dir

    key = f"{model}-{img2img}"
    if key not in _plain:
        xl = model == "tiny-xl"
        cls = {(False, False): diffusers.StableDiffusionPipeline,
               (False, True): diffusers.StableDiffusionImg2ImgPipeline,
               (True, False): diffusers.StableDiffusionXLPipeline,
               (True, True): diffusers.StableDiffusionXLImg2ImgPipeline}[(xl, img2img)]
        pipe = cls.from_pretrained(tiny_model_dir(model))
        pipe.set_progress_bar_config(disable=True)
        _plain[key] = (pipe, dict(pipe.scheduler.config))
    return _plain[key]


def _diffusers(req: JobRequest, init=None) -> list[np.ndarray]:
    import diffusers
    import torch

    pipe, config = _plain_pipe(req.model or "tiny", init is not None)
    cls_name, options = SCHEDULER_TABLE[req.sampler or "Euler"]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(config, **options)
    if cls_name == "DPMSolverSDEScheduler":
        pipe.scheduler.noise_sampler_seed = list(req.seeds)
    kw = dict(prompt=req.prompt, negative_prompt=req.negative_prompt or None,
              num_inference_steps=req.steps, guidance_scale=req.cfg,
              num_images_per_prompt=len(req.seeds),
              generator=[torch.Generator("cpu").manual_seed(s) for s in req.seeds])
    if init is None:
        kw.update(width=req.width, height=req.height)
    else:
        kw.update(image=[init] * len(req.seeds), strength=req.strength)
    with torch.inference_mode():
        images = pipe(**kw, output_type="pil").images
    return [np.asarray(im, np.int16) for im in images]


def _job(**kw) -> JobRequest:
    return JobRequest(**{**dict(prompt="a red fox", width=64, height=64, steps=4, cfg=7.0,
                                seeds=[5, 11]), **kw})


@pytest.mark.parametrize("sampler", available_samplers())
def test_every_sampler_gives_the_pipelines_own_images_first_time_and_again(engine, sampler):
    req = _job(sampler=sampler)
    one = req.model_copy(update={"seeds": [11]})
    want = {2: _diffusers(req), 1: _diffusers(one)}  # (a batch may round differently)
    # the first job prepares the sampler's timesteps and encodes the prompt; the others find
    # both ready (the one-image job's prompt comes from the cache kept at another batch size)
    for label, job in (("first", req), ("one image", one), ("again", req)):
        got = [np.asarray(im, np.int16) for im in engine.run(job)]
        for g, w in zip(got, want[len(job.seeds)], strict=True):
            assert_identical(g, w, f"{sampler}, {label}: the engine against diffusers")


@pytest.mark.parametrize("model,sampler", [("tiny-xl", "Euler"), ("tiny-xl", "DPM++ 2M Karras"),
                                           ("tiny", "Euler a")])
def test_sdxl_and_img2img_give_the_pipelines_own_images(engine, model, sampler):
    from PIL import Image

    req = _job(model=model, sampler=sampler, negative_prompt="blurry")
    for _ in range(2):
        for g, w in zip([np.asarray(im, np.int16) for im in engine.run(req)], _diffusers(req),
                        strict=True):
            assert_identical(g, w, f"{model} {sampler} txt2img")
    init = Image.fromarray(np.asarray(engine.run(req)[0]))
    i2i = req.model_copy(update={"kind": "img2img", "strength": 0.6, "steps": 5})
    for _ in range(2):  # the pipeline sets its own begin index on the prepared timesteps
        got = [np.asarray(im, np.int16) for im in engine.run(i2i, [init])]
        for g, w in zip(got, _diffusers(i2i, init), strict=True):
            assert_identical(g, w, f"{model} {sampler} img2img")


def test_an_sdxl_jobs_vae_upcasts_leave_no_warning_but_the_owners_own_casts_still_warn(engine):
    """SDXL's stock VAE is cast to float32 and back around each img2img encode (and each
    decode on a GPU), and diffusers warns at every cast: not in a worker's log (two to four a
    job); the same warning from the owner's own code in the process still shows."""
    import logging

    import torch
    from PIL import Image

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.casts: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            if record.name == "diffusers.models.modeling_utils" and record.funcName == "to":
                self.casts.append(record)

    keep = Keep()
    library = logging.getLogger("diffusers")  # where diffusers' module loggers propagate
    library.addHandler(keep)
    try:
        req = _job(model="tiny-xl", seeds=[3])
        init = Image.fromarray(np.asarray(engine.run(req)[0]))
        vae = engine._loaded.img2img.vae  # noqa: SLF001 - the VAE the job cast
        assert vae.config.force_upcast, "the tiny SDXL VAE no longer asks to be upcast"
        engine.run(req.model_copy(update={"kind": "img2img", "strength": 0.6, "steps": 5}),
                   [init])
        assert keep.casts == [], [r.getMessage()[:80] for r in keep.casts]
        vae.to(dtype=torch.float32)  # the owner's own cast, outside a job
        assert len(keep.casts) == 1
    finally:
        library.removeHandler(keep)


def test_a_launched_job_hands_its_images_over_once_and_reports_its_speed(engine):
    flight = engine.launch(_job(seeds=[3]))
    before = engine.step_seconds_per_mpix
    first = flight.wait()
    assert flight.wait() is first and len(first) == 1 and first[0].size == (64, 64)
    assert engine.step_seconds_per_mpix is not None and engine.step_seconds_per_mpix != before


def test_a_job_whose_images_land_after_a_model_switch_does_not_set_the_new_models_speed():
    engine = Engine(models=["tiny", "tiny-xl"])
    flight = engine.launch(_job(seeds=[3]))
    engine.load("tiny-xl")
    speed = engine.step_seconds_per_mpix  # the new model's own (its warm-up's), or none yet
    flight.wait()
    assert engine.step_seconds_per_mpix == speed, "the old model's job counted for the new"
    engine.run(_job(model="tiny-xl", seeds=[3]))
    assert engine.step_seconds_per_mpix != speed, "the new model's own job counts"


class _Event:
    """A stand-in for a CUDA event: the one thing a CPU cannot have here."""

    log: list[tuple[str, int]] = []
    made = 0

    def __init__(self) -> None:
        type(self).made += 1
        self.n = type(self).made

    def record(self) -> None:
        self.log.append(("record", self.n))

    def synchronize(self) -> None:
        self.log.append(("sync", self.n))


def test_the_pacer_keeps_a_bounded_lead_and_reports_finished_steps():
    assert Pacer(None).lead == 2, "no speed known yet: two steps ahead"
    assert Pacer(AHEAD_S / 8).lead == 8, "fast steps: as many as fill the lead's time"
    assert Pacer(10.0).lead == 1, "slow steps: one ahead, never none"
    assert Pacer(1e-9).lead == 32, "bounded"
    pacer = Pacer(AHEAD_S / 3, event=_Event)
    finished = [pacer.stepped(step) for step in range(6)]
    assert finished == [0, 0, 0, 1, 2, 3], "a step is reported once the GPU is past it"
    records = [n for what, n in _Event.log if what == "record"]
    syncs = [n for what, n in _Event.log if what == "sync"]
    assert records == [1, 2, 3, 4, 5, 6] and syncs == [1, 2, 3]
    # never more than `lead` steps queued beyond the last one waited for
    queued = 0
    for what, _ in _Event.log:
        queued += 1 if what == "record" else -1
        assert queued <= pacer.lead + 1


def test_a_host_that_refuses_to_pin_memory_gets_plain_copies_and_one_warning(monkeypatch, caplog):
    """Some WSL and container set-ups cap locked memory: pinning fails with a RuntimeError.
    The worker then copies plainly (slower, same results) and says so once."""
    import torch

    from colabswarm.backend import inflight

    real = torch.empty

    def refusing(*args, pin_memory=False, **kw):
        if pin_memory:
            raise RuntimeError("CUDA error: OS call failed or operation not supported on this OS")
        return real(*args, **kw)

    monkeypatch.setattr(torch, "empty", refusing)
    monkeypatch.setitem(inflight._pinning, "ok", True)
    monkeypatch.setitem(inflight._pinning, "failed", 0)
    with caplog.at_level("WARNING", logger="colabswarm.engine"):
        for _ in range(inflight._PIN_TRIES - 1):  # a passing shortage: asked again next time
            assert inflight._pinned((2, 3), torch.uint8) is None
            assert inflight._pinning["ok"] is True
        for _ in range(3):
            assert inflight._pinned((2, 3), torch.uint8) is None
    assert inflight._pinning["ok"] is False and inflight._pinning["failed"] == inflight._PIN_TRIES
    assert sum("cannot pin host memory" in r.getMessage() for r in caplog.records) == 1


def test_the_job_thread_hands_images_over_and_stops_at_three_on_their_way():
    """The engine's thread launches the next job while earlier images are still on their way
    (the GPU stays fed), but no more than three: a slow PNG side must not pile up pinned host
    memory. The device is a stand-in whose images arrive only when the test lets them."""
    import asyncio
    import threading
    import time

    from PIL import Image

    from colabswarm.backend import jobs
    from colabswarm.protocol import Limits

    class Arriving:
        def __init__(self, req) -> None:
            self.landed = threading.Event()
            self.req = req

        def wait(self):
            assert self.landed.wait(30), "the test never let these images land"
            return [Image.new("RGB", (self.req.width, self.req.height), (s % 256, 0, 0))
                    for s in self.req.seeds]

    class Gpu:
        def __init__(self) -> None:
            self.launched: list[Arriving] = []

        def launch(self, req, init_images, on_step, should_stop, *, scope="owner"):
            self.launched.append(Arriving(req))
            return self.launched[-1]

    gpu = Gpu()
    loop = asyncio.new_event_loop()
    manager = jobs.JobManager(gpu, Limits())
    manager.start(loop)
    try:
        ids = [manager.submit(_job(seeds=[i]), []).id for i in range(6)]

        def settle(count: int) -> None:
            deadline = time.monotonic() + 10
            while len(gpu.launched) < count and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # and nothing more comes
            assert len(gpu.launched) == count, f"{len(gpu.launched)} launched, {count} expected"

        settle(jobs._MAX_IN_FLIGHT)  # three launched with none landed: the thread waits
        assert all(manager.get(i).state == "running" for i in ids[:3])
        assert manager.get(ids[3]).state == "queued"
        gpu.launched[0].landed.set()
        settle(jobs._MAX_IN_FLIGHT + 1)  # one landed: one more goes
        for flight in gpu.launched:
            flight.landed.set()
        deadline = time.monotonic() + 10
        while any(manager.get(i).state != "done" for i in ids) and time.monotonic() < deadline:
            for flight in gpu.launched:
                flight.landed.set()
            time.sleep(0.02)
        for n, job_id in enumerate(ids):
            job = manager.get(job_id)
            assert job.state == "done" and len(job.pngs) == 1, (n, job.state, job.error)
    finally:
        manager.close()
        loop.close()
