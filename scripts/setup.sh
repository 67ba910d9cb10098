#!/usr/bin/env bash
# Create .venv with everything colabswarm needs (worker, tunnels, notebooks, tests).
# torch is installed first and pinned: an unpinned torch (or accelerate first) drags in a
# multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==${COLABSWARM_TORCH:-2.13.0}"
fi
.venv/bin/pip install -q -e ".[all]"
# upscale models: spandrel without its torchvision requirement (PyPI's torchvision is a CUDA
# build that pulls a CUDA torch, and does not import beside a CPU one); the worker imports
# spandrel without torchvision (docs/ARCHITECTURE.md, "Installing upscale models")
.venv/bin/pip install -q --no-deps "spandrel==0.4.2"
.venv/bin/python -c "import colabswarm, torch, diffusers; print('colabswarm', colabswarm.__version__, '| torch', torch.__version__, '| diffusers', diffusers.__version__)"
# tests/test_browser.py drives Debian's chromium through Playwright (never `playwright install`);
# install it when missing and possible, else that test is skipped with the reason.
if [ "${COLABSWARM_SETUP_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      chromium >/dev/null; } || echo "note: chromium not installed; the browser test will skip" >&2
fi
