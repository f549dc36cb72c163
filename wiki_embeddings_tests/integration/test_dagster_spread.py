"""A Dagster backfill of every range over two model servers: concurrent runs, one server each, nothing embedded
twice, and a run killed midway whose ranges its retry completes (issue 22 item 4).

The real machinery, in processes as in production: the daemon (`dagster-daemon run`: backfill daemon, queued run
coordinator, run retries) on the shipped dagster.yaml with its own PostgreSQL storage, runs launched by the
DefaultRunLauncher, and the backfill added the way the UI's "Materialize all" adds it (`PartitionBackfill`
from asset partitions, `instance.add_backfill`).
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.execution.backfill import PartitionBackfill
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from wiki_embeddings.core.backfill import WINDOW_PROBE_TEXTS
from wiki_embeddings.core.status import collect_status
from wiki_embeddings.defs.partitions import RANGE_WIDTH, id_ranges, key_bounds
from wiki_embeddings.defs.spread import SERVER_TAG
from wiki_embeddings.devtools import embedded_postgres
from wiki_embeddings.devtools.ollama_server import OllamaServer
from wiki_embeddings_tests.integration.conftest import TEST_DIM, TEST_MODEL
from wiki_embeddings_tests.integration.test_faults_support import (
    FAST_RETRIES,
    filled,
    updates_counted,
    wait_until,
    wrong_vectors,
)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROWS_PER_RANGE = 40
BATCH = 4
#: Ranges a backfill run takes (WIKI_EMBED_RANGES_PER_RUN in the daemon's code location): 100 ranges, 2 runs.
RANGES_PER_RUN = 50
ASSET = dg.AssetKey("wiki_chunk_embeddings")


def _ranges_with_chunks() -> list[int]:
    """Two ranges at the start of each run's share of the backfill (multi_run: RANGES_PER_RUN ranges a run)."""
    count = len(id_ranges.get_partition_keys())  # the default 100 (the daemon's code location reads the same)
    return [start + k for start in range(0, count, RANGES_PER_RUN) for k in (0, 1)]


def _instance_yaml(home: Path) -> None:
    """The shipped dagster.yaml, with a queue that looks every second (the default waits 5 s between looks)."""
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    config["run_coordinator"]["config"] = {"dequeue_interval_seconds": 1}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))


def _pids(instance: dg.DagsterInstance, run_id: str) -> set[int]:
    """The processes that wrote the run's events: its worker and its step's process (multiprocess executor)."""
    return {r.dagster_event.pid for r in instance.all_logs(run_id) if r.dagster_event and r.dagster_event.pid}


@pytest.mark.slow
def test_a_backfill_of_every_range_spreads_over_two_servers_and_a_killed_run_is_retried_cleanly(
    make_table, pg_data_dir, tmp_path, monkeypatch
):
    table = make_table(batch_size=BATCH)
    ranges = _ranges_with_chunks()
    ids = [r * RANGE_WIDTH + k for r in ranges for k in range(ROWS_PER_RANGE)]
    table.load([(i, f"spread text {i}") for i in ids])
    rows = len(ids)

    database = f"dagster_spread_{uuid.uuid4().hex[:8]}"
    embedded_postgres.ensure_running(pg_data_dir, database)
    storage_url = embedded_postgres.dagster_storage_url(pg_data_dir).replace("/dagster?", f"/{database}?")
    home = tmp_path / "dagster_home"
    home.mkdir()
    _instance_yaml(home)

    servers = [OllamaServer(backend="hash", models=[f"{TEST_MODEL}:{TEST_DIM}"]).start() for _ in range(2)]
    daemon = None
    try:
        for server in servers:
            server.set_faults(latency_ms=250)  # runs last long enough to overlap and to be killed midway
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")},
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_URL": storage_url,
            "DATABASE_URL": table.url,
            "WIKI_EMBED_TABLE": table.settings.table,
            "OLLAMA_URL": ",".join(s.url for s in servers),
            "OLLAMA_MODEL": TEST_MODEL,
            "EMBED_STOP_FILE": table.settings.stop_file,
            "WIKI_EMBED_FAILURE_LOG_DIR": str(tmp_path),
            "WIKI_EMBED_RANGES_PER_RUN": str(RANGES_PER_RUN),
            **FAST_RETRIES,
        }
        for key in ("DAGSTER_HOME", "DAGSTER_PG_URL"):
            monkeypatch.setenv(key, env[key])
        with dg.DagsterInstance.get() as instance:
            # `dagster instance concurrency set ollama 2`: two runs embed at once, so each takes one server.
            instance.event_log_storage.set_concurrency_slots("ollama", 2)
            from wiki_embeddings_tests.integration.spread_defs import defs

            graph = defs.resolve_asset_graph()
            run_config = {"ops": {"wiki_chunk_embeddings": {"config": {"batch_size": BATCH, "sleep_ms": 0}}}}
            backfill_id = "spread" + uuid.uuid4().hex[:6]
            instance.add_backfill(
                PartitionBackfill.from_asset_partitions(
                    backfill_id=backfill_id,
                    asset_graph=graph,
                    partition_names=None,
                    asset_selection=[ASSET],
                    backfill_timestamp=time.time(),
                    tags={},
                    dynamic_partitions_store=instance,
                    all_partitions=True,
                    title=None,
                    description=None,
                    run_config=run_config,
                )
            )
            daemon = subprocess.Popen(
                [str(BIN / "dagster-daemon"), "run", "-m", "wiki_embeddings_tests.integration.spread_defs"],
                cwd=REPO,
                env=env,
                stdout=(tmp_path / "daemon.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

            def backfill_runs() -> list[dg.DagsterRun]:
                return list(instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id})))

            def ranges_of(run: dg.DagsterRun) -> list[int]:
                low = key_bounds(run.tags[ASSET_PARTITION_RANGE_START_TAG])[0]
                high = key_bounds(run.tags[ASSET_PARTITION_RANGE_END_TAG])[1]
                return [i for i in ids if low <= i <= high]

            def filled_of(run: dg.DagsterRun) -> int:
                mine = ranges_of(run)
                query = f"SELECT count(*) FROM {table.settings.table} WHERE embedding IS NOT NULL AND id = ANY(%s)"
                return int(table.sql(query, (mine,))[0][0])

            # A run of the first wave, midway through its ranges: kill its worker and its step process.
            def victim() -> dg.DagsterRun | None:
                for run in backfill_runs():
                    if run.status == dg.DagsterRunStatus.STARTED and 2 * BATCH <= filled_of(run) < ROWS_PER_RANGE:
                        return run
                return None

            run = wait_until(victim, 90, "a backfill run to be midway", every=0.05)
            assert isinstance(run, dg.DagsterRun)
            pids = _pids(instance, run.run_id)
            assert len(pids) == 2, pids  # the run worker and the step's process
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            at_kill = filled_of(run)
            assert at_kill < len(ranges_of(run))
            # Its server's lease died with its database session: the server is free for the next run.
            leased_url = servers[int(instance.get_run_by_id(run.run_id).tags[SERVER_TAG])].url
            wait_until(lambda: table.store.leased([leased_url]) == [False], 15, "the killed run's lease to go")
            # Run monitoring marks a dead worker failed (Docker/K8s launchers report it; the DefaultRunLauncher
            # cannot, so here the test does what the monitor or the operator's "mark failed" does); the run
            # retries daemon then re-launches it (dagster.yaml run_retries: the run died, no step failed).
            instance.report_run_failed(instance.get_run_by_id(run.run_id))

            def finished() -> bool:
                runs = backfill_runs()
                return len(runs) == expected_runs and all(r.is_finished for r in runs) and filled(table) == rows

            expected_runs = len(ranges) // 2 + 1  # one a RANGES_PER_RUN ranges, and the killed run's retry
            wait_until(finished, 120, "the backfill's runs to finish", every=0.5)
            runs = backfill_runs()
    finally:
        if daemon is not None:
            with_group = daemon.pid
            os.killpg(with_group, signal.SIGTERM)
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(with_group, signal.SIGKILL)
                daemon.wait(10)
        stats = [s.stats()["texts_embedded"] for s in servers]
        for server in servers:
            server.stop()

    status = collect_status(table.store, table.settings)
    assert status["missing"] == 0 and wrong_vectors(table) == []
    assert updates_counted(table) == rows, "every chunk written exactly once"
    # The killed run was retried by Dagster (run_retries) and its retry succeeded.
    retried = [r for r in runs if r.tags.get("dagster/parent_run_id") == run.run_id]
    assert len(retried) == 1 and retried[0].status == dg.DagsterRunStatus.SUCCESS
    # Each run leased one server; both servers served; runs on different servers ran at the same time.
    assert all(r.tags.get(SERVER_TAG) in ("0", "1") for r in runs)
    assert all(s > 0 for s in stats), stats
    records = instance_records([r.run_id for r in runs])
    spans = [(r.start_time, r.end_time) for r in records]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :]), "runs ran at once"
    # Never two at once on one server: what each server served and when are the engine runs in the bookkeeping (one a
    # range, its server in its options; a killed one ends at its last heartbeat). Dagster's run times are wider: they
    # hold the process start, the lease wait and the run's end after the lease is given back.
    engine = table.sql(
        "SELECT options->>'ollama_url', started_at, coalesce(finished_at, heartbeat_at, started_at)"
        f" FROM {table.settings.state_schema}.runs WHERE table_name = %s",
        (table.store.table.qualified,),
    )
    assert {row[0] for row in engine} == {s.url for s in servers}, engine
    clash = [
        (a, b) for i, a in enumerate(engine) for b in engine[i + 1 :] if a[0] == b[0] and a[1] < b[2] and b[1] < a[2]
    ]
    assert clash == [], f"never two at once on one server: {clash}"
    # Every chunk was embedded once, plus each range run's start-up probes (one run_backfill a range with chunks
    # missing: its row in the bookkeeping); the killed run's requests in flight were embedded but never written.
    range_runs = int(
        table.sql(
            f"SELECT count(*) FROM {table.settings.state_schema}.runs WHERE table_name = %s", (table.settings.table,)
        )[0][0]
    )
    lost = sum(stats) - rows - range_runs * (1 + WINDOW_PROBE_TEXTS)
    assert 0 <= lost <= 16 * BATCH, (stats, range_runs, lost)


def instance_records(run_ids: list[str]) -> list:
    with dg.DagsterInstance.get() as instance:
        return list(instance.get_run_records(filters=dg.RunsFilter(run_ids=run_ids)))
