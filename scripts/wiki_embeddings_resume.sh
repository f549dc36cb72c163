#!/usr/bin/env bash
# Runbook: resume - clear the stop request and continue with the last run's options.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exec "$WIKI_EMBEDDINGS" resume "$@"
