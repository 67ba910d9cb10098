"""The compiled fast path on a real worker: the option is checked and reported, 'auto' stays off
on a CPU, shapes compile on a background thread while the worker answers /v1/info and runs jobs
eagerly, a compiled shape is listed with its batch sizes (1 always among them) and then runs
compiled, a failed compile leaves that shape eager, LoRA jobs stay right, and a swarm sends a
compiled worker only its batch sizes.

Most tests use a fake compile function (the engine's ``compile_fn`` seam): "compiling" a shape
blocks until the test lets it go and records the thread it ran on, and the "compiled" function
is the module's own forward, so the images must be exactly the eager ones. One test compiles
for real with torch.compile (a counting FX backend: dynamo's real tracing, guards and cached
code, without inductor's minutes of C++ compilation on this CPU).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from colabswarm.backend.client import WorkerClient
from colabswarm.backend.compiled import (
    DEFAULT_BATCHES,
    SWITCH_ENV,
    check_batches,
    check_mode,
)
from colabswarm.backend.engine import Engine
from colabswarm.backend.serve import make_engine, start_worker
from colabswarm.errors import InvalidRequest
from colabswarm.protocol import CompiledShape, JobRequest, Limits
from tests.conftest import wait_until
from tests.imagecheck import assert_identical, assert_not_same_picture, assert_same_picture

COMPILE_THREAD = "colabswarm-compile"
ENGINE_THREAD = "colabswarm-engine"
ROOT = Path(__file__).resolve().parent.parent


class FakeCompile:
    """A compile_fn for tests. The first call of a compiled function with a new input shape is
    its "compile": it records the thread, waits for `release` and may fail (`fail_on(batch)`,
    batch = the first input's first dimension). Then it runs the function itself. `ran`
    counts the runs by (thread, function, batch)."""

    def __init__(self, fail_on=None, released: bool = False, hold=None) -> None:
        self.release = threading.Event()
        self.hold = hold or (lambda shape: True)  # which new input shapes wait for `release`
        if released:
            self.release.set()
        self.fail_on = fail_on
        self.compiled_on: list[str] = []
        self.calls = 0
        self.ran: Counter = Counter()
        self._seen: set = set()

    def __call__(self, fn, mode, fullgraph):
        def compiled(module, *args, **kwargs):
            first = args[0] if args else next(iter(kwargs.values()))
            key = (fn.__qualname__, tuple(first.shape))
            if key not in self._seen:
                self.compiled_on.append(threading.current_thread().name)
                if self.hold(tuple(first.shape)):
                    assert self.release.wait(60), "the test never let the compile finish"
                if self.fail_on is not None and self.fail_on(first.shape[0]):
                    raise RuntimeError("fake compiler: this shape does not compile")
                self._seen.add(key)
            self.calls += 1
            self.ran[threading.current_thread().name, fn.__qualname__, first.shape[0]] += 1
            return fn(module, *args, **kwargs)

        return compiled


def _req(seeds=(3, 4), width=64, height=64, **kw) -> JobRequest:
    base = dict(prompt="a red fox", width=width, height=height, steps=3, cfg=7.0)
    return JobRequest(seeds=list(seeds), **{**base, **kw})


def _compiled_worker(fake, batches=(1, 2), **engine_kw):
    eng = Engine(models=["tiny"], compile="default", compile_batches=batches, compile_fn=fake,
                 **engine_kw)
    return start_worker(engine=eng, name="compiled")


def _wait_compiled(handle, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = handle.info()
        if info.compile.state != "compiling":
            return info.compile
        time.sleep(0.05)
    raise AssertionError(f"still compiling after {timeout} s: {handle.info().compile}")


def _compile_thread_ends(timeout: float = 30.0) -> None:
    """The compile thread ends once its queue is empty: a thread that ran torch ops and lived
    on idle kept its own OpenMP team, which made the engine's CPU jobs 3x slower."""
    deadline = time.monotonic() + timeout
    while any(t.name == COMPILE_THREAD for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the compile thread lives on with nothing to do"
        time.sleep(0.05)


async def _run(handle, req: JobRequest) -> list[np.ndarray]:
    async with WorkerClient(handle.share) as c:
        return [np.asarray(im) for im in await c.run(req)]


@pytest.fixture(scope="module")
def eager():
    """A worker with compile off, for reference images."""
    handle = start_worker("tiny", name="eager", compile="off")
    yield handle
    handle.stop()


# ----- the option ------------------------------------------------------------------------------
def test_a_bad_compile_value_is_refused_with_the_choices():
    for bad in ("fast", "", None, "cudagraph"):
        with pytest.raises(InvalidRequest) as err:
            check_mode(bad)
        assert "auto, off, reduce-overhead, default" in str(err.value)
    with pytest.raises(InvalidRequest, match="auto, off, reduce-overhead, default"):
        make_engine("tiny", compile="fast")
    assert check_mode(" Reduce-Overhead ") == "reduce-overhead"


def test_batch_sizes_are_checked_capped_and_always_hold_1():
    assert check_batches("1,2,4,8") == DEFAULT_BATCHES
    assert check_batches([8, 4]) == (1, 4, 8)
    assert check_batches("2,4,8,16", max_images=4) == (1, 2, 4)
    for bad in ("1,x", "", [0], [65], "1;2"):
        with pytest.raises(InvalidRequest, match="compile batches"):
            check_batches(bad)


async def test_auto_stays_off_on_a_cpu_and_says_why(worker):
    async with WorkerClient(worker.share) as c:
        info = await c.info()
    assert info.compile is not None
    assert (info.compile.mode, info.compile.state) == ("off", "off")
    assert "cpu" in (info.compile.detail or "")
    assert info.load_seconds.get("tiny", 0) > 0, "the model's measured load time"


def test_the_command_line_takes_and_reports_the_option(spawn):
    import subprocess
    import sys

    from tests.conftest import ROOT

    bad = subprocess.run([sys.executable, "-m", "colabswarm", "worker", "--compile", "fast"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "reduce-overhead" in bad.stderr, bad.stderr
    proc = spawn("--model", "tiny", "--compile", "auto", "--compile-batches", "1,2",
                 name="cli-compile")
    assert any(line.startswith("compile: off (auto: off on cpu") for line in proc.lines), \
        proc.lines


# ----- background compilation -------------------------------------------------------------------
async def test_a_compiling_worker_answers_and_serves_eagerly_then_runs_compiled(eager):
    fake = FakeCompile()
    handle = _compiled_worker(fake)
    try:
        async with WorkerClient(handle.share) as c:
            info = await c.info()
        assert info.state == "ready", "the worker serves while it compiles"
        assert (info.compile.mode, info.compile.state) == ("default", "compiling")
        assert info.compile.detail.startswith("compiling 0/2 shapes"), info.compile.detail
        assert info.compile.shapes == []
        assert info.load_seconds["tiny"] > 0
        # the compile thread is stuck compiling; jobs run eagerly meanwhile, the same images
        want = await _run(eager, _req())
        got = await _run(handle, _req())
        for a, b in zip(want, got, strict=True):
            assert_identical(a, b, "an eager job on a compiling worker")
        assert fake.calls == 0 and handle.worker.engine._compiler.calls["eager"] > 0

        fake.release.set()
        comp = _wait_compiled(handle)
        assert comp.state == "ready", comp
        assert comp.shapes == [CompiledShape(width=64, height=64, batches=[1, 2])]
        assert comp.detail.startswith("2/2 shapes compiled"), comp.detail
        # before the shapes were listed, and before any job, the engine thread ran each of them
        # compiled (where a GPU records its CUDA graphs: not in a user's first job)
        for batch in (1, 2):  # CFG: the UNet sees twice the batch
            unet = fake.ran[ENGINE_THREAD, "UNet2DConditionModel.forward", 2 * batch]
            assert unet >= 3, (batch, fake.ran)
        before = fake.calls
        got = await _run(handle, _req())
        assert fake.calls > before, "a job of a compiled shape runs compiled"
        for a, b in zip(want, got, strict=True):
            assert_identical(a, b, "a compiled job (the fake compiles to the same function)")
        assert set(fake.compiled_on) == {COMPILE_THREAD}, fake.compiled_on
    finally:
        handle.stop()


async def test_a_busy_worker_still_makes_its_first_runs_and_lists_its_shapes():
    """The engine makes a shape's first run at job boundaries, also while jobs wait: a worker
    that a controller keeps busy lists its compiled shapes within a few jobs, not when the
    stream of jobs stops."""
    fake = FakeCompile()
    handle = _compiled_worker(fake, batches=(1, 2))
    try:
        async with WorkerClient(handle.share) as c:
            for s in range(16):
                await c.submit(_req(seeds=[s]))
            fake.release.set()
            seen = []  # the worker's info at the moment its shapes were first listed

            def listed() -> bool:
                seen.append(handle.info())
                return bool(seen[-1].compile.shapes)

            wait_until(listed, timeout=60, what="the shapes to be listed")
            assert seen[-1].queue_depth > 0, "every job had started before the shapes were listed"
            assert handle.info().compile.shapes == [
                CompiledShape(width=64, height=64, batches=[1, 2])]
            for batch in (1, 2):
                assert fake.ran[ENGINE_THREAD, "UNet2DConditionModel.forward", 2 * batch] >= 3
    finally:
        handle.stop()


def test_a_size_is_listed_once_its_shapes_are_done_while_the_next_size_still_compiles():
    """The compile thread lets the engine make a shape's first run before it starts the next
    shape: a size is listed as soon as it is done, not when the whole queue is."""
    fake = FakeCompile(hold=lambda shape: shape[-1] == 96 // 8)  # 96 px wide: latents of 12
    handle = _compiled_worker(fake, batches=(1,), compile_sizes=((64, 64), (96, 64)))
    try:
        wait_until(lambda: handle.info().compile.shapes, timeout=60,
                   what="the first size to be listed")
        comp = handle.info().compile
        assert comp.shapes == [CompiledShape(width=64, height=64, batches=[1])], comp
        assert comp.state == "compiling" and comp.detail.startswith("compiling 1/2"), comp
        fake.release.set()
        assert [(s.width, s.height) for s in _wait_compiled(handle).shapes] == [(64, 64),
                                                                                (96, 64)]
    finally:
        handle.stop()


@pytest.mark.parametrize("env, during", [(None, 0.0005), ("0.2", 0.0002), ("off", None),
                                         ("soon", 0.0005)])
async def test_jobs_get_the_interpreter_back_sooner_while_a_shape_compiles(monkeypatch, caplog,
                                                                           env, during):
    """Tracing is pure Python on the compile thread, and an eager job gives up the GIL in every
    torch op: with Python's 5 ms switch interval, jobs served while a shape compiled took many
    times their time. While a shape compiles the interval is short (0.5 ms, or what
    COLABSWARM_COMPILE_SWITCH_MS says; 'off' leaves it, a value that is no number is warned
    about and the default used), jobs still run meanwhile, and once nothing compiles the
    interval is what it was."""
    if env is None:
        monkeypatch.delenv(SWITCH_ENV, raising=False)
    else:
        monkeypatch.setenv(SWITCH_ENV, env)
    before = sys.getswitchinterval()
    assert before > 0.0005, "this test needs Python's default interval to start from"
    caplog.set_level("WARNING", logger="colabswarm.compiled")
    seen: list[float] = []
    fake = FakeCompile(hold=lambda shape: seen.append(sys.getswitchinterval()) or True)
    handle = _compiled_worker(fake, batches=(1,))
    try:
        wait_until(lambda: seen, timeout=60, what="the compile to start")
        assert seen[0] == pytest.approx(during if during is not None else before), seen
        images = await _run(handle, _req(seeds=(5,)))  # eagerly, while it compiles
        assert len(images) == 1 and handle.info().compile.state == "compiling"
        fake.release.set()
        assert _wait_compiled(handle).state == "ready"
        wait_until(lambda: sys.getswitchinterval() == pytest.approx(before), timeout=30,
                   what="the switch interval to be restored")
    finally:
        fake.release.set()
        handle.stop()
    assert sys.getswitchinterval() == pytest.approx(before)
    warned = [r.getMessage() for r in caplog.records if SWITCH_ENV in r.getMessage()]
    assert bool(warned) == (env == "soon"), warned


def test_no_first_run_while_lora_adapters_are_loaded():
    """A shape's graphs are traced without LoRA adapters: when a LoRA job has loaded adapters
    after a shape was compiled, the engine makes no first run of it while they are in (it stays
    unlisted), and makes it once they are unloaded."""
    from diffusers import AutoPipelineForText2Image

    from colabswarm.backend.compiled import Compiler
    from colabswarm.backend.tiny import tiny_model_dir

    pipe = AutoPipelineForText2Image.from_pretrained(tiny_model_dir("tiny"))
    adapters = [False]
    fake = FakeCompile(released=True)
    comp = Compiler("default", batches=(1,), compile_fn=fake)
    comp.attach(pipe, "tiny", lambda: adapters[0])
    me = threading.current_thread().name  # this test plays the engine thread
    try:
        wait_until(lambda: "first run of" in (comp.info().detail or ""), timeout=60,
                   what="the shape to be compiled")
        adapters[0] = True  # a LoRA job loaded them
        assert comp.settle() is not None, "shapes are still on their way"
        assert comp.info().shapes == [] and comp.info().state == "compiling", comp.info()
        assert not any(t == me for t, _, _ in fake.ran), fake.ran
        adapters[0] = False  # the next plain job unloaded them
        comp.settle()
        assert [s.batches for s in comp.info().shapes] == [[1]], comp.info()
        assert fake.ran[me, "UNet2DConditionModel.forward", 2] >= 3, fake.ran
    finally:
        comp.close()


async def test_a_new_image_size_runs_eagerly_and_is_compiled_in_the_background(eager):
    fake = FakeCompile(released=True)
    handle = _compiled_worker(fake, batches=(1,))
    try:
        assert _wait_compiled(handle).shapes == [CompiledShape(width=64, height=64, batches=[1])]
        _compile_thread_ends()
        fake.release.clear()  # the next compile waits for the test
        before = fake.calls
        want = await _run(eager, _req(seeds=[9], width=96))
        got = await _run(handle, _req(seeds=[9], width=96))
        assert_identical(want[0], got[0], "a job of a new size")
        assert fake.calls == before, "the new size ran eagerly"
        comp = handle.info().compile
        assert comp.state == "compiling" and comp.detail.startswith("compiling 1/2"), comp
        assert [(s.width, s.height) for s in comp.shapes] == [(64, 64)]
        fake.release.set()
        comp = _wait_compiled(handle)
        assert [(s.width, s.height, s.batches) for s in comp.shapes] == [(64, 64, [1]),
                                                                          (96, 64, [1])]
        await _run(handle, _req(seeds=[9], width=96))
        assert fake.calls > before, "now compiled"
        assert set(fake.compiled_on) == {COMPILE_THREAD}, "the engine thread never compiles"
        _compile_thread_ends()
    finally:
        handle.stop()


async def test_a_failed_compile_leaves_that_shape_eager_and_lists_the_rest():
    fake = FakeCompile(fail_on=lambda batch: batch == 4, released=True)  # batch 2 (CFG: 4)
    handle = _compiled_worker(fake, batches=(1, 2))
    try:
        comp = _wait_compiled(handle)
        assert comp.state == "ready"
        assert comp.shapes == [CompiledShape(width=64, height=64, batches=[1])]
        assert "1 failed, 64x64 batch 2" in comp.detail and "does not compile" in comp.detail
        assert len(await _run(handle, _req(seeds=[1, 2]))) == 2, "batch 2 still runs (eagerly)"
    finally:
        handle.stop()
    fake = FakeCompile(fail_on=lambda batch: True, released=True)
    handle = _compiled_worker(fake, batches=(1,))
    try:
        comp = _wait_compiled(handle)
        assert (comp.state, comp.shapes) == ("failed", []), comp
        assert len(await _run(handle, _req(seeds=[1]))) == 1
    finally:
        handle.stop()


# ----- a real torch.compile ----------------------------------------------------------------------
class CountingBackend:
    """A torch.compile backend that runs dynamo's captured graph as is and counts its runs."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, gm, example_inputs):
        def run(*args):
            self.runs += 1
            return gm(*args)

        return run

    def compile_fn(self, fn, mode, fullgraph):
        import torch

        return torch.compile(fn, backend=self, fullgraph=fullgraph, dynamic=False)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    from colabswarm.backend.tiny import build_tiny_lora

    return build_tiny_lora(tmp_path_factory.mktemp("lora") / "alpha.safetensors", "tiny", 1)


def _engine_images(eng: Engine, req: JobRequest) -> list[np.ndarray]:
    return [np.asarray(im) for im in eng.run(req)]


@pytest.mark.parametrize("model,channels_last", [("tiny", False), ("tiny-xl", False),
                                                  ("tiny", True)])
def test_real_torch_compile_runs_jobs_compiled_and_keeps_the_pictures(model, channels_last,
                                                                     lora_file, monkeypatch):
    """Real dynamo graphs on the CPU: shapes run compiled with float and integer timesteps, the
    pictures stay within the tolerance of an eager worker's, a LoRA job runs eagerly and the
    next plain job compiled again, and the engine thread never compiles. A CPU worker keeps the
    layout it loaded; on a GPU it puts its UNet and decoder in channels_last (measured faster
    compiled), and ``channels_last`` runs that path here by asking for it: the same checks hold,
    a LoRA job on that layout is the eager picture within the tolerance (not bit for bit: the
    convolutions run in another order)."""
    import torch
    from torch._dynamo.utils import counters

    from colabswarm.backend import compiled
    from colabswarm.protocol import LoraRef

    assert compiled.memory_format_for("cuda") == "channels_last"
    assert compiled.memory_format_for("cpu") is None
    if channels_last:
        monkeypatch.setattr(compiled, "memory_format_for", lambda device_type: "channels_last")
    backend = CountingBackend()
    loras = [str(lora_file)] if model == "tiny" else None
    eng = Engine(models=[model], compile="default", compile_batches=(1,),
                 compile_fn=backend.compile_fn, loras=loras)
    ref = Engine(models=[model], loras=loras)
    handle = start_worker(engine=eng, name="real-compile", limits=Limits(max_images=4))
    try:
        comp = _wait_compiled(handle, timeout=300)
        assert comp.shapes == [CompiledShape(width=64, height=64, batches=[1])], comp
        assert "VAE decoder eager" not in (comp.detail or ""), comp.detail
        for part in ("unet", "decoder"):
            convs = _convs(eng, part)
            if channels_last:
                assert convs and all(w.is_contiguous(memory_format=torch.channels_last)
                                     for w in convs), f"the {part} is not in channels_last"
            else:
                assert all(w.is_contiguous() for w in convs), "a CPU worker changed its layout"
        graphs = counters["stats"]["unique_graphs"]
        for sampler in (None, "DPM++ 2M Karras"):  # float and integer timesteps
            req = _req(seeds=[5], sampler=sampler)
            runs = backend.runs
            got = _engine_images(eng, req)
            assert backend.runs - runs == 3 + 1, f"3 UNet steps + the decoder compiled ({sampler})"
            assert_same_picture(_engine_images(ref, req)[0], got[0], f"compiled, {sampler}")
        if model == "tiny":
            lora = LoraRef(name="alpha", hash=eng.lora_files["alpha"].hash, weight=1.0)
            req = _req(seeds=[5], loras=[lora])
            runs = backend.runs
            got = _engine_images(eng, req)
            assert backend.runs == runs, "a LoRA job runs eagerly"
            if channels_last:
                assert_same_picture(_engine_images(ref, req)[0], got[0], "a LoRA job")
                assert_not_same_picture(_engine_images(ref, _req(seeds=[5]))[0], got[0],
                                        "the LoRA changed nothing")
            else:
                assert_identical(_engine_images(ref, req)[0], got[0], "a LoRA job")
            runs = backend.runs
            got = _engine_images(eng, _req(seeds=[5]))
            assert backend.runs - runs == 4, "after the LoRA job the compiled graphs apply again"
            assert_same_picture(_engine_images(ref, _req(seeds=[5]))[0], got[0], "after a LoRA")
        assert counters["stats"]["unique_graphs"] == graphs, "the engine thread compiled"
    finally:
        handle.stop()
        ref.close()


def _convs(eng: Engine, part: str = "unet") -> list:
    import torch

    pipe = eng._loaded.txt2img
    module = pipe.unet if part == "unet" else pipe.vae.decoder
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


# ----- a swarm and a compiled worker --------------------------------------------------------------
def test_a_swarm_sends_a_compiled_worker_only_its_batch_sizes():
    from colabswarm.swarm import Swarm

    fake = FakeCompile(released=True)
    handle = _compiled_worker(fake, batches=(1, 2))
    try:
        assert _wait_compiled(handle).shapes[0].batches == [1, 2]
        sw = Swarm(output_dir=None, trace=True)
        try:
            sw.add(handle.share, name="compiled")
            res = sw.generate("a fox", images=7, seed=1, width=64, height=64, steps=2,
                              save=False)
            assert len(res.images) == 7
            sizes = [n for _b, n, *_ in sw.trace]
            assert set(sizes) <= {1, 2}, sizes
            # another size is not compiled: any batch size goes there
            res = sw.generate("a fox", images=7, seed=1, width=72, height=64, steps=2,
                              save=False)
            assert max(n for _b, n, *_ in sw.trace[len(sizes):]) > 2, sw.trace
        finally:
            sw.close()
    finally:
        handle.stop()


# ----- the compile cache ----------------------------------------------------------------------
def test_the_compile_cache_is_a_file_per_shape_keyed_by_model_and_all_read_back(tmp_path,
                                                                               monkeypatch):
    """torch's artifact functions are stood in for here (the next test uses the real ones):
    the worker writes what save_cache_artifacts gives after each shape it compiled into a new
    file of a subfolder of the owner's folder keyed by GPU, software, model and mode, and a
    restarted worker loads every file before compiling."""
    from colabswarm.backend import compiled

    _compile_thread_ends()  # an earlier test's worker may still finish a shape (and save it)
    loaded: list[bytes] = []
    saves = iter(range(1, 100))
    misses = iter(range(0, 1000))
    monkeypatch.setattr(compiled, "_mega_cache", lambda: (
        lambda: (b"artifacts %d" % next(saves), None), loaded.append))
    monkeypatch.setattr(compiled, "_cache_counts", lambda: (0, next(misses)))  # always a miss

    def run(model: str) -> None:
        eng = Engine(models=[model], compile="default", compile_batches=(1, 2),
                     compile_fn=FakeCompile(released=True), compile_cache=str(tmp_path))
        handle = start_worker(engine=eng, name="cached")
        try:
            assert _wait_compiled(handle).state == "ready"
        finally:
            handle.stop()

    run("tiny")
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("cpu-torch") and "-tiny-default-" in folder.name
    assert sorted(p.read_bytes() for p in folder.glob("*.bin")) == [b"artifacts 1",
                                                                     b"artifacts 2"]
    assert loaded == []
    run("tiny")  # a restart: reads both files before compiling, writes its own
    assert sorted(loaded) == [b"artifacts 1", b"artifacts 2"]
    assert len(list(folder.glob("*.bin"))) == 4
    assert not list(folder.glob("*.tmp")), "files are written whole or not at all"
    run("tiny-xl")  # another model: its own folder, nothing of the other read
    assert len(loaded) == 2 and len(list(tmp_path.iterdir())) == 2


def test_two_workers_sharing_a_cache_folder_keep_one_copy_of_a_shape(tmp_path, monkeypatch):
    """Two workers on one compile cache folder (two sessions on one Drive folder) compile the
    same shapes at once; the one that finishes second finds them written meanwhile and writes
    no second copy. Each stand-in file is named by its shape."""
    from colabswarm.backend import compiled

    _compile_thread_ends()
    saves = iter(range(1, 100))
    misses = iter(range(0, 1000))
    monkeypatch.setattr(compiled, "_mega_cache", lambda: (
        lambda: (b"artifacts %d" % next(saves), None), lambda data: None))
    monkeypatch.setattr(compiled, "_cache_counts", lambda: (0, next(misses)))

    def engine(fake: FakeCompile) -> Engine:
        return Engine(models=["tiny"], compile="default", compile_batches=(1, 2),
                      compile_fn=fake, compile_cache=str(tmp_path))

    slow = FakeCompile()  # holds its compile until released
    second = start_worker(engine=engine(slow), name="second")
    try:
        wait_until(lambda: slow.compiled_on, what="the second worker to start compiling")
        first = start_worker(engine=engine(FakeCompile(released=True)), name="first")
        try:
            assert _wait_compiled(first).state == "ready"
        finally:
            first.stop()
        (folder,) = tmp_path.iterdir()
        names = sorted(p.name for p in folder.glob("*.bin"))
        assert [n.split("-")[:2] for n in names] == [["64x64", "b1"], ["64x64", "b2"]], names
        slow.release.set()
        assert _wait_compiled(second).state == "ready"
        assert [s.batches for s in second.info().compile.shapes] == [[1, 2]]
    finally:
        second.stop()
    assert sorted(p.name for p in folder.glob("*.bin")) == names, "a second copy was written"


_CACHE_SCRIPT = """
import sys, types
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from colabswarm.backend.compiled import Compiler, Shape, read_artifacts

folder = Path(sys.argv[2])
compiler = Compiler("default", background=False)  # the worker's cache settings
fn = torch.compile(lambda x: (x.sin() * 2 + x.cos()).sum(1), dynamic=False)
# the compile thread's own step per shape (compile, save what missed), with this function as
# the "model": a shape (rows, 5, batch 1) is a call of fn on rows x 5
compiler._warm = lambda att, shape: (fn(torch.randn(shape.width, 5)), {})[1]
att = types.SimpleNamespace(cache_dir=folder, cache_known=frozenset(), aot_new=[],
                            aot_known=frozenset(),
                            set_keys=lambda shape, keys: None)
if sys.argv[1] in ("restart", "grow"):
    print("loaded", *read_artifacts(folder))
    att.cache_known = frozenset(p.name for p in folder.glob("*.bin"))
# grow: a hit, then a new shape; meanwhile: nothing loaded (the folder's files count as written
# meanwhile by another worker), a shape found there, then a new shape
shapes = {"grow": (3, 11), "meanwhile": (3, 13)}.get(sys.argv[1], (3, 7))
for rows in shapes:
    compiler._compile_shape(att, Shape(rows, 5, 1))
ind, aot = counters["inductor"], counters["aot_autograd"]
print("hits", ind["fxgraph_cache_hit"] + aot["autograd_cache_hit"],
      "misses", ind["fxgraph_cache_miss"] + aot["autograd_cache_miss"])
"""


@pytest.mark.timeout(600)
def test_a_restarted_worker_finds_every_shape_it_compiled_in_the_cache_files(tmp_path):
    """Real torch.compile (inductor, on this CPU) of a small function at two shapes, the
    worker's cache file written after each, then a new process with empty local caches that
    loads the folder: both shapes come from the files. (torch reads a file back as the last
    save's part only: the worker's one run file, rewritten after each shape, gave back only the
    last shape, and a restarted SD 1.5 worker compiled batch 1 again.)"""
    import shutil
    import subprocess
    import sys

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler: inductor cannot compile on this CPU")
    folder = tmp_path / "compile-cache"

    def run(phase: str, to=folder, inductor: str | None = None) -> list[str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{inductor or phase}")}
        out = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, phase, str(to)],
                             capture_output=True, text=True, env=env, timeout=500, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.split()

    first = run("first")
    assert first[first.index("misses") + 1] != "0", first  # it really compiled
    files = sorted(folder.glob("*.bin"))
    assert len(files) == 2, list(folder.iterdir())
    sizes = [f.stat().st_size for f in files]
    # each file holds what its shape added (torch's buffer is emptied after a save), not the
    # whole buffer again: same-sized shapes, so about the same size (the whole: about twice)
    assert sizes[1] < 1.5 * sizes[0], sizes
    again = run("restart")
    assert again[:3] == ["loaded", "2", "2"], again
    assert again[again.index("misses") + 1] == "0", f"a shape was compiled again: {again}"
    assert int(again[again.index("hits") + 1]) >= 2, again
    assert len(list(folder.glob("*.bin"))) == 2, "a restart that compiled nothing wrote a file"
    # a restarted worker that compiles a new shape after a cache hit: its file holds the new
    # shape only, not the hit's artifacts again (torch records a hit's artifacts anew)
    grown = run("grow")
    assert grown[grown.index("misses") + 1] != "0", grown
    new = [f for f in folder.glob("*.bin") if f.name.startswith("11x5-")]
    assert len(new) == 1, list(folder.iterdir())
    assert new[0].stat().st_size < 1.5 * sizes[0], (new[0].stat().st_size, sizes)
    # the same machine (its inductor cache warm) with a new, empty folder: both shapes are hits
    # of the local cache, and the folder still gets a file of each
    other = tmp_path / "new-drive-folder"
    warm = run("restart", to=other, inductor="first")
    assert warm[:3] == ["loaded", "0", "0"], warm
    assert warm[warm.index("misses") + 1] == "0", f"the warm machine compiled again: {warm}"
    assert sorted(f.name.split("-")[0] for f in other.glob("*.bin")) == ["3x5", "7x5"], \
        list(other.iterdir()) if other.exists() else "no folder written"
    # a shape another worker wrote meanwhile is not written again, and is not carried into
    # this worker's next file either
    run("meanwhile")
    assert len(list(folder.glob("3x5-*.bin"))) == 1, "a second copy was written"
    (last,) = folder.glob("13x5-*.bin")
    assert last.stat().st_size < 1.5 * sizes[0], (last.stat().st_size, sizes)


def test_attaching_keeps_a_half_precision_model_in_half_precision():
    """A GPU worker's model is fp16. The compile thread's own pipeline object shares its
    modules; building it must not cast them (diffusers' ``from_pipe`` casts to float32 unless
    told a dtype: the worker then ran its eager and compiled jobs in fp32, slower, with other
    pictures than a worker with compile off)."""
    import torch
    from diffusers import AutoPipelineForText2Image

    from colabswarm.backend.compiled import Compiler
    from colabswarm.backend.engine import _dtype_kwarg
    from colabswarm.backend.tiny import tiny_model_dir

    pipe = AutoPipelineForText2Image.from_pretrained(tiny_model_dir("tiny"),
                                                     **{_dtype_kwarg(): torch.bfloat16})
    before = {name: {p.dtype for p in m.parameters()} for name, m in pipe.components.items()
              if isinstance(m, torch.nn.Module)}
    comp = Compiler("default", batches=(1,), compile_fn=FakeCompile(released=True),
                    background=False)
    comp.attach(pipe, "tiny", lambda: False)
    after = {name: {p.dtype for p in m.parameters()} for name, m in pipe.components.items()
             if isinstance(m, torch.nn.Module)}
    assert after == before, f"attaching changed the model's dtypes: {before} -> {after}"
    assert before["unet"] == {torch.bfloat16}
