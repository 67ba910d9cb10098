#!/usr/bin/env bash
# Set up (if needed) and run every test: lint, unit and integration tests, notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
COLABSWARM_SETUP_BROWSER=1 bash scripts/setup.sh
source scripts/test_env.sh
.venv/bin/ruff check .
# pytest's exit code 5 (no tests collected) fails this script like any other failure.
# the 20 slowest tests are listed at the end: the whole run must stay well under 30 minutes
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=20 --basetemp="$work/pytest" "$@"
