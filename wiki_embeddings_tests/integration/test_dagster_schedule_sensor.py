"""Maintenance on a schedule, one run at a time; the readiness flag flips after a fresh pass, once."""

import stat
import uuid

import dagster as dg
import pytest

from wiki_embeddings.core.readiness import read_flag
from wiki_embeddings.defs.assets import embedding_coverage
from wiki_embeddings.defs.checks import missing_is_zero
from wiki_embeddings.defs.config import default_failure_log
from wiki_embeddings.defs.jobs import MODE_TAG
from wiki_embeddings.defs.resources import ReadinessResource, WikiDatabaseResource
from wiki_embeddings.defs.schedules import maintenance_schedule
from wiki_embeddings.defs.sensors import readiness_sensor
from wiki_embeddings_tests.integration.dagster_support import resources_for

ENV_TEXT = "# beta stack\nAPI_PORT=8080\nWIKI_EMBEDDINGS_READY=false\nexport OTHER='a b'  # kept\n"


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def test_the_schedule_asks_for_maintenance_with_the_runbook_settings(instance):
    request = maintenance_schedule(dg.build_schedule_context(instance=instance))
    assert isinstance(request, dg.RunRequest)
    config = request.run_config["ops"]["wiki_chunk_embeddings_maintenance"]["config"]
    assert config == {
        "batch_size": 64,  # the most; polite mode (after readiness) sizes batches to the target duration
        "report_every": 20,
        "timeout_sec": 120.0,
        "sleep_ms": 0,
        "max_chars": 2000,
        "failure_log": default_failure_log("maintenance"),  # /tmp/…, here the session's WIKI_EMBED_FAILURE_LOG_DIR
        "retry_quarantined": False,
        "max_chunks": 20000,
    }
    assert request.tags[MODE_TAG] == "maintenance"
    assert maintenance_schedule.cron_schedule == "0 * * * *"


def test_the_schedule_skips_while_a_maintenance_run_is_in_progress(instance):
    run = instance.add_run(
        dg.DagsterRun(job_name="maintenance_job", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED)
    )
    skipped = maintenance_schedule(dg.build_schedule_context(instance=instance))
    assert isinstance(skipped, dg.SkipReason) and run.run_id in skipped.skip_message

    instance.report_run_failed(run)
    assert isinstance(maintenance_schedule(dg.build_schedule_context(instance=instance)), dg.RunRequest)


class Sensor:
    """Evaluates readiness_sensor like the daemon does: the cursor carried from tick to tick."""

    def __init__(self, instance: dg.DagsterInstance, resource: ReadinessResource):
        self.instance, self.resource, self.cursor = instance, resource, None

    def tick(self, resource: ReadinessResource | None = None) -> dg.SensorResult:
        resource = resource or self.resource
        context = dg.build_sensor_context(instance=self.instance, cursor=self.cursor, resources={"readiness": resource})
        result = readiness_sensor(context)
        self.cursor = result.cursor
        return result


def refresh(table, ollama, instance, with_check: bool = True) -> None:
    dg.materialize(
        [embedding_coverage, missing_is_zero] if with_check else [embedding_coverage],
        resources=resources_for(table, ollama),
        instance=instance,
        raise_on_error=False,
    )


def test_readiness_flips_once_after_a_pass_and_never_on_a_fail_or_a_stale_check(make_table, ollama, instance):
    table = make_table()
    table.load([(i, f"chunk {i}") for i in range(1, 11)])
    env = table.tmp / ".env.beta"
    env.write_text(ENV_TEXT)
    env.chmod(0o640)
    marker = table.tmp / "restarts"
    sensor = Sensor(instance, ReadinessResource(env_file=str(env), restart_cmd=f"echo restarted >> {marker}"))

    assert sensor.tick().skip_reason is not None, "no evaluation yet"

    refresh(table, ollama, instance)  # 10 missing: the check fails
    failed = sensor.tick()
    assert failed.skip_reason is not None and read_flag(env) is False

    table.backfill()
    refresh(table, ollama, instance)  # missing=0: the check passes
    flipped = sensor.tick()
    assert read_flag(env) is True
    assert env.read_text() == ENV_TEXT.replace("READY=false", "READY=true"), "every other line kept"
    assert stat.S_IMODE(env.stat().st_mode) == 0o640
    assert marker.read_text() == "restarted\n"
    # The flip is an event an operator can find: a materialization of `readiness`, and the tick says it.
    [flip] = flipped.asset_events
    assert isinstance(flip, dg.AssetMaterialization) and flip.asset_key == dg.AssetKey("readiness")
    assert flip.metadata["readiness_action"].value == "set_true"
    assert (flip.metadata["previous"].value, flip.metadata["flag"].value) == ("false", "true")
    assert flip.metadata["env_file"].value == str(env) and flip.metadata["at"].value
    assert flip.metadata["restart_returncode"].value == "0"
    assert "check_evaluation_id" not in flip.metadata
    assert "set WIKI_EMBEDDINGS_READY=true" in flipped.skip_reason.skip_message

    again = sensor.tick()
    assert again.skip_reason is not None and not again.asset_events
    assert marker.read_text() == "restarted\n", "acted once per passing evaluation"

    # Stale: coverage refreshed without its check; the last pass is about an older materialization.
    env.write_text(ENV_TEXT)
    refresh(table, ollama, instance, with_check=False)
    stale = Sensor(instance, sensor.resource).tick()
    assert "stale" in stale.skip_reason.skip_message and read_flag(env) is False


def test_when_missing_rises_again_the_flag_stays_or_goes_by_policy(make_table, ollama, instance):
    table = make_table()
    table.load([(i, f"chunk {i}") for i in range(1, 6)])
    env = table.tmp / ".env.beta"
    env.write_text(ENV_TEXT)
    table.backfill()
    refresh(table, ollama, instance)
    sensor = Sensor(instance, ReadinessResource(env_file=str(env)))
    sensor.tick()
    assert read_flag(env) is True

    table.load([(6, "a chunk added after readiness")])
    refresh(table, ollama, instance)
    kept = sensor.tick()
    assert read_flag(env) is True
    assert kept.asset_events[0].metadata["readiness_action"].value == "keep_on_regression"

    refresh(table, ollama, instance)
    sensor.tick(ReadinessResource(env_file=str(env), on_regression="unset"))
    assert read_flag(env) is False
    assert env.read_text() == ENV_TEXT


def test_a_check_that_never_ran_is_not_a_pass(make_table, ollama, instance):
    table = make_table()
    table.load([(1, "chunk")])
    table.backfill()
    env = table.tmp / ".env.beta"
    env.write_text(ENV_TEXT)
    refresh(table, ollama, instance)  # a pass...
    resources = resources_for(table, ollama)
    resources["database"] = WikiDatabaseResource(database_url=table.url, table="no_such_schema.wiki_chunks")
    broken = dg.materialize(
        [embedding_coverage, missing_is_zero], resources=resources, instance=instance, raise_on_error=False
    )
    assert not broken.success  # ...then a run whose coverage step failed: its check was planned, never run
    result = Sensor(instance, ReadinessResource(env_file=str(env))).tick()
    assert "has not completed" in result.skip_reason.skip_message and read_flag(env) is False
