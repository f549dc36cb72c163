#!/usr/bin/env bash
# The benchmarks, one command: bash benchmarks/run.sh [--quick] [--only ...] (see --help). Writes benchmarks/RESULTS.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
  echo "no .venv: run 'bash scripts/setup.sh' first" >&2
  exit 2
fi
exec .venv/bin/python -m benchmarks.run "$@"
