#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up the cached venv, installs the package,
# checks the package with ruff (lint + format) and mypy, then runs pytest (unit, property,
# end-to-end CLI, browser and benchmark --quick smoke tests). Arguments go to pytest, e.g. the fast
# loop: bash scripts/test.sh -m "not slow and not e2e"
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/bootstrap.sh
export MPLBACKEND=Agg
echo "[test] ruff check, ruff format --check, mypy on captum_normgrad" >&2
"$PY" -m ruff check captum_normgrad
"$PY" -m ruff format --check captum_normgrad
"$PY" -m mypy captum_normgrad
"$PY" -m pytest -q -p no:cacheprovider "$@"
