#!/usr/bin/env bash
# The main job on a fresh machine: set up, start the embedded PostgreSQL (pgvector), load real wiki text,
# run the runbook's bootstrap backfill with the local embedding server (real all-MiniLM-L6-v2), print status.
# Safe to re-run: nothing already embedded is embedded again.  WIKI_DEMO_ALL=1 imports the whole sample.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
if [ "${WIKI_DEMO_ALL:-0}" = "1" ]; then import_args=(--all); else import_args=(--limit "${WIKI_DEMO_LIMIT:-2000}"); fi
OLALA_START_OLLAMA=1 bash scripts/import_wiki_db.sh "${import_args[@]}"
# The runbook's bootstrap command, as written:
OLALA_START_OLLAMA=1 bash scripts/wiki_embeddings_backfill.sh \
  --batch-size 64 --report-every 10 --timeout-sec 120 --sleep-ms 150 \
  --max-chars 2000 --failure-log /tmp/wiki-embed-failures-bootstrap.jsonl
bash scripts/wiki_embeddings_status.sh
