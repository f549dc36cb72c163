#!/usr/bin/env bash
# Set up and run the whole test suite (real PostgreSQL + pgvector, real HTTP). CI runs exactly this.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
