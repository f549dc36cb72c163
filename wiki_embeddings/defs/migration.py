"""Dagster side of a change of model: start it, fill the shadow column over the same ID ranges, swap it in.

From the UI: launch `start_model_migration_job` with `to_model` (it asks the model for its vector length, adds
the shadow column and records the target; the live column keeps serving); `fill_migration_after_start_sensor`
then queues `model_migration_job` for every ID range that holds chunks (one run per range, like the bootstrap).
Swap with `model_swap_job`, or turn on `model_swap_sensor` (on by default when WIKI_EMBED_AUTO_SWAP=true) to
swap as soon as the shadow is complete and nothing runs; `after_swap_sensor` then tells the backend the new
model (WIKI_EMBEDDINGS_MODEL in the readiness env file, restart command) and refreshes coverage (as after
`model_rollback_job`, which swaps the previous column back). While a
migration is in progress the maintenance job also fills the shadow, so chunks added meanwhile never hold the
swap back. The operations are the core's (`wiki_embeddings.core.operations`, the CLI runs the same ones); this
module only declares and reports.
"""

import os
from typing import Any

import dagster as dg
from pydantic import Field

from wiki_embeddings.checks import one_line, parse_bool
from wiki_embeddings.core import migration, operations, quality
from wiki_embeddings.core.db import Store
from wiki_embeddings.core.readiness import MODEL_KEY, ReadinessError, restart_backend, set_value
from wiki_embeddings.core.status import migration_figures
from wiki_embeddings.defs.assets import embedding_coverage
from wiki_embeddings.defs.config import OLLAMA_POOL, TRANSIENT_RETRY, RangeRunConfig
from wiki_embeddings.defs.jobs import MODE_TAG, coverage_job
from wiki_embeddings.defs.metadata import status_metadata
from wiki_embeddings.defs.outcomes import (
    CLEAN_STATES,
    raise_if_stopped,
    raise_on_trouble,
    report_metadata,
    run_failures,
    window_ended,
)
from wiki_embeddings.defs.partitions import LAST_RANGE_ID, id_ranges, key_for_id, range_bounds
from wiki_embeddings.defs.resources import OllamaResource, ReadinessResource, WikiDatabaseResource, run_settings
from wiki_embeddings.defs.spread import server_share

TARGET_TAG = "wiki_embeddings/target_model"
AUTO_SWAP_ENV = "WIKI_EMBED_AUTO_SWAP"
#: Runs of these jobs in flight keep the swap sensor waiting.
FILL_JOB_NAMES = ("start_model_migration_job", "model_migration_job")
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def migration_observation(store: Store, **extra: Any) -> dg.AssetObservation:
    """The new model's coverage as an observation of `embedding_coverage`: plotted beside the live coverage."""
    figures = migration_figures(store)
    metadata: dict[str, Any] = {
        "migration_model": figures["migration_model"],
        "migration_embedded": figures["migration_embedded"] or 0,
        "migration_missing": figures["migration_missing"] or 0,
        "migration_coverage_pct": dg.MetadataValue.float(float(figures["migration_coverage_pct"] or 0)),
        **extra,
    }
    return dg.AssetObservation(asset_key=embedding_coverage.key, metadata=metadata)


# ---------------------------------------------------------------------------- start
class StartMigrationConfig(dg.Config):
    """What to migrate to; the shadow column is `<embedding column>_next`."""

    to_model: str = Field(description="the Ollama model to migrate to, e.g. nomic-embed-text (must be pulled)")
    text_prefix: str | None = Field(
        default=None,
        description="prepended to every text the new model embeds, e.g. 'search_document: ' (the same model with "
        "a new prefix is a migration too); null: the ollama resource's (`migrate-model --text-prefix`)",
    )
    query_prefix: str | None = Field(
        default=None,
        description="the new model's query prefix, e.g. 'search_query: ' (the swap's self-test); null: the ollama "
        "resource's (`migrate-model --query-prefix`)",
    )
    fill_all_ranges: bool = Field(
        default=True,
        description="then queue model_migration_job for every ID range holding chunks "
        "(fill_migration_after_start_sensor); false: launch the backfill yourself",
    )


@dg.op(description="Ask the target model for its vector length, add the shadow column, record the migration.")
def start_model_migration(
    context: dg.OpExecutionContext,
    config: StartMigrationConfig,
    database: WikiDatabaseResource,
    ollama: OllamaResource,
) -> None:
    to_model = config.to_model.strip()
    settings = run_settings(database, ollama, text_prefix=config.text_prefix, query_prefix=config.query_prefix)
    with run_failures("migration start", settings):
        settings = operations.migration_settings(settings, to_model)
        started = operations.start_migration(settings, to_model, log=context.log.info, probe=ollama.probe_dimensions)
    context.log.info(started.message(settings.embedding_column))
    with database.store(settings) as store:
        observation = migration_observation(store, shadow_column=started.shadow_column, dimensions=started.dimensions)
    context.log_event(observation)


@dg.job(
    tags={MODE_TAG: "migrate-start"},
    description="Start a change of model without downtime (`migrate-model --to MODEL`): set ops."
    "start_model_migration.config.to_model; every ID range is then filled by model_migration_job.",
)
def start_model_migration_job() -> None:
    start_model_migration()


# ---------------------------------------------------------------------------- fill
@dg.op(
    pool=OLLAMA_POOL,
    retry_policy=TRANSIENT_RETRY,
    description="Embed one ID range into the migration's shadow column with its target model.",
)
def fill_shadow_range(
    context: dg.OpExecutionContext, config: RangeRunConfig, database: WikiDatabaseResource, ollama: OllamaResource
) -> None:
    key = context.partition_key
    id_min, id_max = range_bounds(key, key)
    mode = f"dagster migrate {key}"
    with server_share(context, database, ollama) as servers:
        settings = run_settings(database, ollama, id_min=id_min, id_max=id_max, **config.engine_settings(), **servers)
        with run_failures(mode, settings):
            overrides = operations.active_shadow(settings)
            report = operations.fill_shadow(settings, overrides, mode=mode, log=context.log.info)
    target, shadow = overrides["ollama_model"], overrides["embedding_column"]
    what = f"migration to {target} range {key}"
    metadata = {**report_metadata(report, settings), "id_min": id_min, "id_max": id_max, "shadow_column": shadow}
    if report.state in CLEAN_STATES:  # the database answered; after a transient end, retrying comes first
        with database.store() as store:
            context.log_event(migration_observation(store, partition=key))
    raise_on_trouble(report, metadata, what)
    if window_ended(report):  # the run window closed: the range is resumed by its next run, not failed
        context.log.info(f"{what}: {report.stop_reason}; {report.remaining} chunks left for the next run")
        return
    raise_if_stopped(report, metadata, what)
    if report.remaining > 0:
        raise dg.Failure(
            description=f"{what}: {report.remaining} chunks still missing in {shadow} ({report.failed} failed "
            f"this run, failure log {settings.failure_log}); fix and re-run the range",
            metadata=metadata,
            allow_retries=False,
        )
    context.log.info(f"{what}: {report.embedded} chunks embedded into {shadow}")


@dg.job(
    partitions_def=id_ranges,
    tags={MODE_TAG: "migrate"},
    config=dg.RunConfig(ops={"fill_shadow_range": RangeRunConfig()}),
    description="Fill the model migration's shadow column, one run per ID range (queued for every range by "
    "start_model_migration_job; re-run failed ranges like the bootstrap's).",
)
def model_migration_job() -> None:
    fill_shadow_range()


def ranges_holding_chunks(low: int | None, high: int | None) -> list[str]:
    """Partition keys from the range of the smallest id to that of the largest (capped at the last range)."""
    if low is None or high is None or low > LAST_RANGE_ID:
        return []
    keys = id_ranges.get_partition_keys()
    first, last = key_for_id(max(low, 0)), key_for_id(min(high, LAST_RANGE_ID))
    return list(keys[keys.index(first) : keys.index(last) + 1])


@dg.run_status_sensor(
    name="fill_migration_after_start_sensor",
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[start_model_migration_job],
    request_job=model_migration_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After start_model_migration_job succeeds, queues model_migration_job for every ID range that holds "
    "chunks (the pool `ollama` runs them one at a time).",
)
def fill_migration_after_start_sensor(context: dg.RunStatusSensorContext, database: WikiDatabaseResource):
    run = context.dagster_run
    ops: dict[str, Any] = dict(run.run_config.get("ops") or {})  # type: ignore[call-overload]
    config = ops.get("start_model_migration", {}).get("config", {})
    if not config.get("fill_all_ranges", True):
        return dg.SkipReason(f"run {run.run_id} asked not to fill the ranges (fill_all_ranges=false)")
    with database.store() as store:
        target, _ = store.migration_target()
        low, high, _ = store.id_bounds()
    keys = ranges_holding_chunks(low, high)
    if not target:
        return dg.SkipReason(f"the migration started by run {run.run_id} is no longer recorded (aborted or swapped)")
    if high is not None and high > LAST_RANGE_ID:
        context.log.warning(
            f"ids above {LAST_RANGE_ID} lie past the last range: the maintenance job (or `migrate-model --to "
            f"{target}`) fills them in the shadow"
        )
    context.log.info(f"queueing model_migration_job for {len(keys)} ranges (migration to {target})")
    return [dg.RunRequest(run_key=f"{run.run_id}:{key}", partition_key=key, tags={TARGET_TAG: target}) for key in keys]


# ---------------------------------------------------------------------------- swap
class SwapConfig(dg.Config):
    """The swap's quality gate (core/quality.py): a retrieval self-test of the shadow against the live column."""

    force: bool = Field(default=False, description="swap even when the retrieval self-test refuses (recorded)")
    quality_sample: int = Field(default=quality.DEFAULT_SAMPLE, description="chunks in the retrieval self-test")
    quality_margin: float = Field(
        default=quality.DEFAULT_MARGIN,
        description="refuse when the shadow's recall@10 or MRR is lower than the live column's by more than this",
    )


@dg.op(
    description="Run the retrieval self-test (refused when the shadow retrieves worse than the live column, unless "
    "force), then swap the complete shadow column in (one transaction); refused while it is incomplete."
)
def swap_model(
    context: dg.OpExecutionContext, config: SwapConfig, database: WikiDatabaseResource, ollama: OllamaResource
) -> None:
    def gated(store: Store, report: quality.QualityReport) -> None:
        context.log_event(migration_observation(store, **status_metadata(report.figures())))

    settings = run_settings(database, ollama)
    try:
        with run_failures("swap", settings):
            message = operations.swap(
                settings,
                force=config.force,
                sample=config.quality_sample,
                margin=config.quality_margin,
                log=context.log.info,
                gated=gated,
            )
    except quality.QualityRefused as exc:  # the figures ride on the failure (the step's events end here)
        raise dg.Failure(description=str(exc), metadata=status_metadata(exc.figures), allow_retries=False) from None
    context.log.info(message)


@dg.job(
    tags={MODE_TAG: "swap"},
    description="Make the complete shadow column the live one (`migrate-model --swap`): builds the live column's "
    "vector indexes on it first, then renames in one transaction.",
)
def model_swap_job() -> None:
    swap_model()


@dg.op(
    description="Swap the previous column back in (one transaction; refused while it lacks vectors, a shadow column "
    "exists or a run of the table is in flight)."
)
def rollback_model(context: dg.OpExecutionContext, database: WikiDatabaseResource, ollama: OllamaResource) -> None:
    settings = run_settings(database, ollama)
    with run_failures("rollback", settings):
        message = operations.rollback(settings, log=context.log.info)
    context.log.info(message)


@dg.job(
    tags={MODE_TAG: "rollback"},
    description="Swap the previous model's column back in (`migrate-model --rollback`); after_swap_sensor then "
    "tells the backend the restored model, as after a swap.",
)
def model_rollback_job() -> None:
    rollback_model()


def _auto_swap_default() -> dg.DefaultSensorStatus:
    raw = os.environ.get(AUTO_SWAP_ENV, "")
    try:
        on = parse_bool(raw)
    except ValueError as exc:
        raise ValueError(f"{AUTO_SWAP_ENV}: {exc}") from None
    return dg.DefaultSensorStatus.RUNNING if on else dg.DefaultSensorStatus.STOPPED


@dg.sensor(
    name="model_swap_sensor",
    job=model_swap_job,
    minimum_interval_seconds=60,
    default_status=_auto_swap_default(),
    description=f"Swaps the new model in once its shadow column is complete (missing=0, coverage_pct=100.00) and no "
    f"run of the table is in flight. Off unless turned on here or {AUTO_SWAP_ENV}=true when the code loads.",
)
def model_swap_sensor(context: dg.SensorEvaluationContext, database: WikiDatabaseResource):
    with database.store() as store:
        store.migrate()
        state = store.table_state()
        blocker = migration.swap_blocker(store)
    if blocker:
        return dg.SkipReason(blocker)
    for job_name in FILL_JOB_NAMES + ("model_swap_job",):
        busy = context.instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=IN_FLIGHT), limit=1)
        if busy:
            return dg.SkipReason(f"run {busy[0].dagster_run.run_id} of {job_name} is in flight; swapping after it")
    target = state["migration_model"]
    started_at = state.get("migration_started_at")
    context.log.info(f"the shadow column of the migration to {target!r} is complete: requesting the swap")
    return dg.RunRequest(
        run_key=f"swap:{target}:{started_at.isoformat() if started_at else ''}", tags={TARGET_TAG: target}
    )


@dg.run_status_sensor(
    name="after_swap_sensor",
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[model_swap_job, model_rollback_job],
    request_job=coverage_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=f"After a swap (or a rollback): writes {MODEL_KEY}=<new live model> into the readiness env file and "
    "runs WIKI_EMBEDDINGS_RESTART_CMD (the backend must embed queries with the new model), then refreshes "
    "embedding_coverage and missing_is_zero so the check judges the new model.",
)
def after_swap_sensor(
    context: dg.RunStatusSensorContext, database: WikiDatabaseResource, readiness: ReadinessResource
) -> dg.RunRequest:
    with database.store() as store:
        model, _ = store.recorded_model()
    settings = readiness.settings()
    try:
        changed, created = set_value(settings.env_path, MODEL_KEY, model or "")
    except ReadinessError as exc:  # a name recorded by an old version that sourcing could run: never written
        context.log.error(f"after the swap: {exc}; set {MODEL_KEY} by hand and restart the backend")
        return dg.RunRequest(run_key=f"after-swap:{context.dagster_run.run_id}")
    context.log.info(
        f"after the swap: {MODEL_KEY}={one_line(model or '')} in {settings.env_path}"
        f"{' (file created)' if created else '' if changed else ' (already set)'}"
    )
    if changed:
        restart_backend(settings, context.log.info, context.log.error, f"embeds queries with {model!r}")
    return dg.RunRequest(run_key=f"after-swap:{context.dagster_run.run_id}")


MIGRATION_JOBS = [start_model_migration_job, model_migration_job, model_swap_job, model_rollback_job]
MIGRATION_SENSORS = [fill_migration_after_start_sensor, model_swap_sensor, after_swap_sensor]
