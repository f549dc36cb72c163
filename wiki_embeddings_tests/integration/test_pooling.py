"""Long chunks embedded whole (issue 23, `--long-text pool`, the default): a chunk longer than the model's window
is embedded as window-sized pieces and stored as their weighted mean; provenance records how, so verify rebuilds it;
it survives stop/resume and a refused piece; a column never mixes pooled and cut long texts."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from wiki_embeddings.cli import main
from wiki_embeddings.core.backfill import ModelChanged
from wiki_embeddings.core.pooling import Pooling
from wiki_embeddings.core.status import collect_status
from wiki_embeddings.core.text import clean_text
from wiki_embeddings.core.verify import verify
from wiki_embeddings.devtools.ollama_server import ModelSpec, OllamaServer, hash_vector
from wiki_embeddings_tests.integration.conftest import TEST_DIM, TEST_MODEL
from wiki_embeddings_tests.integration.test_faults_support import wrong_vectors


@pytest.fixture(scope="module")
def small_window() -> Iterator[OllamaServer]:
    """A model with a 128-token window, as `/api/show` says and as it enforces (400 over it)."""
    with OllamaServer(backend="hash", models=[ModelSpec("all-minilm:latest", TEST_DIM, context_length=128)]) as srv:
        yield srv


def pooled_rows(table) -> list[tuple[int, str, dict]]:
    return table.sql(
        f"SELECT p.chunk_id, t.content, p.pooling FROM {table.settings.state_schema}.embedding_provenance p"
        f" JOIN {table.settings.table} t ON t.id = p.chunk_id WHERE p.table_name = %s AND p.pooling IS NOT NULL"
        " ORDER BY 1",
        (table.settings.table,),
    )


def test_long_wiki_chunks_are_pooled_whole_never_cut_and_each_vector_is_the_mean_of_its_pieces(
    make_table, small_window
):
    table = make_table(ollama_url=small_window.url, batch_size=32, max_chars=2000)
    chunks = table.load_wiki(200)
    report = table.backfill()
    assert report.state == "completed" and report.failed == 0 and report.embedded == len(chunks), report.message
    status = collect_status(table.store, table.settings)
    assert status["pooled"] == report.pooled > 0 and status["cut_for_context"] == 0
    assert report.pieces > report.pooled, "a pooled chunk has at least two pieces"
    rows = pooled_rows(table)
    cid, content, description = rows[0]
    plan = Pooling.from_json(description)
    text = clean_text(content[:2000])
    assert plan.pieces[0].start == 0 and plan.pieces[-1].end == len(text), "the pieces cover the whole text"
    pieces = np.stack([hash_vector(TEST_MODEL, p.of(text), TEST_DIM) for p in plan.pieces])
    mean = np.average(pieces, axis=0, weights=plan.weights)
    stored = table.sql(f"SELECT embedding::text FROM {table.settings.table} WHERE id = %s", (cid,))[0][0]
    assert np.allclose(np.array(json.loads(stored)), mean / np.linalg.norm(mean), atol=1e-6)
    assert wrong_vectors(table, 2000) == [], "every vector, pooled or not, is exactly as its provenance says"
    assert "pooled=" in "".join(report.summary())


def test_pooling_survives_a_stop_and_a_resume(make_table, small_window):
    table = make_table(ollama_url=small_window.url, batch_size=8, max_chunks=None)
    chunks = table.load_wiki(120)
    first = table.backfill(max_chunks=40)
    assert first.state == "max_chunks" and first.pooled > 0
    rest = table.backfill()
    assert rest.state == "completed" and first.embedded + rest.embedded == len(chunks)
    assert wrong_vectors(table) == [] and collect_status(table.store, table.settings)["missing"] == 0


def test_a_piece_the_server_refuses_is_split_further_never_cut(make_table, ollama):
    """`/api/show` says 512 tokens, the server refuses past 100: the first refusal teaches the window, pieces
    still refused are halved; nothing is cut, nothing failed."""
    table = make_table(batch_size=16)
    chunks = table.load_wiki(120)
    ollama.set_faults(max_input_tokens=100)
    report = table.backfill()
    assert report.state == "completed" and report.failed == 0 and report.embedded == len(chunks)
    status = collect_status(table.store, table.settings)
    assert status["cut_for_context"] == 0 and status["pooled"] == report.pooled > 0
    assert wrong_vectors(table) == []


def test_verify_rebuilds_pooled_vectors_as_they_were_made(make_table, small_window):
    table = make_table(ollama_url=small_window.url, batch_size=32)
    table.load_wiki(80)
    assert table.backfill().pooled > 0
    report = verify(table.store, table.settings, TEST_MODEL, full=True)
    assert report.verdict == "match", report.message
    assert report.min_cosine is not None and report.min_cosine > 0.9999


def test_a_column_never_mixes_pooled_and_cut_long_texts_and_reembed_cut_changes_it(make_table, small_window, capsys):
    table = make_table(ollama_url=small_window.url, batch_size=32, long_text="cut")
    table.load_wiki(60)
    cut = table.backfill()
    assert cut.context_cut > 0 and cut.pooled == 0
    table.load_wiki(80)  # more chunks arrive; the default is pool now
    with pytest.raises(ModelChanged, match="--long-text cut"):
        table.backfill(long_text="pool")
    converted = table.backfill(long_text="pool", reembed_cut=True)
    assert converted.state == "completed" and converted.refreshed >= cut.context_cut
    status = collect_status(table.store, table.settings)
    assert status["cut_for_context"] == 0 and status["pooled"] > 0 and status["missing"] == 0
    assert wrong_vectors(table) == []
    code = main(["status", "--table", table.settings.table, "--database-url", table.url])
    assert code == 0 and f"pooled={status['pooled']}" in capsys.readouterr().out
