#!/usr/bin/env bash
# One command for the Dagster UI (webserver + daemon, i.e. `dagster dev`) on the embedded PostgreSQL:
#   bash scripts/dagster_ui.sh            # http://127.0.0.1:3000  (DAGSTER_PORT / DAGSTER_HOST to change)
# Instance state goes to <repo>/.dagster_home (git-ignored) and to the `dagster` database of the embedded
# PostgreSQL; the chunk table is the embedded one too unless DATABASE_URL is already set. Ctrl-C or SIGTERM
# stops the webserver, the daemon and the code server (the PostgreSQL server keeps running; stop it with
# `python -m wiki_embeddings.devtools.embedded_postgres stop`).
# Optional: WIKI_EMBED_OLLAMA_POOL_LIMIT=N  ranges that may call Ollama at once (pool `ollama`, default 1).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_dagster_env.sh"
cd "$ROOT"

if [ -n "${WIKI_EMBED_OLLAMA_POOL_LIMIT:-}" ]; then
  "$DAGSTER" instance concurrency set ollama "$WIKI_EMBED_OLLAMA_POOL_LIMIT"
fi

echo "dagster_ui: DAGSTER_HOME=$DAGSTER_HOME; UI on http://${DAGSTER_HOST:-127.0.0.1}:${DAGSTER_PORT:-3000}" >&2
# exec: dagster dev replaces this shell, so Ctrl-C / SIGTERM reach it directly, and it shuts its webserver,
# daemon and code server down. dagster dev handles SIGTERM as SIGINT; a shell that starts this script in the
# background without job control hands it SIGINT *ignored* (which bash cannot undo), and then SIGTERM would
# be ignored too - so restore SIGINT's default in a tiny Python step before exec'ing dagster dev.
exec "$PY" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])' \
  "$DAGSTER" dev -w "$ROOT/workspace.yaml" -h "${DAGSTER_HOST:-127.0.0.1}" -p "${DAGSTER_PORT:-3000}"
