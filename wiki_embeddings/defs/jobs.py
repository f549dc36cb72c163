"""Jobs: the runbook's modes (bootstrap, maintenance), a coverage refresh, and the stop / resume brakes.

The model-change jobs live with their sensors in `defs/migration.py`.
"""

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from wiki_embeddings.defs.assets import (
    embedding_coverage,
    missing_wiki_chunks,
    wiki_chunk_embeddings,
    wiki_chunk_embeddings_maintenance,
    wiki_chunks,
)
from wiki_embeddings.defs.config import MaintenanceConfig, RangeRunConfig
from wiki_embeddings.defs.resources import WikiDatabaseResource

#: Run tag naming the runbook mode; dagster.yaml limits maintenance runs to one at a time with it.
MODE_TAG = "wiki_embeddings/mode"

bootstrap_job = dg.define_asset_job(
    name="bootstrap_job",
    selection=dg.AssetSelection.assets(wiki_chunk_embeddings),
    config=dg.RunConfig(ops={"wiki_chunk_embeddings": RangeRunConfig()}),
    tags={MODE_TAG: "bootstrap"},
    description=(
        "Runbook mode 1, the first bulk fill: launch it as a backfill of all ID ranges (UI, or `dagster job "
        "backfill -w workspace.yaml -j bootstrap_job --all true --noprompt`); up to 25 ranges per run "
        "(WIKI_EMBED_RANGES_PER_RUN), at most the `ollama` pool's limit of runs at once. "
        "Defaults: batch 64, report every 10, timeout 120 s, sleep 150 ms, "
        "max-chars 2000."
    ),
)

maintenance_job = dg.define_asset_job(
    name="maintenance_job",
    selection=dg.AssetSelection.assets(
        wiki_chunks, missing_wiki_chunks, wiki_chunk_embeddings_maintenance, embedding_coverage
    ),
    config=dg.RunConfig(ops={"wiki_chunk_embeddings_maintenance": MaintenanceConfig()}),
    tags={MODE_TAG: "maintenance"},
    description=(
        "Runbook mode 2, the incremental fill: every missing chunk (ids past the last range too), at most "
        "20,000 a run, batch 32, sleep 100 ms; then refreshes embedding_coverage and missing_is_zero."
    ),
)

coverage_job = dg.define_asset_job(
    name="coverage_job",
    selection=dg.AssetSelection.assets(wiki_chunks, missing_wiki_chunks, embedding_coverage),
    tags={MODE_TAG: "status"},
    description="The runbook's status: observe the table, list what is missing, refresh coverage and its check.",
)


class StopConfig(dg.Config):
    reason: str = "operator (Dagster)"


@dg.op(description="Create the stop file and record a stop request in the database.")
def request_stop(context: dg.OpExecutionContext, config: StopConfig, database: WikiDatabaseResource) -> None:
    stop_file = database.request_stop(config.reason)
    context.log.info(f"stop requested: {stop_file} created and recorded in the database; runs end after their batch")


@dg.op(description="Clear the stop request in the database and remove the stop file.")
def clear_stop_request(context: dg.OpExecutionContext, database: WikiDatabaseResource) -> None:
    stop_file, removed = database.clear_stop()
    context.log.info(
        f"stop request cleared; stop file {stop_file} {'removed' if removed else 'was not there'}. "
        "Re-execute the stopped ranges (or let the schedule run maintenance)."
    )


@dg.job(tags={MODE_TAG: "stop"}, description="Runbook safe stop: running ranges end after their current batch.")
def stop_job() -> None:
    request_stop()


@dg.job(
    tags={MODE_TAG: "resume"},
    description="Runbook resume, first half: clear the stop request so re-executed ranges do not stop at once.",
)
def resume_job() -> None:
    clear_stop_request()


JOBS: list[dg.JobDefinition | UnresolvedAssetJobDefinition] = [
    bootstrap_job,
    maintenance_job,
    coverage_job,
    stop_job,
    resume_job,
]  # + defs/migration.py's
