#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (CPU only, a few minutes).
# Chromium (Debian package) is used by the report rendering test; without it that test skips.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser rendering test will skip" >&2
fi
scripts/install.sh
exec .venv/bin/python -m pytest -q "$@"
