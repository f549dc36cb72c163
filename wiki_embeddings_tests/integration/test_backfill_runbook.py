"""The runbook's backfill promises, on real PostgreSQL + pgvector and the Ollama-protocol server over HTTP."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from wiki_embeddings.core.backfill import WINDOW_PROBE_TEXTS
from wiki_embeddings.core.failure_log import read_entries
from wiki_embeddings_tests.integration.conftest import TEST_DIM, expected_vector


def stored_vectors_match(table, ids, max_chars: int) -> int:
    """How many stored vectors equal what the server returns for the chunk's cut text."""
    texts = table.store.read_texts(ids, max_chars)
    vectors = table.store.read_vectors(ids)
    same = 0
    for cid in ids:
        vec = vectors[cid]
        if vec is not None and np.allclose(vec, expected_vector(texts[cid]), atol=1e-6):
            same += 1
    return same


def test_full_backfill_fills_every_chunk_with_the_servers_vector_for_its_cut_text(make_table):
    table = make_table()
    chunks = table.load_wiki(300)
    report = table.backfill(max_chars=200)
    assert report.state == "completed"
    assert report.embedded == 300 and report.failed == 0
    status = table.status()
    assert status["missing"] == 0 and status["coverage_pct"] == "100.00" and status["total"] == 300
    ids = [c.id for c in chunks]
    assert stored_vectors_match(table, ids, max_chars=200) == 300


def test_a_rerun_embeds_nothing_again_and_does_not_contact_the_model_server(make_table, ollama):
    table = make_table()
    table.load_wiki(100)
    table.backfill()
    before = ollama.stats()["requests"]
    report = table.backfill()
    assert report.embedded == 0 and report.state == "completed"
    # Nothing missing: not even the start-up probe of the model's dimension reaches the server.
    assert ollama.stats()["requests"] - before == 0


def test_a_poisoned_chunk_in_a_batch_of_64_is_isolated_and_logged_while_the_other_63_are_written(make_table, ollama):
    table = make_table(batch_size=64)
    rows = [(i, f"paragraph {i} about the history of Seoul") for i in range(1, 65)]
    rows[40] = (41, "this paragraph holds the POISON marker")
    table.load(rows)
    ollama.set_faults(error_marker="POISON")
    report = table.backfill()
    assert report.embedded == 63 and report.failed == 1 and report.failed_ids == [41]
    status = table.status()
    assert status["missing"] == 1 and status["failed"] == 1
    entries = read_entries(table.settings.failure_log)
    assert [e["chunk_id"] for e in entries] == [41]
    entry = entries[0]
    assert entry["http_status"] == 500 and entry["attempts"] == 1 and entry["text_length"] == len(rows[40][1])
    assert "POISON" not in str(entry), "the failure log never holds the chunk's text"
    assert set(entry) >= {"chunk_id", "error", "message", "http_status", "attempts", "text_length", "at"}
    recorded = table.store.list_failures()
    assert [(r["chunk_id"], r["http_status"]) for r in recorded] == [(41, 500)]
    assert stored_vectors_match(table, [r[0] for r in rows if r[0] != 41], table.settings.max_chars) == 63


@pytest.mark.parametrize("fault", ["nan_json_marker", "inf_marker", "wrong_dim_marker", "empty_vector_marker"])
def test_bad_vectors_are_never_written(make_table, ollama, fault):
    table = make_table()
    table.load([(1, "good text one"), (2, "BADVEC here"), (3, "good text three")])
    ollama.set_faults(**{fault: "BADVEC"})
    report = table.backfill()
    assert report.embedded == 2 and report.failed_ids == [2]
    assert table.store.read_vectors([2])[2] is None
    assert read_entries(table.settings.failure_log)[0]["error"] == "invalid_vector"


def test_max_chunks_embeds_that_many_in_id_order(make_table):
    table = make_table(batch_size=7)
    table.load([(i, f"chunk number {i}") for i in range(1, 51)])
    report = table.backfill(max_chunks=20)
    assert report.state == "max_chunks" and report.embedded == 20 and report.remaining == 30
    filled = [r[0] for r in table.sql(f"SELECT id FROM {table.settings.table} WHERE embedding IS NOT NULL ORDER BY id")]
    assert filled == list(range(1, 21))


def test_max_chars_cuts_the_text_before_sending(make_table, ollama):
    table = make_table()
    long_text = "가나다라마바사 " * 100
    table.load([(1, long_text)])
    table.backfill(max_chars=10)
    stored = table.store.read_vectors([1])[1]
    assert np.allclose(stored, expected_vector(long_text[:10]), atol=1e-6)
    assert not np.allclose(stored, expected_vector(long_text), atol=1e-6)


def test_sleep_ms_pauses_after_each_request(make_table):
    table = make_table(batch_size=5)
    table.load([(i, f"text {i}") for i in range(1, 21)])
    started = time.perf_counter()
    report = table.backfill(sleep_ms=100)
    # 4 batches + the dimension probe: at least 4 pauses of 100 ms; a generous bound, not a tight one.
    assert report.requests >= 4
    assert time.perf_counter() - started >= 0.4


def test_timeout_sec_bounds_a_hung_request_and_the_run_stops_without_marking_chunks_failed(make_table, ollama):
    table = make_table(timeout_sec=0.5, retries=1)
    table.load([(i, f"text {i}") for i in range(1, 11)])
    ollama.set_faults(hang_after_n=1)  # the dimension probe answers, then every request hangs
    started = time.perf_counter()
    report = table.backfill()
    elapsed = time.perf_counter() - started
    assert report.state == "server_unavailable" and report.exit_code != 0
    assert report.failed == 0 and table.status()["failed"] == 0 and report.remaining == 10
    assert elapsed < 30, "a hung server must not hold the run for long past --timeout-sec"


def test_a_dead_server_mid_run_stops_the_run_without_marking_chunks_failed(make_table, ollama):
    table = make_table(batch_size=4, retries=2)
    table.load([(i, f"text {i}") for i in range(1, 41)])
    ollama.set_faults(latency_ms=20)

    def die_soon() -> None:
        while table.status()["embedded"] < 8:
            time.sleep(0.01)
        ollama.set_faults(down=True)  # every embed request now answers 503

    killer = threading.Thread(target=die_soon)
    killer.start()
    report = table.backfill()
    killer.join()
    assert report.state == "server_unavailable"
    assert report.failed == 0 and table.status()["failed"] == 0
    assert 0 < report.embedded < 40 and report.remaining == 40 - report.embedded
    ollama.reset_faults()
    again = table.backfill()
    assert again.state == "completed" and table.status()["missing"] == 0


def test_stop_ends_after_the_current_batch_and_resume_finishes_the_rest(make_table, ollama):
    table = make_table(batch_size=5)
    table.load([(i, f"text {i}") for i in range(1, 101)])
    ollama.set_faults(latency_ms=50)
    stop_file = table.tmp / "wiki-embed.stop"

    def stop_soon() -> None:
        while table.status()["embedded"] < 10:
            time.sleep(0.02)
        stop_file.write_text("stop")

    stopper = threading.Thread(target=stop_soon)
    stopper.start()
    report = table.backfill()
    stopper.join()
    assert report.state == "stopped" and report.exit_code == 0
    assert 10 <= report.embedded < 100
    assert report.embedded % 5 == 0, "only whole batches were written"
    assert report.remaining == 100 - report.embedded
    stop_file.unlink()
    resumed = table.backfill()
    assert resumed.state == "completed" and resumed.embedded == 100 - report.embedded
    assert table.status()["missing"] == 0


def test_a_stop_request_in_the_database_stops_runs_too(make_table):
    table = make_table()
    table.load([(i, f"text {i}") for i in range(1, 11)])
    table.store.request_stop("test")
    report = table.backfill()
    assert report.state == "stopped" and report.embedded == 0 and report.remaining == 10
    table.store.clear_stop()
    assert table.backfill().embedded == 10


def test_the_attempt_cap_quarantines_and_an_edited_text_lifts_it(make_table, ollama):
    table = make_table(max_attempts=2)
    table.load([(1, "fine"), (2, "BAD chunk")])
    ollama.set_faults(bad_request_marker="BAD")
    for expected_attempts in (1, 2):
        table.backfill()
        assert table.store.list_failures(2)[0]["attempts"] == expected_attempts
    status = table.status()
    assert status["quarantined"] == 1 and status["failed"] == 1
    third = table.backfill()
    assert third.failed == 0, "a quarantined chunk is skipped, not retried"
    assert table.store.list_failures(2)[0]["attempts"] == 2
    table.sql(f"UPDATE {table.settings.table} SET content = 'edited chunk' WHERE id = 2")
    assert table.status()["quarantined"] == 0
    fourth = table.backfill()
    assert fourth.embedded == 1 and table.status()["missing"] == 0
    assert table.store.list_failures(2) == [], "an embedded chunk has no open failure record"


def test_retry_failed_runs_only_the_recorded_failures_quarantined_included(make_table, ollama):
    table = make_table(max_attempts=1)
    table.load([(1, "fine"), (2, "BAD chunk"), (3, "also fine")])
    ollama.set_faults(bad_request_marker="BAD")
    table.backfill()
    assert table.status()["quarantined"] == 1
    table.sql(f"INSERT INTO {table.settings.table} (id, content) VALUES (4, 'new chunk')")
    ollama.reset_faults()
    report = table.backfill(retry_failed=True)
    assert report.embedded == 1 and table.store.read_vectors([2])[2] is not None
    assert table.store.read_vectors([4])[4] is None, "retry-failed touches only the recorded failures"


def test_a_model_whose_vectors_do_not_fit_the_column_is_refused_with_nothing_written(make_table):
    from wiki_embeddings.core.backfill import DimensionMismatch

    table = make_table()
    table.load([(1, "text")])
    with pytest.raises(DimensionMismatch, match=r"768.*vector\(384\)"):
        table.backfill(ollama_model="nomic-embed-text")
    assert table.status()["missing"] == 1


def test_two_concurrent_backfills_embed_each_chunk_exactly_once(make_table, ollama):
    table = make_table(batch_size=8)
    table.load([(i, f"text {i}") for i in range(1, 401)])
    ollama.set_faults(latency_ms=5, slots=4)
    before = ollama.stats()["texts_embedded"]
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(table.backfill())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.embedded for r in reports) == 400
    assert all(r.embedded > 0 for r in reports), "both runs took part"
    # Every text embedded once, plus each run's start-up probes (the vector length, the window).
    assert ollama.stats()["texts_embedded"] - before == 400 + 2 * (1 + WINDOW_PROBE_TEXTS)
    assert table.status()["missing"] == 0


def test_status_figures_are_exact(make_table, ollama):
    table = make_table(max_attempts=1)
    table.load([(i, "BAD" if i in (3, 4) else f"text {i}") for i in range(1, 11)])
    ollama.set_faults(bad_request_marker="BAD")
    table.backfill(max_chunks=6)
    status = table.status()
    assert status == {
        "total": 10,
        "embedded": 4,
        "missing": 6,
        "coverage_pct": "40.00",
        "failed": 2,
        "quarantined": 2,
        "stop_requested": False,
    }


def test_coverage_shows_100_only_when_nothing_is_missing():
    from wiki_embeddings.core.db import coverage_pct

    assert coverage_pct(999_999, 1_000_000) == "99.99"
    assert coverage_pct(1_000_000, 1_000_000) == "100.00"
    assert coverage_pct(0, 0) == "0.00"


def test_the_vector_dimension_is_read_from_the_column(make_table):
    assert make_table(dim=8).store.column_dimensions() == 8
    assert make_table().store.column_dimensions() == TEST_DIM
