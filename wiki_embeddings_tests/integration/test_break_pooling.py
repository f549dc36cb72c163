"""Outside tester's probes of `--long-text pool` (issue 23) with real processes: what held stays as tests, what
broke is marked xfail(strict) with the defect it shows."""

from __future__ import annotations

import threading
import time

import pytest

from wiki_embeddings.core.status import collect_status
from wiki_embeddings.core.verify import verify
from wiki_embeddings_tests.integration.conftest import TEST_MODEL
from wiki_embeddings_tests.integration.test_faults_support import (
    cli_env,
    filled,
    kill9,
    run_cli,
    start_cli,
    wait_until,
    wrong_vectors,
)
from wiki_embeddings_tests.integration.test_pooling import small_window  # noqa: F401

LONG = " ".join(f"word{k} sentence number {k}." for k in range(400))


def _insert(table, rows: list[tuple[int, str]]) -> None:
    for cid, text in rows:
        table.sql(f"INSERT INTO {table.settings.table} (id, content) VALUES (%s, %s)", (cid, text))


@pytest.mark.parametrize("fault", ["nan_json_marker", "bad_request_marker", "nan_marker", "inf_marker"])
def test_a_poisoned_tail_piece_fails_its_chunk_only(make_table, small_window, fault):  # noqa: F811
    table = make_table(ollama_url=small_window.url, batch_size=8, max_chars=50000)
    _insert(table, [(1, LONG + " POISONED tail."), (2, LONG), (3, "short text fine"), (4, "another short one")])
    small_window.set_faults(**{fault: "POISONED"})
    try:
        report = table.backfill()
    finally:
        small_window.reset_faults()
    assert report.state == "completed" and report.failed == 1 and report.embedded == 3, report.message
    assert report.failed_ids == [1] or list(report.failed_ids) == [1]
    assert wrong_vectors(table, 50000) == []


def test_korean_without_spaces_and_a_40000_character_word_are_pooled(make_table, small_window):  # noqa: F811
    table = make_table(ollama_url=small_window.url, batch_size=8, max_chars=50000)
    _insert(table, [(1, "가나다라마바사" * 3000), (2, "x" * 40000)])
    report = table.backfill()
    assert report.state == "completed" and report.pooled == 2 and report.failed == 0, report.message
    assert wrong_vectors(table, 50000) == []


def test_verify_rebuilds_pooled_vectors_made_with_a_text_prefix(make_table, small_window):  # noqa: F811
    table = make_table(ollama_url=small_window.url, batch_size=8, text_prefix="search_document: ")
    table.load_wiki(40)
    assert table.backfill().pooled > 0
    assert verify(table.store, table.settings, TEST_MODEL, full=True).verdict == "match"


def test_kill9_with_pieces_in_flight_then_resume_leaves_every_vector_exact(
    make_table,
    small_window,  # noqa: F811
    tmp_path,
):
    table = make_table(ollama_url=small_window.url, batch_size=8, max_chars=50000)
    _insert(table, [(cid, f"chunk {cid}. " + LONG) for cid in range(1, 41)])
    small_window.set_faults(per_text_ms=30, slots=0)
    proc = start_cli(table, "backfill", "--batch-size", "8", "--concurrency", "2", log=tmp_path / "k.log")
    try:
        wait_until(lambda: filled(table) >= 8, 60, "some pooled chunks")
    finally:
        kill9(proc)
    small_window.reset_faults()
    table.backfill()
    status = collect_status(table.store, table.settings)
    assert status["missing"] == 0 and status["pooled"] == 40 and wrong_vectors(table, 50000) == []


def test_pooled_counts_only_chunks_written(make_table, small_window):  # noqa: F811
    table = make_table(ollama_url=small_window.url, batch_size=8, max_chars=50000)
    _insert(table, [(1, LONG)])
    small_window.set_faults(latency_ms=300)
    small_window.reset_stats()
    result: dict = {}
    worker = threading.Thread(target=lambda: result.setdefault("report", table.backfill()))
    worker.start()
    try:
        while small_window.stats()["embed_requests"] < 6:  # its pieces are in flight
            time.sleep(0.05)
        table.sql(f"DELETE FROM {table.settings.table} WHERE id = 1")
    finally:
        worker.join(120)
        small_window.reset_faults()
    report = result["report"]
    assert report.embedded == 0
    assert report.pooled <= report.embedded, "".join(report.summary())


def test_the_preflight_line_does_not_say_cut_under_pool(make_table, small_window):  # noqa: F811
    table = make_table(ollama_url=small_window.url, batch_size=8)
    _insert(table, [(cid, f"chunk {cid}. " + LONG) for cid in range(1, 5)])
    cut = run_cli(table, "backfill", "--dry-run", env=cli_env(table, WIKI_EMBED_LONG_TEXT="cut"))
    assert "cut to fit" in cut.stdout + cut.stderr, "under --long-text cut the line still says what is cut"
    dry = run_cli(table, "backfill", "--dry-run")
    assert "are pooled (--long-text pool" in dry.stdout and "cut to fit" not in dry.stdout, dry.stdout
    done = run_cli(table, "backfill")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert "pooled=4" in out
    assert "cut to fit" not in out and "keeps" not in out, out
    assert "are pooled (--long-text pool" in out and "extra model inputs per 1,000 chunks" in out, out


def test_a_text_prefix_that_fills_the_window_is_a_bad_setting(make_table, small_window):  # noqa: F811
    table = make_table(ollama_url=small_window.url, batch_size=4)
    table.load([(1, "hello there")])
    done = run_cli(table, "backfill", env=cli_env(table, WIKI_EMBED_TEXT_PREFIX="p " * 125))
    assert done.returncode == 2 and "WIKI_EMBED_TEXT_PREFIX" in done.stderr, done.stderr


def test_a_keep_alive_ollama_cannot_parse_is_a_bad_setting(make_table, ollama):
    table = make_table(batch_size=4)
    table.load([(1, "hello there")])
    done = run_cli(table, "backfill", env=cli_env(table, WIKI_EMBED_KEEP_ALIVE="forever"))
    assert done.returncode == 2 and "WIKI_EMBED_KEEP_ALIVE" in done.stderr, done.stderr


def test_reembed_cut_does_not_reembed_what_this_run_just_cut(make_table, small_window):  # noqa: F811
    table = make_table(ollama_url=small_window.url, batch_size=16, long_text="cut")
    table.load_wiki(40)
    report = table.backfill(reembed_cut=True)
    assert report.embedded == 40 and report.context_cut > 0
    assert report.refreshed == 0 and report.context_cut <= report.embedded, "".join(report.summary())
    cut_before = table.sql(
        f"SELECT count(*) FROM {table.settings.state_schema}.embedding_provenance WHERE context_cut"
        " AND table_name = %s",  # the bookkeeping is shared by every test's table
        (table.store.table.qualified,),
    )[0][0]
    again = table.backfill(reembed_cut=True)  # a later run still redoes what an earlier one cut
    assert again.embedded == 0 and again.refreshed == cut_before > 0, "".join(again.summary())


def test_a_short_api_key_does_not_mangle_messages(make_table, small_window):  # noqa: F811
    table = make_table(ollama_url=small_window.url, batch_size=8)
    table.load([(1, "short one"), (2, "short")])
    assert (
        run_cli(table, "backfill", env=cli_env(table, WIKI_EMBED_API="openai", WIKI_EMBED_API_KEY="ollama")).returncode
        == 0
    )
    table.load([(3, "a third chunk")])
    done = run_cli(table, "backfill", env=cli_env(table, WIKI_EMBED_API="ollama", WIKI_EMBED_API_KEY="ollama"))
    assert done.returncode == 2, done.stderr
    assert "--api ollama" in done.stderr and "***" not in done.stderr, done.stderr


def test_batch_size_counts_pieces(make_table, small_window, monkeypatch):  # noqa: F811
    from wiki_embeddings.core.embedders.pooled import PooledClient

    sizes: list[int] = []
    original = PooledClient.embed_texts

    async def recording(self, texts, *, server=None):
        sizes.append(len(texts))
        return await original(self, texts, server=server)

    monkeypatch.setattr(PooledClient, "embed_texts", recording)
    table = make_table(ollama_url=small_window.url, batch_size=8, max_chars=50000)
    _insert(table, [(1, "word " * 4000), (2, "more " * 4000)])
    report = table.backfill()
    assert report.state == "completed" and report.pooled == 2
    assert max(sizes) <= 8, f"largest request: {max(sizes)} inputs"
    assert sum(sizes) >= 2 * 8, "every piece of both chunks was sent (about 26 each), in requests of at most 8"
    assert wrong_vectors(table, 50000) == [], "each chunk written whole, from all its pieces"
