#!/usr/bin/env bash
# The whole test suite on a device machine's CPU, its GPUs hidden: the suite as CI would run it
# on another x86 processor (issue 12: "green on a machine whose CPU differs from yours"). The
# device image has torch and part of what the tests need; the rest travels as wheels in .twhl,
# fetched here once (the repository root; .twhl is git-ignored through .git/info/exclude):
#
#   echo /.twhl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     -d .twhl -r bench/device_test_wheels.txt
#
# Usage on the device (kind nvidia-h200 or nvidia-h200-x2, carry [".twhl"]):
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
source scripts/test_env.sh
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=""
python3 -c "import torch, diffusers, sys; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| diffusers', diffusers.__version__, '| cuda visible:', \
torch.cuda.is_available())"
python3 -m pytest -q -p no:cacheprovider --basetemp="$work/pytest" -rs "$@" 2>&1 \
    | tee "$out/pytest.log"
