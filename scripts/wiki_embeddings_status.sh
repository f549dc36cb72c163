#!/usr/bin/env bash
# Runbook: status (key=value lines; --json, --check).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exec "$WIKI_EMBEDDINGS" status "$@"
