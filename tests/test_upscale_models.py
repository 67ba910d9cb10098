"""Upscale models for real: random-weight ESRGAN (RRDB), Real-ESRGAN compact (SRVGGNetCompact)
and SwinIR models, built with spandrel's own architecture classes at small sizes, saved as
.safetensors (and one .pth), detected by spandrel, served by real worker processes and run
through a distributed tiled upscale; a pickle .pth with a payload is refused and never runs.

Tolerances: a model applied here and the same model on a worker process run the same float32
kernels on possibly different thread counts, so results are compared with
tests.imagecheck.assert_same_picture (<= 2/255 in <= 1 % of values), never exactly.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from colabswarm.backend import upscalers as up
from colabswarm.errors import ColabSwarmError, ModelNotAvailable
from colabswarm.swarm import Swarm, read_parameters
from tests.conftest import ROOT, WorkerProcess
from tests.imagecheck import assert_different, assert_same_picture

up.import_spandrel()  # the test models are built with spandrel's own architecture classes
from spandrel.architectures.Compact import Compact  # noqa: E402
from spandrel.architectures.ESRGAN import ESRGAN  # noqa: E402
from spandrel.architectures.SwinIR import SwinIR  # noqa: E402

# name -> (spandrel's architecture id, scale, constructor): the real classes with small configs
# (default ESRGAN is 64 filters x 23 blocks, SwinIR 180-dim x 6 layers of 6 blocks)
ARCHS = {
    "esrgan-4x": ("ESRGAN", 4, lambda: ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1,
                                              scale=4)),
    "compact-4x": ("Compact", 4, lambda: Compact(num_in_ch=3, num_out_ch=3, num_feat=8,
                                                 num_conv=2, upscale=4)),
    "swinir-4x": ("SwinIR", 4, lambda: SwinIR(
        img_size=16, patch_size=1, in_chans=3, embed_dim=12, depths=[2], num_heads=[2],
        window_size=4, mlp_ratio=2.0, upscale=4, img_range=1.0, upsampler="pixelshuffle",
        resi_connection="1conv")),
}


class Payload:
    """What a hostile .pth carries: unpickling it calls exec, which writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code from a pickle ran')",))


def _build(seed: int, make) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # SwinIR calls torch.meshgrid without indexing=
        warnings.filterwarnings("ignore", "torch.meshgrid", UserWarning)
        net = make().eval()
    # random init leaves most ESRGAN/SwinIR outputs near a flat grey; widen the weights a
    # little so that the images carry detail and a wrong model or tile would show
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_(1.5)
    return net


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("upscalers")
    nets = {}
    for i, (name, (_arch, _scale, make)) in enumerate(ARCHS.items()):
        nets[name] = _build(i, make)
        save_file({k: v.contiguous() for k, v in nets[name].state_dict().items()},
                  str(folder / f"{name}.safetensors"))
    # a .pth as Real-ESRGAN's releases ship them: the state dict under "params_ema"
    nets["esrgan-2x"] = _build(7, lambda: ESRGAN(in_nc=3, out_nc=3, num_filters=8,
                                                 num_blocks=1, scale=2))
    torch.save({"params_ema": nets["esrgan-2x"].state_dict()}, folder / "esrgan-2x.pth")
    marker = folder.parent / f"{folder.name}-pwned"
    torch.save({"model.0.weight": torch.zeros(8, 3, 3, 3), "x": Payload(marker)},
               folder / "evil.pth")
    (folder / "notes.txt").write_text("not a model")
    return folder, nets, marker


@pytest.fixture(scope="module")
def workers(models):
    folder = models[0]
    env = {"OMP_NUM_THREADS": "1"}
    procs = [WorkerProcess("--upscalers-dir", str(folder), name="m0", env=env),
             WorkerProcess("--upscalers-dir", str(folder), name="m1", env=env)]
    threads = [threading.Thread(target=p.start, kwargs={"timeout": 240}) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not all(p.share for p in procs):
        for p in procs:
            p.kill()
        pytest.fail("workers did not start: " + "\n".join(sum((p.lines for p in procs), [])))
    yield procs
    for p in procs:
        p.kill()


def _source(w: int = 32, h: int = 32, seed: int = 3) -> Image.Image:
    # smooth shapes plus noise: what an upscaler is for, and enough detail to compare
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)),
                     ((xx // 8 + yy // 8) % 2) * 200], axis=-1)
    noisy = base + rng.integers(-30, 30, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _direct(net: torch.nn.Module, image: Image.Image) -> Image.Image:
    """The model applied to the whole image, with torch alone (no colabswarm code)."""
    x = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        y = net(x).clamp(0, 1)[0].permute(1, 2, 0).mul(255).round().byte().numpy()
    return Image.fromarray(np.ascontiguousarray(y))


# ----- the folder: detection, weights-only loading, refusals ----------------------------------
def test_spandrel_detects_each_small_model_as_its_architecture_and_scale(models):
    folder, _nets, marker = models
    found = {m.name: m for m in up.model_files(str(folder))}
    for name, (arch, scale, _make) in ARCHS.items():
        assert (found[name].architecture, found[name].scale, found[name].problem) == (
            arch, scale, None), f"{name} must be detected as {arch} {scale}x"
    assert (found["esrgan-2x"].architecture, found["esrgan-2x"].scale) == ("ESRGAN", 2)
    assert "notes" not in found, "only .safetensors and .pth files are considered"
    assert up.available_upscalers(str(folder)) == [
        "lanczos", "tiny-upscaler", "compact-4x", "esrgan-2x", "esrgan-4x", "swinir-4x"]
    assert up.upscaler_scales(str(folder)) == {
        "compact-4x": 4, "esrgan-2x": 2, "esrgan-4x": 4, "swinir-4x": 4}
    assert not marker.exists()


def test_a_pth_holding_a_pickle_is_refused_and_no_code_from_it_runs(models, tmp_path):
    folder, _nets, marker = models
    evil = {m.name: m for m in up.model_files(str(folder))}["evil"]
    assert evil.problem is not None and evil.architecture is None
    assert "pickle" in evil.problem and ".safetensors" in evil.problem, evil.problem
    with pytest.raises(ModelNotAvailable) as err:
        up.run_upscaler(_source(), "evil", 2, "cpu", str(folder), {})
    assert "pickle" in str(err.value) and "esrgan-4x" in str(err.value), "says what is offered"
    assert not marker.exists(), "the payload must not have run"
    # the control: the same kind of file does run its payload when unpickled in full
    control_marker = tmp_path / "control-ran"
    torch.save({"x": Payload(control_marker)}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert control_marker.exists(), "the payload works, so the refusal above is what kept it out"


def test_files_that_are_not_usable_upscalers_are_not_offered_and_say_why(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "unknown.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    shutil.copy(tmp_path / "unknown.safetensors", tmp_path / "lanczos.safetensors")
    found = {m.name: m.problem for m in up.model_files(str(tmp_path))}
    assert "knows no architecture" in found["unknown"]
    assert "not a readable .safetensors" in found["broken"]
    assert "no state dict" in found["list"]
    assert "built-in" in found["lanczos"]
    assert up.available_upscalers(str(tmp_path)) == ["lanczos", "tiny-upscaler"]


def test_without_spandrel_models_are_not_offered_and_the_message_says_how_to_install(
        models, tmp_path, monkeypatch):
    shutil.copy(models[0] / "compact-4x.safetensors", tmp_path / "c.safetensors")
    monkeypatch.setitem(sys.modules, "spandrel", None)  # import spandrel now fails
    (only,) = up.model_files(str(tmp_path))
    assert "spandrel" in only.problem and "pip install --no-deps" in only.problem
    assert up.available_upscalers(str(tmp_path)) == ["lanczos", "tiny-upscaler"]


def test_a_spandrel_that_does_not_import_is_reported_not_raised(models, tmp_path, monkeypatch):
    """spandrel imports einops at module level (RGT, FDAT, Uformer): without it the worker
    must still start, offer no model, and say what to install."""
    shutil.copy(models[0] / "compact-4x.safetensors", tmp_path / "c2.safetensors")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "spandrel"}
    for k in saved:
        del sys.modules[k]
    monkeypatch.setitem(sys.modules, "einops", None)
    try:
        with pytest.raises(ModelNotAvailable, match="does not import"):
            up.import_spandrel()
        (only,) = up.model_files(str(tmp_path))
        assert "einops" in only.problem and "pip install" in only.problem
        assert not [k for k in sys.modules if k.split(".")[0] == "spandrel"]
        if not up._torchvision_works():  # its placeholders are gone again (a real one stays)
            assert not [k for k in sys.modules if k.split(".")[0] == "torchvision"]
    finally:
        sys.modules.update(saved)


@pytest.mark.parametrize("torchvision", ["broken", "working"])
def test_spandrel_imports_beside_a_broken_or_working_torchvision(models, tmp_path, torchvision):
    """A PyPI torchvision beside a CPU torch fails at import (torchvision 0.28.0's wheel links
    libtorch_cuda.so; with torch 2.13.0+cpu `import torchvision` raises RuntimeError "operator
    torchvision::nms does not exist", docs/ARCHITECTURE.md): spandrel must still load the
    models, leaving no torchvision module behind. A working torchvision must be used as is."""
    pkg = tmp_path / "fake" / "torchvision"
    (pkg / "transforms").mkdir(parents=True)
    if torchvision == "broken":
        (pkg / "__init__.py").write_text(
            "raise RuntimeError('operator torchvision::nms does not exist')\n")
        (pkg / "transforms" / "__init__.py").write_text("")
    else:
        (pkg / "__init__.py").write_text("from . import transforms\n")
        (pkg / "transforms" / "__init__.py").write_text("from . import functional\n")
    (pkg / "transforms" / "functional.py").write_text(textwrap.dedent("""
        import enum
        class InterpolationMode(enum.Enum):
            NEAREST = "nearest"
            BILINEAR = "bilinear"
        def normalize(tensor, mean, std): return tensor
        def rotate(img, angle, interpolation=None, fill=None): return img
    """))
    code = textwrap.dedent(f"""
        import sys
        from colabswarm.backend import upscalers as up
        print(up.upscaler_scales({str(models[0])!r}))
        import spandrel.architectures.LaMa.__arch.LaMa as lama
        print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))
        print(type(lama.rotate).__name__)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkg.parent), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    scales, modules, rotate = out.stdout.strip().splitlines()
    assert scales == str({"compact-4x": 4, "esrgan-2x": 2, "esrgan-4x": 4, "swinir-4x": 4})
    if torchvision == "broken":
        assert modules == "[]" and rotate == "_Missing", "placeholders, gone after the import"
    else:
        assert "torchvision.transforms.functional" in modules and rotate == "function"


# ----- running a model: whole, and in tiles of its own -----------------------------------------
@pytest.mark.parametrize("name", [*ARCHS, "esrgan-2x"])
def test_the_worker_runs_the_model_as_torch_does_on_the_whole_image(models, name):
    folder, nets, _ = models
    src = _source(40, 24)
    scale = up.upscaler_scales(str(folder))[name]
    out = up.run_upscaler(src, name, scale, "cpu", str(folder), {})
    assert out.size == (40 * scale, 24 * scale)
    assert_same_picture(out, _direct(nets[name], src), f"{name} via colabswarm vs torch")
    assert_different(out, src.resize(out.size, Image.Resampling.LANCZOS), "model vs Lanczos")


def test_a_large_image_goes_through_the_model_in_tiles_and_equals_the_whole_pass(models):
    """Compact with 2 body convs looks 4 input pixels around each pixel; tiles that share 16
    pixels ignore their outer 4 and blend across the next 8, so tiled equals whole."""
    folder, nets, _ = models
    src = _source(72, 56, seed=5)
    seen: list[tuple[int, int]] = []
    cache: dict = {}
    up.run_upscaler(src, "compact-4x", 4, "cpu", str(folder), cache)  # loads it into cache
    (loaded,) = cache.values()
    inner = loaded.call

    def recording(x):
        seen.append(tuple(x.shape[-2:]))
        return inner(x)

    loaded.call = recording
    tiled = up.run_upscaler(src, "compact-4x", 4, "cpu", str(folder), cache, tile=32,
                            overlap=16)
    assert len(seen) == len(up.tile_spans(56, 32, 16)) * len(up.tile_spans(72, 32, 16)) > 4
    assert max(max(s) for s in seen) <= 32, "no pass sees more than one tile"
    assert tiled.size == (288, 224)
    assert_same_picture(tiled, _direct(nets["compact-4x"], src), "tiled vs whole")


def test_out_of_gpu_memory_halves_the_model_tile_and_still_gives_the_whole_result():
    src = _source(96, 40, seed=9)
    whole = up.run_upscaler(src, "tiny-upscaler", 2, "cpu", None, {})
    cache: dict = {}
    up.run_upscaler(src, "tiny-upscaler", 2, "cpu", None, cache)
    (loaded,) = cache.values()
    inner, sizes = loaded.call, []

    def small_gpu(x):
        sizes.append(max(x.shape[-2:]))
        if max(x.shape[-2:]) > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated: tile > 64 px)")
        return inner(x)

    loaded.call = small_gpu
    out = up.run_upscaler(src, "tiny-upscaler", 2, "cpu", None, cache, tile=128, overlap=16)
    assert sizes[0] == 96 and max(sizes[1:]) <= 64, sizes
    assert_same_picture(out, whole, "after halving the tile vs whole")


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 700), tile=st.integers(16, 256), overlap=st.integers(0, 96),
       scale=st.sampled_from([1, 2, 4]))
def test_model_tiles_cover_the_image_and_their_weights_sum_to_one(length, tile, overlap,
                                                                   scale):
    spans = up.tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(e - s == min(tile, length) for s, e in spans)
    shared = [a[1] - b[0] for a, b in zip(spans, spans[1:], strict=False)]
    assert all(n >= min(overlap, tile // 2) for n in shared)
    weights = up.blend_weights(spans, length, scale, overlap)
    total = np.zeros(length * scale)
    margin = (min([overlap, *shared]) // 4) * scale  # a quarter of what neighbours share
    for (s, e), w in zip(spans, weights, strict=True):
        assert len(w) == (e - s) * scale and (w >= 0).all()
        total[s * scale:e * scale] += w
        if s > 0:
            assert not w[:margin].any(), "pixels next to a tile's inner edge get no weight"
        if e < length:
            assert not w[len(w) - margin:].any()
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_a_model_asked_for_more_pixels_than_allowed_is_refused_before_it_runs(models,
                                                                             monkeypatch):
    monkeypatch.setattr(up, "MAX_MODEL_PIXELS", 100 * 100)
    with pytest.raises(ColabSwarmError, match="4x model") as err:
        up.run_upscaler(_source(32, 32), "compact-4x", 2, "cpu", str(models[0]), {})
    assert err.value.kind == "invalid"


# ----- real workers, distributed ---------------------------------------------------------------
def test_workers_advertise_their_models_and_scales_and_refuse_the_pickle(models, workers,
                                                                         worker):
    folder, _nets, marker = models
    m0 = workers[0]
    url, token = m0.share.split("#token=")
    auth = {"Authorization": f"Bearer {token}"}
    info = httpx.get(f"{url}/v1/info", headers=auth, timeout=30).json()
    assert info["upscalers"] == up.available_upscalers(str(folder))
    assert info["upscaler_scales"] == {"compact-4x": 4, "esrgan-2x": 2, "esrgan-4x": 4,
                                       "swinir-4x": 4}
    plain = httpx.get(worker.url + "/v1/info", timeout=30, headers={  # no upscalers_dir
        "Authorization": f"Bearer {worker.token}"}).json()
    assert plain["upscalers"] == ["lanczos", "tiny-upscaler"] and plain["upscaler_scales"] == {}
    # a token holder names the pickle anyway: 422 with the reason, and nothing ran
    png = Image.new("RGB", (16, 16))
    buf = io.BytesIO()
    png.save(buf, format="PNG")
    up_id = httpx.post(f"{url}/v1/uploads", content=buf.getvalue(), headers=auth,
                       timeout=30).json()["id"]
    r = httpx.post(f"{url}/v1/jobs", headers=auth, timeout=30, json={
        "kind": "upscale", "upscaler": "evil", "scale": 2, "seeds": [0],
        "init_images": [up_id]})
    assert r.status_code == 422, r.text
    assert "pickle" in r.json()["detail"] and "esrgan-4x" in r.json()["detail"], r.text
    assert any("upscaler evil is not offered" in line for line in m0.lines), \
        "the owner sees why in the worker's log"
    assert not marker.exists()


@pytest.mark.parametrize("name", list(ARCHS))
def test_a_distributed_4x_upscale_through_each_model_is_the_model_on_the_whole_image(
        models, workers, tmp_path, name):
    """Both workers have the model: each upscales the small source through it and cuts its own
    tiles; denoise 0 returns the tiles as cut, so the blend is the model's image."""
    from colabswarm.swarm.upscale import _workers_cut

    _folder, nets, marker = models
    s = Swarm(output_dir=tmp_path)
    try:
        for p in workers:
            s.add(p.share)
        assert _workers_cut(s, name), "both have the model: each worker cuts its own tiles"
        src = _source(32, 32)
        r = s.upscale(src, scale=4, upscaler=name, tile=64, overlap=16, denoise=0.0, steps=4,
                      seed=1)
        # which worker takes which tiles is the scheduler's call (and the machine's load)
        assert r.image.size == (128, 128) and r.tiles > 4 and set(r.backends) <= {"m0", "m1"}
        assert_same_picture(r.image, _direct(nets[name], src), f"{name} distributed vs whole")
        text = _upscale_field(r.path)
        assert text.startswith(f"{name} x4, ") and "resized" not in text, text
    finally:
        s.close()
    assert not marker.exists()


def _upscale_field(path) -> str:
    """The image's 'Upscale' parameter, read by A1111's rules (it is JSON-quoted: commas)."""
    from colabswarm.swarm.outputs import parse_parameters

    return parse_parameters(read_parameters(path))["Upscale"]


def test_a_model_only_one_worker_has_runs_there_and_the_controller_cuts_the_tiles(
        models, workers, worker, tmp_path):
    from colabswarm.swarm.upscale import _workers_cut

    _folder, nets, _ = models
    s = Swarm(output_dir=tmp_path)
    try:
        s.add(workers[0].share)
        s.add(worker.share)  # a worker without upscalers_dir
        assert not _workers_cut(s, "swinir-4x"), "one lacks the model: the controller cuts"
        src = _source(32, 32, seed=4)
        r = s.upscale(src, scale=4, upscaler="swinir-4x", tile=64, overlap=16, denoise=0.0,
                      steps=4, seed=2)
        assert r.image.size == (128, 128)
        assert_same_picture(r.image, _direct(nets["swinir-4x"], src), "controller-cut")
        assert _upscale_field(r.path).startswith("swinir-4x x4, ")
    finally:
        s.close()


def test_a_4x_model_asked_for_2x_runs_at_4x_then_resizes_and_says_so(models, workers,
                                                                     tmp_path):
    _folder, nets, _ = models
    s = Swarm(output_dir=tmp_path)
    try:
        for p in workers:
            s.add(p.share)
        src = _source(32, 32, seed=6)
        r = s.upscale(src, scale=2, upscaler="esrgan-4x", tile=64, overlap=16, denoise=0.0,
                      steps=4, seed=3)
        assert r.image.size == (64, 64)
        expected = _direct(nets["esrgan-4x"], src).resize((64, 64), Image.Resampling.LANCZOS)
        assert_same_picture(r.image, expected, "4x model resized to 2x")
        assert _upscale_field(r.path).startswith(
            "esrgan-4x x2 (a 4x model: ran at x4 then resized to x2 with Lanczos), ")
        # the .pth (weights-only) 2x model at its own scale: no note
        r2 = s.upscale(src, scale=2, upscaler="esrgan-2x", tile=64, overlap=16, denoise=0.0,
                       steps=4, seed=3)
        assert_same_picture(r2.image, _direct(nets["esrgan-2x"], src), "the .pth model")
        assert _upscale_field(r2.path).startswith("esrgan-2x x2, ")
    finally:
        s.close()


def test_the_upscale_panel_offers_the_models_and_runs_one(models, workers, tmp_path):
    pytest.importorskip("ipywidgets")
    from colabswarm.widgets import UpscalePanel

    _folder, nets, _ = models
    s = Swarm(output_dir=tmp_path)
    try:
        for p in workers:
            s.add(p.share)
        panel = UpscalePanel(s)
        src = _source(32, 32, seed=8)
        panel.add_image(src, "src.png")
        assert {"compact-4x", "esrgan-4x", "swinir-4x", "esrgan-2x"} <= set(
            panel.upscaler.options)
        assert "evil" not in panel.upscaler.options
        panel.upscaler.value, panel.scale.value = "compact-4x", 4
        panel.tile.value, panel.overlap.value, panel.denoise.value = 64, 16, 0.0
        assert panel.start() is not None
        r = panel.wait(120)
        assert r.image.size == (128, 128)
        assert_same_picture(r.image, _direct(nets["compact-4x"], src), "panel upscale")
        assert _upscale_field(r.path).startswith("compact-4x x4")
        panel.close()
    finally:
        s.close()


def test_a_model_nobody_offers_is_refused_by_the_swarm(workers):
    s = Swarm(output_dir=None)
    try:
        s.add(workers[0].share)
        with pytest.raises(ColabSwarmError, match="evil"):
            s.upscale(_source(), scale=2, upscaler="evil", tile=64, overlap=16, denoise=0.0,
                      steps=4, seed=1)
    finally:
        s.close()


def test_the_install_pins_agree():
    """setup.sh installs spandrel with --no-deps at the version the worker's message names,
    and the `upscale` extra allows that version."""
    import tomllib

    setup = (ROOT / "scripts" / "setup.sh").read_text()
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    pin = 'spandrel==0.4.2'
    assert f'pip install -q --no-deps "{pin}"' in setup and pin in up.SPANDREL_INSTALL
    assert any(d.startswith("spandrel>=0.4.2") for d in extra["upscale"])
    assert any(d.startswith("einops") for d in extra["worker"])
    assert not any(d.startswith("spandrel") for d in extra["worker"] + extra["all"]), \
        "spandrel's torchvision requirement would pull a CUDA torch on a CPU machine"
