"""What people generate with, across the swarm: samplers, LoRAs (by name and hash), prompt
syntax, prompt lists, img2img, X/Y grids, SDXL; with real worker processes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colabswarm.backend.tiny import build_tiny_lora
from colabswarm.errors import InvalidRequest, ModelNotAvailable
from colabswarm.swarm import Swarm
from colabswarm.swarm.outputs import parse_parameters, read_parameters
from tests.conftest import WorkerProcess, start_all
from tests.imagecheck import (
    assert_identical,
    assert_not_same_picture,
    assert_same_picture,
)

KW = dict(width=64, height=64, steps=3)
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    build_tiny_lora(root / "detail.safetensors", "tiny", 1)
    build_tiny_lora(root / "xl-style.safetensors", "tiny-xl", 2)
    return root


@pytest.fixture(scope="module")
def pair(loras):
    """Two workers: 'styled' has the LoRAs and both tiny models, 'plain' only the SD one."""
    procs = start_all([
        WorkerProcess("--model", "tiny", "--model", "tiny-xl", "--loras-dir", str(loras),
                      name="styled", env=ENV),
        WorkerProcess("--model", "tiny", name="plain", env=ENV),
    ])
    yield procs
    for p in procs:
        p.kill()


@pytest.fixture
def swarm(pair, tmp_path):
    s = Swarm(output_dir=tmp_path / "out", trace=True)
    for p in pair:
        s.add(p.share, name=p.name)
    yield s
    s.close()


def test_a_lora_only_one_worker_has_runs_only_there(swarm):
    swarm.move("plain", 0)  # first in order, and still skipped, with the reason
    r = swarm.generate("a red fox", images=6, seed=10, loras={"detail": 0.8}, **KW)
    assert Counter(g.backend for g in r.images) == Counter({"styled": 6})
    assert any("plain skipped" in m and "does not have LoRA 'detail'" in m
               for _, _, m in swarm.logs), [m for _, _, m in swarm.logs]
    swarm.disable("styled")  # and the other one serves plain jobs of the same parameters
    plain = swarm.generate("a red fox", images=2, seed=10, **KW)
    assert {g.backend for g in plain.images} == {"plain"}
    swarm.enable("styled")


def test_lora_prompt_syntax_equals_the_loras_argument(swarm, tmp_path):
    tagged = swarm.generate("a red fox <lora:detail:0.8>", seed=3, **KW).images[0]
    given = swarm.generate("a red fox", seed=3, loras={"detail": 0.8}, **KW).images[0]
    without = swarm.generate("a red fox", seed=3, model=None, **KW)
    assert tagged.backend == given.backend == "styled"
    assert_identical(tagged.image, given.image, "<lora:detail:0.8> and loras={'detail': 0.8}")
    same_worker = [g for g in without.images if g.backend == "styled"]
    if same_worker:
        assert_not_same_picture(tagged.image, same_worker[0].image, "with and without the LoRA")
    fields = parse_parameters(read_parameters(given.path))
    assert fields["Prompt"] == "a red fox <lora:detail:0.8>"
    assert fields["Lora hashes"].startswith("detail: ")
    assert fields["Model"] == "tiny", "the model's name, not 'default'"


def test_unknown_names_are_refused_with_the_valid_ones(swarm):
    with pytest.raises(InvalidRequest, match="DPM\\+\\+ 2M Karras"):
        swarm.generate("x", sampler="DPM++ 9000", **KW)
    with pytest.raises(ModelNotAvailable, match="No backend offers LoRA 'nope'.*detail"):
        swarm.generate("x <lora:nope:1>", **KW)


def test_samplers_by_their_a1111_names_across_the_swarm(swarm):
    euler = swarm.generate("an owl", images=2, seed=21, sampler="Euler", **KW)
    for name in ("DPM++ 2M Karras", "euler_a", "UniPC"):
        r = swarm.generate("an owl", images=2, seed=21, sampler=name, **KW)
        for a, b in zip(r.images, euler.images, strict=True):
            assert_not_same_picture(a.image, b.image, f"{name} vs Euler")
        fields = parse_parameters(read_parameters(r.images[0].path))
        assert fields["Sampler"] == {"euler_a": "Euler a"}.get(name, name)


def test_a_prompt_list_batches_its_prompts_together(swarm):
    prompts = ["a red fox", "a blue owl", "a green cat"]
    r = swarm.generate(prompts=prompts, images=2, seed=100, **KW)
    assert [g.seed for g in r.images] == list(range(100, 106))
    assert [g.params["prompt"] for g in r.images] == [p for p in prompts for _ in range(2)]
    assert any(n > 2 for _, n, *_ in swarm.trace), "prompts shared a pipeline call"
    # the image of one prompt in a mixed batch is that prompt's picture
    for g in r.images:
        alone = swarm.generate(g.params["prompt"], seed=g.seed, **KW).images[0]
        assert_same_picture(g.image, alone.image, f"seed {g.seed} in a prompt list vs alone")


def test_img2img_from_generate(swarm):
    src = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8))
    r = swarm.generate("a painting", images=2, seed=4, init_image=src, strength=0.6,
                       steps=5, width=64, height=64)
    assert all(g.image.size == (64, 64) for g in r.images)
    fields = parse_parameters(read_parameters(r.images[0].path))
    assert fields["Denoising strength"] == "0.6"
    lighter = swarm.generate("a painting", seed=4, init_image=src, strength=0.2, steps=5,
                             width=64, height=64).images[0]
    d_strong = np.abs(np.asarray(r.images[0].image, np.int16) - np.asarray(src, np.int16))
    d_light = np.abs(np.asarray(lighter.image, np.int16) - np.asarray(src, np.int16))
    assert d_light.mean() < d_strong.mean(), "less denoising stays closer to the source"


def test_an_xy_grid_comes_back_complete_with_labels(swarm):
    g = swarm.grid("a red fox", x=("cfg", [3, 7, 11]), y=("sampler", ["Euler", "DDIM"]),
                   seed=5, **KW)
    assert [len(row) for row in g.cells] == [3, 3]
    for r, sampler in enumerate(["Euler", "DDIM"]):
        for c, cfg in enumerate([3, 7, 11]):
            cell = g.cells[r][c]
            assert cell.seed == 5 and cell.params["cfg"] == cfg
            assert cell.params["sampler"] == sampler
            fields = parse_parameters(read_parameters(cell.path))
            assert fields["CFG scale"] == str(cfg) and fields["Sampler"] == sampler
    assert g.image.width > 3 * 64 and g.image.height > 2 * 64, "room for the labels"
    band = np.asarray(g.image.convert("L"))[: g.image.height - 2 * 64, g.image.width - 3 * 64:]
    assert (band < 128).any(), "the column labels are drawn"
    assert g.path is not None and "Grid" in parse_parameters(read_parameters(g.path))
    assert_not_same_picture(g.cells[0][0].image, g.cells[0][2].image, "cfg 3 vs 11")


def test_a_prompt_search_replace_grid_over_lora_weights(swarm):
    g = swarm.grid("a red fox", x=("prompt", ["fox", "owl"]), y=("lora:detail", [0, 1]),
                   seed=8, **KW)
    assert [[c.params["prompt"] for c in row] for row in g.cells] == \
        [["a red fox", "a red owl"]] * 2
    assert [row[0].params["loras"][0]["weight"] for row in g.cells] == [0.0, 1.0]
    with pytest.raises(InvalidRequest, match="not in the prompt"):
        swarm.grid("a red fox", x=("prompt", ["cat", "dog"]), **KW)


def test_kill_9_mid_grid_still_completes_it(loras, tmp_path):
    procs = start_all([WorkerProcess("--model", "tiny", name=f"k{i}", env=ENV)
                       for i in range(2)])
    s = Swarm(output_dir=None, copies=False, health_every=0.5)
    try:
        for p in procs:
            s.add(p.share, name=p.name)
        ref = s.grid("a fox", x=("cfg", [2, 4, 6]), y=("seed", [1, 2, 3]), width=64,
                     height=64, steps=4, save=False)
        killed: list[str] = []

        def on_image(_g) -> None:
            if killed:
                return
            busy = [f for f in s.flights() if f["total_steps"] == 0 or f["step"] < f["total_steps"]]
            if busy:
                killed.append(busy[0]["backend"])
                next(p for p in procs if p.name == killed[0]).kill()

        g = s.grid("a fox", x=("cfg", [2, 4, 6]), y=("seed", [1, 2, 3]), width=64, height=64,
                   steps=4, save=False, on_image=on_image)
        assert killed and sum(len(row) for row in g.cells) == 9
        for r in range(3):
            for c in range(3):
                assert_same_picture(g.cells[r][c].image, ref.cells[r][c].image,
                                    f"cell {r},{c} with a worker killed")
    finally:
        s.close()
        for p in procs:
            p.kill()


def test_sdxl_through_the_swarm_with_a_sampler_a_lora_and_clip_skip(swarm):
    r = swarm.generate("a castle <lora:xl-style:0.7>", images=2, seed=9, model="tiny-xl",
                       sampler="DPM++ 2M", clip_skip=2, **KW)
    assert {g.backend for g in r.images} == {"styled"}
    fields = parse_parameters(read_parameters(r.images[0].path))
    assert fields["Model"] == "tiny-xl" and fields["Sampler"] == "DPM++ 2M"
    assert fields["Lora hashes"].startswith("xl-style: ")
    g = swarm.grid("a castle", x=("cfg", [4, 8]), seed=9, model="tiny-xl", **KW)
    assert len(g.cells[0]) == 2
