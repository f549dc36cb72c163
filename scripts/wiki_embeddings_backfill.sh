#!/usr/bin/env bash
# Runbook: bootstrap / maintenance backfill. All flags go to `wiki-embeddings backfill`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exec "$WIKI_EMBEDDINGS" backfill "$@"
