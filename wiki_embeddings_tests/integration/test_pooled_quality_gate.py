"""The swap's quality gate over a pooled shadow column (issue 23: "the swap's quality gate ... with pooled
chunks"), with the real all-MiniLM-L6-v2 on the wiki sample: a shadow whose long chunks are pooled passes against
the same model's cut vectors (its queries come from a chunk's middle, which a cut vector may not hold), and a
shadow of random vectors, pooled all the same, is refused against pooled MiniLM. After the swap, `verify` rebuilds
the pooled vectors of the new live column as they were made."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wiki_embeddings.core import migration, quality
from wiki_embeddings.core.verify import verify
from wiki_embeddings.devtools.ollama_server import OllamaServer

SAMPLE = 80  # chunks: enough for the gate's paired test, small enough for a CPU's MiniLM
MAX_CHARS = 2000  # the runbook's: about a quarter of the wiki chunks are longer than MiniLM's window


@pytest.fixture(scope="module")
def minilm() -> Iterator[OllamaServer]:
    """The real MiniLM under two names (a migration between them changes only how long chunks are embedded) and a
    random-vector model (`hash-*`) beside it."""
    with OllamaServer(backend="minilm", models=["all-minilm:384", "minilm-twin:384", "hash-random:384"]) as srv:
        yield srv


def _pooled_in(table, column: str) -> int:
    return int(
        table.sql(
            f"SELECT count(*) FROM {table.settings.state_schema}.embedding_provenance p JOIN pg_attribute a"
            f" ON a.attrelid = %s::regclass AND a.attnum = p.column_attnum AND NOT a.attisdropped"
            " WHERE a.attname = %s AND p.table_name = %s AND p.pooling IS NOT NULL",
            (table.settings.table, column, table.settings.table),
        )[0][0]
    )


def _fill_shadow(table, model: str, long_text: str) -> str:
    """Start the migration to `model` and fill its shadow column; the shadow's name."""
    migration.start(table.store, model, 384)
    shadow = table.store.migration_target()[1]
    assert shadow, "the migration names its shadow column"
    report = table.backfill(embedding_column=shadow, ollama_model=model, long_text=long_text)
    assert report.state == "completed" and report.failed == 0, report.message
    return shadow


def test_a_pooled_shadow_passes_the_gate_against_cut_vectors_and_verify_rebuilds_it_after_the_swap(make_table, minilm):
    table = make_table(ollama_url=minilm.url, ollama_model="all-minilm", max_chars=MAX_CHARS, batch_size=32)
    table.load_wiki(limit=SAMPLE)
    live = table.backfill(long_text="cut")
    assert live.state == "completed" and live.context_cut > 0 and live.pooled == 0, live.message
    shadow = _fill_shadow(table, "minilm-twin", "pool")
    pooled = _pooled_in(table, shadow)
    assert pooled >= 10 and _pooled_in(table, table.settings.embedding_column) == 0

    report = quality.gate(table.store, table.settings, sample=SAMPLE)
    assert report.passed and report.verdict == "pass" and report.sample >= 60, report.message
    assert report.shadow.recall_at_10 > 0.45, "pooled MiniLM finds a chunk from a dozen of its words"
    assert "swapped" in migration.swap(table.store)

    # The swapped column is the live one now: its pooled vectors are rebuilt from their recorded pieces.
    assert _pooled_in(table, table.settings.embedding_column) == pooled
    settings = table.settings.replace(ollama_model="minilm-twin", long_text="pool")
    checked = verify(table.store, settings, "minilm-twin", sample=40, seed=1)
    assert checked.verdict == "match", checked


def test_a_pooled_shadow_of_random_vectors_is_refused_against_pooled_minilm(make_table, minilm):
    table = make_table(ollama_url=minilm.url, ollama_model="all-minilm", max_chars=MAX_CHARS, batch_size=32)
    table.load_wiki(limit=SAMPLE)
    live = table.backfill()  # --long-text pool, the default
    assert live.state == "completed" and live.pooled > 0, live.message
    shadow = _fill_shadow(table, "hash-random", "pool")
    assert _pooled_in(table, shadow) > 0, "the random model's long chunks are pooled too"

    with pytest.raises(quality.QualityRefused, match="retrieves worse than the live column") as refused:
        quality.gate(table.store, table.settings, sample=SAMPLE)
    figures = refused.value.figures
    assert figures["quality_result"] == "refused", figures
    assert figures["live_recall_at_10"] > 0.45, "pooled live MiniLM retrieves its own chunks"
    assert figures["shadow_recall_at_10"] < figures["live_recall_at_10"] - 0.25, "random vectors rank by chance"
    assert table.store.recorded_model()[0] == "all-minilm", "nothing swapped"
