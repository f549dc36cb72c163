#!/usr/bin/env bash
# Runbook precondition 2: load the wiki sample into public.wiki_chunks (idempotent; --all for everything).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exec "$WIKI_EMBEDDINGS" import "$@"
