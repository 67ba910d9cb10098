#!/usr/bin/env bash
# The whole test suite on a device machine's CPU, its GPUs hidden: the suite as CI would run it
# on another x86 processor (issue 12: "green on a machine whose CPU differs from yours"). The
# device image has torch and part of what the tests need; the rest travels as wheels in .twhl
# (docs/BENCHMARKS.md, "The test suite on another CPU", says how they are fetched). Usage on
# the device (kind nvidia-h200 or nvidia-h200-x2, carry [".twhl"]):
#
#   bash bench/device_tests.sh $OUT [pytest arguments, e.g. -n 8 or a list of test files]
#
# Writes $OUT/lscpu.txt and $OUT/pytest.log. Differs from scripts/test.sh in what the machine
# lacks: no ruff (the lint does not depend on the CPU) and no Chromium, so
# tests/test_browser.py skips there and says so.
set -uo pipefail
out=${1:?usage: bash bench/device_tests.sh OUTDIR [pytest arguments]}
shift
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    .twhl/*.whl || exit 3
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 3
lscpu > "$out/lscpu.txt"
grep -E '^(Model name|CPU\(s\)|Vendor ID)' "$out/lscpu.txt"
work="$PWD/.work"
rm -rf "$work/pytest"
mkdir -p "$work/tmp" "$work/ipython" "$work/jupyter/config" "$work/jupyter/data" \
         "$work/jupyter/runtime" "$work/xdg" "$work/cache"
export TMPDIR="$work/tmp" IPYTHONDIR="$work/ipython" XDG_CONFIG_HOME="$work/xdg" \
       JUPYTER_CONFIG_DIR="$work/jupyter/config" JUPYTER_DATA_DIR="$work/jupyter/data" \
       JUPYTER_RUNTIME_DIR="$work/jupyter/runtime" COLABSWARM_CACHE="$work/cache" \
       MPLCONFIGDIR="$work/tmp" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
       CUDA_VISIBLE_DEVICES=""
python3 -c "import torch, diffusers, sys; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| diffusers', diffusers.__version__, '| cuda visible:', \
torch.cuda.is_available())"
python3 -m pytest -q -p no:cacheprovider --basetemp="$work/pytest" -rs "$@" 2>&1 \
    | tee "$out/pytest.log"
