"""The assets: the chunk table, what is missing, the embeddings (per ID range, and maintenance), coverage.

Asset bodies call the core (core/operations.py for the runs, which the CLI runs too; the store via the
resources) and turn its answers into metadata (defs/metadata.py) and outcomes (defs/outcomes.py); they hold no
SQL and no HTTP.

  wiki_chunks (observed) -> missing_wiki_chunks -> wiki_chunk_embeddings [ID ranges] -> embedding_coverage -> readiness
                                               -> wiki_chunk_embeddings_maintenance -> + missing_is_zero  (env file)

Who keeps the picture current without a click (the database is the truth, whoever wrote it):
- `embedding_state_sensor` (defs/state.py) observes `wiki_chunks` every minute and reports ranges the database
  shows complete (or empty) as materialized - also when the CLI, the runbook scripts or a cron did the work;
- `coverage_automation_sensor` runs `missing_wiki_chunks`, `embedding_coverage` and `missing_is_zero` after any
  write or change of the table, once at start and on `WIKI_EMBED_REFRESH_CRON` (`LIVE_AUTOMATION`);
- `readiness_sensor` (defs/sensors.py) flips the flag and materializes `readiness`.
"""

import os
from collections.abc import Iterator
from typing import Any

import dagster as dg

from wiki_embeddings.core import operations
from wiki_embeddings.core.backfill import RunReport
from wiki_embeddings.core.status import collect_status
from wiki_embeddings.defs.config import OLLAMA_POOL, TRANSIENT_RETRY, MaintenanceConfig, RangeRunConfig
from wiki_embeddings.defs.metadata import (
    missing_summary,
    observe_table,
    progress,
    range_table,
    ranges_overview,
    status_metadata,
)
from wiki_embeddings.defs.outcomes import (
    raise_if_stopped,
    raise_on_trouble,
    report_metadata,
    run_failures,
    window_ended,
)
from wiki_embeddings.defs.partitions import BACKFILL_POLICY, RANGE_WIDTH, id_ranges, key_bounds
from wiki_embeddings.defs.resources import OllamaResource, WikiDatabaseResource, run_settings
from wiki_embeddings.defs.spread import server_share

GROUP = "wiki_embeddings"

REFRESH_CRON_ENV = "WIKI_EMBED_REFRESH_CRON"
#: The cadence on which what-is-missing, coverage and the check are refreshed even when nothing was seen changing.
REFRESH_CRON = os.environ.get(REFRESH_CRON_ENV, "").strip() or "*/30 * * * *"

_AC = dg.AutomationCondition
_IDLE = ~_AC.in_progress() & ~_AC.any_deps_in_progress()
#: missing_wiki_chunks, embedding_coverage and missing_is_zero stay the database's truth with no click:
#: - after any write or change: an upstream update (a range or maintenance run, the state sensor's observation of
#:   `wiki_chunks` when the table changed - new chunks, progress of a CLI run); unlike plain `eager()`, ranges
#:   never materialized (failed ones) do not hold it back;
#: - never refreshed yet (a new instance): at once, unless that attempt failed;
#: - on REFRESH_CRON, whatever happened.
LIVE_AUTOMATION = (
    _AC.eager().without(~_AC.any_deps_missing()).with_label("after a write or a change of the table")
    | (_AC.missing() & ~_AC.execution_failed() & _IDLE).with_label("never refreshed yet")
    | (_AC.cron_tick_passed(REFRESH_CRON) & _IDLE).with_label(f"on {REFRESH_CRON}")
)
#: The name the check and older code use.
COVERAGE_AUTOMATION = LIVE_AUTOMATION


# ---------------------------------------------------------------------------- the source table
@dg.multi_observable_source_asset(
    specs=[
        dg.AssetSpec(
            "wiki_chunks",
            description=(
                "The wiki chunk table (public.wiki_chunks by default), loaded by the import outside Dagster. "
                "Observed, never materialized here: row count and id range tell the operator what there is to embed."
            ),
            kinds={"postgres"},
            group_name=GROUP,
        )
    ],
)
def wiki_chunks(context: dg.AssetExecutionContext, database: WikiDatabaseResource):
    """Observe the chunk table: how many chunks, which ids, and whether some lie past the last ID range."""
    with database.store() as store:
        observed = observe_table(store)
    context.log.info(f"wiki_chunks: {observed.description}")
    yield dg.ObserveResult(asset_key="wiki_chunks", metadata=observed.metadata, data_version=observed.data_version)


# ---------------------------------------------------------------------------- what is missing
@dg.asset(deps=[wiki_chunks], kinds={"postgres"}, group_name=GROUP, automation_condition=LIVE_AUTOMATION)
def missing_wiki_chunks(context: dg.AssetExecutionContext, database: WikiDatabaseResource) -> dg.MaterializeResult:
    """Chunks still without an embedding, per ID range: the to-do list of the bootstrap backfill.

    A range listed here is one to (re-)materialize in `wiki_chunk_embeddings`; `failed` counts chunks there
    with an open failure record (see the failure log); ids past the last range are left to maintenance.
    """
    settings = database.settings()
    with database.store(settings) as store:
        store.migrate()
        summary = missing_summary(store.missing_by_range(RANGE_WIDTH), store.failed_by_range(RANGE_WIDTH))
    total = sum(r["missing"] for r in summary)
    past = [r for r in summary if r["range"].startswith("past")]
    context.log.info(f"{total} chunks missing in {len(summary)} ranges")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": total,
            "missing": total,
            "ranges_with_missing": len(summary) - len(past),
            "missing_past_last_range": sum(r["missing"] for r in past),
            "failed": sum(r["failed"] for r in summary),
            "by_range": range_table(summary),
        }
    )


# ---------------------------------------------------------------------------- embeddings
@dg.asset(
    partitions_def=id_ranges,
    backfill_policy=BACKFILL_POLICY,
    deps=[missing_wiki_chunks],
    kinds={"ollama", "postgres"},
    pool=OLLAMA_POOL,
    retry_policy=TRANSIENT_RETRY,
    group_name=GROUP,
    output_required=False,  # a run over several ranges reports each range it completed, one by one
)
def wiki_chunk_embeddings(
    context: dg.AssetExecutionContext,
    config: RangeRunConfig,
    database: WikiDatabaseResource,
    ollama: OllamaResource,
) -> Iterator[dg.AssetObservation | dg.AssetMaterialization | dg.MaterializeResult]:
    """Embeddings of one ID range of chunks: materialized means every chunk in the range has its vector.

    A run embeds the range's missing chunks with the runbook's bootstrap settings (batching, failure
    isolation, failure log, stop file). It fails, after writing everything else, when chunks of the range
    are still missing (see the failure log) or when it was stopped: re-run the range when fixed.
    A backfill run over several ranges (BackfillPolicy) takes them one at a time: a range with nothing
    missing (an empty one) costs one query; each completed range is materialized at once; the run fails at
    the end naming the ranges that still miss chunks, which alone show as failed.
    """
    with server_share(context, database, ollama) as servers:
        yield from _embed_ranges(context, config, database, ollama, list(context.partition_keys), servers)


def _embed_ranges(
    context: dg.AssetExecutionContext,
    config: RangeRunConfig,
    database: WikiDatabaseResource,
    ollama: OllamaResource,
    keys: list[str],
    servers: dict[str, Any],
) -> Iterator[dg.AssetObservation | dg.AssetMaterialization | dg.MaterializeResult]:
    """The ranges of one run, one at a time (`servers`: the run's share of the model servers, core/spread.py)."""
    if len(keys) == 1:
        yield from _embed_one_range(context, config, database, ollama, keys[0], servers)
        return
    with database.store() as store:
        missing_by_start = dict(store.missing_by_range(RANGE_WIDTH))
    incomplete: list[str] = []
    for key in keys:
        if missing_by_start.get(key_bounds(key)[0], 0) == 0:
            yield dg.AssetMaterialization(asset_key=context.asset_key, partition=key, metadata=_nothing_to_do(key))
            continue
        ended = False
        try:
            for event in _embed_one_range(context, config, database, ollama, key, servers):
                if isinstance(event, dg.MaterializeResult):
                    event = dg.AssetMaterialization(  # type: ignore[assignment]  # re-keyed to its partition
                        asset_key=context.asset_key, partition=key, metadata=event.metadata
                    )
                ended = ended or (isinstance(event, dg.AssetObservation) and "window_ended" in event.metadata)
                yield event
        except dg.Failure as failure:
            if "stopped on request" in (failure.description or ""):
                raise  # a stop request ends the whole run after this batch
            context.log.error(failure.description or f"range {key} failed")
            incomplete.append(key)
        if ended:  # the run window closed: the ranges not reached stay as they are, for the next run
            break
    if incomplete:
        raise dg.Failure(
            description=(
                f"{len(incomplete)} of {len(keys)} ranges still have missing chunks: {', '.join(incomplete[:20])}"
                f"{' ...' if len(incomplete) > 20 else ''}. The others are materialized. Each failed range's "
                "reason is in this run's log; fix it, then re-run the failed ranges (backfill page: re-execute "
                "failed; retry_quarantined: true to include quarantined chunks)."
            ),
            metadata={"failed_ranges": dg.MetadataValue.json(incomplete)},
            allow_retries=False,
        )


def _nothing_to_do(key: str) -> dict[str, Any]:
    low, high = key_bounds(key)
    return {
        "dagster/row_count": 0,
        "embedded": 0,
        "remaining": 0,
        "state": "nothing_missing",
        "id_min": low,
        "id_max": high,
    }


def _embed_one_range(
    context: dg.AssetExecutionContext,
    config: RangeRunConfig,
    database: WikiDatabaseResource,
    ollama: OllamaResource,
    key: str,
    servers: dict[str, Any],
) -> Iterator[dg.AssetObservation | dg.MaterializeResult]:
    id_min, id_max = key_bounds(key)
    what = f"range {key}"
    mode = f"dagster {what}"
    settings = run_settings(database, ollama, id_min=id_min, id_max=id_max, **config.engine_settings(), **servers)
    with run_failures(mode, settings):
        report = operations.run_backfill(settings, mode=mode, log=context.log.info, client=ollama.client)
    metadata = {**report_metadata(report, settings), "id_min": id_min, "id_max": id_max}
    raise_on_trouble(report, metadata, what)
    if window_ended(report):  # the run window closed: resumable, neither materialized nor failed
        metadata["window_ended"] = report.stop_reason
        yield dg.AssetObservation(asset_key=context.asset_key, partition=key, metadata=metadata)
        context.log.info(f"{what}: {report.stop_reason}; {report.remaining} chunks left for the next run")
        return
    if report.state == "stopped" or report.remaining > 0:
        # what the run did stays visible on the partition
        yield dg.AssetObservation(asset_key=context.asset_key, partition=key, metadata=metadata)
    raise_if_stopped(report, metadata, what)
    if report.remaining > 0:
        others = max(report.remaining - report.failed - report.skipped_busy, 0)
        raise dg.Failure(
            description=(
                f"{what}: {report.remaining} chunks still missing after the run; {report.embedded} were written. "
                f"{report.failed} failed in this run (failure log: {settings.failure_log}), "
                f"{report.skipped_busy} were held by another run, {others} others are quarantined by earlier "
                "failures or were added meanwhile. Read the failure log, fix the cause (smaller batch_size, "
                "larger timeout_sec, smaller max_chars), then re-run the range (retry_quarantined: true to "
                "include quarantined chunks)."
            ),
            metadata=metadata,
            allow_retries=False,
        )
    yield dg.MaterializeResult(metadata=metadata)


@dg.asset(
    deps=[missing_wiki_chunks],
    kinds={"ollama", "postgres"},
    pool=OLLAMA_POOL,
    retry_policy=TRANSIENT_RETRY,
    group_name=GROUP,
)
def wiki_chunk_embeddings_maintenance(
    context: dg.AssetExecutionContext,
    config: MaintenanceConfig,
    database: WikiDatabaseResource,
    ollama: OllamaResource,
) -> dg.MaterializeResult:
    """The incremental fill: embeds chunks still missing anywhere in the table (ids past the last range too).

    Runs with the runbook's maintenance settings (at most 20,000 chunks a run). Chunks it cannot embed are
    logged and counted here, and keep `missing_is_zero` failing; quarantined chunks are never retried unless
    a run sets retry_quarantined.
    """
    mode = "dagster maintenance"
    with server_share(context, database, ollama) as servers:
        settings = run_settings(database, ollama, **config.engine_settings(), **servers)
        with run_failures(mode, settings):
            outcome = operations.backfill(
                settings,
                mode=mode,
                log=context.log.info,
                maintenance=True,
                client=ollama.client,
                shadow_mode="dagster maintenance (migration)",
            )
    report = outcome.live
    metadata = report_metadata(report, settings)
    raise_on_trouble(report, metadata, "maintenance")
    if window_ended(report):  # like --max-chunks: a clean, capped end; the shadow waits for the next run
        return dg.MaterializeResult(metadata={**metadata, "window_ended": report.stop_reason})
    raise_if_stopped(report, metadata, "maintenance")
    if report.failed:
        context.log.warning(
            f"maintenance: {report.failed} chunks could not be embedded (failure log: {settings.failure_log})"
        )
    if outcome.shadow is not None:  # during a model migration maintenance also fills the shadow column
        metadata.update(_shadow_metadata(outcome.shadow))
    return dg.MaterializeResult(metadata=metadata)


def _shadow_metadata(report: RunReport) -> dict[str, Any]:
    """The shadow fill of a maintenance run (core/operations.backfill): its figures, or its trouble raised."""
    what = f"maintenance of the migration to {report.model}"
    metadata = {
        "migration_model": report.model,
        "migration_embedded": report.embedded,
        "migration_refreshed": report.refreshed,
        "migration_failed": report.failed,
        "migration_remaining": report.remaining,
    }
    raise_on_trouble(report, metadata, what)
    raise_if_stopped(report, metadata, what)
    return metadata


# ---------------------------------------------------------------------------- coverage
@dg.asset(
    deps=[missing_wiki_chunks, wiki_chunk_embeddings, wiki_chunk_embeddings_maintenance],
    kinds={"postgres"},
    group_name=GROUP,
    automation_condition=LIVE_AUTOMATION,
)
def embedding_coverage(context: dg.AssetExecutionContext, database: WikiDatabaseResource) -> dg.MaterializeResult:
    """How much of the table is embedded: the runbook's status figures, plotted over time, and a table per range.

    Done when missing=0 and coverage_pct=100.00 (the `missing_is_zero` check); coverage shows 100.00 only
    when nothing is missing, and an empty table is 0.00. `chunks_per_s` / `eta` are those of the embedding runs
    under way (CLI or Dagster). During a model migration, `migration_*` shows the new model's coverage of its
    shadow column (it does not count towards readiness until the swap). Refreshed by itself (`LIVE_AUTOMATION`).
    """
    settings = database.settings()
    with database.store(settings) as store:
        status = collect_status(store, settings)
        running, rate = store.running_rate()
        per_range = ranges_overview(store)
    context.log.info(
        f"total={status['total']} embedded={status['embedded']} missing={status['missing']} "
        f"coverage_pct={status['coverage_pct']} failed={status['failed']} quarantined={status['quarantined']} "
        f"stale_model={status['stale_model']} stale_text={status['stale_text']} runs_under_way={running}"
    )
    if status["migration_model"]:
        context.log.info(
            f"migration to {status['migration_model']}: missing={status['migration_missing']} "
            f"coverage_pct={status['migration_coverage_pct']}"
        )
    return dg.MaterializeResult(
        metadata={
            **status_metadata(status),
            "dagster/row_count": dg.MetadataValue.int(int(status["total"])),
            "coverage_pct_text": dg.MetadataValue.text(str(status["coverage_pct"])),
            **progress(int(status["missing"]), running, rate),
            "by_range": range_table(per_range),
        }
    )


#: The readiness flag (WIKI_EMBEDDINGS_READY in the env file): not computed by a run; `readiness_sensor`
#: materializes it when it writes the flag (old and new value, file, time) and observes it when it keeps it.
readiness = dg.AssetSpec(
    "readiness",
    deps=[embedding_coverage],
    description=(
        "WIKI_EMBEDDINGS_READY in the readiness env file (WIKI_EMBEDDINGS_ENV_FILE, .env.beta). Materialized by "
        "readiness_sensor each time it writes the flag: previous and new value, file, time, restart result."
    ),
    kinds={"file"},
    group_name=GROUP,
)


ASSETS = [
    wiki_chunks,
    missing_wiki_chunks,
    wiki_chunk_embeddings,
    wiki_chunk_embeddings_maintenance,
    embedding_coverage,
    readiness,
]
