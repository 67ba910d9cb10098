"""Samplers by their A1111 names: every one runs on a real worker, makes its own picture, and
keeps "same seed, same image" (exact at the same batch size, within kernel rounding alone vs
batched), also for the samplers that draw fresh noise at every step."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from colabswarm.backend.client import WorkerClient
from colabswarm.errors import InvalidRequest, ModelNotAvailable
from colabswarm.protocol import JobRequest
from colabswarm.samplers import (
    DEFAULT_SAMPLER,
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    UNET_CALLS_PER_STEP,
    canonical_sampler,
)
from tests.conftest import WorkerProcess
from tests.imagecheck import (
    PIXEL_TOLERANCE,
    SHARE_TOLERANCE,
    assert_identical,
    assert_same_picture,
    image_diff,
)

# diffusers' documented A1111 -> scheduler mapping, written out here on its own so the
# worker's table is checked against it rather than against itself
EXPECTED = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {"use_karras_sigmas": False}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ 2M SDE Heun": ("DPMSolverMultistepScheduler",
                          {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    "DPM++ 2M SDE Heun Karras": ("DPMSolverMultistepScheduler",
                                 {"solver_type": "heun", "use_karras_sigmas": True}),
    "DPM++ 3M SDE": ("DPMSolverMultistepScheduler",
                     {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "DPM++ 3M SDE Karras": ("DPMSolverMultistepScheduler",
                            {"solver_order": 3, "use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {"clip_sample": False}),
    "DDPM": ("DDPMScheduler", {"clip_sample": False}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
}


# ----- names (pure) -------------------------------------------------------------------------
def test_every_a1111_name_is_canonical_and_listed_in_the_errors():
    assert set(SAMPLERS) == set(EXPECTED)
    for name in SAMPLERS:
        assert canonical_sampler(name) == name
    with pytest.raises(InvalidRequest) as err:
        canonical_sampler("Euler b")
    assert all(name in str(err.value) for name in SAMPLERS)


@pytest.mark.parametrize("alias, name", [
    ("euler_a", "Euler a"), ("k_euler_a", "Euler a"), ("EULER A", "Euler a"),
    ("euler_ancestral", "Euler a"), ("k_euler", "Euler"), ("dpmpp_2m_karras", "DPM++ 2M Karras"),
    ("k_dpmpp_2m", "DPM++ 2M"), ("dpm++ 2m sde karras", "DPM++ 2M SDE Karras"),
    ("dpmpp_2m_sde_gpu", "DPM++ 2M SDE"), ("dpmpp_3m_sde", "DPM++ 3M SDE"),
    ("dpmpp_sde_karras", "DPM++ SDE Karras"), ("dpm_2", "DPM2"), ("k_dpm_2_a", "DPM2 a"),
    ("dpm_2_ancestral", "DPM2 a"), ("k_lms", "LMS"), ("lms_karras", "LMS Karras"),
    ("uni_pc", "UniPC"), ("pndm", "PLMS"), ("ddim", "DDIM"), ("heun", "Heun"), ("deis", "DEIS"),
])
def test_aliases_people_paste_from_other_tools(alias, name):
    assert canonical_sampler(alias) == name


@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive", "dpmpp_2s_ancestral", "Restart",
                                  "LCM", "", "   ", "x" * 65, "euler_b"])
def test_names_diffusers_cannot_run_are_refused_with_the_list(name):
    with pytest.raises(InvalidRequest) as err:
        canonical_sampler(name)
    assert "DPM++ 2M Karras" in str(err.value)


@given(name=st.sampled_from(SAMPLERS), data=st.data())
def test_any_case_and_separator_spelling_is_accepted(name, data):
    spelled = "".join(
        data.draw(st.sampled_from([c.lower(), c.upper()])) if c.isalpha()
        else data.draw(st.sampled_from([" ", "_", "-"])) if c == " " else c
        for c in name
    )
    assert canonical_sampler(spelled) == name


@given(st.text(max_size=80))
def test_any_text_is_a_name_or_an_invalid_request(text):
    try:
        assert canonical_sampler(text) in SAMPLERS
    except InvalidRequest:
        pass


def test_the_worker_table_is_diffusers_documented_mapping():
    import diffusers

    from colabswarm.backend.schedulers import SCHEDULER_TABLE, SchedulerBank, available_samplers
    from colabswarm.backend.tiny import tiny_model_dir

    assert available_samplers() == list(SAMPLERS)  # torchsde is installed with the worker
    config = diffusers.EulerDiscreteScheduler.load_config(tiny_model_dir("tiny") / "scheduler")
    bank = SchedulerBank(config)
    for name, (cls, options) in EXPECTED.items():
        made = bank.for_job(name, [1, 2])
        assert type(made).__name__ == cls == SCHEDULER_TABLE[name][0], name
        for key, value in options.items():
            assert made.config[key] == value, (name, key)
        assert made.config["beta_schedule"] == "scaled_linear", "the model's own schedule"
        assert made.order == UNET_CALLS_PER_STEP[name], name
        assert bank.for_job(name, [1]) is not made, "each job gets its own scheduler"


# ----- on a real worker ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampler_worker():
    """One worker process serving the tiny SD and SDXL models (one OpenMP thread: on a busy
    2-core machine, two threads per worker spin against each other)."""
    proc = WorkerProcess("--model", "tiny", "--model", "tiny-xl", name="samplers",
                         env={"OMP_NUM_THREADS": "1"})
    try:
        yield proc.start()
    finally:
        proc.kill()


@pytest.fixture
def app():
    """The worker's request checks over a real (unloaded) tiny engine: no server needed."""
    from colabswarm.backend.engine import Engine
    from colabswarm.backend.server import WorkerApp

    return WorkerApp(Engine(["tiny"], warmup=False), "t" * 32)


def _arrays(images) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in images]


def _req(sampler: str | None, seeds: list[int], **kw) -> JobRequest:
    # cfg 30 and 10 steps: the random tiny UNet changes little along a trajectory, so the
    # high-order samplers (LMS, DEIS) stay near Euler; strong guidance pulls them apart
    base = dict(prompt="a red fox", width=64, height=64, steps=10, cfg=30.0, seeds=seeds)
    return JobRequest(sampler=sampler, **{**base, **kw})


def _clearly_differs(a: np.ndarray, b: np.ndarray) -> bool:
    """More than kernel rounding: differences above the tolerance in many values."""
    d = np.abs(a - b)
    return int(d.max()) > 2 * PIXEL_TOLERANCE and float((d > PIXEL_TOLERANCE).mean()) > (
        5 * SHARE_TOLERANCE)


def test_every_sampler_runs_makes_its_own_picture_and_keeps_seeds(sampler_worker):
    async def main() -> None:
        async with WorkerClient(sampler_worker.share) as c:
            info = await c.info()
            assert info.samplers == list(SAMPLERS)
            euler = _arrays(await c.run(_req(None, [5])))[0]
            assert_identical(euler, _arrays(await c.run(_req("Euler", [5])))[0],
                             "no sampler (the default) and 'Euler'")
            for name in SAMPLERS:
                alone = _arrays(await c.run(_req(name, [5])))[0]
                batch = _arrays(await c.run(_req(name, [3, 5, 9])))
                assert_same_picture(alone, batch[1], f"{name}: seed 5 alone vs in a batch")
                assert _clearly_differs(batch[0], batch[1]), f"{name}: seeds 3 and 5"
                if name != "Euler":
                    assert _clearly_differs(alone, euler), (
                        f"{name} must not make Euler's picture ({image_diff(alone, euler)})")
                if name in STOCHASTIC_SAMPLERS:
                    again = _arrays(await c.run(_req(name, [3, 5, 9])))
                    for i in range(3):
                        assert_identical(batch[i], again[i], f"{name}: a batch run twice")

    asyncio.run(main())


def test_the_status_names_the_sampler_used_and_aliases_give_the_same_image(sampler_worker):
    async def main() -> None:
        async with WorkerClient(sampler_worker.share) as c:
            st_default = await c.submit(_req(None, [1], steps=2))
            st_alias = await c.submit(_req("k_dpmpp_2m_karras", [1], steps=2))
            assert st_default.sampler == DEFAULT_SAMPLER
            assert st_alias.sampler == "DPM++ 2M Karras"
            for st_ in (st_default, st_alias):
                await c.status(st_.id, wait=20, since=-1)
            by_alias = _arrays(await c.run(_req("dpmpp_2m_karras", [1])))[0]
            by_name = _arrays(await c.run(_req("DPM++ 2M Karras", [1])))[0]
            assert_identical(by_alias, by_name, "an alias and the A1111 name")

    asyncio.run(main())


def test_img2img_with_second_order_and_multistep_samplers(sampler_worker):
    """Heun and DPM2 call the UNet twice a step, PLMS once more at the end: the job still
    reports its progress in order and ends on its last step."""
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), np.uint8))
    import io

    buf = io.BytesIO()
    init.save(buf, format="PNG")

    async def main() -> None:
        async with WorkerClient(sampler_worker.share) as c:
            for name in ("Heun", "DPM2 a Karras", "PLMS", "DPM++ SDE Karras", "DDIM"):
                seen = []
                req = _req(name, [2, 4], kind="img2img", steps=8, strength=0.5)
                images = await c.run(req, init_pngs=[buf.getvalue()],
                                     on_progress=lambda s, seen=seen: seen.append(
                                         (s.step, s.total_steps)))
                assert len(images) == 2 and images[0].size == (64, 64)
                steps = [s for s, _ in seen]
                assert steps == sorted(steps), f"{name}: progress went back: {seen}"
                assert all(s <= t for s, t in seen if t), f"{name}: {seen}"

    asyncio.run(main())


def test_unknown_and_unavailable_samplers_are_refused(sampler_worker, app, monkeypatch):
    async def main() -> None:
        async with WorkerClient(sampler_worker.share) as c:
            with pytest.raises(InvalidRequest) as err:
                await c.submit(_req("DPM fast", [1]))
            assert "DPM++ 2M Karras" in str(err.value)

    asyncio.run(main())
    with pytest.raises(InvalidRequest) as err:  # the worker's own check, kind 'invalid'
        app.check(_req("Euler b", [1]))
    assert type(err.value) is InvalidRequest
    # a worker without torchsde does not offer the Brownian-tree samplers
    monkeypatch.setattr(app.engine, "sampler_names", lambda: ["Euler"])
    with pytest.raises(ModelNotAvailable):
        app.check(_req("DPM++ SDE", [1]))


def test_sdxl_runs_every_sampler_and_keeps_seeds(sampler_worker):
    def xl(sampler: str | None, seeds: list[int]) -> JobRequest:
        return _req(sampler, seeds, steps=4, model="tiny-xl")

    async def main() -> None:
        async with WorkerClient(sampler_worker.share) as c:
            euler = _arrays(await c.run(xl(None, [5])))[0]
            for name in SAMPLERS:
                alone = _arrays(await c.run(xl(name, [5])))[0]
                if name in STOCHASTIC_SAMPLERS:
                    batch = _arrays(await c.run(xl(name, [3, 5])))
                    assert_same_picture(alone, batch[1], f"SDXL {name}: alone vs batched")
                    assert _clearly_differs(alone, euler), f"SDXL {name} vs Euler"

    asyncio.run(main())
