#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the package into it.
#
# The environment is cached outside the checkout, keyed on the hash of requirements/lock.txt,
# so a warm machine reuses it and a changed dependency spec builds a fresh one.
# Usage: source .ci/bootstrap.sh   (exports PY, the venv's python, and puts the venv on PATH)
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_key="$(cat "$_root/requirements/lock.txt" | sha256sum | cut -c1-16)"
_cache="${CAPTUM_NORMGRAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/captum-normgrad}"
_venv="$_cache/venv-$_key"
# Never take the local CPU-only torch wheel: torchvision does not import with it.
export PIP_FIND_LINKS=""
if [ ! -f "$_venv/.complete" ]; then
  echo "[bootstrap] creating $_venv (first run on this machine: a few minutes)" >&2
  rm -rf "$_venv"
  mkdir -p "$_cache"
  python3 -m venv "$_venv"
  "$_venv/bin/python" -m pip install -q --upgrade pip
  "$_venv/bin/python" -m pip install -q -r "$_root/requirements/lock.txt"
  touch "$_venv/.complete"
fi
# The package itself is (re)installed from this checkout every time: cheap, and always current.
if ! "$_venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$_root" >"$_cache/install-$_key.log" 2>&1; then
  cat "$_cache/install-$_key.log" >&2; exit 1
fi
export PATH="$_venv/bin:$PATH"
export PY="$_venv/bin/python"
set +euo pipefail
