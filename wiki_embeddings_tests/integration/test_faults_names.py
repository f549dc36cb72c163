"""Model names that would write into status and the env file (issue 21, item 3), through the real CLI, PostgreSQL,
Dagster's after-swap sensor and bash. The rules themselves: unit/test_model_names.py."""

from __future__ import annotations

import json
import subprocess

import dagster as dg
import pytest

from wiki_embeddings.defs.migration import after_swap_sensor
from wiki_embeddings.defs.resources import ReadinessResource, WikiDatabaseResource
from wiki_embeddings_tests.integration.test_faults_support import cli_env, run_cli

INJECTION = "m3\nmissing=0\ncoverage_pct=100.00"


def _record_model(table, name: str) -> None:
    """What an old version left: a live model name it never checked."""
    table.sql(
        f"UPDATE {table.settings.state_schema}.table_state SET model = %s WHERE table_name = %s",
        (name, table.store.table.qualified),
    )


def _sourced(env_file, key: str) -> str:
    """`source` the env file with bash in its directory, as a backend's start script would; the key's value."""
    done = subprocess.run(
        ["bash", "-c", f'set -a; source {env_file.name}; printf %s "${key}"'],
        cwd=env_file.parent,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return done.stdout


def test_migrate_model_to_a_name_holding_newlines_is_refused_with_exit_2_and_nothing_recorded(make_table, ollama):
    table = make_table()
    table.load([(i, f"chunk {i}") for i in range(1, 6)])
    ollama.reset_stats()
    done = run_cli(table, "migrate-model", "--to", INJECTION)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: the target model (--to / to_model): ") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert table.store.migration_target() == (None, None) and not table.store.column_exists("embedding_next")
    assert ollama.stats()["embed_requests"] == 0, "refused before the server was asked"
    status = run_cli(table, "status").stdout.splitlines()
    assert [line for line in status if line.startswith(("missing=", "coverage_pct="))] == [
        "missing=5",
        "coverage_pct=0.00",
    ]
    bad_env = run_cli(table, "status", env=cli_env(table, OLLAMA_MODEL="all-minilm\ncoverage_pct=100.00"))
    assert bad_env.returncode == 2 and "OLLAMA_MODEL" in bad_env.stderr and bad_env.stdout == ""


def test_status_escapes_a_name_an_old_version_recorded(make_table):
    table = make_table()
    table.load([(i, f"chunk {i}") for i in range(1, 6)])
    assert table.backfill().state == "completed"
    table.sql(f"UPDATE {table.settings.table} SET embedding = NULL WHERE id = 5")
    _record_model(table, INJECTION)
    out = run_cli(table, "status").stdout
    lines = out.splitlines()
    assert [line for line in lines if line.startswith("missing=")] == ["missing=1"]
    assert [line for line in lines if line.startswith("coverage_pct=")] == ["coverage_pct=80.00"]
    assert "model=m3\\nmissing=0\\ncoverage_pct=100.00" in lines
    assert json.loads(run_cli(table, "status", "--json").stdout)["model"] == INJECTION, "JSON keeps the value"


def _after_swap(table, env_file, instance) -> dg.RunRequest:
    """after_swap_sensor on a finished run, as the daemon would evaluate it after model_swap_job."""

    @dg.op
    def swapped() -> None:
        pass

    @dg.job
    def model_swap_stand_in() -> None:
        swapped()

    result = model_swap_stand_in.execute_in_process(instance=instance)
    s = table.settings
    context = dg.build_run_status_sensor_context(
        sensor_name=after_swap_sensor.name,
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        dagster_event=result.get_run_success_event(),
        resources={
            "database": WikiDatabaseResource(database_url=s.database_url, table=s.table),
            "readiness": ReadinessResource(env_file=str(env_file)),
        },
    )
    return after_swap_sensor(context)


@pytest.mark.parametrize("style", ["", "'", '"'])
def test_the_after_swap_sensor_never_writes_a_name_that_sourcing_the_env_file_could_run(make_table, tmp_path, style):
    table = make_table()
    table.load([(1, "one")])
    assert table.backfill().state == "completed"
    env_file = tmp_path / ".env.beta"
    env_file.write_text(f"WIKI_EMBEDDINGS_READY=true\nWIKI_EMBEDDINGS_MODEL={style}all-minilm{style}\n")
    with dg.instance_for_test() as instance:
        _record_model(table, "m;touch FILE")
        request = _after_swap(table, env_file, instance)
        assert isinstance(request, dg.RunRequest)
        written = env_file.read_text()
        if style == '"':  # a double-quoted line keeps its quotes: `;` means nothing there
            assert 'WIKI_EMBEDDINGS_MODEL="m;touch FILE"' in written
        else:  # bare is not safe for it: single quotes
            assert "WIKI_EMBEDDINGS_MODEL='m;touch FILE'" in written
        assert _sourced(env_file, "WIKI_EMBEDDINGS_MODEL") == "m;touch FILE"
        assert not (tmp_path / "FILE").exists(), "sourcing the file ran nothing"

        before = env_file.read_bytes()
        _record_model(table, "m'\n;touch FILE\nWIKI_EMBEDDINGS_READY=false")
        request = _after_swap(table, env_file, instance)
        assert isinstance(request, dg.RunRequest), "coverage is still refreshed"
        assert env_file.read_bytes() == before, "refused: the file is unchanged"
        assert _sourced(env_file, "WIKI_EMBEDDINGS_READY") == "true"
        assert not (tmp_path / "FILE").exists()
