"""Two controllers on one worker: does a short run wait behind a long one? (issue 17)

One real worker process (tiny model, CPU) and two Swarms. A queues a long run (`--long`
images, `--a-batch` per job, enough slots to put every job on the worker at once); once the
worker holds at least `--queued` of A's jobs, B queues a short run (`--short` images, one job).
Measured per mode, `--rounds` times:

- `guests`: A and B each hold a guest token of their own: the worker serves them round-robin
  by images (colabswarm's fair share).
- `one token`: A and B share the owner's token, as every friend did before guest tokens: the
  worker serves their jobs first come, first served.

Reported: B's wait (B's submit to B's last image), A's run time, and how many of A's images
came back while B waited.

    PYTHONPATH=. .venv/bin/python bench/bench_fair_share.py --json /tmp/fair.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_SHARE = re.compile(r"^(https?://\S+#token=[A-Za-z0-9_\-]+)$")


def start_worker_process() -> tuple[subprocess.Popen, str, dict[str, str]]:
    cmd = [sys.executable, "-m", "colabswarm", "worker", "--model", "tiny", "--port", "0",
           "--name", "bench-fair", "--guest", "a", "--guest", "b"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    owner, guests = "", {}
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.strip()
        if _SHARE.match(line):
            owner = line
        elif line.startswith("guest "):
            guests[line.split()[1]] = line.rsplit(" ", 1)[1]
            if len(guests) == 2:
                break
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, owner, guests


def one_round(share_a: str, share_b: str, owner: str, a: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from colabswarm.protocol import decode_share
    from colabswarm.swarm import Swarm

    url, token = decode_share(owner)
    sa = Swarm(output_dir=None, max_batch=a.a_batch, copies=False, health_every=0.5)
    sb = Swarm(output_dir=None, max_batch=a.short, copies=False, health_every=0.5)
    arrivals: list[tuple[str, float]] = []
    lock = threading.Lock()

    def note(who: str):
        def on_image(_g: Any) -> None:
            with lock:
                arrivals.append((who, time.monotonic()))
        return on_image

    try:
        sa.add(share_a, name="gpu", slots=64)
        sb.add(share_b, name="gpu", slots=64)
        size = {"width": a.size, "height": a.size, "steps": a.steps}
        t0 = time.monotonic()
        fa = sa.submit_generate("long run", a.long, seed=1, on_image=note("a"), save=False,
                                **size)
        with httpx.Client(base_url=url, timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as http:
            while http.get("/v1/info").json()["queue_depth"] < a.queued:
                time.sleep(0.01)
        tb = time.monotonic()
        with lock:
            a_before = sum(1 for w, _ in arrivals if w == "a")
        fb = sb.submit_generate("short run", a.short, seed=2, on_image=note("b"), save=False,
                                **size)
        fb.result(timeout=600)
        tb_done = time.monotonic()
        with lock:
            a_during = sum(1 for w, _ in arrivals if w == "a") - a_before
        fa.result(timeout=600)
        ta_done = time.monotonic()
    finally:
        sa.close()
        sb.close()
    return {"b_wait_s": round(tb_done - tb, 3), "a_run_s": round(ta_done - t0, 3),
            "b_joined_after_s": round(tb - t0, 3), "a_images_before_b": a_before,
            "a_images_while_b_waited": a_during}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--long", type=int, default=40)
    p.add_argument("--short", type=int, default=4)
    p.add_argument("--a-batch", type=int, default=2)
    p.add_argument("--queued", type=int, default=10, help="A's jobs on the worker before B")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    proc, owner, guests = start_worker_process()
    out: dict[str, Any] = {"config": vars(a), "machine": {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "python": platform.python_version()}, "modes": {}}
    try:
        one_round(guests["a"], guests["b"], owner, a)  # warm-up (first jobs, speeds)
        for mode, (sa, sb) in (("guests", (guests["a"], guests["b"])),
                               ("one token", (owner, owner))):
            rounds = [one_round(sa, sb, owner, a) for _ in range(a.rounds)]
            out["modes"][mode] = rounds
            med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            print(f"{mode:>10}: B waited {med['b_wait_s']:.2f} s (median; "
                  f"{[r['b_wait_s'] for r in rounds]}), A ran {med['a_run_s']:.2f} s, "
                  f"A images while B waited {[r['a_images_while_b_waited'] for r in rounds]}",
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(15)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
