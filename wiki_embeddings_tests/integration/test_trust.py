"""Trust the vectors: `verify` (a model changed under its name), identity = model + dimensions + prefix, run
windows (`--until`, `--max-minutes`), and the swap's retrieval quality gate (real MiniLM against random vectors)."""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from wiki_embeddings import cli
from wiki_embeddings.core import migration, quality, verify
from wiki_embeddings.core.backfill import ModelChanged
from wiki_embeddings.core.status import collect_status
from wiki_embeddings.core.window import WINDOW_REASON, next_occurrence, parse_until, run_deadline
from wiki_embeddings.devtools.ollama_server import OllamaServer

from .conftest import TEST_MODEL


def _rows(n: int, start: int = 1) -> list[tuple[int, str]]:
    return [
        (i, f"chunk {i}: " + " ".join(f"word{(i * 7 + k) % 97}" for k in range(40))) for i in range(start, start + n)
    ]


def _cli(args: list[str], table) -> tuple[int, str]:
    out = io.StringIO()
    s = table.settings
    common = ["--database-url", table.url, "--table", s.table, "--ollama-url", s.ollama_url, "--model", s.ollama_model]
    code = cli.main([*args, *common], out=out)
    return code, out.getvalue()


# ---------------------------------------------------------------------------- verify
def test_verify_matches_then_catches_a_model_changed_under_its_name(make_table, ollama):
    t = make_table()
    t.load(_rows(60))
    # Embedded from a cut (--max-chars 30): verify re-embeds exactly what was sent, whatever its own settings say.
    assert t.backfill(max_chars=30).state == "completed"
    report = verify.verify(t.store, t.settings, TEST_MODEL, sample=40, seed=1)
    assert report.verdict == "match" and report.exit_code == 0, report.message
    assert report.compared >= 30 and report.min_cosine is not None and report.min_cosine > 0.9999
    assert report.digest and report.digest == report.recorded_digest  # recorded by the run, as /api/tags says

    ollama.set_faults(model_salt="pulled")  # `ollama pull` replaced the weights under the same name
    report = verify.verify(t.store, t.settings, TEST_MODEL, sample=40, seed=2)
    assert report.verdict == "model_changed" and report.exit_code == 8  # as for a backfill whose column changed model
    assert report.below_threshold == report.compared and report.digest_changed is True
    assert f"the model answering as {TEST_MODEL!r} changed" in report.message and "migrate-model" in report.message
    status = collect_status(t.store, t.settings)
    assert status["verify_result"] == "model_changed" and status["verify_below_threshold"] == report.compared
    assert status["verify_at"] and status["model_digest"]

    code, out = _cli(["verify", "--sample", "20", "--json"], t)
    assert code == 8 and json.loads(out)["verdict"] == "model_changed"


def test_verify_unreachable_server_is_not_evaluated_never_model_changed(make_table, ollama):
    t = make_table()
    t.load(_rows(20))
    t.backfill()
    ollama.set_faults(down=True)
    settings = t.settings.replace(retries=1)
    report = verify.verify(t.store, settings, TEST_MODEL, sample=10)
    assert report.verdict == "not_evaluated" and report.exit_code == 3
    assert "not evaluated" in report.message and "changed" not in report.message
    assert collect_status(t.store, t.settings)["verify_result"] == "not_evaluated"


def test_verify_counts_zero_norm_vectors_and_full_scan(make_table):
    t = make_table()
    t.load(_rows(30))
    t.backfill()
    zero = "[" + ",".join(["0"] * 384) + "]"
    t.sql(f"UPDATE {t.settings.table} SET embedding = %s::vector WHERE id = 7", (zero,))
    code, out = _cli(["verify", "--full"], t)
    assert code == 1, out
    assert "verify: mismatch" in out and "zero_norm=1" in out and "full=30" in out


# ---------------------------------------------------------------------------- identity: model + dimensions + prefix
def test_a_prefix_change_on_the_live_column_is_refused_and_migrate_model_may_take_it(make_table):
    t = make_table()
    t.load(_rows(10))
    assert t.backfill().state == "completed"
    t.load(_rows(5, start=100))
    with pytest.raises(ModelChanged, match="migrate-model --to all-minilm --text-prefix 'search_document: '"):
        t.backfill(text_prefix="search_document: ")
    assert t.status()["missing"] == 5  # nothing was written
    with pytest.raises(migration.MigrationError, match="already the live model"):
        migration.check_target(t.store, TEST_MODEL, "")
    migration.check_target(t.store, TEST_MODEL, "search_document: ")  # the same model with a new prefix: allowed
    # Cuts stay provenance, never refused.
    assert t.backfill(max_chars=12).state == "completed"


# ---------------------------------------------------------------------------- run windows
def test_until_parsing_and_next_occurrence():
    assert parse_until("06:00")[:3] == (6, 0, 0)
    assert parse_until("23:59+09:00")[3] == timezone(timedelta(hours=9))
    for bad in ("6", "24:00", "06:60", "06:00+15:00", "tomorrow"):
        with pytest.raises(ValueError):
            parse_until(bad)
    now = datetime(2025, 1, 1, 5, 0, tzinfo=UTC).timestamp()
    assert next_occurrence("06:00Z", now) == datetime(2025, 1, 1, 6, 0, tzinfo=UTC)
    assert next_occurrence("04:00Z", now) == datetime(2025, 1, 2, 4, 0, tzinfo=UTC)
    deadline, reason = run_deadline("06:00Z", 30, now)  # the earlier of the two
    assert deadline == now + 1800 and reason.startswith(WINDOW_REASON) and "--max-minutes 30" in reason
    with pytest.raises(ValueError, match="max-minutes"):
        t = cli.build_parser().parse_args(["backfill", "--max-minutes", "0"])
        cli.settings_from_args(t)


def test_a_run_window_stops_safely_and_the_next_run_resumes(make_table, ollama):
    t = make_table()
    t.load(_rows(60))
    ollama.set_faults(latency_ms=150)
    started = time.monotonic()
    report = t.backfill(batch_size=4, max_minutes=0.03)  # 1.8 s: the start-up probes take 0.6 s of it
    assert report.state == "stopped" and report.exit_code == 0
    assert report.stop_reason.startswith(WINDOW_REASON) and "--max-minutes" in report.message
    assert 0 < report.embedded < 60 and report.failed == 0 and time.monotonic() - started < 10
    assert t.status()["missing"] == 60 - report.embedded and t.status()["failed"] == 0
    ollama.reset_faults()
    soon = (datetime.now().astimezone() + timedelta(hours=1)).strftime("%H:%M")
    assert t.backfill(until=soon).state == "completed"
    assert t.status()["missing"] == 0


def test_until_flag_on_the_cli(make_table, ollama):
    t = make_table()
    t.load(_rows(400))
    ollama.set_faults(latency_ms=100)
    soon = datetime.now(UTC) + timedelta(seconds=3)
    # --until three seconds from now (explicit offset): the run, ~20 s of work one request at a time, ends then. (A
    # time already past when the run starts means that time tomorrow, so a loaded machine needs the margin.)
    until = soon.strftime("%H:%M:%S") + "Z"
    code, out = _cli(["backfill", "--batch-size", "2", "--concurrency", "1", "--until", until], t)
    assert code == 0 and "stopped on request (run window ends at" in out
    assert t.status()["missing"] > 0 and t.status()["failed"] == 0


# ---------------------------------------------------------------------------- the swap's quality gate (real MiniLM)
@pytest.fixture(scope="module")
def minilm():
    """One server with the real all-MiniLM-L6-v2 and a random-vector model (`hash-*`) beside it."""
    with OllamaServer(backend="minilm", models=["all-minilm:384", "hash-random:384"]) as srv:
        yield srv


def _wiki_table(make_table, minilm, model: str):
    t = make_table(ollama_url=minilm.url, ollama_model=model, max_chars=300, batch_size=32)
    t.load_wiki(limit=150)
    return t


def test_swap_refuses_a_random_vector_shadow_against_live_minilm(make_table, minilm):
    t = _wiki_table(make_table, minilm, "all-minilm")
    assert t.backfill().state == "completed"
    code, out = _cli(["migrate-model", "--to", "hash-random", "--max-chars", "300"], t)
    assert code == 0, out
    code, out = _cli(["migrate-model", "--check-quality", "--quality-sample", "150", "--max-chars", "300"], t)
    assert code == 1
    code, out = _cli(["migrate-model", "--swap", "--quality-sample", "150", "--max-chars", "300"], t)
    assert code == 1  # refused: nothing swapped
    code, out = _cli(["migrate-model", "--status", "--json"], t)
    info = json.loads(out)
    assert info["quality_result"] == "refused" and info["target_model"] == "hash-random"
    # Real MiniLM finds a chunk from a dozen of its words (among sibling chunks of the same articles); random
    # vectors rank it by chance (recall@10 about 10/150).
    assert info["live_recall_at_10"] > 0.45 and info["shadow_recall_at_10"] < 0.15, info
    assert info["live_mrr"] > info["shadow_mrr"] + 0.25
    assert t.store.recorded_model()[0] == "all-minilm"
    # --force swaps anyway, and is recorded.
    code, out = _cli(["migrate-model", "--swap", "--force", "--quality-sample", "150", "--max-chars", "300"], t)
    assert code == 0 and "swapped" in out
    forced = t.store.latest_trust("swap_forced")
    assert forced and forced["shadow_recall_at_10"] < 0.15 and forced["by"]


def test_swap_passes_minilm_shadow_against_live_random_vectors(make_table, minilm):
    t = _wiki_table(make_table, minilm, "hash-random")
    assert t.backfill().state == "completed"
    store = t.store
    migration.start(store, "all-minilm", 384)
    shadow = t.settings.replace(embedding_column="embedding_next", ollama_model="all-minilm")
    assert t.backfill(**{k: getattr(shadow, k) for k in ("embedding_column", "ollama_model")}).state == "completed"
    report = quality.gate(store, t.settings, sample=150)
    assert report.passed and report.shadow.recall_at_10 > 0.45 > 0.15 > report.live.recall_at_10
    assert "retrieval self-test passed" in report.message
    assert "swapped" in migration.swap(store)


def test_rank_figures_and_queries():
    docs = np.eye(20, dtype=np.float32)
    assert quality.rank_figures(docs, docs) == (1.0, 1.0)
    text = " ".join(f"w{k}" for k in range(40))
    q = quality.make_query(text)
    assert q in text and len(q.split()) == quality.QUERY_WORDS and q != text


def test_sample_ids_spread_over_sparse_id_ranges(make_table, monkeypatch):
    from wiki_embeddings.core.db import trust as store_module

    t = make_table()
    t.load(_rows(50) + _rows(50, start=1_000_000))
    t.backfill()
    small = t.store.sample_ids(40, seed=3)
    assert len(small) == 40 and any(i < 100 for i in small) and any(i >= 1_000_000 for i in small)
    monkeypatch.setattr(store_module, "_SMALL_TABLE", 10)  # the strata path of a large table
    t.sql(f"ANALYZE {t.settings.table}")
    ids = t.store.sample_ids(40, seed=4)
    assert len(ids) >= 30 and sum(i < 100 for i in ids) >= 10 and sum(i >= 1_000_000 for i in ids) >= 10


def test_after_model_changed_a_migration_to_the_same_name_re_embeds_with_the_new_weights(make_table, ollama):
    t = make_table()
    t.load(_rows(30))
    t.backfill()
    with pytest.raises(migration.MigrationError, match="already the live model"):
        migration.check_target(t.store, TEST_MODEL, "")
    ollama.set_faults(model_salt="pulled")
    assert verify.verify(t.store, t.settings, TEST_MODEL, sample=20).verdict == "model_changed"
    migration.start(t.store, TEST_MODEL, 384, text_prefix="")
    assert t.backfill(embedding_column="embedding_next").state == "completed"
    assert "swapped" in migration.swap(t.store)  # 30 chunks of random words: the gate is not run here
    assert verify.verify(t.store, t.settings, TEST_MODEL, sample=20).verdict == "match"
