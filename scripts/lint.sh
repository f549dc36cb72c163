#!/usr/bin/env bash
# Lint, format and type checks, as CI runs them (scripts/test.sh) and the pre-commit hooks do.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PATHS=(wiki_embeddings wiki_embeddings_tests benchmarks)
.venv/bin/ruff check "${PATHS[@]}"
.venv/bin/ruff format --check "${PATHS[@]}"
.venv/bin/mypy  # [tool.mypy] in pyproject.toml: the package, every function of core/ typed
echo "lint: ruff check, ruff format --check and mypy passed"
