"""Does a process survive dynamo tracing on a second thread after the first tracing thread
ended? With a CUDA build of torch and no GPU visible it did not: dynamo's FakeTensorMode puts
a no-op CUDA device guard owned by the tracing thread (a thread_local in c10's
``ensureCUDADeviceGuardSet``) into the process-wide registry, and once that thread has ended
the next trace calls into freed memory. A colabswarm worker on a CPU traces on a compile
thread that ends whenever its queue is empty, so its second compile thread crashed
(``compiled._keep_cuda_guard`` is the fix; docs/BENCHMARKS.md, "The test suite on another
CPU").

Runs two child processes with every GPU hidden (``CUDA_VISIBLE_DEVICES=""``), each tracing a
small function (dynamo's ``eager`` backend, no inductor) on one thread, which ends, then on a
second: ``plain`` as torch does it, ``kept`` after colabswarm's guard keeper. Prints each
child's exit code (-11: segmentation fault) and torch's build. On a CPU-only build of torch
both survive (no guard is swapped there); the crash needs a CUDA build, as on a GPU host.

    python -m bench.diag_fake_guard [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import sys, threading, torch
if sys.argv[1] == "kept":
    from colabswarm.backend.compiled import _keep_cuda_guard
    _keep_cuda_guard()

def trace(n):
    def run():
        fn = torch.compile(lambda x: torch.sin(x) + n, backend="eager", dynamic=False)
        fn(torch.ones(n))
    t = threading.Thread(target=run)
    t.start()
    t.join()

trace(3)
trace(4)
print("survived", flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    import torch

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONFAULTHANDLER="1")
    out = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "runs": {}}
    for case in ("plain", "kept"):
        p = subprocess.run([sys.executable, "-c", CHILD, case], env=env, capture_output=True,
                           text=True, timeout=300)
        tail = (p.stdout + p.stderr).strip().splitlines()[-3:]
        out["runs"][case] = {"exit_code": p.returncode, "survived": p.returncode == 0,
                             "tail": tail}
        print(f"{case}: exit code {p.returncode}", "| " + " / ".join(tail)[-300:], flush=True)
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
