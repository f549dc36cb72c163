"""Process faults: a backfill killed with SIGKILL mid-request loses nothing, writes nothing twice, leaves no claim.

Runs are real `wiki-embeddings backfill` processes (`python -m wiki_embeddings.cli`) against the session
PostgreSQL and the Ollama-protocol server, killed with `kill -9` while a request is in flight.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import threading
import time

import pytest

from wiki_embeddings.core.status import collect_status
from wiki_embeddings_tests.integration.test_faults_support import (
    FilledWatcher,
    advisory_locks,
    cli_env,
    dagster_materialize,
    filled,
    kill9,
    run_cli,
    start_cli,
    updates_counted,
    wait_until,
    wrong_vectors,
)

BATCH = 16
ROWS = 400  # a multiple of BATCH: every committed state is a whole number of batches


def test_kill_9_mid_request_then_a_rerun_fills_everything_once_and_leaves_no_claim(make_table, ollama):
    table = make_table(batch_size=BATCH)
    table.load([(i, f"paragraph {i} on the rivers of Korea") for i in range(1, ROWS + 1)])
    ollama.set_faults(latency_ms=150)  # every request is in flight for 150 ms: the kill lands mid-request
    args = ("backfill", "--batch-size", str(BATCH), "--report-every", "1")

    with FilledWatcher(table) as watcher:
        proc = start_cli(table, *args, log=table.tmp / "killed.log")
        try:
            wait_until(lambda: filled(table) >= 3 * BATCH, 60, "the first batches to be written")
            # While it runs, status shows a live run.
            live = collect_status(table.store, table.settings)
            assert live["last_run_state"] == "running"
            before = filled(table)
            wait_until(lambda: filled(table) > before, 10, "one more batch")
            time.sleep(0.04)  # just after a commit: the next batch is on the wire for another ~110 ms
        finally:
            kill9(proc)
        assert proc.returncode == -9
        at_kill = filled(table)
        assert 0 < at_kill < ROWS

        # The killed process's sessions end with it, and every claim and the run's lock with them.
        wait_until(lambda: not advisory_locks(table), 10, "the killed run's advisory locks to go")
        dead = collect_status(table.store, table.settings)
        assert dead["last_run_state"] == "abandoned", dead
        assert dead["last_run_heartbeat"], "the last heartbeat of the dead run is shown"
        assert dead["missing"] == ROWS - at_kill and dead["failed"] == 0
        assert wrong_vectors(table) == [], "what the killed run committed is correct"

        ollama.reset_faults()
        again = run_cli(table, *args)
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"embedded={ROWS - at_kill} failed=0" in again.stdout

    status = collect_status(table.store, table.settings)
    assert status["missing"] == 0 and status["coverage_pct"] == "100.00" and status["last_run_state"] == "completed"
    assert wrong_vectors(table) == []
    assert not advisory_locks(table)
    # Nothing written twice: PostgreSQL counted exactly one row update per chunk over both runs
    # (the write is `UPDATE ... WHERE embedding IS NULL`, so a second write of a row would be counted or refused).
    wait_until(lambda: updates_counted(table) >= ROWS, 10, "the statistics of both runs")
    time.sleep(0.5)
    assert updates_counted(table) == ROWS
    # No partial batch was ever visible, during the kill or the re-run.
    assert all(n % BATCH == 0 for n in watcher.seen), sorted(watcher.seen)
    runs = table.sql(f"SELECT state FROM {table.store.state_schema}.runs WHERE table_name = %s ORDER BY run_id",
                     (table.store.table.qualified,))  # fmt: skip
    assert [r[0] for r in runs] == ["abandoned", "completed"], "the re-run recorded the killed run as abandoned"


def test_a_graceful_sigterm_ends_after_the_batch_in_flight_with_state_stopped(make_table, ollama):
    """The contrast to kill -9: SIGTERM (what a container stop sends first) is the stop file's path."""
    table = make_table(batch_size=BATCH)
    table.load([(i, f"text {i}") for i in range(1, ROWS + 1)])
    ollama.set_faults(latency_ms=100)
    proc = start_cli(table, "backfill", "--batch-size", str(BATCH), log=table.tmp / "term.log")
    try:
        wait_until(lambda: filled(table) >= BATCH, 60, "a first batch")
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        kill9(proc)
    status = collect_status(table.store, table.settings)
    assert status["last_run_state"] == "stopped"
    assert status["embedded"] % BATCH == 0 and 0 < status["embedded"] < ROWS
    assert not advisory_locks(table)


DAGSTER_MISSING = importlib.util.find_spec("wiki_embeddings.definitions") is None


@pytest.mark.slow
@pytest.mark.skipif(DAGSTER_MISSING, reason="wiki_embeddings/definitions.py (the Dagster layer) does not exist yet")
def test_a_dagster_partition_run_killed_mid_run_is_completed_by_a_rerun(make_table, ollama, tmp_path):
    from wiki_embeddings.defs.partitions import range_key

    table = make_table(batch_size=BATCH)
    table.load([(i, f"ranged text {i}") for i in range(1, ROWS + 1)])
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    env = cli_env(table, DAGSTER_HOME=str(dagster_home), WIKI_EMBED_FAILURE_LOG=str(tmp_path / "dagster-f.jsonl"))
    cmd = dagster_materialize(range_key(0))
    ollama.set_faults(latency_ms=150)
    with FilledWatcher(table) as watcher:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            wait_until(lambda: filled(table) >= 2 * BATCH, 120, "the Dagster run to write its first batches")
            time.sleep(0.04)
        finally:
            # The whole process group: `dagster asset materialize` runs the step in its own process.
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            proc.wait(10)
        at_kill = filled(table)
        assert at_kill < ROWS
        wait_until(lambda: not advisory_locks(table), 15, "the killed Dagster run's advisory locks to go")
        assert collect_status(table.store, table.settings)["last_run_state"] == "abandoned"
        ollama.reset_faults()
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert collect_status(table.store, table.settings)["missing"] == 0
    assert wrong_vectors(table) == []
    wait_until(lambda: updates_counted(table) >= ROWS, 10, "the statistics of both runs")
    time.sleep(0.5)
    assert updates_counted(table) == ROWS
    assert all(n % BATCH == 0 for n in watcher.seen), sorted(watcher.seen)


@pytest.mark.parametrize("stage", ["write_vectors", "claim", "record_failure"])
def test_an_unexpected_error_in_one_stage_ends_the_run_instead_of_hanging_it(make_table, ollama, monkeypatch, stage):
    """A bug (or an unforeseen error) in the writer, the claim loop or the bookkeeping stops the whole run."""
    from wiki_embeddings.core.db import Store

    table = make_table(batch_size=4)
    table.load([(i, "POISON" if i == 2 else f"text {i}") for i in range(1, 41)])
    ollama.set_faults(error_marker="POISON")

    def broken(*_a, **_k):
        raise ValueError("simulated bug")

    monkeypatch.setattr(Store, stage, broken)
    result: list = []
    runner = threading.Thread(target=lambda: result.append(table.backfill()), daemon=True)
    runner.start()
    runner.join(30)
    assert not runner.is_alive(), f"the run hung after an error in {stage}"
    monkeypatch.undo()
    report = result[0]
    assert report.state == "error" and report.exit_code == 1
    assert "unexpected error" in report.message and "ValueError: simulated bug" in report.message
    # Its claims were given back: its sessions are closed (a closed backend leaves pg_locks a moment later).
    wait_until(lambda: not advisory_locks(table), 5, "its claims to be given back")
    assert collect_status(table.store, table.settings)["last_run_state"] == "error"
