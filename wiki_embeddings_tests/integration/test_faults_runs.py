"""Runs you can see and release (issue 21, item 2): a backfill frozen (SIGSTOP) while holding claims shows in
`status` as stalled with its host, pid and heartbeat age; `runs release` ends its sessions so another run completes;
woken (SIGCONT), the released run ends without writing anything, with exit code 9."""

from __future__ import annotations

import json
import os
import signal
import socket

from wiki_embeddings.core.db.runs import run_session_name
from wiki_embeddings.core.status import collect_status, format_status
from wiki_embeddings.defs.metadata import status_metadata
from wiki_embeddings_tests.integration.test_faults_support import advisory_locks, filled, run_cli, start_cli, wait_until


def _count_writes(table) -> None:
    """Every row the table's UPDATEs touch is logged (an exact witness, unlike the statistics' n_tup_upd)."""
    schema = table.settings.table.split(".")[0]
    table.sql(f"CREATE TABLE {schema}.write_log (id bigint, at timestamptz DEFAULT clock_timestamp())")
    table.sql(
        f"CREATE FUNCTION {schema}.log_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" INSERT INTO {schema}.write_log (id) VALUES (NEW.id); RETURN NEW; END $$"
    )
    table.sql(
        f"CREATE TRIGGER log_write AFTER UPDATE ON {table.settings.table} FOR EACH ROW"
        f" EXECUTE FUNCTION {schema}.log_write()"
    )


def _reap(proc) -> None:
    """A backfill a failed assertion left running is killed, so no test leaves a process behind."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _writes(table) -> int:
    return int(table.sql(f"SELECT count(*) FROM {table.settings.table.split('.')[0]}.write_log")[0][0])


def _run_row(table, run_id: int) -> tuple:
    return table.sql(
        f"SELECT state, heartbeat_at, embedded, message FROM {table.settings.state_schema}.runs WHERE run_id = %s",
        (run_id,),
    )[0]


def test_a_frozen_run_is_seen_stalled_released_by_an_operator_and_ends_without_writing_when_it_wakes(
    make_table, ollama, tmp_path
):
    table = make_table(batch_size=8, busy_wait_sec=1.0)
    table.load([(i, f"paragraph {i} of a frozen run") for i in range(1, 97)])
    _count_writes(table)
    ollama.set_faults(latency_ms=600, slots=0)  # batches in flight while it freezes
    proc = start_cli(table, "backfill", "--batch-size", "8", "--concurrency", "2", log=tmp_path / "frozen.log")
    try:
        wait_until(lambda: filled(table) >= 8 and table.store.held_claims(), 60, "the run to hold claims mid-run")
        os.kill(proc.pid, signal.SIGSTOP)  # a paused VM, a debugger, a network gone silent: no heartbeat any more
        run_id = int(table.sql(f"SELECT max(run_id) FROM {table.settings.state_schema}.runs")[0][0])
        missing = {r[0] for r in table.sql(f"SELECT id FROM {table.settings.table} WHERE embedding IS NULL")}
        held = [cid for cid in table.store.held_claims() if cid in missing]  # (written ones it has not let go yet)
        assert held, "the frozen run holds claims of missing chunks"
        # 100 s without a heartbeat, as a frozen process leaves it (the lease is 90 s).
        table.sql(
            f"UPDATE {table.settings.state_schema}.runs SET heartbeat_at = now() - interval '100 seconds'"
            " WHERE run_id = %s",
            (run_id,),
        )

        # status: every existing key, plus running_runs and the run's id, host, pid, heartbeat age; locked is now.
        status = json.loads(run_cli(table, "status", "--json").stdout)
        assert status["running_runs"] == 1 and status["last_run_state"] == "stalled"
        (seen,) = status["runs_in_flight"]
        assert (seen["run_id"], seen["state"], seen["host"], seen["pid"]) == (
            run_id,
            "stalled",
            socket.gethostname(),
            proc.pid,
        )
        assert seen["heartbeat_age_s"] >= 100 and "last_run_servers" in status
        assert status["locked"] == len(held), "chunks whose claim a session holds right now"
        text = run_cli(table, "status").stdout.splitlines()
        assert "running_runs=1" in text and f"locked={len(held)}" in text
        line = next(x for x in text if x.startswith(f"running_run_{run_id}="))
        assert "state=stalled" in line and f"pid={proc.pid}" in line and f"host={socket.gethostname()}" in line
        metadata = status_metadata(collect_status(table.store, table.settings))
        assert metadata["running_runs"].value == 1
        assert metadata["runs_in_flight"].records[0].data["pid"] == proc.pid  # Dagster shows the same
        listed = run_cli(table, "runs").stdout.splitlines()
        assert listed[0].split("\t")[:2] == ["run_id", "state"] and listed[1].split("\t")[:2] == [
            str(run_id),
            "stalled",
        ]

        # Before the release its chunks stay held: another run ends `locked`.
        locked_run = table.backfill(busy_wait_sec=0.5)
        assert locked_run.state == "locked"

        refused = run_cli(table, "runs", "release", "999999")
        assert refused.returncode == 2 and "no run 999999" in refused.stderr
        released = run_cli(table, "runs", "release", str(run_id))
        assert released.returncode == 0, released.stdout + released.stderr
        assert f"run {run_id} released" in released.stdout
        assert not [lock for lock in advisory_locks(table) if lock[0] == "claim"], "its claims are free"
        assert not table.sql(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s", (run_session_name(run_id),)
        ), "its sessions ended"
        assert _run_row(table, run_id)[0] == "released"
        assert json.loads(run_cli(table, "status", "--json").stdout)["running_runs"] == 0
        # Its `embedded` is what it wrote (counted as each write commits), not its last heartbeat's figure: it froze
        # before its first beat (10 s), which left 0.
        wrote = _writes(table) - locked_run.embedded
        assert wrote >= 8 and _run_row(table, run_id)[2] == wrote
        listed = {r["run_id"]: r for r in json.loads(run_cli(table, "runs", "--json").stdout)}
        assert listed[run_id]["state"] == "released" and listed[run_id]["embedded"] == wrote

        ollama.set_faults(latency_ms=0)
        again = table.backfill()
        assert again.state == "completed" and table.status()["missing"] == 0, again.message
        writes_before, row_before = _writes(table), _run_row(table, run_id)
        failures_before = table.sql(f"SELECT count(*) FROM {table.settings.state_schema}.failures")

        # It wakes: its next write, heartbeat or stop check sees `released`; it ends without writing.
        os.kill(proc.pid, signal.SIGCONT)
        code = proc.wait(60)
    finally:
        _reap(proc)
    out = (tmp_path / "frozen.log").read_text()
    assert code == 9, out
    assert "released by an operator" in out and "Traceback" not in out
    assert _writes(table) == writes_before, "the released run wrote nothing after it woke"
    assert _run_row(table, run_id) == row_before, "its row stays as the release wrote it"
    assert table.sql(f"SELECT count(*) FROM {table.settings.state_schema}.failures") == failures_before
    assert run_cli(table, "runs", "release", str(run_id)).stdout.startswith(f"run {run_id} is released: nothing")


def test_a_running_run_is_not_released_without_force_and_status_shows_it(make_table, ollama, tmp_path):
    table = make_table(batch_size=8)
    table.load([(i, f"chunk {i}") for i in range(1, 401)])
    ollama.set_faults(latency_ms=300)
    # One request at a time: ~15 s of runway, so the run is still going when `runs release` (a new process) asks on a
    # loaded machine; the latency drops to 0 once it has been refused.
    proc = start_cli(table, "backfill", "--batch-size", "8", "--concurrency", "1", log=tmp_path / "live.log")
    try:
        wait_until(lambda: filled(table) >= 8, 60, "the run to write")
        run_id = int(table.sql(f"SELECT max(run_id) FROM {table.settings.state_schema}.runs")[0][0])
        status = collect_status(table.store, table.settings)
        assert status["running_runs"] == 1 and status["runs_in_flight"][0]["state"] == "running"
        assert f"running_run_{run_id}=state=running" in format_status(status)
        refused = run_cli(table, "runs", "release", str(run_id))
        assert refused.returncode == 2 and "is running" in refused.stderr and "--force" in refused.stderr
        ollama.set_faults(latency_ms=0)
        assert proc.wait(60) == 0
    finally:
        _reap(proc)
    done = json.loads(run_cli(table, "status", "--json").stdout)
    assert done["running_runs"] == 0 and done["runs_in_flight"] == [] and done["locked"] == 0
    assert run_cli(table, "runs", "release", str(run_id)).returncode == 0, "a finished run: nothing to do"


def test_a_running_run_released_with_force_says_so_and_counts_what_it_wrote(make_table, ollama, tmp_path):
    """`runs release --force` on a live run (issue 21's minor findings): nothing says "while stalled", and the
    released run's `embedded` in status is what it wrote before the release, not 0."""
    table = make_table(batch_size=8)
    table.load([(i, f"chunk {i} of a forced release") for i in range(1, 81)])
    _count_writes(table)
    ollama.set_faults(latency_ms=400)
    proc = start_cli(table, "backfill", "--batch-size", "8", log=tmp_path / "forced.log")
    try:
        wait_until(lambda: filled(table) >= 8, 60, "the run to write")
        run_id = int(table.sql(f"SELECT max(run_id) FROM {table.settings.state_schema}.runs")[0][0])
        released = run_cli(table, "runs", "release", str(run_id), "--force")
        assert released.returncode == 0 and f"run {run_id} released" in released.stdout, released.stderr
        assert "stalled" not in released.stdout
        code = proc.wait(60)
    finally:
        _reap(proc)
    out = (tmp_path / "forced.log").read_text()
    assert code == 9 and "released by an operator" in out and "stalled" not in out, out
    state, _, embedded, message = _run_row(table, run_id)
    assert (
        state == "released"
        and message == "released by an operator while running, with --force; its sessions were ended"
    )
    assert embedded == _writes(table) == filled(table) > 0, "what it wrote before the release, every write counted"
    status = json.loads(run_cli(table, "status", "--json").stdout)
    assert status["last_run_state"] == "released" and status["last_run_embedded"] == embedded
