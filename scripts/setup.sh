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
.venv/bin/pip install -q -e ".[all]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import colabswarm, torch, diffusers; print('colabswarm', colabswarm.__version__, '| torch', torch.__version__, '| diffusers', diffusers.__version__)"
