"""Run bench/bench_worker.py against the current worker code.

bench_worker's instrumentation (its ``Probe``) wraps ``colabswarm.backend.jobs._encode_png``,
which the worker no longer has: PNGs are now written by ``colabswarm.backend.png.encode_png``
on the job manager's encoder threads. This shim gives the module the old name back before
bench_worker loads, so the shipped code runs untouched (its PNG step is then not timed by the
probe: ``png_ms_per_image`` reads 0) and only the ``inproc``/``remote`` paths are meaningful;
the ``fastpng``/``offload`` what-ifs describe the old code and are not run.

    python3 -m bench.bench_worker_compat --model-dir /tmp/sd15-random --batches 4 \
        --paths inproc/2,remote/2 --json $OUT/worker.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import colabswarm.backend.jobs as _jobs  # noqa: E402

if not hasattr(_jobs, "_encode_png"):
    _jobs._encode_png = _jobs.encode_png  # type: ignore[attr-defined]

from bench.bench_worker import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
