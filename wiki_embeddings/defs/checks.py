"""The runbook's "Done when": missing=0 and coverage_pct=100.00, as a blocking check on embedding_coverage."""

import dagster as dg

from wiki_embeddings.defs.assets import (
    COVERAGE_AUTOMATION,
    embedding_coverage,
    markdown_table,
    missing_summary,
    worst_ranges,
)
from wiki_embeddings.defs.partitions import RANGE_WIDTH
from wiki_embeddings.defs.resources import WikiDatabaseResource

MISSING_IS_ZERO = "missing_is_zero"
COVERAGE_KEY = dg.AssetKey("embedding_coverage")
MISSING_IS_ZERO_KEY = dg.AssetCheckKey(COVERAGE_KEY, MISSING_IS_ZERO)


@dg.asset_check(
    asset=embedding_coverage,
    name=MISSING_IS_ZERO,
    blocking=True,
    automation_condition=COVERAGE_AUTOMATION,  # evaluated in the same run whenever coverage is refreshed
    description="Passes only when no chunk lacks an embedding (missing=0, coverage_pct=100.00) and every embedding "
    "is of the live model (stale_model=0); the readiness "
    "sensor sets WIKI_EMBEDDINGS_READY=true after a pass.",
)
def missing_is_zero(database: WikiDatabaseResource) -> dg.AssetCheckResult:
    settings = database.settings()
    with database.store(settings) as store:
        store.migrate()
        status = store.status(settings.max_attempts)
        status.update(store.model_status())
        summary = missing_summary(store.missing_by_range(RANGE_WIDTH), store.failed_by_range(RANGE_WIDTH))
    # Only embeddings current for the live model count: vectors of another model (stale_model) fail the check.
    passed = status["missing"] == 0 and status["coverage_pct"] == "100.00" and status["stale_model"] == 0
    worst = worst_ranges(summary)
    if passed:
        description = f"done: all {status['total']} chunks embedded"
    elif status["total"] == 0:
        description = "the chunk table is empty: nothing to call ready"
    elif status["missing"] == 0 and status["stale_model"]:
        description = (
            f"{status['stale_model']} embeddings were made by another model than the live one; "
            "re-embed them through `wiki-embeddings migrate-model`"
        )
    else:
        description = (
            f"{status['missing']} chunks missing (coverage {status['coverage_pct']} %), {status['failed']} with "
            f"open failures; worst range {worst.iloc[0]['range'] if not worst.empty else '-'}"
        )
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata={
            "missing": status["missing"],
            "failed": status["failed"],
            "quarantined": status["quarantined"],
            "stale_model": status["stale_model"],
            "stale_text": status["stale_text"],
            "total": status["total"],
            "coverage_pct": dg.MetadataValue.float(float(status["coverage_pct"])),
            "worst_ranges": markdown_table(worst),
        },
    )
