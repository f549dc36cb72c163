#!/usr/bin/env bash
# One command for the Dagster UI: webserver + daemon (`dagster dev`) on the embedded PostgreSQL, with a model.
#   bash scripts/dagster_ui.sh            # prints "Dagster UI ready: http://127.0.0.1:3000" (DAGSTER_PORT / DAGSTER_HOST)
# Instance state goes to <repo>/.dagster_home (git-ignored) and to the `dagster` database of the embedded
# PostgreSQL; the chunk table is the embedded one too unless DATABASE_URL is already set. When OLLAMA_URL does
# not answer, the local embedding service (`ollama serve`, else the project's server with the real
# all-MiniLM-L6-v2 model) is started and the runs use it; --no-model never starts one. Ctrl-C or SIGTERM stops
# the webserver, the daemon, the code server and that model server (the PostgreSQL server keeps running; stop
# it with `python -m wiki_embeddings.devtools.embedded_postgres stop`).
# Optional: WIKI_EMBED_OLLAMA_POOL_LIMIT=N  ranges that may call Ollama at once (pool `ollama`, default 1).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_dagster_env.sh"
cd "$ROOT"

if [ -n "${WIKI_EMBED_OLLAMA_POOL_LIMIT:-}" ]; then
  "$DAGSTER" instance concurrency set ollama "$WIKI_EMBED_OLLAMA_POOL_LIMIT"
fi

echo "dagster_ui: DAGSTER_HOME=$DAGSTER_HOME; starting the UI on http://${DAGSTER_HOST:-127.0.0.1}:${DAGSTER_PORT:-3000}" >&2
# exec: the launcher replaces this shell and handles Ctrl-C / SIGTERM itself (also when this script was started
# in the background of a non-interactive shell, which hands it SIGINT ignored): it stops dagster dev (webserver,
# daemon, code server) and the local model server it started.
exec "$PY" -m wiki_embeddings.local_services dagster-ui --workspace "$ROOT/workspace.yaml" "$@"
