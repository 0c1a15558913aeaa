#!/usr/bin/env bash
# The main job on a built-in default: sets up the cached venv, installs the package and runs
# `captum-normgrad demo`, which writes a Figure-1-style grid to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/bootstrap.sh
export MPLBACKEND=Agg
captum-normgrad demo --out "${1:-out/demo}"
