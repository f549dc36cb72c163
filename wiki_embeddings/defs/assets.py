"""The assets: the chunk table, what is missing, the embeddings (per ID range, and maintenance), coverage.

Asset bodies call the core (engine, store via the resources) and turn its answers into metadata and
outcomes; they hold no SQL and no HTTP.

    wiki_chunks (observed) -> missing_wiki_chunks -> wiki_chunk_embeddings [ID ranges]   -> embedding_coverage
                                                  -> wiki_chunk_embeddings_maintenance  ->   + missing_is_zero
"""

from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import dagster as dg
import pandas as pd
import psycopg
from pydantic import Field

from wiki_embeddings.core import migration
from wiki_embeddings.core.engine import DimensionMismatch, RunReport
from wiki_embeddings.core.status import collect_status
from wiki_embeddings.core.store import StoreError
from wiki_embeddings.defs.partitions import LAST_RANGE_ID, RANGE_WIDTH, id_ranges, key_for_id, range_bounds
from wiki_embeddings.defs.resources import OllamaResource, WikiDatabaseResource, run_engine
from wiki_embeddings.settings import Settings, redact, url_password

GROUP = "wiki_embeddings"
#: Concurrency pool of every step that calls Ollama; its limit (dagster.yaml `concurrency.pools`, or
#: `dagster instance concurrency set ollama N`) is how many ranges embed at once.
OLLAMA_POOL = "ollama"
BOOTSTRAP_FAILURE_LOG = "/tmp/wiki-embed-failures-bootstrap.jsonl"
MAINTENANCE_FAILURE_LOG = "/tmp/wiki-embed-failures-maintenance.jsonl"
MAX_TABLE_ROWS = 100

#: Transient trouble only (server unavailable, database connection lost): a chunk-level failure or a stop
#: request raises `dg.Failure(allow_retries=False)`, which this policy does not retry.
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)

#: Refresh coverage (and its check) when embeddings were written and nothing upstream is still running.
#: Unlike plain `eager()`, ranges never materialized (empty ones, failed ones) do not hold it back.
COVERAGE_AUTOMATION = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())


#: Engine end states that are the chunks' or the operator's business, not the infrastructure's.
CLEAN_STATES = {"completed", "stopped", "max_chunks"}
#: End states worth a retry: the server or the database was away; the chunks are fine.
TRANSIENT_STATES = {"server_unavailable", "database_unavailable"}


class EmbeddingServiceUnavailable(Exception):
    """The embedding server or the database went away mid-run (after the core's own retries): the
    RetryPolicy retries the step, which resumes where the run stopped (nothing is marked failed)."""


class RangeRunConfig(dg.Config):
    """One range run; defaults are the runbook's bootstrap command."""

    batch_size: int = Field(default=64, description="chunks per request")
    report_every: int = Field(default=10, description="a progress line every N batches")
    timeout_sec: float | None = Field(default=120.0, description="deadline of one request; null: the ollama resource's")
    sleep_ms: int = Field(default=150, description="pause after each request, easing Ollama's load")
    max_chars: int | None = Field(default=2000, description="text cut before sending; null: the ollama resource's")
    failure_log: str = Field(default=BOOTSTRAP_FAILURE_LOG, description="JSONL of chunks that could not be embedded")
    retry_quarantined: bool = Field(
        default=False, description="also claim chunks quarantined by earlier failures (a deliberate re-run)"
    )

    def engine_settings(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "report_every": self.report_every,
            "timeout_sec": self.timeout_sec,
            "sleep_ms": self.sleep_ms,
            "max_chars": self.max_chars,
            "failure_log": self.failure_log,
            "include_quarantined": self.retry_quarantined,
        }


class MaintenanceConfig(RangeRunConfig):
    """One maintenance run; defaults are the runbook's maintenance command."""

    batch_size: int = Field(default=32, description="chunks per request")
    report_every: int = Field(default=20, description="a progress line every N batches")
    sleep_ms: int = Field(default=100, description="pause after each request")
    max_chunks: int | None = Field(default=20000, description="stop after this many chunks; null: no cap")
    failure_log: str = Field(default=MAINTENANCE_FAILURE_LOG, description="JSONL of chunks that could not be embedded")

    def engine_settings(self) -> dict[str, Any]:
        # Maintenance re-embeds chunks whose text changed since they were embedded (range runs do not).
        return {**super().engine_settings(), "max_chunks": self.max_chunks, "refresh_changed": True}


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
        low, high, total = store.id_bounds()
    metadata: dict[str, Any] = {
        "dagster/row_count": total,
        "min_id": dg.MetadataValue.int(low if low is not None else 0),
        "max_id": dg.MetadataValue.int(high if high is not None else 0),
        "ranges": f"{len(id_ranges.get_partition_keys())} ranges of {RANGE_WIDTH} ids up to {LAST_RANGE_ID}",
        "past_last_range": high is not None and high > LAST_RANGE_ID,
    }
    context.log.info(f"wiki_chunks: {total} chunks, ids {low}..{high}")
    yield dg.ObserveResult(asset_key="wiki_chunks", metadata=metadata, data_version=dg.DataVersion(f"{total}:{high}"))


# ---------------------------------------------------------------------------- what is missing
def missing_summary(missing: list[tuple[int, int]], failed: list[tuple[int, int]]) -> pd.DataFrame:
    """One row per ID range with missing chunks (`range`, `missing`, `failed`); ids past the last range in one row."""
    failed_by_start = dict(failed)
    rows: dict[str, dict[str, Any]] = {}
    for start, count in missing:
        key = key_for_id(start) or f"past {LAST_RANGE_ID}"
        row = rows.setdefault(key, {"range": key, "missing": 0, "failed": 0})
        row["missing"] += count
        row["failed"] += failed_by_start.get(start, 0)
    return pd.DataFrame(list(rows.values()), columns=["range", "missing", "failed"])


def worst_ranges(summary: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    return summary.sort_values(["missing", "range"], ascending=[False, True]).head(n)


def markdown_table(frame: pd.DataFrame, limit: int = MAX_TABLE_ROWS) -> dg.MetadataValue:
    if frame.empty:
        return dg.MetadataValue.md("_nothing missing_")
    text = frame.head(limit).to_markdown(index=False)
    if len(frame) > limit:
        text += f"\n\n_{len(frame) - limit} more ranges not shown_"
    return dg.MetadataValue.md(text)


@dg.asset(deps=[wiki_chunks], kinds={"postgres", "pandas"}, group_name=GROUP)
def missing_wiki_chunks(context: dg.AssetExecutionContext, database: WikiDatabaseResource) -> dg.MaterializeResult:
    """Chunks still without an embedding, per ID range: the to-do list of the bootstrap backfill.

    A range listed here is one to (re-)materialize in `wiki_chunk_embeddings`; `failed` counts chunks there
    with an open failure record (see the failure log); ids past the last range are left to maintenance.
    """
    settings = database.settings()
    with database.store(settings) as store:
        store.migrate()
        summary = missing_summary(store.missing_by_range(RANGE_WIDTH), store.failed_by_range(RANGE_WIDTH))
    total = int(summary["missing"].sum())
    past = summary[summary["range"].str.startswith("past")]
    context.log.info(f"{total} chunks missing in {len(summary)} ranges")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": total,
            "missing": total,
            "ranges_with_missing": len(summary) - len(past),
            "missing_past_last_range": int(past["missing"].sum()),
            "failed": int(summary["failed"].sum()),
            "by_range": markdown_table(summary),
        }
    )


# ---------------------------------------------------------------------------- embeddings
def report_metadata(report: RunReport, settings: Settings) -> dict[str, Any]:
    return {
        "dagster/row_count": report.embedded,
        "embedded": report.embedded,
        "failed": report.failed,
        "skipped": report.skipped_busy,
        "refreshed": report.refreshed,
        "remaining": report.remaining,
        "chunks_per_s": dg.MetadataValue.float(round(report.chunks_per_s, 2)),
        "seconds": dg.MetadataValue.float(round(report.seconds, 2)),
        "model": report.model,
        "state": report.state,
        "failure_log": dg.MetadataValue.path(settings.failure_log or ""),
        "failed_ids": dg.MetadataValue.json(report.failed_ids[:100]),
    }


def _run(context: dg.AssetExecutionContext, database, ollama, *, mode: str, **run: Any) -> tuple[RunReport, Settings]:
    """The engine run; errors it raises become one redacted line (`from None`: Dagster stores an exception's
    whole chain, and a libpq message can echo the connection URL)."""
    secrets = _url_secrets(database.settings().database_url)
    try:
        return run_engine(database, ollama, mode=mode, log=context.log.info, **run)
    except (DimensionMismatch, StoreError) as exc:  # configuration: retrying cannot help
        raise dg.Failure(description=redact(str(exc), secrets), allow_retries=False) from None
    except psycopg.OperationalError as exc:  # the database is away: transient
        raise EmbeddingServiceUnavailable(f"{mode}: database unavailable: {_first_line(exc, secrets)}") from None
    except psycopg.Error as exc:
        raise dg.Failure(description=f"{mode}: database: {_first_line(exc, secrets)}", allow_retries=False) from None


def _url_secrets(url: str | None) -> list[str]:
    password = url_password(url)
    return [password, unquote(password)] if password else []


def _first_line(exc: BaseException, secrets: list[str]) -> str:
    text = str(exc).strip()
    return redact(text.splitlines()[0] if text else type(exc).__name__, secrets)


def _raise_on_trouble(report: RunReport, metadata: dict[str, Any], what: str) -> None:
    """Transient ends (server or database away) are retried; other unclean ends (model not found, failure log
    not writable...) need the operator: no retry."""
    if report.state in TRANSIENT_STATES:
        raise EmbeddingServiceUnavailable(
            f"{what}: {report.state}: {report.message} ({report.embedded} chunks written before)"
        )
    if report.state not in CLEAN_STATES:
        raise dg.Failure(
            description=f"{what}: {report.state}: {report.message}", metadata=metadata, allow_retries=False
        )


def _raise_if_stopped(report: RunReport, metadata: dict[str, Any], what: str) -> None:
    if report.state == "stopped":
        raise dg.Failure(
            description=(
                f"{what} stopped on request after its current batch ({report.embedded} chunks written, "
                f"{report.remaining} still missing); not marked complete. Run `resume_job` to clear the stop "
                "request, then materialize it again."
            ),
            metadata=metadata,
            allow_retries=False,
        )


@dg.asset(
    partitions_def=id_ranges,
    deps=[missing_wiki_chunks],
    kinds={"ollama", "postgres"},
    pool=OLLAMA_POOL,
    retry_policy=TRANSIENT_RETRY,
    group_name=GROUP,
)
def wiki_chunk_embeddings(
    context: dg.AssetExecutionContext,
    config: RangeRunConfig,
    database: WikiDatabaseResource,
    ollama: OllamaResource,
) -> Iterator[dg.AssetObservation | dg.MaterializeResult]:
    """Embeddings of one ID range of chunks: materialized means every chunk in the range has its vector.

    A run embeds the range's missing chunks with the runbook's bootstrap settings (batching, failure
    isolation, failure log, stop file). It fails, after writing everything else, when chunks of the range
    are still missing (see the failure log) or when it was stopped: re-run the range when fixed.
    """
    key_range = context.partition_key_range
    id_min, id_max = range_bounds(key_range.start, key_range.end)
    what = (
        f"range {key_range.start}" if key_range.start == key_range.end else f"ranges {key_range.start}..{key_range.end}"
    )
    report, settings = _run(
        context, database, ollama, mode=f"dagster {what}", id_min=id_min, id_max=id_max, **config.engine_settings()
    )
    metadata = {**report_metadata(report, settings), "id_min": id_min, "id_max": id_max}
    _raise_on_trouble(report, metadata, what)
    if report.state == "stopped" or report.remaining > 0:
        for key in context.partition_keys:  # what the run did stays visible on the partition
            yield dg.AssetObservation(asset_key=context.asset_key, partition=key, metadata=metadata)
    _raise_if_stopped(report, metadata, what)
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
    report, settings = _run(context, database, ollama, mode="dagster maintenance", **config.engine_settings())
    metadata = report_metadata(report, settings)
    _raise_on_trouble(report, metadata, "maintenance")
    _raise_if_stopped(report, metadata, "maintenance")
    if report.failed:
        context.log.warning(
            f"maintenance: {report.failed} chunks could not be embedded (failure log: {settings.failure_log})"
        )
    metadata.update(_maintain_shadow(context, database, ollama, config))
    return dg.MaterializeResult(metadata=metadata)


def _maintain_shadow(
    context: dg.AssetExecutionContext, database: WikiDatabaseResource, ollama: OllamaResource, config: RangeRunConfig
) -> dict[str, Any]:
    """During a model migration, maintenance also fills the shadow column with the target model (same cap), so
    chunks added or edited after their range was migrated never hold the swap back."""
    with database.store() as store:
        active = migration.active_migration(store)
    if active is None:
        return {}
    target, shadow = active
    what = f"maintenance of the migration to {target}"
    report, settings = _run(
        context,
        database,
        ollama,
        mode="dagster maintenance (migration)",
        embedding_column=shadow,
        ollama_model=target,
        **config.engine_settings(),
    )
    metadata = {
        "migration_model": target,
        "migration_embedded": report.embedded,
        "migration_refreshed": report.refreshed,
        "migration_failed": report.failed,
        "migration_remaining": report.remaining,
    }
    _raise_on_trouble(report, metadata, what)
    _raise_if_stopped(report, metadata, what)
    return metadata


# ---------------------------------------------------------------------------- coverage
@dg.asset(
    deps=[wiki_chunk_embeddings, wiki_chunk_embeddings_maintenance],
    kinds={"postgres"},
    group_name=GROUP,
    automation_condition=COVERAGE_AUTOMATION,
)
def embedding_coverage(context: dg.AssetExecutionContext, database: WikiDatabaseResource) -> dg.MaterializeResult:
    """How much of the table is embedded: the runbook's status figures, plotted over time.

    Done when missing=0 and coverage_pct=100.00 (the `missing_is_zero` check); coverage shows 100.00 only
    when nothing is missing, and an empty table is 0.00. During a model migration, `migration_*` shows the new
    model's coverage of its shadow column (it does not count towards readiness until the swap).
    """
    settings = database.settings()
    with database.store(settings) as store:
        status = collect_status(store, settings)
    context.log.info(
        f"total={status['total']} embedded={status['embedded']} missing={status['missing']} "
        f"coverage_pct={status['coverage_pct']} failed={status['failed']} quarantined={status['quarantined']} "
        f"stale_model={status['stale_model']} stale_text={status['stale_text']}"
    )
    migration_metadata = {}
    if status["migration_model"]:  # the new model's coverage beside the live one, while a migration runs
        migration_metadata = {
            "migration_model": status["migration_model"],
            "migration_embedded": status["migration_embedded"],
            "migration_missing": status["migration_missing"],
            "migration_coverage_pct": dg.MetadataValue.float(float(status["migration_coverage_pct"])),
        }
        context.log.info(
            f"migration to {status['migration_model']}: missing={status['migration_missing']} "
            f"coverage_pct={status['migration_coverage_pct']}"
        )
    return dg.MaterializeResult(
        metadata={
            **migration_metadata,
            "dagster/row_count": status["total"],
            "total": status["total"],
            "embedded": status["embedded"],
            "missing": status["missing"],
            "coverage_pct": dg.MetadataValue.float(float(status["coverage_pct"])),
            "coverage_pct_text": status["coverage_pct"],
            "failed": status["failed"],
            "quarantined": status["quarantined"],
            "stale_model": status["stale_model"],
            "stale_text": status["stale_text"],
            "stale_text_scanned_at": status["stale_text_scanned_at"] or "never",
            "unverified": status["unverified"] if status["unverified"] != "" else "not scanned",
            "stop_requested": bool(status["stop_requested"]),
            "model": status["model"],
            "last_run_state": status["last_run_state"],
        }
    )


ASSETS = [
    wiki_chunks,
    missing_wiki_chunks,
    wiki_chunk_embeddings,
    wiki_chunk_embeddings_maintenance,
    embedding_coverage,
]
