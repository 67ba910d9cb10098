#!/usr/bin/env bash
# Set up (if needed) and run every test: lint, unit and integration tests, notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
COLABSWARM_SETUP_BROWSER=1 bash scripts/setup.sh
work="$PWD/.work"
rm -rf "$work/pytest"
mkdir -p "$work/tmp" "$work/ipython" "$work/jupyter/config" "$work/jupyter/data" \
         "$work/jupyter/runtime" "$work/xdg" "$work/cache"
export TMPDIR="$work/tmp" IPYTHONDIR="$work/ipython" XDG_CONFIG_HOME="$work/xdg" \
       JUPYTER_CONFIG_DIR="$work/jupyter/config" JUPYTER_DATA_DIR="$work/jupyter/data" \
       JUPYTER_RUNTIME_DIR="$work/jupyter/runtime" COLABSWARM_CACHE="$work/cache" \
       MPLCONFIGDIR="$work/tmp" PYTHONDONTWRITEBYTECODE=1
.venv/bin/ruff check .
# pytest's exit code 5 (no tests collected) fails this script like any other failure.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --basetemp="$work/pytest" "$@"
