"""Install carried wheels (.whl/) into a --target folder, only those this Python lacks.

For the device machine, which has no package registry: a wheel is installed when its
distribution is missing, or older than the wheel, so nothing the image already has (torch,
numpy, ...) is shadowed by a carried copy unless the copy is newer. Run with the Python that
will run the benchmark, then put the target first on PYTHONPATH:

    python3 bench/install_wheels.py .whl /tmp/site && export PYTHONPATH=/tmp/site:$PWD
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _older(installed: str, wanted: str) -> bool:
    try:
        from packaging.version import Version

        return Version(installed) < Version(wanted)
    except Exception:  # no packaging, or an odd version string: keep what is there
        return False


def main(argv: list[str]) -> int:
    wheel_dir = Path(argv[0] if argv else ".whl")
    target = argv[1] if len(argv) > 1 else "/tmp/site"
    chosen = []
    for whl in sorted(wheel_dir.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        try:
            have = md.version(_norm(name))
        except md.PackageNotFoundError:
            have = None
        take = have is None or _older(have, version)
        print(f"{'install' if take else 'keep   '} {name} {version} (have {have})", flush=True)
        if take:
            chosen.append(str(whl))
    if not chosen:
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--upgrade", "--target", target, *chosen]
    return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
