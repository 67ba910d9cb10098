#!/usr/bin/env bash
# Set up (if needed) and run every test: lint, unit and integration tests, notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
COLABSWARM_SETUP_BROWSER=1 bash scripts/setup.sh
source scripts/test_env.sh
.venv/bin/ruff check .
# pytest's exit code 5 (no tests collected) fails this script like any other failure.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --basetemp="$work/pytest" "$@"
