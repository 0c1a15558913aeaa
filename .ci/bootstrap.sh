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
# Lint and type check (requirements/lint.txt, outside lock.txt so the venv cache key does not change)
if ! "$_venv/bin/python" -c "import ruff, mypy" >/dev/null 2>&1 \
    || ! cmp -s "$_root/requirements/lint.txt" "$_venv/.lint.txt"; then
  "$_venv/bin/python" -m pip install -q -r "$_root/requirements/lint.txt" >"$_cache/pip-lint.log" 2>&1 \
    || { cat "$_cache/pip-lint.log" >&2; exit 1; }
  cp "$_root/requirements/lint.txt" "$_venv/.lint.txt"
fi
# Browser for tests/test_browser.py: Debian's Chromium (apt-get, when root) and Playwright
# (requirements/browser.txt, kept out of lock.txt so the venv cache key does not change).
# Where the set-up is possible, CAPTUM_NORMGRAD_REQUIRE_BROWSER=1 makes a missing browser a test
# failure instead of a skip. CAPTUM_NORMGRAD_NO_BROWSER=1 skips the set-up.
if [ -z "${CAPTUM_NORMGRAD_NO_BROWSER:-}" ]; then
  _can_apt=0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then _can_apt=1; fi
  if [ ! -x /usr/bin/chromium ] && [ "$_can_apt" = 1 ]; then
    echo "[bootstrap] installing chromium with apt-get for the browser tests" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        >"$_cache/apt-chromium.log" 2>&1; then
      echo "[bootstrap] warning: apt-get install chromium failed, see $_cache/apt-chromium.log" >&2
    fi
  fi
  if ! "$_venv/bin/python" -c "import playwright" >/dev/null 2>&1; then
    "$_venv/bin/python" -m pip install -q -r "$_root/requirements/browser.txt" >"$_cache/pip-browser.log" 2>&1 \
      || echo "[bootstrap] warning: pip install -r requirements/browser.txt failed, see $_cache/pip-browser.log" >&2
  fi
  if [ "$_can_apt" = 1 ] || { [ -x /usr/bin/chromium ] && "$_venv/bin/python" -c "import playwright" >/dev/null 2>&1; }; then
    export CAPTUM_NORMGRAD_REQUIRE_BROWSER=1
  fi
fi
set +euo pipefail
