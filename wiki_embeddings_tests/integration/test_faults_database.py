"""Database faults: PostgreSQL restarted or gone during a run, and a write killed inside its transaction.

These restart or stop the session's PostgreSQL itself; each test waits until it is back, so the tests after
them (and the other sessions' stores, which reconnect) see a working server.
"""

from __future__ import annotations

import threading

import pytest

from wiki_embeddings.core.status import collect_status
from wiki_embeddings.devtools import embedded_postgres
from wiki_embeddings_tests.integration.test_faults_support import (
    FilledWatcher,
    advisory_locks,
    cli_env,
    filled,
    kill9,
    run_cli,
    start_cli,
    wait_until,
    wrong_vectors,
)

BATCH = 16


def _back(pg_data_dir, table) -> None:
    embedded_postgres.ensure_running(pg_data_dir)
    table.store.close()  # its session died with the server; the next call reconnects


def _crash_and_start(pg_data_dir) -> None:
    embedded_postgres.kill(pg_data_dir)  # immediate shutdown: no checkpoint, crash recovery from the WAL
    embedded_postgres.ensure_running(pg_data_dir)


@pytest.mark.slow
@pytest.mark.parametrize("restart", [embedded_postgres.restart, _crash_and_start], ids=["fast-restart", "crash"])
def test_postgres_restarted_mid_run_the_run_reconnects_and_finishes(make_table, ollama, pg_data_dir, restart):
    table = make_table(batch_size=BATCH)
    rows = 40 * BATCH
    table.load([(i, f"chunk {i} about the Han river") for i in range(1, rows + 1)])
    ollama.set_faults(latency_ms=30)
    log = table.tmp / "restart.log"
    with FilledWatcher(table) as watcher:
        # Two requests in flight: several stages share the claim connection and all see it die at once.
        args = ("backfill", "--batch-size", str(BATCH), "--report-every", "5", "--concurrency", "2")
        proc = start_cli(table, *args, log=log)
        try:
            wait_until(lambda: filled(table) >= 4 * BATCH, 60, "the first batches")
            committed = filled(table)
            restart(pg_data_dir)  # every session is terminated
            _back(pg_data_dir, table)
            assert filled(table) >= committed, "every committed batch survived"
            assert proc.wait(120) == 0, log.read_text()
        finally:
            kill9(proc)
    out = log.read_text()
    assert "database connection lost" in out and "backfill completed" in out
    status = collect_status(table.store, table.settings)
    assert status["missing"] == 0 and status["failed"] == 0 and status["last_run_state"] == "completed"
    assert wrong_vectors(table) == []
    assert all(n % BATCH == 0 for n in watcher.seen), sorted(watcher.seen)
    assert not advisory_locks(table)


@pytest.mark.slow
def test_postgres_gone_longer_than_the_reconnect_window_stops_the_run_with_one_clear_line(
    make_table, ollama, pg_data_dir
):
    table = make_table(batch_size=BATCH)
    rows = 40 * BATCH
    table.load([(i, f"chunk {i}") for i in range(1, rows + 1)])
    ollama.set_faults(latency_ms=30)
    env = cli_env(table, WIKI_EMBED_DB_RECONNECT_SEC="1")
    log = table.tmp / "gone.log"
    proc = start_cli(table, "backfill", "--batch-size", str(BATCH), env=env, log=log)
    try:
        wait_until(lambda: filled(table) >= 2 * BATCH, 60, "the first batches")
        embedded_postgres.stop(pg_data_dir)
        code = proc.wait(60)
    finally:
        kill9(proc)
        _back(pg_data_dir, table)
    out = log.read_text()
    assert code == 5, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not reconnect within 1 s" in errors[0], out
    assert "Traceback" not in out
    status = collect_status(table.store, table.settings)
    assert status["failed"] == 0 and status["embedded"] % BATCH == 0
    assert status["last_run_state"] == "abandoned", "its end could not be recorded; its session is gone"
    again = run_cli(table, "backfill", "--batch-size", str(BATCH))
    assert again.returncode == 0, again.stdout + again.stderr
    assert collect_status(table.store, table.settings)["missing"] == 0
    assert wrong_vectors(table) == []


def test_a_write_killed_inside_its_transaction_leaves_none_of_its_batch_and_is_written_whole_after(
    make_table, ollama, pg_url
):
    table = make_table(batch_size=BATCH, backoff_base_sec=0.05)
    table.load([(i, f"text {i}") for i in range(1, 2 * BATCH + 1)])
    # A trigger makes the write of row 10 take a long time: the run's first write has updated rows 1..9 in its
    # transaction when it is killed. (A row lock would not do: writes skip locked rows and retry them later.)
    schema = table.settings.table.split(".")[0]
    table.sql(f"CREATE TABLE {schema}.slow_flag AS SELECT 1 AS on")
    table.sql(
        f"CREATE FUNCTION {schema}.slow_10() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.id = 10 AND"
        f" EXISTS (SELECT 1 FROM {schema}.slow_flag) THEN PERFORM pg_sleep(60); END IF; RETURN NEW; END $$"
    )
    table.sql(
        f"CREATE TRIGGER slow_10 BEFORE UPDATE ON {table.settings.table}"
        f" FOR EACH ROW EXECUTE FUNCTION {schema}.slow_10()"
    )
    result: list = []
    with FilledWatcher(table) as watcher:
        runner = threading.Thread(target=lambda: result.append(table.backfill()))
        runner.start()
        try:
            writer = wait_until(
                lambda: table.sql(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'"
                    " AND query LIKE '%%UPDATE%%SET%%' AND query LIKE %s",
                    (f"%{schema}%",),
                ),
                30,
                "the write to be inside its transaction",
            )[0][0]
            assert filled(table) == 0, "rows 1..9 are written but not committed: nobody sees them"
            table.sql(f"DELETE FROM {schema}.slow_flag")  # the retried write goes through at once
            table.sql("SELECT pg_terminate_backend(%s)", (writer,))
            wait_until(
                lambda: not table.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (writer,)), 10, "the kill"
            )
            assert filled(table) == 0, "the killed transaction left none of its batch"
        finally:
            runner.join(60)
    report = result[0]
    assert report.state == "completed" and report.embedded == 2 * BATCH and report.failed == 0, report.message
    assert wrong_vectors(table) == []
    assert watcher.seen <= {0, BATCH, 2 * BATCH}, sorted(watcher.seen)
