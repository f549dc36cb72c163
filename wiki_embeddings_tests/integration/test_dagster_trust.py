"""Drift as a readiness condition (vectors_match_model), the swap job's quality gate and run windows, in Dagster."""

from __future__ import annotations

import dagster as dg
import pytest

from wiki_embeddings.core import migration
from wiki_embeddings.core.readiness import read_flag
from wiki_embeddings.defs.assets import embedding_coverage
from wiki_embeddings.defs.checks import missing_is_zero
from wiki_embeddings.defs.migration import SwapConfig
from wiki_embeddings.defs.resources import ReadinessResource
from wiki_embeddings.defs.trust import VECTORS_MATCH, vectors_match_model
from wiki_embeddings_tests.integration.dagster_support import (
    FIRST,
    definitions_for,
    failure_of,
    range_config,
    resources_for,
)
from wiki_embeddings_tests.integration.test_dagster_schedule_sensor import Sensor


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def refresh(table, ollama, instance) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [embedding_coverage, missing_is_zero, vectors_match_model],
        resources=resources_for(table, ollama),
        instance=instance,
        raise_on_error=False,
    )


def drift_evaluation(result: dg.ExecuteInProcessResult):
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == VECTORS_MATCH]
    return evaluation


def test_a_model_changed_under_its_name_fails_the_drift_check_and_blocks_readiness(make_table, ollama, instance):
    table = make_table()
    table.load([(i, f"chunk {i} about something") for i in range(1, 41)])
    table.backfill()
    env = table.tmp / ".env.beta"
    env.write_text("WIKI_EMBEDDINGS_READY=false\n")
    sensor = Sensor(instance, ReadinessResource(env_file=str(env), on_regression="unset"))

    ollama.set_faults(model_salt="pulled")
    result = refresh(table, ollama, instance)
    drift = drift_evaluation(result)
    assert not drift.passed and drift.severity == dg.AssetCheckSeverity.ERROR
    assert drift.description.startswith("the model answering as 'all-minilm' changed") and "migrate-model" in (
        drift.description
    )
    assert drift.metadata["verdict"].value == "model_changed" and drift.metadata["digest"].value
    assert drift.metadata["digest"].value != drift.metadata["recorded_digest"].value  # the cause, shown
    tick = sensor.tick()
    assert read_flag(env) is False and VECTORS_MATCH in tick.skip_reason.skip_message  # missing=0, yet not ready

    ollama.reset_faults()  # the original weights are back
    assert drift_evaluation(refresh(table, ollama, instance)).passed
    sensor.tick()
    assert read_flag(env) is True

    ollama.set_faults(model_salt="pulled-again")  # a regression, policy `unset`: the flag is taken back
    refresh(table, ollama, instance)
    sensor.tick()
    assert read_flag(env) is False


def test_an_unreachable_server_makes_the_drift_check_a_warning_that_does_not_block(make_table, ollama, instance):
    table = make_table()
    table.load([(i, f"chunk {i}") for i in range(1, 11)])
    table.backfill()
    env = table.tmp / ".env.beta"
    ollama.set_faults(down=True)
    drift = drift_evaluation(refresh(table, ollama, instance))
    assert not drift.passed and drift.severity == dg.AssetCheckSeverity.WARN
    assert drift.metadata["verdict"].value == "not_evaluated"
    Sensor(instance, ReadinessResource(env_file=str(env))).tick()
    assert read_flag(env) is True


def test_the_swap_job_refuses_a_worse_shadow_unless_forced(make_table, ollama, instance):
    table = make_table()
    table.load([(i, f"chunk {i}: " + " ".join(f"w{(i * 5 + k) % 89}" for k in range(30))) for i in range(1, 61)])
    table.backfill()
    # A broken fill wrote zero vectors into the shadow: it cannot rank anything (the real-model gate, MiniLM
    # against random vectors, is in test_trust.py; here the job's wiring).
    migration.start(table.store, "nomic-embed-text", 768)
    table.sql(f"UPDATE {table.settings.table} SET embedding_next = array_fill(0, ARRAY[768])::vector")
    defs = definitions_for(resources_for(table, ollama))
    job = defs.resolve_job_def("model_swap_job")
    cfg = dg.RunConfig(ops={"swap_model": SwapConfig(quality_sample=60)})
    result = job.execute_in_process(instance=instance, run_config=cfg, raise_on_error=False)
    assert not result.success
    assert "swap refused by the retrieval self-test" in failure_of(result).description
    figures = failure_of(result).metadata
    assert figures["quality_result"].value == "refused" and figures["shadow_recall_at_10"].value == 0.0
    assert figures["live_mrr"].value > figures["shadow_mrr"].value
    forced = job.execute_in_process(
        instance=instance, run_config=dg.RunConfig(ops={"swap_model": SwapConfig(quality_sample=60, force=True)})
    )
    assert forced.success and table.store.recorded_model()[0] == "nomic-embed-text"
    [observed] = [e.event_specific_data.asset_observation.metadata for e in forced.all_events if e.is_asset_observation]
    assert observed["quality_forced"].value is True and "shadow_mrr" in observed  # the shadow's metadata
    assert table.store.latest_trust("swap_forced")["by"]


def test_a_run_window_leaves_the_range_resumable_not_failed(make_table, ollama, instance):
    table = make_table()
    table.load([(i, f"chunk {i}") for i in range(1, 61)])
    ollama.set_faults(latency_ms=150)
    resources = resources_for(table, ollama)
    result = dg.materialize(
        [
            a
            for a in definitions_for(resources).assets
            if getattr(a, "key", None) == dg.AssetKey("wiki_chunk_embeddings")
        ],
        resources=resources,
        instance=instance,
        partition_key=FIRST,
        run_config=range_config(table, batch_size=4, max_minutes=0.01),
    )
    assert result.success  # not failed
    assert not result.get_asset_materialization_events()  # not materialized: the range is still to do
    [observation] = [e.event_specific_data.asset_observation for e in result.all_events if e.is_asset_observation]
    assert "run window ends" in observation.metadata["window_ended"].value
    ollama.reset_faults()
    again = dg.materialize(
        [
            a
            for a in definitions_for(resources).assets
            if getattr(a, "key", None) == dg.AssetKey("wiki_chunk_embeddings")
        ],
        resources=resources,
        instance=instance,
        partition_key=FIRST,
        run_config=range_config(table),
    )
    assert again.success and again.get_asset_materialization_events() and table.status()["missing"] == 0
