#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up the cached venv, installs the package,
# runs pytest (unit, property, end-to-end CLI and benchmark --quick smoke tests).
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/bootstrap.sh
export MPLBACKEND=Agg
"$PY" -m pytest -q -p no:cacheprovider "$@"
