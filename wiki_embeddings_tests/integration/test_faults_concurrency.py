"""Concurrency: bootstrap backfills, a maintenance run and a Dagster range run at once on overlapping ids.

Each chunk is embedded exactly once (the server counts the texts it embedded), written exactly once
(PostgreSQL counts the row updates), no run deadlocks, and the runs' own counts add up exactly.
"""

from __future__ import annotations

import importlib.util
import subprocess

import pytest

from wiki_embeddings.core.backfill import WINDOW_PROBE_TEXTS
from wiki_embeddings.core.status import collect_status
from wiki_embeddings_tests.integration.test_faults_support import (
    advisory_locks,
    cli_env,
    dagster_materialize,
    kill9,
    start_cli,
    updates_counted,
    wait_until,
    wrong_vectors,
)

ROWS = 2400
DAGSTER = importlib.util.find_spec("wiki_embeddings.definitions") is not None


@pytest.mark.slow
def test_overlapping_runs_embed_and_write_each_chunk_exactly_once_without_deadlock(make_table, ollama, tmp_path):
    table = make_table()
    table.load([(i, f"shared chunk {i}") for i in range(1, ROWS + 1)])
    # 10 ms per text: a Dagster range run (no fixed sleep, self-tuning depth) takes seconds, so the others overlap it.
    ollama.set_faults(latency_ms=15, per_text_ms=10, slots=4)
    ollama.reset_stats()
    procs: dict[str, subprocess.Popen] = {}
    try:
        if DAGSTER:  # started first: its process takes seconds to load, the others then overlap with it
            from wiki_embeddings.defs.partitions import range_key

            home = tmp_path / "dagster_home"
            home.mkdir()
            procs["dagster range"] = subprocess.Popen(
                dagster_materialize(range_key(0)),
                env=cli_env(table, DAGSTER_HOME=str(home)),
                stdout=open(tmp_path / "dagster.log", "wb"),  # noqa: SIM115 - the child owns it
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            wait_until(
                lambda: table.sql(
                    f"SELECT 1 FROM {table.store.state_schema}.runs WHERE table_name = %s AND mode LIKE 'dagster%%'"
                    " AND state = 'running'",
                    (table.store.table.qualified,),
                ),
                120,
                "the Dagster run to start",
            )
        for name, args in {
            "bootstrap 1": ["backfill", "--batch-size", "16"],
            "bootstrap 2": ["backfill", "--batch-size", "64", "--concurrency", "2"],
            "ranged": ["backfill", "--batch-size", "16", "--id-min", "600", "--id-max", "1800"],
            "maintenance": ["backfill", "--batch-size", "32", "--max-chunks", "300"],
        }.items():
            procs[name] = start_cli(table, *args, log=tmp_path / f"{name}.log")
        codes = {name: proc.wait(180) for name, proc in procs.items()}  # a deadlock would time out here
    finally:
        for proc in procs.values():
            kill9(proc)
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    for name, code in codes.items():
        if name != "dagster range":  # it may end 'held by another run' for chunks still in flight elsewhere
            assert code == 0, (name, logs)

    status = collect_status(table.store, table.settings)
    assert status["missing"] == 0 and status["failed"] == 0
    runs = table.sql(
        f"SELECT mode, state, embedded, options->>'max_chunks' FROM {table.store.state_schema}.runs"
        " WHERE table_name = %s ORDER BY run_id",
        (table.store.table.qualified,),
    )
    assert len(runs) == len(procs) and {r[1] for r in runs} <= {"completed", "max_chunks"}, runs
    assert sum(r[2] for r in runs) == ROWS, f"the runs' counts add up exactly: {runs}"
    assert [r[2] <= 300 for r in runs if r[3] == "300"] == [True], "maintenance stays within --max-chunks"
    # Each text reached the model once; the only extra texts are each run's start-up probes (length, window).
    assert ollama.stats()["texts_embedded"] == ROWS + len(runs) * (1 + WINDOW_PROBE_TEXTS)
    wait_until(lambda: updates_counted(table) >= ROWS, 10, "the statistics of every run")
    assert updates_counted(table) == ROWS, "each row written once"
    assert wrong_vectors(table) == []
    # A session's locks go when its backend notices the process is gone: asynchronous, so give it a moment.
    wait_until(lambda: not advisory_locks(table), 10, "the runs' locks to go with their sessions")
