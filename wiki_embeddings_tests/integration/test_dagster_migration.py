"""Issue 6 from the Dagster UI: start a change of model, every range filled by itself, the swap when configured,
coverage of the new model visible throughout, and maintenance keeping the shadow filled."""

from __future__ import annotations

import uuid

import dagster as dg
import pytest

from wiki_embeddings.core.status import collect_status
from wiki_embeddings.defs import migration as migration_defs
from wiki_embeddings.defs.config import RangeRunConfig
from wiki_embeddings.defs.migration import (
    StartMigrationConfig,
    after_swap_sensor,
    fill_migration_after_start_sensor,
    model_swap_sensor,
)
from wiki_embeddings.defs.resources import ReadinessResource
from wiki_embeddings_tests.integration.dagster_support import (
    FIRST,
    SECOND,
    definitions_for,
    maintenance_config,
    resources_for,
)
from wiki_embeddings_tests.integration.test_model_change import NOMIC, assert_vectors_of

FILL = dg.RunConfig(ops={"fill_shadow_range": RangeRunConfig(sleep_ms=0, batch_size=8)})


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def start_config(model: str, **kw) -> dg.RunConfig:
    return dg.RunConfig(ops={"start_model_migration": StartMigrationConfig(to_model=model, **kw)})


def after_success(sensor, instance, result, resources):
    """Evaluate a run-status sensor on the success event of `result`, as the daemon would."""
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        dagster_event=result.get_run_success_event(),
        resources=resources,
    )
    return sensor(context)


def migration_status(table) -> dict:
    return collect_status(table.store, table.settings)


def test_an_operator_changes_the_model_from_the_ui_and_the_swap_happens_when_the_shadow_is_complete(
    make_table, ollama, instance
):
    table = make_table()
    table.load([(i, f"chunk {i}") for i in range(1, 21)] + [(150_000 + i, f"later chunk {i}") for i in range(5)])
    assert table.backfill().state == "completed"
    resources = resources_for(table, ollama)
    defs = definitions_for(resources)

    # 1. Launch the start job with the target model: the shadow column is added, the live column untouched.
    started = defs.resolve_job_def("start_model_migration_job").execute_in_process(
        instance=instance, run_config=start_config(NOMIC)
    )
    assert started.success
    observed = [e.event_specific_data.asset_observation.metadata for e in started.all_events if e.is_asset_observation]
    assert observed[0]["migration_model"].value == NOMIC and observed[0]["migration_missing"].value == 25
    assert table.store.migration_target() == (NOMIC, "embedding_next")
    status = migration_status(table)
    assert status["model"] == "all-minilm" and status["coverage_pct"] == "100.00", "search keeps serving"
    assert status["migration_model"] == NOMIC and status["migration_coverage_pct"] == "0.00"

    # 2. The sensor queues the fill of every range that holds chunks, one run per range.
    requests = after_success(fill_migration_after_start_sensor, instance, started, resources)
    assert [r.partition_key for r in requests] == [FIRST, SECOND]
    assert all(r.run_key.startswith(started.run_id) for r in requests), "one request per start run and range"

    # 3. The swap sensor waits while the shadow is incomplete, then while a fill run is in flight.
    swap_context = dg.build_sensor_context(instance=instance, resources=resources)
    waiting = model_swap_sensor(swap_context)
    assert isinstance(waiting, dg.SkipReason) and "not complete (missing=25" in waiting.skip_message
    job = defs.resolve_job_def("model_migration_job")
    for request in requests:
        filled = job.execute_in_process(instance=instance, partition_key=request.partition_key, run_config=FILL)
        assert filled.success
    assert migration_status(table)["migration_coverage_pct"] == "100.00"
    in_flight = instance.add_run(
        dg.DagsterRun(job_name="model_migration_job", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED)
    )
    busy = model_swap_sensor(swap_context)
    assert isinstance(busy, dg.SkipReason) and in_flight.run_id in busy.skip_message
    instance.report_run_failed(in_flight)

    # 4. Complete and idle: the swap is requested once per migration (a stable run key), and runs.
    request = model_swap_sensor(swap_context)
    assert isinstance(request, dg.RunRequest) and request.run_key.startswith(f"swap:{NOMIC}:")
    assert model_swap_sensor(swap_context).run_key == request.run_key
    assert_vectors_of(table, "all-minilm", 384), "nothing changed for readers before the swap"
    swapped = defs.resolve_job_def("model_swap_job").execute_in_process(instance=instance)
    assert swapped.success
    assert_vectors_of(table, NOMIC, 768)
    status = migration_status(table)
    assert status["model"] == NOMIC and status["missing"] == 0 and status["migration_model"] == ""

    # 5. After the swap the backend is told the new model (env file + restart command), and coverage and its
    #    check are refreshed so readiness judges the new model.
    env_file = table.tmp / ".env.beta"
    env_file.write_text("WIKI_EMBEDDINGS_READY=true\nWIKI_EMBEDDINGS_MODEL=all-minilm\n")
    marker = table.tmp / "restarted"
    after = {**resources, "readiness": ReadinessResource(env_file=str(env_file), restart_cmd=f"touch {marker}")}
    refresh = after_success(after_swap_sensor, instance, swapped, after)
    assert isinstance(refresh, dg.RunRequest) and swapped.run_id in refresh.run_key
    assert env_file.read_text() == f"WIKI_EMBEDDINGS_READY=true\nWIKI_EMBEDDINGS_MODEL={NOMIC}\n"
    assert marker.exists(), "the backend was restarted to embed queries with the new model"
    done = model_swap_sensor(swap_context)
    assert isinstance(done, dg.SkipReason) and "no model migration in progress" in done.skip_message


def test_the_start_job_refuses_the_live_model_and_a_second_target_clearly(make_table, ollama, instance):
    table = make_table()
    table.load([(1, "one"), (2, "two")])
    assert table.backfill().state == "completed"
    defs = definitions_for(resources_for(table, ollama))
    job = defs.resolve_job_def("start_model_migration_job")
    same = job.execute_in_process(instance=instance, run_config=start_config("all-minilm"), raise_on_error=False)
    assert not same.success and not table.store.column_exists("embedding_next")
    assert job.execute_in_process(instance=instance, run_config=start_config(NOMIC)).success
    again = job.execute_in_process(instance=instance, run_config=start_config(NOMIC))
    assert again.success, "starting the same migration again is repeat-safe"
    other = job.execute_in_process(instance=instance, run_config=start_config("tiny"), raise_on_error=False)
    assert not other.success
    failure = [e for e in other.all_events if e.is_step_failure][0].step_failure_data.user_failure_data
    assert f"a migration to {NOMIC!r} is in progress" in failure.description
    assert table.store.migration_target() == (NOMIC, "embedding_next")


def test_no_fill_is_queued_when_the_operator_asks_to_launch_it_himself(make_table, ollama, instance):
    table = make_table()
    table.load([(1, "one")])
    assert table.backfill().state == "completed"
    resources = resources_for(table, ollama)
    started = (
        definitions_for(resources)
        .resolve_job_def("start_model_migration_job")
        .execute_in_process(instance=instance, run_config=start_config(NOMIC, fill_all_ranges=False))
    )
    skipped = after_success(fill_migration_after_start_sensor, instance, started, resources)
    assert isinstance(skipped, dg.SkipReason) and "fill_all_ranges=false" in skipped.skip_message


def test_maintenance_during_a_migration_fills_both_columns_so_new_chunks_never_hold_the_swap_back(
    make_table, ollama, instance
):
    table = make_table()
    name = table.settings.table
    table.load([(i, f"chunk {i}") for i in range(1, 11)])
    assert table.backfill().state == "completed"
    resources = resources_for(table, ollama)
    defs = definitions_for(resources)
    assert (
        defs.resolve_job_def("start_model_migration_job")
        .execute_in_process(instance=instance, run_config=start_config(NOMIC))
        .success
    )
    assert defs.resolve_job_def("model_migration_job").execute_in_process(
        instance=instance, partition_key=FIRST, run_config=FILL
    )
    table.sql(f"INSERT INTO {name} (id, content) VALUES (11, 'added during the migration')")
    table.sql(f"UPDATE {name} SET content = 'edited during the migration' WHERE id = 3")
    assert migration_status(table)["migration_missing"] == 1

    result = defs.resolve_job_def("maintenance_job").execute_in_process(
        instance=instance, run_config=maintenance_config(table)
    )
    assert result.success
    meta = result.asset_materializations_for_node("wiki_chunk_embeddings_maintenance")[0].metadata
    assert meta["embedded"].value == 1 and meta["migration_embedded"].value == 1
    assert meta["migration_refreshed"].value == 1, "the edited chunk is re-embedded in the shadow too"
    assert_vectors_of(table, "all-minilm", 384)
    assert_vectors_of(table, NOMIC, 768, column="embedding_next")
    coverage = result.asset_materializations_for_node("embedding_coverage")[0].metadata
    assert coverage["migration_model"].value == NOMIC and coverage["migration_coverage_pct"].value == 100.0
    assert coverage["model"].value == "all-minilm" and coverage["coverage_pct_text"].value == "100.00"


def test_the_runbook_maintenance_command_also_fills_the_shadow(make_table, ollama):
    from wiki_embeddings_tests.integration.test_cli import run_cli, status_of

    table = make_table()
    table.load([(i, f"chunk {i}") for i in range(1, 6)])
    assert run_cli(table, "backfill", "--model", "all-minilm")[0] == 0
    assert run_cli(table, "migrate-model", "--to", NOMIC)[0] == 0
    table.sql(f"INSERT INTO {table.settings.table} (id, content) VALUES (6, 'a late chunk')")
    code, out = run_cli(table, "backfill", "--max-chunks", "100")
    assert code == 0, out
    assert "migrate (maintenance)" in out
    status = status_of(table)
    assert status["missing"] == "0" and status["migration_missing"] == "0"
    assert status["migration_model"] == NOMIC and status["migration_coverage_pct"] == "100.00"
    assert_vectors_of(table, NOMIC, 768, column="embedding_next")


@pytest.mark.parametrize(
    ("value", "status"), [("true", "RUNNING"), ("1", "RUNNING"), ("", "STOPPED"), ("no", "STOPPED")]
)
def test_the_swap_sensor_runs_by_itself_only_when_configured(monkeypatch, value, status):
    monkeypatch.setenv(migration_defs.AUTO_SWAP_ENV, value)
    assert migration_defs._auto_swap_default().name == status
