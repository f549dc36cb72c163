"""Swap faults: an index build interrupted half-way, and two swaps at once.

A `CREATE INDEX CONCURRENTLY` whose session dies leaves an INVALID index: never used by a query, yet (once it
reached the "ready" step) maintained on every write. It must not follow the shadow column under the live name;
status reports it while it exists. Two `migrate-model --swap` at once are serialized: the loser says so.
"""

from __future__ import annotations

import json
import threading

import psycopg
import pytest

from wiki_embeddings_tests.integration.test_cli import run_cli
from wiki_embeddings_tests.integration.test_faults_support import start_cli, wait_until


def _migrated(make_table):
    """A table embedded with the test model, an operator's HNSW index on the live column, and a complete shadow
    column filled with the `tiny` model: ready to swap."""
    table = make_table()
    name = table.settings.table
    table.load([(i, f"section {i} of the article") for i in range(1, 41)])
    assert table.backfill().state == "completed"
    table.sql(f"CREATE INDEX {table.store.table.name}_search ON {name} USING hnsw (embedding vector_cosine_ops)")
    code, out = run_cli(table, "migrate-model", "--to", "tiny")
    assert code == 0, out
    return table


def _invalid(table) -> list[tuple[str, bool]]:
    return table.sql(
        "SELECT c.relname::text, ix.indisready FROM pg_index ix JOIN pg_class c ON c.oid = ix.indexrelid"
        " WHERE ix.indrelid = %s::regclass AND NOT ix.indisvalid ORDER BY 1",
        (table.settings.table,),
    )


def _phase(table, pid: int) -> str | None:
    rows = table.sql("SELECT phase FROM pg_stat_progress_create_index WHERE pid = %s", (pid,))
    return rows[0][0] if rows else None


def _waiting_on_locks(table) -> int:
    """Sessions of the tool waiting for a lock (a build waiting for writers, a statement for a table lock)."""
    return table.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'wiki-embeddings' AND wait_event_type = 'Lock'"
    )[0][0]


def _leave_an_interrupted_build(table, index: str) -> None:
    """An HNSW build on the shadow column whose backend is terminated after the index became ready (so it is
    maintained on writes) and before it was validated: what a kill -9 of a swap mid-build leaves."""
    name = table.settings.table
    blocker = psycopg.connect(table.url)  # a writer's open transaction holds the build at its first wait
    blocker.execute(f"UPDATE {name} SET title = title WHERE id = 1")
    builder = psycopg.connect(table.url, autocommit=True)
    pid = builder.info.backend_pid
    errors: list[BaseException] = []

    def build() -> None:
        try:
            builder.execute(f"CREATE INDEX CONCURRENTLY {index} ON {name} USING hnsw (embedding_next vector_l2_ops)")
        except psycopg.Error as exc:
            errors.append(exc)

    thread = threading.Thread(target=build)
    thread.start()
    try:
        wait_until(lambda: _phase(table, pid) == "waiting for writers before build", 30, "the build's first wait")
        second = psycopg.connect(table.url)  # a writer that began after it: the build waits again before validating
        second.execute(f"UPDATE {name} SET title = title WHERE id = 2")
        blocker.commit()
        wait_until(lambda: _phase(table, pid) == "waiting for writers before validation", 30, "the second wait")
        table.sql("SELECT pg_terminate_backend(%s)", (pid,))
        thread.join(30)
        second.commit()
        second.close()
    finally:
        blocker.close()
        builder.close()
    assert errors, "the build was terminated"
    assert _invalid(table) == [(index, True)], "INVALID, and ready: maintained on every write"


def test_an_index_left_invalid_by_an_interrupted_build_is_reported_and_dropped_by_the_next_swap(make_table):
    table = _migrated(make_table)
    dead = f"{table.store.table.name}_embedding_next_hnsw_idx"
    _leave_an_interrupted_build(table, dead)

    code, out = run_cli(table, "status", "--json")
    assert code == 0, out
    status = json.loads(out)
    assert status["invalid_indexes"] == 1 and status["invalid_index_names"] == dead

    code, out = run_cli(table, "migrate-model", "--swap", "--force")
    assert code == 0, out
    assert f"dropped INVALID index {dead}" in out
    assert _invalid(table) == [], "no INVALID index follows the shadow under the live name"
    live = table.store.vector_index_specs()
    assert [s["name"] for s in live] == [f"{table.store.table.name}_search"]
    assert [s["name"] for s in table.store.vector_index_specs("embedding_prev")] == [dead], "rebuilt, same name"
    code, out = run_cli(table, "status")
    assert code == 0 and "invalid_indexes=0\n" in out


def test_an_invalid_index_already_on_the_live_column_is_dropped_by_the_next_migrate_command(make_table):
    table = _migrated(make_table)
    name = table.settings.table
    # What the old swap left: the dead build swapped in under the live name. Made INVALID the way a failed
    # concurrent build leaves it (a unique build that meets duplicates), on the live column.
    table.sql(f"UPDATE {name} SET embedding = (SELECT embedding FROM {name} WHERE id = 1) WHERE id = 2")
    dead = f"{table.store.table.name}_embedding_unique_idx"
    with pytest.raises(psycopg.errors.UniqueViolation):
        table.sql(f"CREATE UNIQUE INDEX CONCURRENTLY {dead} ON {name} ((embedding::text))")
    assert [r[0] for r in _invalid(table)] == [dead]
    code, out = run_cli(table, "status")
    assert code == 0 and "invalid_indexes=1\n" in out and f"invalid_index_names={dead}\n" in out

    code, out = run_cli(table, "migrate-model", "--swap", "--force")
    assert code == 0, out
    assert _invalid(table) == []


def test_two_simultaneous_swaps_are_serialized_and_the_loser_says_the_swap_already_happened(make_table, tmp_path):
    table = _migrated(make_table)
    name = table.settings.table
    # A writer's open transaction holds the first swap inside its index build, so the second surely overlaps it.
    blocker = psycopg.connect(table.url)
    blocker.execute(f"UPDATE {name} SET title = title WHERE id = 1")
    logs = [tmp_path / "swap1.log", tmp_path / "swap2.log"]
    procs = []
    try:
        procs.append(start_cli(table, "migrate-model", "--swap", "--force", log=logs[0]))
        wait_until(lambda: table.sql("SELECT count(*) FROM pg_stat_progress_create_index")[0][0] >= 1, 60, "build 1")
        procs.append(start_cli(table, "migrate-model", "--swap", "--force", log=logs[1]))
        wait_until(
            lambda: (
                "waiting for it to end" in logs[1].read_text()
                or _waiting_on_locks(table) >= 2  # (before the fix: both builds, one behind the other's lock)
            ),
            60,
            "the second swap to reach the first",
        )
        blocker.commit()
        codes = [p.wait(60) for p in procs]
    finally:
        blocker.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    outs = [log.read_text() for log in logs]
    assert codes == [0, 0], outs
    assert "swapped:" in outs[0]
    assert "another swap or rollback" in outs[1] and "finished while this one waited" in outs[1], outs[1]
    assert "holds model 'tiny'" in outs[1]
    assert "deadlock" not in outs[1] and "does not exist" not in outs[1]
    assert table.store.recorded_model()[0] == "tiny"
    assert [s["name"] for s in table.store.vector_index_specs()] == [f"{table.store.table.name}_search"]
    assert _invalid(table) == []
    assert len(table.store.vector_index_specs("embedding_prev")) == 1
