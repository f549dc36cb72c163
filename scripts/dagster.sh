#!/usr/bin/env bash
# Any `dagster` command against this project's instance on the embedded PostgreSQL, e.g.
#   bash scripts/dagster.sh definitions validate
#   bash scripts/dagster.sh job backfill -w workspace.yaml -j bootstrap_job --all true --noprompt
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_dagster_env.sh"
cd "$ROOT"
exec "$DAGSTER" "$@"
