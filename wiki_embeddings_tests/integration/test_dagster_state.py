"""The Dagster picture is the database's, whoever did the work: the state sensor, backfill runs over many ranges,
the check's severity while work is under way, and the instance storage's local/production defaults."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from wiki_embeddings.defs.assets import embedding_coverage, wiki_chunk_embeddings
from wiki_embeddings.defs.checks import missing_is_zero
from wiki_embeddings.defs.partitions import RANGES_PER_RUN, id_ranges, range_key
from wiki_embeddings.defs.state import embedding_state_sensor
from wiki_embeddings_tests.integration.dagster_support import FIRST, SECOND, range_config, resources_for

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ALL = set(id_ranges.get_partition_keys())


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


class StateSensor:
    """Ticks embedding_state_sensor like the daemon: cursor carried over, its events reported to the instance."""

    def __init__(self, instance: dg.DagsterInstance, resources: dict):
        self.instance, self.resources, self.cursor = instance, resources, None

    def tick(self) -> dg.SensorResult:
        context = dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources={"database": self.resources["database"]}
        )
        result = embedding_state_sensor(context)
        self.cursor = result.cursor
        for event in result.asset_events:
            self.instance.report_runless_asset_event(event)
        return result


def shown_done(instance: dg.DagsterInstance) -> set[str]:
    return set(instance.get_materialized_partitions(wiki_chunk_embeddings.key))


def test_work_done_outside_dagster_shows_as_materialized_and_new_chunks_undo_it(make_table, ollama, instance):
    table = make_table()
    table.load([(i, f"first {i}") for i in range(1, 21)] + [(100_000 + i, f"second {i}") for i in range(1, 11)])
    sensor = StateSensor(instance, resources_for(table, ollama))

    before = sensor.tick()  # nothing embedded yet: only the 98 empty ranges are done
    assert shown_done(instance) == ALL - {FIRST, SECOND}
    [observation] = [e for e in before.asset_events if isinstance(e, dg.AssetObservation)]
    assert observation.asset_key == dg.AssetKey("wiki_chunks")
    assert observation.metadata["dagster/row_count"].value == 30 and observation.metadata["missing"].value == 30

    assert table.backfill().state == "completed"  # the CLI's engine, no Dagster run
    after = sensor.tick()
    assert shown_done(instance) == ALL, "the fill percentage reaches 100 when every chunk is embedded"
    reported = {e.partition: e for e in after.asset_events if isinstance(e, dg.AssetMaterialization)}
    assert set(reported) == {FIRST, SECOND}
    assert reported[FIRST].metadata["state"].value == "embedded"
    assert "reported 2 ranges as done" in after.skip_reason.skip_message

    quiet = sensor.tick()
    assert not [e for e in quiet.asset_events if isinstance(e, dg.AssetMaterialization)]
    assert "no change" in quiet.skip_reason.skip_message

    table.load([(100_000 + i, f"new {i}") for i in range(11, 16)] + [(300_005, "a chunk in an empty range")])
    regressed = sensor.tick()
    third = range_key(300_000)
    assert shown_done(instance) == ALL - {SECOND, third}, "ranges with missing chunks again are no longer done"
    assert "2 ranges no longer done" in regressed.skip_reason.skip_message
    [seen] = [e for e in regressed.asset_events if isinstance(e, dg.AssetObservation)]
    assert seen.metadata["missing"].value == 6 and "table changed" in regressed.skip_reason.skip_message

    table.backfill()
    sensor.tick()
    assert shown_done(instance) == ALL


def test_a_backfill_run_over_many_ranges_materializes_each_and_fails_only_the_broken_one(make_table, ollama, instance):
    assert wiki_chunk_embeddings.backfill_policy == dg.BackfillPolicy.multi_run(RANGES_PER_RUN)
    table = make_table()
    table.load([(i, "this one holds the POISON marker" if i == 3 else f"chunk {i}") for i in range(1, 11)])
    table.load([(100_000 + i, f"second {i}") for i in range(1, 11)])
    ollama.set_faults(error_marker="POISON")
    last = range_key(400_000)
    result = dg.materialize(
        [wiki_chunk_embeddings],
        tags={"dagster/asset_partition_range_start": FIRST, "dagster/asset_partition_range_end": last},
        resources=resources_for(table, ollama),
        run_config=range_config(table),
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    assert shown_done(instance) == {SECOND, range_key(200_000), range_key(300_000), last}
    failures = [e for e in result.all_events if e.is_step_failure]
    assert FIRST in failures[0].step_failure_data.user_failure_data.description
    assert table.store.count_missing(100_000, 199_999) == 0 and table.store.count_missing(0, 99_999) == 1


def test_the_check_warns_with_progress_while_a_run_is_under_way_and_errs_when_idle(make_table, ollama, instance):
    table = make_table()
    table.load([(i, f"chunk {i}") for i in range(1, 11)])
    resources = resources_for(table, ollama)
    run_id = table.store.start_run("bootstrap", {}, "all-minilm")  # a live CLI run (its lock is held)
    table.store.heartbeat_run(run_id, 0, 0, 5.0)
    during = dg.materialize([embedding_coverage, missing_is_zero], resources=resources, instance=instance)
    assert during.success, "a refresh during a bootstrap is a successful run"
    [warn] = during.get_asset_check_evaluations()
    assert not warn.passed and warn.severity == dg.AssetCheckSeverity.WARN
    assert "in progress" in warn.description and "ETA" in warn.description
    assert warn.metadata["chunks_per_s"].value == 5.0 and warn.metadata["eta_s"].value == 2.0
    coverage = during.asset_materializations_for_node("embedding_coverage")[0].metadata
    assert coverage["runs_under_way"].value == 1 and coverage["eta"].value == "2 s"
    assert isinstance(coverage["by_range"], dg.TableMetadataValue)
    assert "unverified" not in coverage or isinstance(coverage["unverified"], dg.IntMetadataValue)

    table.store.finish_run(run_id, "completed", 0, 0, 0.0, "")
    after = dg.materialize([embedding_coverage, missing_is_zero], resources=resources, instance=instance)
    assert after.success
    [error] = after.get_asset_check_evaluations()
    assert not error.passed and error.severity == dg.AssetCheckSeverity.ERROR
    assert "nothing is running" in error.description


def test_instance_storage_defaults_to_the_embedded_postgresql_only_locally(pg_data_dir, pg_url, monkeypatch):
    from wiki_embeddings.dagster_storage import instance_storage_url
    from wiki_embeddings.local_services import database_url
    from wiki_embeddings.settings import from_env

    monkeypatch.delenv("DAGSTER_PG_URL", raising=False)
    monkeypatch.setenv("WIKI_EMBED_PGDATA", str(pg_data_dir))
    monkeypatch.delenv("WIKI_EMBED_DEPLOYMENT", raising=False)
    assert instance_storage_url().startswith("postgresql+psycopg2://")
    monkeypatch.setenv("DAGSTER_PG_URL", "postgresql://u:p@db:5432/dagster")
    assert instance_storage_url() == "postgresql+psycopg2://u:p@db:5432/dagster"

    monkeypatch.delenv("DAGSTER_PG_URL")
    monkeypatch.setenv("WIKI_EMBED_DEPLOYMENT", "production")
    with pytest.raises(RuntimeError, match="DAGSTER_PG_URL is not set.*production"):
        instance_storage_url()
    with pytest.raises(RuntimeError, match="DATABASE_URL is not set.*production"):
        database_url(from_env({}))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_") and k != "WIKI_EMBED_DEPLOYMENT"}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.mark.parametrize("command", [["dg", "check", "defs"], ["dagster", "definitions", "validate"]])
def test_the_ecosystem_tools_work_from_the_repo_root_with_no_setting(command, pg_data_dir, pg_url):
    # No DAGSTER_HOME, no DAGSTER_PG_URL: ./dagster.yaml's project storage takes the embedded PostgreSQL.
    proc = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        cwd=REPO,
        env=_env(WIKI_EMBED_PGDATA=str(pg_data_dir)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
