"""Shapes compiled ahead of time (precompiled.py): a restarted worker loads them, no tracing.

Each run is a new process with its own empty inductor cache and the same compile cache folder,
as a restarted Colab worker with a Drive folder. torch's AOT precompile is real; the backend
is AOTAutograd's ``aot_eager`` (what torch can save, without inductor's minutes of C++ on this
CPU), so the numbers mean nothing and the behaviour is the worker's: what is written, what a
restart loads instead of compiling, and that a bad file costs a compile, never a job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.imagecheck import assert_same_picture

ROOT = Path(__file__).resolve().parent.parent


class Small(torch.nn.Module):
    """A module small enough for inductor's C++ on this CPU in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2

_SCRIPT = """
import json, logging, sys, time
import numpy as np
from colabswarm.backend.engine import Engine
from colabswarm.backend.serve import start_worker
from colabswarm.protocol import JobRequest

folder, image = sys.argv[1], sys.argv[2]
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
eng = Engine(models=["tiny"], compile="default", compile_batches=(1,), compile_cache=folder)
handle = start_worker(engine=eng, name="aot")
try:
    deadline = time.monotonic() + 240
    while handle.info().compile.state == "compiling" and time.monotonic() < deadline:
        time.sleep(0.05)
    info = handle.info().compile
    calls = eng._compiler.calls
    before = calls["compiled unet"]
    req = JobRequest(seeds=[5], prompt="a red fox", width=64, height=64, steps=3, cfg=7.0)
    np.save(image, np.asarray(eng.run(req)[0]))
    print(json.dumps({"state": info.state, "shapes": [s.batches for s in info.shapes],
                      "aot_compiled": calls["aot compiled unet"],
                      "aot_loaded": calls["aot loaded unet"],
                      "job_unet_compiled": calls["compiled unet"] - before}))
finally:
    handle.stop()
"""


def _run(tmp_path: Path, folder: Path, name: str, **env: str) -> dict:
    envs = {**os.environ, "OMP_NUM_THREADS": "1", "COLABSWARM_COMPILE_BACKEND": "aot_eager",
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}"), **env}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(folder),
                          str(tmp_path / f"{name}.npy")],
                         capture_output=True, text=True, env=envs, timeout=400, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["log"] = out.stderr
    result["image"] = np.load(tmp_path / f"{name}.npy")
    return result


def _aot_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/64x64-b1-*.aot"))


@pytest.mark.timeout(900)
def test_a_restarted_worker_loads_its_shapes_compiled_ahead_of_time(tmp_path):
    """The first worker compiles its shape ahead of time and writes it; a restarted one loads
    it instead of compiling and makes the same picture; a damaged file is said, compiled
    again and replaced, and the job still runs; the owner can turn it off."""
    pytest.importorskip("torch._dynamo.aot_compile", reason="this torch has no AOT precompile")
    folder = tmp_path / "compile-cache"
    first = _run(tmp_path, folder, "first")
    assert first["state"] == "ready" and first["shapes"] == [[1]], first["log"][-2000:]
    assert first["aot_compiled"] >= 1 and first["aot_loaded"] == 0, first
    assert first["job_unet_compiled"] == 3, "the job's 3 UNet steps ran compiled"
    (written,) = _aot_files(folder)

    again = _run(tmp_path, folder, "restart")
    assert again["state"] == "ready" and again["shapes"] == [[1]], again["log"][-2000:]
    assert again["aot_loaded"] >= 1, again["log"][-2000:]
    assert again["aot_compiled"] == 0, "the UNet's shape in the folder was compiled again"
    assert "loaded ahead-of-time compiled" in again["log"]
    assert again["job_unet_compiled"] == 3
    assert _aot_files(folder) == [written], "a restart that compiled nothing wrote a file"
    assert_same_picture(first["image"], again["image"], "the restarted worker's picture")

    written.write_bytes(b"not a compiled shape")  # e.g. a half-synced Drive file
    damaged = _run(tmp_path, folder, "damaged")
    assert f"{written} not loaded" in damaged["log"], damaged["log"][-2000:]
    assert damaged["state"] == "ready" and damaged["aot_compiled"] >= 1, damaged
    assert damaged["job_unet_compiled"] == 3
    assert_same_picture(first["image"], damaged["image"], "after a damaged file")
    assert len(_aot_files(folder)) == 2, "the shape was not written again"

    off = _run(tmp_path, tmp_path / "other-folder", "off", COLABSWARM_COMPILE_AOT="off")
    assert off["state"] == "ready" and off["aot_compiled"] == 0 and off["aot_loaded"] == 0, off
    assert not _aot_files(tmp_path / "other-folder")
    assert_same_picture(first["image"], off["image"], "compiled the traced way")


_GRAPHS_SCRIPT = """
import json, sys
import torch
from torch._dynamo.utils import counters
from colabswarm.backend import precompiled
from tests.test_precompiled import Small

torch.manual_seed(0)
m = Small().eval().requires_grad_(False)
x = torch.randn(4, 8)
with torch.inference_mode():
    fn = precompiled.compile_call(Small.forward, "reduce-overhead", None, m, (x,), {})
    data = precompiled.dumps([("small", "key", fn)], {"small": Small.forward})
out = {}
for mode in ("default", "reduce-overhead"):
    before = counters["inductor"]["cudagraph_skips"]
    ((name, key, loaded),) = precompiled.loads(data, {"small": Small.forward}, {"small": mode})
    with torch.inference_mode():
        # inductor's kernels against eager: equal up to float rounding, which CPUs differ in
        same = bool(torch.allclose(precompiled.call(loaded, m, (x,), {}), m(x), rtol=1e-5,
                                   atol=1e-6))
    out[mode] = {"graphs_asked": counters["inductor"]["cudagraph_skips"] > before,
                 "same": same, "key": key}
print(json.dumps(out))
"""


@pytest.mark.timeout(600)
def test_a_loaded_function_records_cuda_graphs_when_its_mode_does(tmp_path):
    """torch decides at load time, from inductor's global setting, whether a loaded function
    records CUDA graphs: a restarted worker that loaded its shapes without it ran batch 1 at
    2.6 img/s instead of 7.0 on an H200. Real inductor on this CPU: a function loaded for
    'reduce-overhead' asks for CUDA graphs (torch skips them here, a CPU graph, and counts the
    skip; on a GPU it records them), one loaded for 'default' does not; both compute what the
    module does."""
    import shutil

    pytest.importorskip("torch._dynamo.aot_compile", reason="this torch has no AOT precompile")
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler: inductor cannot compile on this CPU")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    out = subprocess.run([sys.executable, "-c", _GRAPHS_SCRIPT], capture_output=True,
                         text=True, env=env, timeout=500, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["reduce-overhead"]["graphs_asked"], "loaded for CUDA graphs without asking"
    assert not got["default"]["graphs_asked"]
    assert got["default"]["same"] and got["reduce-overhead"]["same"], got
    assert got["default"]["key"] == "key"


def _small_compiled() -> tuple:
    """A Small, an input, and its call compiled ahead of time with AOTAutograd (in seconds)."""
    from colabswarm.backend import precompiled

    pytest.importorskip("torch._dynamo.aot_compile", reason="this torch has no AOT precompile")
    torch.manual_seed(0)
    m = Small().eval().requires_grad_(False)
    x = torch.randn(4, 8)
    with torch.inference_mode():
        return m, x, precompiled.compile_call(Small.forward, "default", "aot_eager", m, (x,), {})


def test_a_shape_another_worker_wrote_meanwhile_is_not_written_again(tmp_path):
    """Two workers sharing a folder (two Colab sessions on one Drive folder) that compile the
    same shape keep one copy: the one that finishes second finds a file of that shape that was
    not there when it read the folder, and writes none; its own earlier files do not count.
    A restart loads the shape's calls from every file of it."""
    import types

    from colabswarm.backend import precompiled
    from colabswarm.backend.compiled import Compiler, Shape

    m, x, fn = _small_compiled()
    comp = Compiler("default", background=False)
    folder = tmp_path / "compile-cache"
    att = types.SimpleNamespace(cache_dir=folder, aot_known=frozenset(), unet=m, decoder=None,
                                aot={"unet": {}}, aot_off={}, modes={"unet": "default"},
                                aot_new=[("unet", "key", fn)])
    shape = Shape(64, 64, 1)
    comp._save_shape(att, shape)
    (mine,) = folder.glob("64x64-b1-*.aot")
    att.aot_new = [("unet", "key", fn)]
    comp._save_shape(att, Shape(64, 64, 2))  # its own earlier file is no reason to skip
    assert len(list(folder.glob("64x64-b2-*.aot"))) == 1
    other = folder / "64x64-b1-another-worker-001.aot"
    other.write_bytes(mine.read_bytes())  # the other worker finished the shape meanwhile
    att.aot_new = [("unet", "key", fn)]
    comp._save_shape(att, shape)
    assert sorted(folder.glob("64x64-b1-*.aot")) == sorted([mine, other]), "written again"
    att.aot_known = frozenset(p.name for p in folder.glob("*.aot"))  # a restart reads the folder
    loaded = comp._load_shape(att, shape)
    assert len(loaded) == 2 and att.aot["unet"].keys() == {"key"}, loaded
    with torch.inference_mode():
        # AOTAutograd may decompose the ops: equal up to float rounding, which CPUs differ in
        torch.testing.assert_close(precompiled.call(att.aot["unet"]["key"], m, (x,), {}), m(x))


def test_a_compiled_call_that_does_not_run_is_traced_instead(tmp_path):
    """torch's AOT path is experimental: a call compiled (or loaded) ahead of time that raises
    when run (the decoder under ``aot_eager`` on this CPU did) must not fail the job. The call
    runs the traced way and gives the module's own answer; that module compiles the traced
    way from then on, and the failed call is neither kept nor written."""
    import types

    from colabswarm.backend import precompiled
    from colabswarm.backend.compiled import Compiler

    m, x, fn = _small_compiled()
    m.lin = torch.nn.Identity()  # the module changed under it: its call now raises
    with torch.inference_mode(), pytest.raises((AttributeError, KeyError)):
        precompiled.call(fn, m, (x,), {})
    comp = Compiler("default", background=False)
    att = types.SimpleNamespace(
        aot={"unet": {"key": fn}}, aot_off={}, aot_new=[("unet", "key", fn)],
        fullgraph={"unet": True}, modes={"unet": "default"},
        fns={"unet": torch.compile(Small.forward, backend="eager", fullgraph=True)})
    with torch.inference_mode():
        got = comp._compile_call(att, "unet", m, "key", (x,), {})
        # dynamo's eager backend runs the module's own ops: the same answer on any CPU
        assert torch.equal(got, m(x)), "the traced call's answer is not the module's"
    assert "unet" in att.aot_off and att.aot["unet"] == {} and att.aot_new == [], att
