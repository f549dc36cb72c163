#!/usr/bin/env bash
# Set up and run the whole test suite (real PostgreSQL + pgvector, real HTTP). CI runs exactly this.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# The real-browser test (wiki_embeddings_tests/integration/test_dagster_browser.py) drives Debian's Chromium through PyPI
# `playwright` (never `playwright install`, which downloads a browser): install the package when it is missing.
if [ ! -x "${WIKI_EMBED_CHROMIUM:-/usr/lib/chromium/chromium}" ] && ! command -v chromium >/dev/null 2>&1; then
  echo "test: installing Debian's chromium for the browser test" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
# What CI checks besides the tests (the same hooks run locally through .pre-commit-config.yaml):
bash scripts/lint.sh
# Two test processes (WIKI_EMBED_TEST_WORKERS; 0 = one process): most integration tests wait on servers, clocks and
# child processes, not on the CPU, so two halve the wall time on 2 cores. A test file stays in one process (its
# fixtures - the infinity server, the real model - start once). Each process has its own PostgreSQL and temp paths.
.venv/bin/python -m pytest -q -n "${WIKI_EMBED_TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
