"""The assets: the chunk table, what is missing, the embeddings (per ID range, and maintenance), coverage.

Asset bodies call the core (engine, store via the resources) and turn its answers into metadata and
outcomes; they hold no SQL and no HTTP.

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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import dagster as dg
from pydantic import Field

from wiki_embeddings.core import operations
from wiki_embeddings.core.backfill import CLEAN_STATES as ENGINE_CLEAN_STATES
from wiki_embeddings.core.backfill import DimensionMismatch, RunReport
from wiki_embeddings.core.db import DatabaseUnavailable, DataRefused, Store, StoreError
from wiki_embeddings.core.status import collect_status
from wiki_embeddings.core.window import WINDOW_REASON
from wiki_embeddings.defs.partitions import (
    BACKFILL_POLICY,
    LAST_RANGE_ID,
    RANGE_WIDTH,
    id_ranges,
    key_bounds,
    key_for_id,
)
from wiki_embeddings.defs.resources import OllamaResource, WikiDatabaseResource, run_engine
from wiki_embeddings.settings import Settings, redact, url_secrets

GROUP = "wiki_embeddings"
#: Concurrency pool of every step that calls Ollama; its limit (dagster.yaml `concurrency.pools`, or
#: `dagster instance concurrency set ollama N`) is how many ranges embed at once.
OLLAMA_POOL = "ollama"
FAILURE_LOG_DIR_ENV = "WIKI_EMBED_FAILURE_LOG_DIR"


def default_failure_log(kind: str, env: Mapping[str, str] = os.environ) -> str:
    """The run config's failure-log default: the runbook's `/tmp/wiki-embed-failures-<kind>.jsonl`, or the same
    name in `WIKI_EMBED_FAILURE_LOG_DIR` (read when the definitions load)."""
    directory = env.get(FAILURE_LOG_DIR_ENV, "").strip() or "/tmp"
    return os.path.join(directory, f"wiki-embed-failures-{kind}.jsonl")


BOOTSTRAP_FAILURE_LOG = default_failure_log("bootstrap")
MAINTENANCE_FAILURE_LOG = default_failure_log("maintenance")
MAX_TABLE_ROWS = 100

#: Transient trouble only (server unavailable, database connection lost): a chunk-level failure or a stop
#: request raises `dg.Failure(allow_retries=False)`, which this policy does not retry.
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)

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


#: Engine end states that are the chunks' or the operator's business, not the infrastructure's.
CLEAN_STATES = ENGINE_CLEAN_STATES
#: End states worth a retry: the server or the database was away, or another session held some chunks (a
#: concurrent run's claim, a row lock); the chunks are fine.
TRANSIENT_STATES = {"server_unavailable", "database_unavailable", "locked"}


class EmbeddingServiceUnavailable(Exception):
    """The embedding server or the database went away mid-run (after the core's own retries): the
    RetryPolicy retries the step, which resumes where the run stopped (nothing is marked failed)."""


class RangeRunConfig(dg.Config):
    """One range run; defaults are the runbook's bootstrap command."""

    batch_size: int = Field(
        default=64, description="most chunks per request; trouble (503, timeouts) shrinks batches, success grows them"
    )
    report_every: int = Field(default=10, description="a progress line every N batches")
    timeout_sec: float | None = Field(default=120.0, description="deadline of one request; null: the ollama resource's")
    sleep_ms: int = Field(
        default=0,
        description="pause after each request; > 0 means one request in flight (0: the depth tunes itself; for "
        "live traffic use polite instead)",
    )
    polite: bool | None = Field(
        default=None,
        description="live queries share Ollama: one request in flight, batches sized to target_request_sec; "
        "null: on for maintenance once the readiness flag is set (WIKI_EMBEDDINGS_ENV_FILE)",
    )
    target_request_sec: float | None = Field(
        default=None, description="polite mode's longest request in seconds (0.5); setting it turns polite mode on"
    )
    max_chars: int | None = Field(default=2000, description="text cut before sending; null: the ollama resource's")
    failure_log: str = Field(default=BOOTSTRAP_FAILURE_LOG, description="JSONL of chunks that could not be embedded")
    retry_quarantined: bool = Field(
        default=False, description="also claim chunks quarantined by earlier failures (a deliberate re-run)"
    )
    until: str | None = Field(
        default=None,
        description="run window: end safely at HH:MM (the worker's local time, or with an offset: 06:00+09:00); "
        "the range is left resumable (not materialized, not failed)",
    )
    max_minutes: float | None = Field(default=None, description="run window: end safely after this many minutes")

    def engine_settings(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "report_every": self.report_every,
            "timeout_sec": self.timeout_sec,
            "sleep_ms": self.sleep_ms,
            "polite": self.polite,
            "target_request_sec": self.target_request_sec,
            "max_chars": self.max_chars,
            "failure_log": self.failure_log,
            "include_quarantined": self.retry_quarantined,
            "until": self.until,
            "max_minutes": self.max_minutes,
        }


class MaintenanceConfig(RangeRunConfig):
    """One maintenance run; defaults are the runbook's maintenance command."""

    report_every: int = Field(default=20, description="a progress line every N batches")
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
        observed = observe_table(store)
    context.log.info(f"wiki_chunks: {observed.description}")
    yield dg.ObserveResult(asset_key="wiki_chunks", metadata=observed.metadata, data_version=observed.data_version)


class TableObservation:
    """What `wiki_chunks` looks like now: metadata for the UI and a data version that changes with the table."""

    def __init__(self, total: int, low: int | None, high: int | None, missing: int):
        self.total, self.low, self.high, self.missing = total, low, high, missing
        self.data_version = dg.DataVersion(f"{total}:{high}:{missing}")
        self.description = f"{total} chunks, ids {low}..{high}, {missing} without an embedding"
        self.metadata: dict[str, Any] = {
            "dagster/row_count": dg.MetadataValue.int(total),
            "missing": dg.MetadataValue.int(missing),
            # Identifiers, not quantities: text, so the UI draws no plot of them.
            "min_id": dg.MetadataValue.text("" if low is None else str(low)),
            "max_id": dg.MetadataValue.text("" if high is None else str(high)),
            "ranges": dg.MetadataValue.text(
                f"{len(id_ranges.get_partition_keys())} ranges of {RANGE_WIDTH} ids up to {LAST_RANGE_ID}"
            ),
            "past_last_range": dg.MetadataValue.bool(high is not None and high > LAST_RANGE_ID),
        }


def observe_table(store: Store) -> TableObservation:
    """Two cheap queries: count and id bounds (primary key), missing (the partial index)."""
    low, high, total = store.id_bounds()
    return TableObservation(total, low, high, store.count_missing())


# ---------------------------------------------------------------------------- what is missing
def missing_summary(missing: list[tuple[int, int]], failed: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """One row per ID range with missing chunks (`range`, `missing`, `failed`); ids past the last range in one row."""
    failed_by_start = dict(failed)
    rows: dict[str, dict[str, Any]] = {}
    for start, count in missing:
        key = key_for_id(start) or f"past {LAST_RANGE_ID}"
        row = rows.setdefault(key, {"range": key, "missing": 0, "failed": 0})
        row["missing"] += count
        row["failed"] += failed_by_start.get(start, 0)
    return list(rows.values())


def worst_ranges(summary: list[dict[str, Any]], n: int = 5) -> list[dict[str, Any]]:
    return sorted(summary, key=lambda r: (-r["missing"], r["range"]))[:n]


RANGE_COLUMNS = {"range": "string", "chunks": "int", "missing": "int", "failed": "int"}


def range_table(rows: list[dict[str, Any]], limit: int = MAX_TABLE_ROWS) -> dg.MetadataValue:
    """Rows of {range, [chunks], missing, failed} as a table the UI renders (and sorts); at most `limit` rows."""
    columns = [c for c in RANGE_COLUMNS if any(c in r for r in rows)] or ["range", "missing", "failed"]
    schema = dg.TableSchema(columns=[dg.TableColumn(c, RANGE_COLUMNS[c]) for c in columns])
    records = [dg.TableRecord({c: r.get(c, 0) for c in columns}) for r in rows[:limit]]
    return dg.MetadataValue.table(records=records, schema=schema)


#: The former name of `range_table`.
markdown_table = range_table


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
    secrets = url_secrets(database.settings().database_url)
    try:
        return run_engine(database, ollama, mode=mode, log=context.log.info, **run)
    except DatabaseUnavailable as exc:  # the database is away: transient
        raise EmbeddingServiceUnavailable(f"{mode}: database unavailable: {_first_line(exc, secrets)}") from None
    except DataRefused as exc:
        raise dg.Failure(description=f"{mode}: database: {_first_line(exc, secrets)}", allow_retries=False) from None
    except (DimensionMismatch, StoreError) as exc:  # configuration: retrying cannot help
        raise dg.Failure(description=redact(str(exc), secrets), allow_retries=False) from None


def _first_line(exc: BaseException, secrets: Sequence[str | None]) -> str:
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


def window_ended(report: RunReport) -> bool:
    """The run stopped because its window (until / max_minutes, core/window.py) closed."""
    return report.state == "stopped" and report.stop_reason.startswith(WINDOW_REASON)


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
    keys = list(context.partition_keys)
    if len(keys) == 1:
        yield from _embed_one_range(context, config, database, ollama, keys[0])
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
            for event in _embed_one_range(context, config, database, ollama, key):
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
) -> Iterator[dg.AssetObservation | dg.MaterializeResult]:
    id_min, id_max = key_bounds(key)
    what = f"range {key}"
    report, settings = _run(
        context, database, ollama, mode=f"dagster {what}", id_min=id_min, id_max=id_max, **config.engine_settings()
    )
    metadata = {**report_metadata(report, settings), "id_min": id_min, "id_max": id_max}
    _raise_on_trouble(report, metadata, what)
    if window_ended(report):  # the run window closed: resumable, neither materialized nor failed
        metadata["window_ended"] = report.stop_reason
        yield dg.AssetObservation(asset_key=context.asset_key, partition=key, metadata=metadata)
        context.log.info(f"{what}: {report.stop_reason}; {report.remaining} chunks left for the next run")
        return
    if report.state == "stopped" or report.remaining > 0:
        # what the run did stays visible on the partition
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
    if window_ended(report):  # like --max-chunks: a clean, capped end; the shadow waits for the next run
        return dg.MaterializeResult(metadata={**metadata, "window_ended": report.stop_reason})
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
        overrides = operations.shadow_overrides(store)
    if overrides is None:
        return {}
    target = overrides["ollama_model"]
    what = f"maintenance of the migration to {target}"
    report, settings = _run(
        context, database, ollama, mode="dagster maintenance (migration)", **config.engine_settings(), **overrides
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
#: Status keys that are identifiers or labels, not quantities: text, so the UI draws no meaningless plot.
_TEXT_KEYS = {"last_run_id", "dimensions"}
#: Status keys whose value is a formatted number.
_FLOAT_KEYS = {"coverage_pct", "migration_coverage_pct", "last_run_chunks_per_s"}


def status_metadata(status: dict[str, Any]) -> dict[str, Any]:
    """Every status key as metadata of one stable type: ints stay ints (plotted), percentages and rates become
    floats, identifiers and labels text, flags bools. A key whose value is empty (`unverified` before the first
    content scan, `migration_*` without a migration) is left out rather than switching type."""
    out: dict[str, Any] = {}
    for key, value in status.items():
        if value is None or value == "":
            continue
        if key in _FLOAT_KEYS:
            try:
                out[key] = dg.MetadataValue.float(float(value))
            except (TypeError, ValueError):
                out[key] = dg.MetadataValue.text(str(value))
        elif isinstance(value, bool):
            out[key] = dg.MetadataValue.bool(value)
        elif isinstance(value, int) and key not in _TEXT_KEYS:
            out[key] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            out[key] = dg.MetadataValue.float(value)
        else:
            out[key] = dg.MetadataValue.text(str(value))
    return out


def progress(missing: int, running: int, rate: float) -> dict[str, Any]:
    """chunks/s of the runs under way and the time left at that rate, as stable metadata."""
    if missing == 0:
        eta = "done"
    elif running == 0:
        eta = "nothing running"
    elif rate <= 0:
        eta = "starting"
    else:
        eta = _duration(missing / rate)
    metadata: dict[str, Any] = {
        "runs_under_way": dg.MetadataValue.int(running),
        "chunks_per_s": dg.MetadataValue.float(round(rate, 2)),
        "eta": dg.MetadataValue.text(eta),
    }
    if missing and running and rate > 0:
        metadata["eta_s"] = dg.MetadataValue.float(round(missing / rate, 1))
    return metadata


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def ranges_overview(store: Store) -> list[dict[str, Any]]:
    """Chunks, missing and failed per ID range that holds chunks (ids past the last range in one row)."""
    failed = dict(store.failed_by_range(RANGE_WIDTH))
    rows: dict[str, dict[str, Any]] = {}
    for start, chunks, missing in store.rows_by_range(RANGE_WIDTH):
        key = key_for_id(start) or f"past {LAST_RANGE_ID}"
        row = rows.setdefault(key, {"range": key, "chunks": 0, "missing": 0, "failed": 0})
        row["chunks"] += chunks
        row["missing"] += missing
        row["failed"] += failed.get(start, 0)
    return list(rows.values())


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
