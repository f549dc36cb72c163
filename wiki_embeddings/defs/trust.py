"""Drift as a readiness condition: `vectors_match_model`, a sampled re-embedding check on `embedding_coverage`.

Evaluated with `missing_is_zero` (same automation condition: after every write or change of the table, i.e. after
runs, and on WIKI_EMBED_REFRESH_CRON) and cheap: `DRIFT_SAMPLE` vectors re-embedded by the live model and compared
with what is stored (`wiki_embeddings.core.verify`, the logic of `wiki-embeddings verify`). It fails (ERROR) when
the model answering under the live name no longer reproduces the stored vectors - "the model answering as `X`
changed: re-embed with `migrate-model`" - or when some vectors differ or have norm 0. Its verdict is recorded like
`verify`'s and is part of the readiness decision (core/readiness.py `assess`, core/verify.py `drift_figures`): the
flag is not set (and, with the policy `unset`, is taken back) until a later match, a re-embed or a swap. A server
that does not answer makes the result `not_evaluated` (a WARN): never "model changed", and it does not block.
"""

from dataclasses import dataclass
from typing import Any

import dagster as dg

from wiki_embeddings.core import verify
from wiki_embeddings.core.factories import resolve_model
from wiki_embeddings.defs.assets import LIVE_AUTOMATION, embedding_coverage
from wiki_embeddings.defs.resources import OllamaResource, WikiDatabaseResource

VECTORS_MATCH = "vectors_match_model"
VECTORS_MATCH_KEY = dg.AssetCheckKey(dg.AssetKey("embedding_coverage"), VECTORS_MATCH)
DRIFT_SAMPLE = 32


@dg.asset_check(
    asset=embedding_coverage,
    name=VECTORS_MATCH,
    blocking=False,
    automation_condition=LIVE_AUTOMATION,  # type: ignore[arg-type]  # an asset condition, valid on a check
    description=f"Re-embeds {DRIFT_SAMPLE} stored vectors spread over the table with the live model and compares "
    f"(cosine >= {verify.MIN_COSINE}): fails when the model answering under the live name changed (an `ollama pull` "
    "replaced its weights) or vectors differ / have norm 0. Readiness waits for it like for missing_is_zero.",
)
def vectors_match_model(
    context: dg.AssetCheckExecutionContext, database: WikiDatabaseResource, ollama: OllamaResource
) -> dg.AssetCheckResult:
    settings = database.settings(**ollama.overrides())
    with database.store(settings) as store:
        store.migrate()
        report = verify.verify(store, settings, resolve_model(settings, store), sample=DRIFT_SAMPLE)
    context.log.info(report.message)
    severity = dg.AssetCheckSeverity.WARN if report.verdict == "not_evaluated" else dg.AssetCheckSeverity.ERROR
    return dg.AssetCheckResult(
        passed=report.verdict in ("match", "nothing_to_verify"),  # no vector yet: nothing to distrust
        severity=severity,
        description=report.message,
        metadata=verify_metadata(report),
    )


def verify_metadata(report: verify.VerifyReport) -> dict[str, Any]:
    out: dict[str, Any] = {
        "verdict": dg.MetadataValue.text(report.verdict),
        "model": dg.MetadataValue.text(report.model),
        "compared": dg.MetadataValue.int(report.compared),
        "below_threshold": dg.MetadataValue.int(report.below_threshold),
        "zero_norm": dg.MetadataValue.int(report.zero_norm),
        "threshold": dg.MetadataValue.float(report.threshold),
        "digest": dg.MetadataValue.text(report.digest or ""),
        "recorded_digest": dg.MetadataValue.text(report.recorded_digest or ""),
    }
    if report.min_cosine is not None:
        out["min_cosine"] = dg.MetadataValue.float(report.min_cosine)
        out["median_cosine"] = dg.MetadataValue.float(report.median_cosine or 0.0)
    return out


@dataclass(frozen=True)
class Drift:
    id: int
    passed: bool
    verdict: str
    description: str


def latest_drift(instance: dg.DagsterInstance) -> Drift | None:
    """The latest completed evaluation of vectors_match_model, or None."""
    record = instance.get_latest_asset_check_evaluation_record(VECTORS_MATCH_KEY)
    if record is None or record.event is None or record.status.value not in ("SUCCEEDED", "FAILED"):
        return None
    evaluation = record.event.asset_check_evaluation
    if evaluation is None:
        return None
    verdict = evaluation.metadata.get("verdict")
    return Drift(
        id=record.id,
        passed=evaluation.passed,
        verdict=str(verdict.value) if verdict is not None else "",
        description=evaluation.description or "",
    )
