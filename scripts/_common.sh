# Shared by the runbook scripts: run the project's CLI from the repo's .venv (or PATH).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/wiki-embeddings" ]; then
  WIKI_EMBEDDINGS="$ROOT/.venv/bin/wiki-embeddings"
else
  WIKI_EMBEDDINGS="wiki-embeddings"
fi
