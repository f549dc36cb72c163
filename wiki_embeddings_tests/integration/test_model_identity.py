"""One rule for model names everywhere (core/modelname.py): Ollama's (`all-minilm` = `all-minilm:latest`), in Python
and in the SQL that compares names inside a statement - the stale-model count, the model guard of a batch write, the
recorded model, the trust log."""

from __future__ import annotations

import ast
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from wiki_embeddings.core import migration
from wiki_embeddings.core.db import ModelMismatch, StoreError
from wiki_embeddings.core.db.modelnames import canonical_sql
from wiki_embeddings.core.modelname import canonical, same_model, same_prefix

NAMES = [
    "all-minilm",
    "all-minilm:latest",
    "  all-minilm:latest\n",
    "All-MiniLM:Latest",
    "library/all-minilm",
    "registry.ollama.ai/library/all-minilm:latest",
    "all-minilm:",
    "all-minilm:l6-v2",
    "nomic-embed-text:v1.5",
    "jina/jina-embeddings-v2-base-en:latest",
    "registry.ollama.ai/jina/jina-embeddings-v2-base-en",
    "registry.ollama.ai/x",
    "example.com:5000/team/model:7b",
    "hf.co/user/repo:Q4_K_M",
    "latest",
    ":latest",
    "",
    "vllm",
    "v\tv",
]


def test_ollamas_spellings_of_one_model_are_one_model():
    one = [n for n in NAMES[:7]]
    assert {canonical(n) for n in one} == {"all-minilm"}
    assert all(same_model("all-minilm", n) for n in one)
    assert not same_model("all-minilm", "all-minilm:l6-v2"), "another tag is another model"
    assert not same_model("all-minilm", "nomic-embed-text")
    assert same_model("jina/jina-embeddings-v2-base-en", "registry.ollama.ai/jina/jina-embeddings-v2-base-en:latest")
    assert not same_model("registry.ollama.ai/x", "x"), "two parts are namespace/model: no registry to drop"
    assert same_model(None, "") and canonical("vllm") == "vllm", "a 'v' is not whitespace"
    assert same_prefix(None, "") and not same_prefix("search_document: ", "search_document:")


def test_the_sql_form_of_the_rule_agrees_with_the_python_one(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        query = sql.SQL("SELECT {}").format(canonical_sql(sql.SQL("%s::text")))
        for name in NAMES:
            got = conn.execute(query, (name,)).fetchone()
            assert got is not None and got[0] == canonical(name), name
        assert conn.execute(query, (None,)).fetchone() == (None,)


def test_the_rule_lives_in_a_leaf_module():
    """core/modelname.py imports nothing of the project; core/identity.py no longer imports the engine at all."""
    package = Path(__file__).resolve().parents[2] / "wiki_embeddings"
    for path, banned in ((package / "core/modelname.py", "wiki_embeddings"), (package / "core/identity.py", "engine")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(banned in n for n in names), f"{path.name} imports {names}"


def test_stale_model_counts_no_vector_of_the_same_model_spelled_otherwise(make_table):
    table = make_table()
    table.load([(i, f"t {i}") for i in range(1, 6)])
    assert table.backfill(ollama_model="all-minilm:latest").state == "completed"
    assert {r["model"] for r in table.store.provenance(range(1, 6)).values()} == {"all-minilm:latest"}
    table.store.record_model("all-minilm", 384, replace=True)
    assert table.store.model_status()["stale_model"] == 0, "all-minilm:latest vectors are all-minilm's"
    table.store.record_model("ALL-MINILM", 384, replace=True)
    assert table.store.model_status()["stale_model"] == 0
    table.store.record_model("all-minilm:l6-v2", 384, replace=True)
    assert table.store.model_status()["stale_model"] == 5, "another tag is another model"


def test_a_run_writes_under_another_spelling_of_the_columns_model(make_table):
    table = make_table()
    table.load([(1, "one")])
    assert table.backfill(ollama_model="all-minilm").state == "completed"
    table.load([(2, "two")])
    report = table.backfill(ollama_model="all-minilm:latest")
    assert report.state == "completed" and report.embedded == 1, report.message
    assert same_model(table.store.recorded_model()[0], "all-minilm")
    assert table.store.model_status()["stale_model"] == 0


def test_recording_the_model_accepts_its_spellings_and_refuses_another_model(make_table):
    table = make_table()
    table.store.record_model("all-minilm", 384)
    table.store.record_model(" library/all-minilm:latest ", 384)
    with pytest.raises(ModelMismatch):
        table.store.record_model("nomic-embed-text", 768)


def test_the_trust_log_finds_a_models_results_under_any_spelling(make_table):
    table = make_table()
    table.store.record_trust("verify", {"verdict": "match"}, model="all-minilm:latest")
    table.store.record_trust("verify", {"verdict": "model_changed"}, model="nomic-embed-text")
    assert (table.store.latest_trust("verify", "all-minilm") or {}).get("verdict") == "match"
    assert (table.store.latest_trust("verify", "nomic-embed-text:latest") or {}).get("verdict") == "model_changed"
    assert (table.store.latest_trust("verify") or {}).get("verdict") == "model_changed"


def test_a_migration_to_the_live_model_spelled_otherwise_is_refused(make_table):
    table = make_table()
    table.load([(1, "one")])
    assert table.backfill(ollama_model="all-minilm").state == "completed"
    with pytest.raises(migration.MigrationError, match="already the live model"):
        migration.check_target(table.store, "all-minilm:latest")
    table.store.start_migration("nomic-embed-text", 768, "embedding_next")
    table.store.start_migration("nomic-embed-text:latest", 768, "embedding_next")  # the same migration: continued
    with pytest.raises(StoreError, match="in progress"):
        table.store.start_migration("mxbai-embed-large", 768, "embedding_next")
