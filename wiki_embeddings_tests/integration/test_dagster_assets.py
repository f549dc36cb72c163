"""The runbook, run through Dagster: ranges filled, failures isolated, stop and resume, the done-check.

Real PostgreSQL + pgvector and the Ollama-protocol server over HTTP; assets executed in-process.
"""

import threading
import time

import dagster as dg
import pytest

from wiki_embeddings.core.failure_log import read_entries
from wiki_embeddings.defs.assets import embedding_coverage, missing_wiki_chunks, wiki_chunk_embeddings
from wiki_embeddings.defs.checks import missing_is_zero
from wiki_embeddings.defs.config import RangeRunConfig
from wiki_embeddings.defs.outcomes import EmbeddingServiceUnavailable
from wiki_embeddings.defs.partitions import LAST_RANGE_ID, key_bounds, key_for_id, range_key
from wiki_embeddings.defs.resources import WikiDatabaseResource
from wiki_embeddings_tests.integration.dagster_support import (
    FIRST,
    SECOND,
    definitions_for,
    failure_of,
    maintenance_config,
    range_config,
    resources_for,
)


@pytest.fixture
def instance():
    inst = dg.DagsterInstance.ephemeral()
    yield inst
    inst.dispose()


def materialized(instance: dg.DagsterInstance) -> set[str]:
    return set(instance.get_materialized_partitions(wiki_chunk_embeddings.key))


def run_range(table, ollama, instance, key: str, **config) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [wiki_chunk_embeddings],
        partition_key=key,
        resources=resources_for(table, ollama),
        run_config=range_config(table, **config),
        instance=instance,
        raise_on_error=False,
    )


def test_partition_keys_are_fixed_width_id_ranges():
    assert range_key(0) == FIRST and range_key(100_000) == SECOND
    assert key_bounds(SECOND) == (100_000, 199_999)
    assert key_for_id(1) == FIRST and key_for_id(1_000_001) == "01000000-01099999"
    assert key_for_id(LAST_RANGE_ID + 1) is None


def test_materializing_two_ranges_fills_them_one_range_at_a_time(make_table, ollama, instance):
    table = make_table()
    table.load([(i, f"first range chunk {i}") for i in range(1, 41)])
    table.load([(100_000 + i, f"second range chunk {i}") for i in range(1, 21)])

    first = run_range(table, ollama, instance, FIRST)
    assert first.success
    meta = first.asset_materializations_for_node("wiki_chunk_embeddings")[0].metadata
    assert meta["embedded"].value == 40 and meta["failed"].value == 0 and meta["remaining"].value == 0
    assert meta["model"].value == "all-minilm" and meta["chunks_per_s"].value > 0
    assert table.store.count_missing(0, 99_999) == 0
    assert table.store.count_missing(100_000, 199_999) == 20, "only the partition's ids are touched"

    assert run_range(table, ollama, instance, SECOND).success
    assert table.status()["missing"] == 0
    assert materialized(instance) == {FIRST, SECOND}


def test_a_poisoned_chunk_fails_its_range_after_everything_else_is_written(make_table, ollama, instance):
    table = make_table()
    table.load([(i, "this chunk holds the POISON marker" if i == 7 else f"chunk {i}") for i in range(1, 31)])
    ollama.set_faults(error_marker="POISON")

    result = run_range(table, ollama, instance, FIRST)

    assert not result.success
    failure = failure_of(result)
    assert "1 failed in this run" in failure.description
    assert table.settings.failure_log in failure.description
    assert failure.metadata["failed"].value == 1 and failure.metadata["embedded"].value == 29
    assert table.store.count_missing(0, 99_999) == 1
    assert [e["chunk_id"] for e in read_entries(table.settings.failure_log)] == [7]
    assert FIRST not in materialized(instance), "a range with a missing chunk is not complete"
    retries = [e for e in result.all_events if e.event_type_value in ("STEP_UP_FOR_RETRY", "STEP_RESTARTED")]
    assert retries == [], "a chunk failure is not retried by the RetryPolicy"
    observations = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    assert observations, "what the failed run did stays visible on the partition"

    ollama.reset_faults()
    again = run_range(table, ollama, instance, FIRST)
    assert again.success and FIRST in materialized(instance)
    metadata = again.asset_materializations_for_node("wiki_chunk_embeddings")[0].metadata
    assert metadata["embedded"].value == 1
    servers = metadata["servers"].value  # each model server's standing as the run ended (issue 20)
    assert [s["state"] for s in servers] == ["in"] and servers[0]["url"] == ollama.url


def test_a_stop_file_ends_a_range_after_its_batch_and_resume_job_lets_it_finish(make_table, ollama, instance):
    table = make_table()
    table.load([(i, f"text {i}") for i in range(1, 101)])
    ollama.set_faults(latency_ms=40)
    stop_file = table.tmp / "wiki-embed.stop"

    def stop_soon() -> None:
        deadline = time.monotonic() + 30
        while table.status()["embedded"] < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        stop_file.write_text("stop")

    stopper = threading.Thread(target=stop_soon)
    stopper.start()
    stopped = run_range(table, ollama, instance, FIRST, batch_size=5)
    stopper.join()

    assert not stopped.success
    failure = failure_of(stopped)
    assert "stopped on request" in failure.description and "resume_job" in failure.description
    embedded = failure.metadata["embedded"].value
    assert 10 <= embedded < 100 and embedded % 5 == 0, "only whole batches were written"
    assert FIRST not in materialized(instance)

    defs = definitions_for(resources_for(table, ollama))
    assert defs.resolve_job_def("resume_job").execute_in_process(instance=instance).success
    assert not stop_file.exists()
    ollama.reset_faults()
    resumed = run_range(table, ollama, instance, FIRST)
    assert resumed.success and table.status()["missing"] == 0
    assert FIRST in materialized(instance)


def test_stop_job_stops_the_next_range_run_at_once(make_table, ollama, instance):
    table = make_table()
    table.load([(i, f"text {i}") for i in range(1, 11)])
    defs = definitions_for(resources_for(table, ollama))
    assert defs.resolve_job_def("stop_job").execute_in_process(instance=instance).success
    assert table.store.stop_requested()

    stopped = run_range(table, ollama, instance, FIRST)
    assert not stopped.success and failure_of(stopped).metadata["embedded"].value == 0

    assert defs.resolve_job_def("resume_job").execute_in_process(instance=instance).success
    assert not table.store.stop_requested()
    assert run_range(table, ollama, instance, FIRST).success


def coverage_and_check(table, ollama, instance) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [embedding_coverage, missing_is_zero],
        resources=resources_for(table, ollama),
        instance=instance,
        raise_on_error=False,
    )


def test_the_check_fails_while_anything_is_missing_and_passes_at_zero(make_table, ollama, instance):
    table = make_table()
    beyond = LAST_RANGE_ID + 5  # past the last range: only maintenance reaches it
    table.load([(i, f"chunk {i}") for i in range(1, 21)] + [(beyond, "a chunk past the last range")])
    assert run_range(table, ollama, instance, FIRST).success

    before = coverage_and_check(table, ollama, instance)
    evaluation = before.get_asset_check_evaluations()[0]
    assert not evaluation.passed
    assert evaluation.metadata["missing"].value == 1
    worst = evaluation.metadata["worst_ranges"]
    assert isinstance(worst, dg.TableMetadataValue)
    assert [(r.data["range"], r.data["missing"]) for r in worst.records] == [("past 9999999", 1)]
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR, "nothing runs: a real problem"
    coverage = before.asset_materializations_for_node("embedding_coverage")[0].metadata
    assert coverage["missing"].value == 1 and coverage["total"].value == 21
    assert coverage["coverage_pct"].value == pytest.approx(95.23)

    defs = definitions_for(resources_for(table, ollama))
    todo = dg.materialize([missing_wiki_chunks], resources=resources_for(table, ollama), instance=instance)
    todo_meta = todo.asset_materializations_for_node("missing_wiki_chunks")[0].metadata
    assert todo_meta["dagster/row_count"].value == 1 and todo_meta["missing_past_last_range"].value == 1

    maintenance = defs.resolve_job_def("maintenance_job").execute_in_process(
        instance=instance, run_config=maintenance_config(table)
    )
    assert maintenance.success
    filled = maintenance.asset_materializations_for_node("wiki_chunk_embeddings_maintenance")[0].metadata
    assert filled["embedded"].value == 1
    check = maintenance.get_asset_check_evaluations()[0]
    assert check.passed and check.metadata["missing"].value == 0
    final = maintenance.asset_materializations_for_node("embedding_coverage")[0].metadata
    assert final["coverage_pct"].value == 100.0 and final["coverage_pct_text"].value == "100.00"
    observed = [e for e in maintenance.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    assert observed and observed[0].asset_key == dg.AssetKey("wiki_chunks")


def test_maintenance_skips_quarantined_chunks_unless_asked(make_table, ollama, instance):
    table = make_table(max_attempts=1)
    table.load([(1, "fine"), (2, "BAD chunk")])
    ollama.set_faults(bad_request_marker="BAD")
    table.backfill()
    assert table.status()["quarantined"] == 1
    ollama.reset_faults()
    defs = definitions_for(resources_for(table, ollama))
    job = defs.resolve_job_def("maintenance_job")

    plain = job.execute_in_process(instance=instance, run_config=maintenance_config(table), raise_on_error=False)
    assert plain.asset_materializations_for_node("wiki_chunk_embeddings_maintenance")[0].metadata["embedded"].value == 0
    assert table.status()["missing"] == 1

    deliberate = job.execute_in_process(
        instance=instance, run_config=maintenance_config(table, retry_quarantined=True), raise_on_error=False
    )
    assert deliberate.success and table.status()["missing"] == 0


def test_coverage_is_refreshed_automatically_after_a_range_is_written(make_table, ollama, instance):
    table = make_table()
    table.load([(i, f"chunk {i}") for i in range(1, 6)])
    resources = resources_for(table, ollama)
    defs = definitions_for(resources)
    check = dg.AssetCheckKey(embedding_coverage.key, "missing_is_zero")
    live = {missing_wiki_chunks.key, embedding_coverage.key, check}

    def requested(result) -> set:
        return {r.key for r in result.results if r.true_subset.size}

    # A new instance gets its first picture with no click (no "upstream never materialized" on a launch).
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert requested(first) == live
    assert dg.materialize(
        [missing_wiki_chunks, embedding_coverage, missing_is_zero], resources=resources, instance=instance
    ).success
    idle = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert idle.total_requested == 0, "nothing changed: nothing to refresh"

    assert run_range(table, ollama, instance, FIRST).success
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=idle.cursor)
    # Coverage and its check, in one run, although the other 99 ranges were never materialized.
    assert after.get_num_requested(embedding_coverage.key) == 1
    assert requested(after) == {embedding_coverage.key, dg.AssetCheckKey(embedding_coverage.key, "missing_is_zero")}

    # A change of the table seen by the state sensor (a new data version of wiki_chunks) refreshes all three.
    assert dg.materialize([embedding_coverage, missing_is_zero], resources=resources, instance=instance).success
    quiet = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=after.cursor)
    assert quiet.total_requested == 0
    instance.report_runless_asset_event(
        dg.AssetObservation(asset_key="wiki_chunks", tags={"dagster/data_version": "55:55:50"})
    )
    changed = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=quiet.cursor)
    assert requested(changed) == live


def test_a_dead_server_is_left_to_the_retry_policy_and_marks_nothing_failed(make_table, ollama, monkeypatch):
    monkeypatch.setenv("WIKI_EMBED_BACKOFF_BASE_SEC", "0.01")
    monkeypatch.setenv("WIKI_EMBED_BACKOFF_MAX_SEC", "0.05")
    table = make_table()
    table.load([(i, f"chunk {i}") for i in range(1, 11)])
    ollama.set_faults(down=True)
    # Invoked directly, so the policy's 30 s+ waits are not sat through; the policy itself is asserted.
    context = dg.build_asset_context(partition_key=FIRST, resources=resources_for(table, ollama))
    with pytest.raises(EmbeddingServiceUnavailable, match="server_unavailable"):
        list(wiki_chunk_embeddings(context, RangeRunConfig(sleep_ms=0, failure_log=table.settings.failure_log)))
    policy = wiki_chunk_embeddings.op.retry_policy
    assert policy.max_retries == 3 and policy.backoff == dg.Backoff.EXPONENTIAL
    assert table.status()["failed"] == 0 and table.status()["missing"] == 10, "the chunks are fine"


def test_a_single_run_over_a_range_of_partitions_embeds_their_ids(make_table, ollama, instance):
    table = make_table()
    table.load([(5, "first"), (100_005, "second"), (200_005, "third, not selected")])
    result = dg.materialize(
        [wiki_chunk_embeddings],
        tags={"dagster/asset_partition_range_start": FIRST, "dagster/asset_partition_range_end": SECOND},
        resources=resources_for(table, ollama),
        run_config=range_config(table),
        instance=instance,
    )
    assert result.success
    assert materialized(instance) == {FIRST, SECOND}
    assert table.store.count_missing() == 1 and table.store.count_missing(200_000, 299_999) == 1


def test_an_unreachable_database_is_transient_and_its_password_never_shown(make_table, ollama, monkeypatch):
    monkeypatch.setenv("WIKI_EMBED_DB_RECONNECT_SEC", "0.5")
    table = make_table()
    resources = resources_for(table, ollama)
    resources["database"] = WikiDatabaseResource(
        database_url="postgresql://wiki:S3cr%40tPW@127.0.0.1:1/wiki?connect_timeout=2",
        table=table.settings.table,
        stop_file=table.settings.stop_file,
    )
    context = dg.build_asset_context(partition_key=FIRST, resources=resources)
    with pytest.raises(EmbeddingServiceUnavailable) as raised:
        list(wiki_chunk_embeddings(context, RangeRunConfig(sleep_ms=0, failure_log=table.settings.failure_log)))
    assert "S3cr" not in str(raised.value) and raised.value.__cause__ is None and raised.value.__suppress_context__


def test_the_shipped_resources_take_their_settings_from_the_environment(make_table, ollama, instance, monkeypatch):
    from wiki_embeddings.definitions import build_resources

    table = make_table()
    table.load([(i, f"chunk {i}") for i in range(1, 6)])
    for var, value in {
        "DATABASE_URL": table.url,
        "OLLAMA_URL": ollama.url,
        "OLLAMA_MODEL": "all-minilm",
        "WIKI_EMBED_TABLE": table.settings.table,
        "EMBED_STOP_FILE": table.settings.stop_file,
    }.items():
        monkeypatch.setenv(var, value)
    resources = build_resources()
    assert isinstance(resources["database"].database_url, dg.EnvVar), "the UI shows the variable, not the URL"
    result = dg.materialize(
        [wiki_chunk_embeddings],
        partition_key=FIRST,
        resources=resources,
        run_config=range_config(table),
        instance=instance,
    )
    assert result.success and table.status()["missing"] == 0
