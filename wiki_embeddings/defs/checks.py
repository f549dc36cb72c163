"""The runbook's "Done when": the readiness decision (core/readiness.py: missing=0, coverage_pct=100.00,
stale_model=0, no standing drift verdict), as a check on embedding_coverage.

Severity tells an expected state from a problem: while embedding runs are under way (CLI or Dagster: a live run
in the database, a Dagster run or backfill of the embedding assets in flight) a failing result is a WARN that
reports progress (missing, chunks/s, ETA); ERROR only when nothing is running and chunks are still missing
(failed, quarantined, or never reached). The check is not blocking: a refresh run always succeeds when it could
read the figures - nothing is computed downstream of coverage; the readiness sensor acts on its result.
"""

from typing import Any

import dagster as dg

from wiki_embeddings.core.readiness import assess
from wiki_embeddings.core.verify import drift_figures
from wiki_embeddings.defs.assets import LIVE_AUTOMATION, embedding_coverage
from wiki_embeddings.defs.metadata import missing_summary, progress, range_table, worst_ranges
from wiki_embeddings.defs.partitions import RANGE_WIDTH
from wiki_embeddings.defs.resources import WikiDatabaseResource

MISSING_IS_ZERO = "missing_is_zero"
COVERAGE_KEY = dg.AssetKey("embedding_coverage")
MISSING_IS_ZERO_KEY = dg.AssetCheckKey(COVERAGE_KEY, MISSING_IS_ZERO)
#: Dagster runs that embed: while one of them is queued or running, missing chunks are work under way.
EMBEDDING_ASSETS = {dg.AssetKey("wiki_chunk_embeddings"), dg.AssetKey("wiki_chunk_embeddings_maintenance")}
EMBEDDING_JOBS = {"bootstrap_job", "maintenance_job", "model_migration_job"}
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def dagster_work_under_way(instance: dg.DagsterInstance, own_run_id: str | None) -> int:
    """Dagster runs in flight that embed chunks (and backfills still requesting runs), other than this run."""
    from dagster._core.execution.backfill import BulkActionStatus

    count = 0
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT), limit=200):
        if run.run_id == own_run_id:
            continue
        if run.job_name in EMBEDDING_JOBS or (run.asset_selection and run.asset_selection & EMBEDDING_ASSETS):
            count += 1
    count += len(instance.get_backfills(status=BulkActionStatus.REQUESTED, limit=20))
    return count


def _own_run_id(context: dg.AssetCheckExecutionContext) -> str | None:
    try:
        return context.run.run_id
    except Exception:  # invoked directly, outside a run
        return None


@dg.asset_check(
    asset=embedding_coverage,
    name=MISSING_IS_ZERO,
    blocking=False,
    # evaluated in the same run whenever coverage is refreshed (an asset condition, valid on a check)
    automation_condition=LIVE_AUTOMATION,  # type: ignore[arg-type]
    description="Passes only when no chunk lacks an embedding (missing=0, coverage_pct=100.00), every embedding "
    "is of the live model (stale_model=0) and no drift verdict (model_changed, mismatch) stands: the readiness "
    "decision of core/readiness.py; the readiness sensor sets WIKI_EMBEDDINGS_READY=true after a pass. "
    "While embedding runs are under way a miss is a WARN with progress (chunks/s, ETA); ERROR when nothing runs.",
)
def missing_is_zero(context: dg.AssetCheckExecutionContext, database: WikiDatabaseResource) -> dg.AssetCheckResult:
    settings = database.settings()
    with database.store(settings) as store:
        store.migrate()
        status = store.status(settings.max_attempts)
        status.update(store.model_status())
        status.update(drift_figures(store))
        summary = missing_summary(store.missing_by_range(RANGE_WIDTH), store.failed_by_range(RANGE_WIDTH))
        running, rate = store.running_rate()
    # The one readiness decision (core/readiness.py), as `status --check` and the readiness sensor make it: vectors
    # of another model (stale_model) and a standing drift verdict fail the check as missing ones do.
    readiness = assess(status)
    passed = readiness.ready
    under_way = 0 if passed else running + dagster_work_under_way(context.instance, _own_run_id(context))
    worst = worst_ranges(summary)
    figures = progress(int(status["missing"]), running, rate)
    severity = dg.AssetCheckSeverity.ERROR
    if passed:
        description = f"done: all {status['total']} chunks embedded"
    elif status["total"] == 0:
        description = "the chunk table is empty: nothing to call ready"
    elif status["missing"] == 0 and status["stale_model"]:
        description = (
            f"{status['stale_model']} embeddings were made by another model than the live one; "
            "re-embed them through `wiki-embeddings migrate-model`"
        )
    elif readiness.blocker == "drift":
        description = readiness.reason
    elif under_way:
        severity = dg.AssetCheckSeverity.WARN
        description = (
            f"in progress: {status['missing']} chunks missing (coverage {status['coverage_pct']} %), "
            f"{figures['chunks_per_s'].value} chunks/s, ETA {figures['eta'].value}"
        )
    else:
        description = (
            f"{status['missing']} chunks missing (coverage {status['coverage_pct']} %) and nothing is running: "
            f"{status['failed']} with open failures, {status['quarantined']} quarantined; worst range "
            f"{worst[0]['range'] if worst else '-'}. Re-run the failed ranges or maintenance."
        )
    metadata: dict[str, Any] = {
        "missing": dg.MetadataValue.int(int(status["missing"])),
        "failed": dg.MetadataValue.int(int(status["failed"])),
        "quarantined": dg.MetadataValue.int(int(status["quarantined"])),
        "stale_model": dg.MetadataValue.int(int(status["stale_model"])),
        "stale_text": dg.MetadataValue.int(int(status["stale_text"])),
        "total": dg.MetadataValue.int(int(status["total"])),
        "coverage_pct": dg.MetadataValue.float(float(status["coverage_pct"])),
        "work_under_way": dg.MetadataValue.bool(bool(under_way)),
        "drift_verdict": dg.MetadataValue.text(status["drift_verdict"]),  # the readiness sensor re-assesses
        "ready_reason": dg.MetadataValue.text(readiness.reason),
        **figures,
        "worst_ranges": range_table(worst),
    }
    return dg.AssetCheckResult(passed=passed, severity=severity, description=description, metadata=metadata)
