"""Operator misuse: the table dropped under a run, an id column that is not an integer, an absurd batch size.

Each ends in one clear line and a recorded end state, never a half-recorded run or an error from deep in SQL.
"""

from __future__ import annotations

import pytest

from wiki_embeddings.settings import MAX_BATCH_SIZE, Settings
from wiki_embeddings_tests.integration.test_faults_support import cli_env, filled, run_cli, start_cli, wait_until


def test_dropping_the_table_mid_run_ends_the_run_table_gone_and_finishes_its_row(make_table, ollama, tmp_path):
    table = make_table()
    name = table.settings.table
    table.load([(i, f"text {i}") for i in range(1, 401)])
    ollama.set_faults(latency_ms=100)
    log = tmp_path / "run.log"
    proc = start_cli(table, "backfill", "--batch-size", "16", log=log)
    try:
        wait_until(lambda: filled(table) >= 32, 60, "a few batches")
        table.sql(f"DROP TABLE {name}")
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = log.read_text()
    assert code == 1, out  # not 2 (a configuration error): the run started and ended in a recorded state
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out
    assert f"the chunk table {name} or its column 'embedding' disappeared during the run" in errors[0]
    runs = table.sql(
        f"SELECT state, finished_at IS NOT NULL, message FROM {table.settings.state_schema}.runs WHERE table_name = %s",
        (name,),
    )
    assert len(runs) == 1
    state, finished, message = runs[0]
    assert (state, finished) == ("table_gone", True), runs
    assert "disappeared during the run" in message


@pytest.mark.parametrize("id_type", ["text", "uuid", "numeric"])
def test_an_id_column_that_is_not_an_integer_is_refused_before_anything_is_sent(make_table, ollama, id_type):
    table = make_table()
    schema = table.settings.table.split(".")[0]
    other = f"{schema}.odd_ids"
    value = {"text": "'a' || g", "uuid": "gen_random_uuid()", "numeric": "g + 0.5"}[id_type]
    table.sql(f"CREATE TABLE {other} (id {id_type} PRIMARY KEY, content text NOT NULL, embedding vector(384))")
    table.sql(f"INSERT INTO {other} (id, content) SELECT {value}, 'text ' || g FROM generate_series(1, 20) g")
    ollama.reset_stats()
    env = cli_env(table, WIKI_EMBED_TABLE=other)
    for command in (["backfill"], ["status"]):
        result = run_cli(table, *command, env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.strip() == (
            f"error: id column {other}.id is {id_type}; it must be smallint, integer or bigint (set "
            "WIKI_EMBED_ID_COLUMN / --id-column to an integer key); nothing was sent"
        )
    assert ollama.stats()["embed_requests"] == 0, "refused before anything was sent"
    assert table.sql(f"SELECT count(*) FROM {other} WHERE embedding IS NOT NULL") == [(0,)]
    runs = table.sql(f"SELECT count(*) FROM {table.settings.state_schema}.runs WHERE table_name = %s", (other,))
    assert runs == [(0,)], "no run recorded"


@pytest.mark.parametrize("size", [str(MAX_BATCH_SIZE + 1), "10000000000000000000"])
def test_an_absurd_batch_size_is_refused_with_its_bound(make_table, ollama, size):
    table = make_table()
    table.load([(i, f"text {i}") for i in range(1, 11)])
    ollama.reset_stats()
    result = run_cli(table, "backfill", "--batch-size", size)
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"error: batch-size must be at most {MAX_BATCH_SIZE} chunks per request, got {size}"
    )
    assert "out of range" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert ollama.stats()["embed_requests"] == 0 and filled(table) == 0
    assert Settings(batch_size=MAX_BATCH_SIZE).validate().batch_size == MAX_BATCH_SIZE
