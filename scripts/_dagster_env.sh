# Shared by scripts/dagster_ui.sh and scripts/dagster.sh: the Dagster instance on the embedded PostgreSQL.
# DAGSTER_HOME=<repo>/.dagster_home (git-ignored) with a copy of dagster.yaml; DAGSTER_PG_URL (the embedded
# server's `dagster` database, psycopg2 driver) unless already set; DATABASE_URL (embedded) unless already set.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
DAGSTER="$ROOT/.venv/bin/dagster"
if [ ! -x "$PY" ] || [ ! -x "$DAGSTER" ]; then
  echo "error: $ROOT/.venv with dagster is missing; run: bash scripts/setup.sh" >&2
  exit 2
fi
export DAGSTER_HOME="${DAGSTER_HOME:-$ROOT/.dagster_home}"
mkdir -p "$DAGSTER_HOME"
[ -f "$DAGSTER_HOME/dagster.yaml" ] && cmp -s "$ROOT/dagster.yaml" "$DAGSTER_HOME/dagster.yaml" \
  || cp "$ROOT/dagster.yaml" "$DAGSTER_HOME/dagster.yaml"
if [ -z "${DAGSTER_PG_URL:-}" ]; then
  # Starts the embedded PostgreSQL if needed and creates the `dagster` database; prints only the URL.
  DAGSTER_PG_URL="$("$PY" -m wiki_embeddings.devtools.embedded_postgres dagster-url)"
  export DAGSTER_PG_URL
fi
if [ -z "${DATABASE_URL:-}" ]; then
  DATABASE_URL="$("$PY" -m wiki_embeddings.devtools.embedded_postgres url)"
  export DATABASE_URL
fi
