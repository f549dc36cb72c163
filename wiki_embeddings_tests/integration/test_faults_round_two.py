"""Reliability, round two: a swap racing a run's start, rows locked or refused by the database, claim-key
collisions between tables. Each test failed on the code before its fix."""

from __future__ import annotations

import threading
import time

import numpy as np
import psycopg
import pytest

from wiki_embeddings.core.db import ModelMismatch, Provenance
from wiki_embeddings.core.factories import build_store
from wiki_embeddings_tests.integration.test_cli import run_cli
from wiki_embeddings_tests.integration.test_faults_support import wrong_vectors


def swap_to(table, model: str) -> None:
    """A swap as `migrate-model --swap` commits it: the shadow column becomes the live one of `model`."""
    table.sql(f"ALTER TABLE {table.settings.table} ADD COLUMN embedding_next vector(384)")
    table.store.swap_columns(
        to_live="embedding_next",
        from_live="embedding_prev",
        model=model,
        dimensions=384,
        previous_model="all-minilm",
        previous_dimensions=384,
        migration=(None, None, None),
    )


# ------------------------------------------------------------------------------------------ 1. swap vs. run start


def test_a_run_that_started_before_a_swap_never_records_its_model_again(make_table):
    table = make_table()
    table.load([(1, "one")])
    table.store.record_model("all-minilm", 384)
    swap_to(table, "model-b")  # the swap commits while a backfill of all-minilm is still probing its server
    with (
        build_store(table.settings, table.url) as late,
        pytest.raises(ModelMismatch, match="holds model 'model-b' now"),
    ):
        late.record_model("all-minilm", 384)
    assert table.store.recorded_model() == ("model-b", 384), "the old model is never put back"


def test_a_vector_is_written_only_for_the_model_live_at_the_moment_of_the_write(make_table):
    table = make_table()
    table.load([(i, f"t {i}") for i in range(1, 5)])
    table.store.record_model("model-b", 384)  # e.g. recorded by the swap just before this batch
    vec = np.full(384, 0.5, dtype=np.float32)
    with build_store(table.settings, table.url) as writer, writer.connect() as conn:
        with pytest.raises(ModelMismatch, match="now takes model 'model-b'"):
            writer.write_vectors(conn, [1, 2], [vec, vec], provenance=Provenance("all-minilm", 384, 2000))
        assert writer.write_vectors(conn, [3], [vec], provenance=Provenance("model-b:latest", 384, 2000)) == 1
    assert table.sql(f"SELECT id FROM {table.settings.table} WHERE embedding IS NOT NULL") == [(3,)]


def test_a_backfill_racing_a_swap_ends_model_changed_and_writes_nothing_of_the_old_model(make_table, ollama):
    table = make_table(batch_size=4)
    table.load([(i, f"t {i}") for i in range(1, 9)])
    table.backfill(max_chunks=4)  # all-minilm is the live model
    ollama.set_faults(latency_ms=1200)  # the next run's start-up probe takes seconds

    def swap_meanwhile() -> None:
        time.sleep(0.4)
        swap_to(table, "model-b")

    swapper = threading.Thread(target=swap_meanwhile)
    swapper.start()
    try:
        report = table.backfill()
    except ModelMismatch:
        report = None  # refused at its start: equally safe
    swapper.join()
    if report is not None:
        assert report.state == "model_changed" and report.exit_code == 8 and report.embedded == 0, report.message
    assert table.store.recorded_model()[0] == "model-b"
    assert table.sql(f"SELECT count(*) FROM {table.settings.table} WHERE embedding IS NOT NULL") == [(0,)]


def test_status_check_fails_while_vectors_of_another_model_are_live(make_table):
    table = make_table()
    table.load([(1, "one")])
    table.backfill()
    table.store.record_model("some-other-model", 384, replace=True)
    code, out = run_cli(table, "status", "--check")
    assert "missing=0" in out and "stale_model=1" in out
    assert code == 1, "--check never passes with stale vectors"


# ------------------------------------------------------------------------------------------ 2. row locks


def test_a_chunk_whose_row_another_session_locks_is_not_waited_on_and_the_run_ends_locked(make_table):
    table = make_table(batch_size=8, busy_wait_sec=1.5)
    table.load([(i, f"t {i}") for i in range(1, 17)])
    holder = psycopg.connect(table.url)
    try:
        holder.execute(f"SELECT 1 FROM {table.settings.table} WHERE id = 5 FOR UPDATE")  # held, never committed
        started = time.monotonic()
        report = table.backfill()
        elapsed = time.monotonic() - started
        assert report.state == "locked" and report.exit_code == 7 and report.locked == 1, report.message
        assert "1 chunks locked by another session" in report.message
        assert report.embedded == 15 and report.failed == 0 and elapsed < 20
        assert table.store.list_failures() == [], "a locked row is not the chunk's fault"
    finally:
        holder.rollback()
        holder.close()
    again = table.backfill()
    assert again.state == "completed" and again.embedded == 1 and table.status()["missing"] == 0


def test_a_row_lock_released_during_the_run_is_retried_at_its_end(make_table):
    table = make_table(batch_size=8, busy_wait_sec=20)
    table.load([(i, f"t {i}") for i in range(1, 17)])
    holder = psycopg.connect(table.url)
    holder.execute(f"SELECT 1 FROM {table.settings.table} WHERE id = 9 FOR UPDATE")
    timer = threading.Timer(2.0, lambda: (holder.rollback(), holder.close()))
    timer.start()
    report = table.backfill()
    timer.join()
    assert report.state == "completed" and report.embedded == 16, report.message
    assert table.status()["missing"] == 0 and wrong_vectors(table) == []


# ------------------------------------------------------------------------------------------ 3. write errors


def test_a_row_the_database_refuses_is_isolated_and_the_rest_of_its_batch_written(make_table):
    table = make_table(batch_size=64, max_attempts=2)
    table.load([(i, f"t {i}") for i in range(1, 65)])
    table.sql(
        "CREATE FUNCTION {s}.refuse_42() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NEW.id = 42 THEN RAISE EXCEPTION 'chunk 42 is frozen by policy'; END IF; RETURN NEW; END $$".format(
            s=table.settings.table.split(".")[0]
        )
    )
    table.sql(
        f"CREATE TRIGGER refuse_42 BEFORE UPDATE ON {table.settings.table} FOR EACH ROW"
        f" EXECUTE FUNCTION {table.settings.table.split('.')[0]}.refuse_42()"
    )
    report = table.backfill()
    assert report.state == "completed" and report.embedded == 63 and report.failed_ids == [42], report.message
    failure = table.store.list_failures()[0]
    assert failure["error"] == "write_error" and "frozen by policy" in failure["message"]
    assert wrong_vectors(table) == []
    assert table.backfill().failed_ids == [42]  # a later run tries it again...
    status = table.status()
    assert status["missing"] == 1 and status["quarantined"] == 1  # ...then it is quarantined


# ------------------------------------------------------------------------------------------ 4. claim keys


@pytest.mark.parametrize(
    "ids",
    [
        list(range(-40, 0)),
        [2**40 + i for i in range(40)],
        [-(2**62) + i for i in range(20)] + [2**62 + i for i in range(20)],
    ],
    ids=["negative", "huge", "mixed"],
)
def test_runs_on_several_tables_at_once_never_skip_each_others_chunks(make_table, ids):
    tables = [make_table(batch_size=8) for _ in range(3)]
    for table in tables:
        table.load([(i, f"{table.settings.table} {i}") for i in ids])
    reports: list = []
    threads = [threading.Thread(target=lambda t=t: reports.append(t.backfill())) for t in tables]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for table in tables:
        assert table.status()["missing"] == 0, table.settings.table
        assert wrong_vectors(table) == []
    assert all(r.state == "completed" for r in reports), [r.message for r in reports]


def test_a_busy_claim_key_delays_a_chunk_and_never_ends_the_run_completed(make_table):
    """Another session holds the very claim key of chunk 3 (a collision, or a run that hangs on it)."""
    table = make_table(batch_size=4, busy_wait_sec=1.0)
    table.load([(i, f"t {i}") for i in range(1, 9)])
    holder = psycopg.connect(table.url, autocommit=True)
    try:
        namespace = table.store.table.lock_namespace
        holder.execute("SELECT pg_advisory_lock(hashtextextended(%s || '3', 0))", (namespace,))
        report = table.backfill()
        assert report.state == "locked" and report.locked == 1 and report.embedded == 7, report.message
    finally:
        holder.close()
    assert table.backfill().state == "completed" and table.status()["missing"] == 0


# ------------------------------------------------------------------------------------------ 2. deadlines


@pytest.fixture
def proxy(pg_url):
    from wiki_embeddings_tests.integration.test_faults_support import SilentableProxy

    p = SilentableProxy(pg_url)
    yield p
    p.close()


def _start_through(table, proxy, tmp_path, **env):
    from wiki_embeddings_tests.integration.test_faults_support import cli_env, start_cli

    extra = {
        "DATABASE_URL": proxy.url,
        "WIKI_EMBED_DB_STATEMENT_TIMEOUT_SEC": "2",
        "WIKI_EMBED_DB_RECONNECT_SEC": "4",
        **env,
    }
    log = tmp_path / "run.log"
    return start_cli(table, "backfill", "--batch-size", "8", env=cli_env(table, **extra), log=log), log


def _wait_filled(table, at_least: int) -> None:
    from wiki_embeddings_tests.integration.test_faults_support import filled, wait_until

    wait_until(lambda: filled(table) >= at_least, 60, f"{at_least} chunks written")


def test_a_black_holed_database_is_detected_within_its_deadline_and_the_run_exits_5(
    make_table, ollama, proxy, tmp_path
):
    table = make_table()
    table.load([(i, f"t {i}") for i in range(1, 401)])
    ollama.set_faults(latency_ms=30)
    proc, log = _start_through(table, proxy, tmp_path)
    _wait_filled(table, 16)
    proxy.silent.set()  # the network goes silent: no answer, no reset
    started = time.monotonic()
    code = proc.wait(90)
    elapsed = time.monotonic() - started
    out = log.read_text()
    assert code == 5, out
    assert "could not reconnect within 4 s" in out and "Traceback" not in out
    assert elapsed < 45, (
        f"bounded by the client's deadline and WIKI_EMBED_DB_RECONNECT_SEC, not by TCP: {elapsed:.0f} s"
    )
    assert table.store.list_failures() == []


def test_sigterm_is_honoured_within_seconds_while_the_database_does_not_answer(make_table, ollama, proxy, tmp_path):
    import signal

    table = make_table()
    table.load([(i, f"t {i}") for i in range(1, 401)])
    ollama.set_faults(latency_ms=30)
    proc, log = _start_through(table, proxy, tmp_path, WIKI_EMBED_DB_STATEMENT_TIMEOUT_SEC="120")
    _wait_filled(table, 16)
    proxy.silent.set()
    time.sleep(1.0)  # the run is now waiting on a database that never answers
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    assert time.monotonic() - started < 12, "stop is honoured within seconds whatever the run waits on"
    assert code == 0 and "stopped on request" in log.read_text()


def test_status_never_shows_running_with_a_frozen_heartbeat():
    from datetime import UTC, datetime, timedelta

    from wiki_embeddings.core.status import RUN_LEASE_SEC, run_state

    now = datetime.now(UTC)
    fresh = {"state": "running", "alive": True, "heartbeat_at": now}
    frozen = {"state": "running", "alive": True, "heartbeat_at": now - timedelta(seconds=RUN_LEASE_SEC + 1)}
    assert run_state(fresh) == "running" and run_state(frozen) == "stalled"
    assert run_state({**frozen, "alive": False}) == "abandoned"


def test_every_pipeline_connection_bounds_its_statements_and_lock_waits(make_table):
    table = make_table()
    with build_store(table.settings, table.url) as store, store.connect(statement_timeout_sec=7) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('statement_timeout', 'lock_timeout')"
            ).fetchall()
        )
    assert settings == {"statement_timeout": "7000", "lock_timeout": "10000"}
