"""PNG 'parameters' as A1111 writes them, read back by A1111's rules and by sd-parsers (a
third-party reader of A1111 images): sampler, LoRAs, seed, steps, CFG, size and model."""

from __future__ import annotations

import pytest
from PIL import Image

from colabswarm.protocol import JobRequest, LoraRef
from colabswarm.swarm.outputs import (
    GeneratedImage,
    loras_from_parameters,
    parameters_text,
    parse_parameters,
    read_parameters,
    save_image,
)

H1, H2 = "0123456789abcdef" * 4, "fedcba9876543210" * 4


def _params(**kw) -> dict:
    """A generated image's params as the controller keeps them (the job's fields)."""
    req = JobRequest(prompt="a red fox, snow", negative_prompt="blurry,\nlow quality",
                     width=512, height=768, steps=20, cfg=7.0, model="sd15",
                     sampler="DPM++ 2M Karras", clip_skip=2,
                     loras=[LoraRef(name="film grain", weight=0.8, hash=H1),
                            LoraRef(name="fox-v2", weight=-0.25, hash=H2)])
    params = req.model_dump(exclude={"seeds", "init_images", "upscaler", "scale", "strength"})
    return {**params, **kw}


def test_the_layout_is_a1111s():
    text = parameters_text(_params(), 42, backend="colab t4")
    assert text == (
        "a red fox, snow <lora:film grain:0.8> <lora:fox-v2:-0.25>\n"
        "Negative prompt: blurry,\nlow quality\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
        "Model: sd15, Clip skip: 2, "
        'Lora hashes: "film grain: 0123456789ab, fox-v2: fedcba987654", '
        "Backend: colab t4, Generator: colabswarm"
    )


def test_saved_pngs_read_back_by_a1111s_rules(tmp_path):
    img = GeneratedImage(Image.new("RGB", (16, 24)), seed=42, backend="w:7801", index=0,
                         seconds=1.0, params=_params())
    fields = parse_parameters(read_parameters(save_image(img, tmp_path)))
    assert fields["Prompt"].startswith("a red fox, snow <lora:")
    assert fields["Negative prompt"] == "blurry,\nlow quality"
    assert fields["Sampler"] == "DPM++ 2M Karras"
    assert (fields["Seed"], fields["Steps"], fields["CFG scale"]) == ("42", "20", "7")
    assert (fields["Size-1"], fields["Size-2"], fields["Model"]) == ("512", "768", "sd15")
    assert fields["Clip skip"] == "2"
    assert fields["Backend"] == "w:7801", "a value with ':' is quoted and unquoted"
    assert loras_from_parameters(fields) == [("film grain", 0.8, H1[:12]),
                                             ("fox-v2", -0.25, H2[:12])]


def test_sd_parsers_reads_them(tmp_path):
    sd_parsers = pytest.importorskip("sd_parsers")
    img = GeneratedImage(Image.new("RGB", (16, 24)), seed=42, backend="b", index=0,
                         seconds=1.0, params=_params(model="my-model"))
    info = sd_parsers.ParserManager().parse(save_image(img, tmp_path))
    assert info.generator == sd_parsers.data.Generators.AUTOMATIC1111
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M Karras"
    assert sampler.parameters == {"cfg_scale": "7", "seed": "42", "steps": "20"}
    assert str(sampler.model) == "my-model"
    assert info.metadata["Size"] == "512x768"
    assert "<lora:film grain:0.8>" in info.full_prompt


def test_defaults_and_an_old_style_infotext():
    text = parameters_text(dict(prompt="x", steps=4, cfg=7.5, width=64, height=64), 1)
    fields = parse_parameters(text)
    assert fields["Sampler"] == "Euler" and fields["CFG scale"] == "7.5"
    assert fields["Clip skip"] == "1" and "Clip skip" not in text, "1 is A1111's unwritten default"
    assert "Lora hashes" not in fields and loras_from_parameters(fields) == []
    # an infotext as A1111 writes it
    a1111 = ("masterpiece, fox <lora:detailer:0.6>\nNegative prompt: lowres\n"
             "Steps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, "
             "Seed: 965400086, Size: 512x640, Model hash: 45dee52b, Model: anything-v3, "
             'Clip skip: 2, Lora hashes: "detailer: 1a2b3c4d5e6f", Version: v1.10.1')
    f = parse_parameters(a1111)
    assert (f["Sampler"], f["Seed"], f["Size-2"], f["Model"]) == (
        "Euler a", "965400086", "640", "anything-v3")
    assert loras_from_parameters(f) == [("detailer", 0.6, "1a2b3c4d5e6f")]


def test_odd_values_are_quoted_and_prompt_tags_are_not_doubled():
    params = _params(model="folder, v2: final", prompt="a fox <lora:fox-v2:1>")
    text = parameters_text(params, 7)
    assert text.count("<lora:fox-v2:") == 1, "loras= wins over the prompt's own tag"
    fields = parse_parameters(text)
    assert fields["Model"] == "folder, v2: final"
    assert dict((n, w) for n, w, _ in loras_from_parameters(fields)) == {
        "fox-v2": -0.25, "film grain": 0.8}
    # a caption that cannot be parsed never costs the image
    broken = parameters_text(_params(prompt="<lora:a:1> <lora:a:2>", loras=[]), 7)
    assert broken.startswith("<lora:a:1> <lora:a:2>\n")
