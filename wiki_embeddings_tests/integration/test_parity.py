"""The CLI and Dagster run the same operations (core/operations.py): each operation both offer is started from
each front-end on a table of its own with the same chunks, and the two tables must end the same - vectors of every
column, the recorded models and prefixes, the figures of `status`. The scenario is a model's life: bootstrap, a
migration to the same model with a new text prefix (refused by Dagster before the prefix was passed), maintenance
during the migration (fills both columns), swap, rollback."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import dagster as dg
import pytest

from wiki_embeddings.core.factories import build_store
from wiki_embeddings.core.status import collect_status
from wiki_embeddings.defs.config import RangeRunConfig
from wiki_embeddings.defs.migration import StartMigrationConfig
from wiki_embeddings.devtools.ollama_server import hash_vector
from wiki_embeddings_tests.integration.conftest import TEST_DIM, TEST_MODEL
from wiki_embeddings_tests.integration.dagster_support import (
    FIRST,
    definitions_for,
    maintenance_config,
    range_config,
    resources_for,
)
from wiki_embeddings_tests.integration.test_cli import run_cli

PREFIX = "search_document: "
COLUMNS = ("embedding", "embedding_next", "embedding_prev")
STATUS_KEYS = (
    "total",
    "embedded",
    "missing",
    "failed",
    "model",
    "dimensions",
    "stale_model",
    "migration_model",
    "migration_missing",
    "migration_coverage_pct",
)
STATE_KEYS = ("model", "dimensions", "migration_model", "migration_column", "previous_model")


def snapshot(table) -> dict[str, Any]:
    """What an operation leaves behind, independent of the table's name: per column its vectors (a digest per id)
    and identity, the table's recorded state, the status figures."""
    out: dict[str, Any] = {}
    ids = [r[0] for r in table.sql(f"SELECT id FROM {table.settings.table} ORDER BY id")]
    for column in COLUMNS:
        if not table.store.column_exists(column):
            continue
        with build_store(table.settings.replace(embedding_column=column), table.url) as store:
            vectors = store.read_vectors(ids)
            identity = store.column_identity() or {}
        out[column] = {
            "vectors": {i: None if v is None else digest(v.tobytes()) for i, v in vectors.items()},
            "identity": {k: identity.get(k) for k in ("model", "text_prefix")},
        }
    state = table.store.table_state()
    out["state"] = {k: state.get(k) for k in STATE_KEYS}
    status = collect_status(table.store, table.settings)
    out["status"] = {k: status.get(k) for k in STATUS_KEYS}
    return out


def digest(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()[:12]


def vector_digest(text: str) -> str:
    """The digest of the vector the hash backend gives `text` (what the engine sends: prefix + text)."""
    return digest(hash_vector(TEST_MODEL, text, TEST_DIM).tobytes())


class Dagster:
    """The Dagster side of the scenario: the project's jobs bound to one test table's resources."""

    def __init__(self, table, ollama, instance: dg.DagsterInstance):
        self.defs = definitions_for(resources_for(table, ollama))
        self.table, self.instance = table, instance

    def run(self, job: str, **kw: Any) -> None:
        result = self.defs.resolve_job_def(job).execute_in_process(instance=self.instance, raise_on_error=False, **kw)
        failures = [e.step_failure_data.user_failure_data for e in result.all_events if e.is_step_failure]
        assert result.success, f"{job}: {[getattr(f, 'description', f) for f in failures]}"


STEPS: list[tuple[str, Callable[[Any], None], Callable[[Dagster], None]]] = []


def step(name: str, cli: Callable[[Any], None], dagster: Callable[[Dagster], None]) -> None:
    STEPS.append((name, cli, dagster))


def cli_ok(table, *args: str) -> None:
    code, out = run_cli(table, *args)
    assert code == 0, f"{args}: {out}"


def add_chunk(table) -> None:
    table.sql(f"INSERT INTO {table.settings.table} (id, content) VALUES (13, 'a chunk added during the migration')")


step(
    "backfill run (bootstrap)",
    lambda t: cli_ok(t, "backfill", "--model", TEST_MODEL),
    lambda d: d.run("bootstrap_job", partition_key=FIRST, run_config=range_config(d.table)),
)
step(
    "migration start with a new text prefix, and the shadow fill",
    lambda t: cli_ok(t, "migrate-model", "--to", TEST_MODEL, "--text-prefix", PREFIX),
    lambda d: (
        d.run(
            "start_model_migration_job",
            run_config=dg.RunConfig(
                ops={"start_model_migration": StartMigrationConfig(to_model=TEST_MODEL, text_prefix=PREFIX)}
            ),
        ),
        d.run(
            "model_migration_job",
            partition_key=FIRST,
            run_config=dg.RunConfig(ops={"fill_shadow_range": RangeRunConfig(sleep_ms=0, batch_size=8)}),
        ),
    ),
)
step(
    "maintenance during the migration (both columns)",
    lambda t: (add_chunk(t), cli_ok(t, "backfill", "--max-chunks", "100")),
    lambda d: (add_chunk(d.table), d.run("maintenance_job", run_config=maintenance_config(d.table))),
)
step("swap", lambda t: cli_ok(t, "migrate-model", "--swap"), lambda d: d.run("model_swap_job"))
step("rollback", lambda t: cli_ok(t, "migrate-model", "--rollback"), lambda d: d.run("model_rollback_job"))


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def test_each_operation_ends_the_same_from_the_cli_and_from_dagster(make_table, ollama, instance):
    rows = [(i, f"chunk {i}") for i in range(1, 13)]
    by_cli, by_dagster = make_table(), make_table()
    by_cli.load(rows)
    by_dagster.load(rows)
    dagster = Dagster(by_dagster, ollama, instance)
    seen: dict[str, dict[str, Any]] = {}
    for name, cli, dag in STEPS:
        cli(by_cli)
        dag(dagster)
        seen[name] = snapshot(by_cli)
        assert snapshot(by_dagster) == seen[name], f"after {name}, the CLI's table and Dagster's differ"

    # What the scenario did (the same on both sides, by the comparisons above).
    texts = dict(rows + [(13, "a chunk added during the migration")])
    started = seen["migration start with a new text prefix, and the shadow fill"]
    assert started["embedding_next"]["identity"] == {"model": TEST_MODEL, "text_prefix": PREFIX}
    assert started["embedding_next"]["vectors"] == {i: vector_digest(PREFIX + texts[i]) for i in range(1, 13)}
    assert started["state"]["migration_model"] == TEST_MODEL, "the same model with a new prefix is a migration"
    maintained = seen["maintenance during the migration (both columns)"]
    assert maintained["embedding"]["vectors"][13] == vector_digest(texts[13])
    assert maintained["embedding_next"]["vectors"][13] == vector_digest(PREFIX + texts[13])
    assert maintained["status"]["missing"] == 0 and maintained["status"]["migration_missing"] == 0
    swapped = seen["swap"]
    assert swapped["embedding"]["identity"]["text_prefix"] == PREFIX and swapped["state"]["migration_model"] is None
    assert swapped["embedding_prev"]["vectors"] == {i: vector_digest(t) for i, t in texts.items()}
    rolled_back = seen["rollback"]
    assert rolled_back["embedding"]["identity"]["text_prefix"] == "" and rolled_back["status"]["missing"] == 0
    assert rolled_back["embedding_next"]["vectors"] == {i: vector_digest(PREFIX + t) for i, t in texts.items()}
