#!/usr/bin/env bash
# Runbook: safe stop - running backfills end after their current batch.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exec "$WIKI_EMBEDDINGS" stop "$@"
