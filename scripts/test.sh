#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (CPU only, about 8 minutes on 2 cores).
# Chromium (Debian package) is used by the report rendering test; without it that test skips.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser rendering test will skip" >&2
fi
scripts/install.sh
# Lint first (ruff is pinned in constraints.txt, so every machine reads the same rules): a second.
.venv/bin/ruff check --quiet .
# Two processes, each test file whole in one of them (its module fixtures are built once); the
# suite spends much of its time in subprocesses and I/O, so two workers halve it on 2 cores.
# `scripts/test.sh -n 0` runs it in one process; later arguments win.
exec .venv/bin/python -m pytest -q -n "${DRCT_TEST_WORKERS:-2}" --dist loadfile "$@"
