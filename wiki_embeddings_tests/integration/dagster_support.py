"""Helpers for the Dagster tests: resources and run config pointing at one test table (no fixtures here)."""

from pathlib import Path
from typing import Any

import dagster as dg

from wiki_embeddings.defs.assets import ASSETS
from wiki_embeddings.defs.checks import missing_is_zero
from wiki_embeddings.defs.config import MaintenanceConfig, RangeRunConfig
from wiki_embeddings.defs.jobs import JOBS
from wiki_embeddings.defs.migration import MIGRATION_JOBS, MIGRATION_SENSORS
from wiki_embeddings.defs.resources import OllamaResource, ReadinessResource, WikiDatabaseResource
from wiki_embeddings_tests.integration.conftest import TEST_MODEL

FIRST = "00000000-00099999"
SECOND = "00100000-00199999"


def resources_for(table: Any, ollama: Any, env_file: Path | None = None, **readiness: Any) -> dict[str, Any]:
    """The three resources on the test table, its stop file, the session's Ollama-protocol server."""
    s = table.settings
    return {
        "database": WikiDatabaseResource(
            database_url=s.database_url, table=s.table, stop_file=s.stop_file, max_attempts=s.max_attempts
        ),
        "ollama": OllamaResource(url=ollama.url, model=TEST_MODEL, retries=2, timeout_sec=10.0),
        "readiness": ReadinessResource(env_file=str(env_file or table.tmp / ".env.beta"), **readiness),
    }


def range_config(table: Any, **overrides: Any) -> dg.RunConfig:
    cfg = RangeRunConfig(**{"sleep_ms": 0, "batch_size": 16, "failure_log": table.settings.failure_log, **overrides})
    return dg.RunConfig(ops={"wiki_chunk_embeddings": cfg})


def maintenance_config(table: Any, **overrides: Any) -> dg.RunConfig:
    cfg = MaintenanceConfig(**{"sleep_ms": 0, "failure_log": table.settings.failure_log, **overrides})
    return dg.RunConfig(ops={"wiki_chunk_embeddings_maintenance": cfg})


def definitions_for(resources: dict[str, Any]) -> dg.Definitions:
    """The project's assets, check, jobs and migration sensors bound to test resources (the shipped Definitions
    read the env)."""
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=[missing_is_zero],
        jobs=[*JOBS, *MIGRATION_JOBS],
        sensors=MIGRATION_SENSORS,
        resources=resources,
    )


def failure_of(result: dg.ExecuteInProcessResult) -> Any:
    """The user failure data (description, metadata) of the run's failed step."""
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "the run was expected to fail"
    return failures[0].step_failure_data.user_failure_data
