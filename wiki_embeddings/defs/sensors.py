"""Sensors: readiness (the runbook's last step) and the automation that keeps coverage fresh.

`readiness_sensor` reads the latest completed evaluation of `missing_is_zero` (the readiness decision of
`core.readiness.assess`, made on the database's figures; a drift check evaluated after it is folded in by the same
function, `reassess`); after a fresh pass it sets
`WIKI_EMBEDDINGS_READY=true` in the env file and runs the optional backend-restart command. The rule itself
(`decide`, the atomic env-file edit) lives in `wiki_embeddings.core.readiness`. The cursor is the id of the
last evaluation handled, so one evaluation is acted on once. What it did is the tick's message and log; each
write of the flag is a materialization of the `readiness` asset (previous and new value, file, time, restart
result), a flag kept on a regression an observation of it.
"""

import dataclasses
import datetime as dt
from typing import Any

import dagster as dg

from wiki_embeddings.core.readiness import (
    READY_KEY,
    Evaluation,
    Materialization,
    assess,
    decide,
    read_flag,
    restart_backend,
    set_flag,
)
from wiki_embeddings.core.verify import DECISIVE
from wiki_embeddings.defs.assets import embedding_coverage, missing_wiki_chunks
from wiki_embeddings.defs.assets import readiness as readiness_asset
from wiki_embeddings.defs.checks import COVERAGE_KEY, MISSING_IS_ZERO, MISSING_IS_ZERO_KEY
from wiki_embeddings.defs.resources import ReadinessResource
from wiki_embeddings.defs.state import embedding_state_sensor, sensor_interval
from wiki_embeddings.defs.trust import Drift, latest_drift

COMPLETED = {"SUCCEEDED", "FAILED"}


def latest_evaluation(instance: dg.DagsterInstance) -> tuple[Evaluation | None, str | None, dict[str, Any]]:
    """The latest evaluation of missing_is_zero and its figures (metadata: what `assess` decides on), or
    (None, why, {}) when there is none that completed."""
    record = instance.get_latest_asset_check_evaluation_record(MISSING_IS_ZERO_KEY)
    if record is None:
        return None, None, {}
    if record.status.value not in COMPLETED or record.event is None:
        why = f"evaluation {record.id} of {MISSING_IS_ZERO} has not completed (in progress, or its run failed)"
        return None, why, {}
    evaluation = record.event.asset_check_evaluation
    if evaluation is None:
        return None, f"evaluation {record.id} has no result", {}
    missing = evaluation.metadata.get("missing")
    target = evaluation.target_materialization_data
    return (
        Evaluation(
            id=record.id,
            passed=evaluation.passed,
            timestamp=record.event.timestamp,
            target_storage_id=target.storage_id if target else None,
            missing=int(missing.value) if missing is not None else None,  # type: ignore[arg-type]
        ),
        None,
        {k: v.value for k, v in evaluation.metadata.items()},
    )


def latest_coverage(instance: dg.DagsterInstance) -> Materialization | None:
    records = instance.fetch_materializations(COVERAGE_KEY, limit=1).records
    if not records:
        return None
    return Materialization(storage_id=records[0].storage_id, timestamp=records[0].timestamp)


@dg.sensor(
    name="readiness_sensor",
    minimum_interval_seconds=sensor_interval(60),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        f"After a fresh pass of {MISSING_IS_ZERO}, sets {READY_KEY}=true in the env file (WIKI_EMBEDDINGS_ENV_FILE, "
        ".env.beta) and runs WIKI_EMBEDDINGS_RESTART_CMD if set. Never on a failed, missing or stale evaluation."
    ),
)
def readiness_sensor(context: dg.SensorEvaluationContext, readiness: ReadinessResource) -> dg.SensorResult:
    settings = readiness.settings()
    path = settings.env_path
    evaluation, pending, figures = latest_evaluation(context.instance)
    if pending:
        context.log.info(f"readiness: {pending}; waiting")
        return dg.SensorResult(skip_reason=pending, cursor=context.cursor)
    handled = int(context.cursor) if context.cursor else None
    flag = read_flag(path)
    if evaluation is not None:
        evaluation = reassess(evaluation, figures, latest_drift(context.instance))
    decision = decide(evaluation, latest_coverage(context.instance), handled, flag, settings.on_regression)
    cursor = str(decision.handled) if decision.handled is not None else context.cursor
    metadata: dict[str, Any] = {
        "readiness_action": dg.MetadataValue.text(decision.action),
        "reason": dg.MetadataValue.text(decision.reason),
        "env_file": dg.MetadataValue.path(str(path)),
        "at": dg.MetadataValue.text(dt.datetime.now(dt.UTC).isoformat(timespec="seconds")),
    }

    if decision.action == "none":
        context.log.info(f"readiness: {decision.reason}; {READY_KEY} in {path} is {_show(flag)}")
        return dg.SensorResult(skip_reason=f"{decision.reason}; {READY_KEY} is {_show(flag)}", cursor=cursor)

    if decision.action == "keep_on_regression":
        context.log.warning(f"readiness: {decision.reason} ({path})")
        metadata.update(previous=dg.MetadataValue.text("true"), flag=dg.MetadataValue.text("true"))
        return dg.SensorResult(
            asset_events=[dg.AssetObservation(asset_key=readiness_asset.key, metadata=metadata)],
            cursor=cursor,
            skip_reason=f"kept {READY_KEY}=true in {path}: {decision.reason}",
        )

    value = decision.action == "set_true"
    change = set_flag(path, value)
    new = "true" if value else "false"
    metadata.update(previous=dg.MetadataValue.text(_show(change.previous)), flag=dg.MetadataValue.text(new))
    metadata["file_created"] = dg.MetadataValue.bool(bool(change.created))
    done = f"set {READY_KEY}={new} in {path} (was {_show(change.previous)}{', file created' if change.created else ''})"
    log = context.log.info if value else context.log.warning
    log(f"readiness: {decision.reason}: {done}")
    restart = restart_backend(
        settings,
        lambda m: context.log.info(f"readiness: {m}"),
        lambda m: context.log.error(f"readiness: {m}"),
        "picks the flag up",
    )
    if restart is not None:
        metadata["restart_returncode"] = dg.MetadataValue.text(
            str(restart.returncode) if restart.returncode is not None else "timed out"
        )
        metadata["restart_output"] = dg.MetadataValue.text(restart.output_tail)
        done += f"; restart command exited {metadata['restart_returncode'].value}"
    return dg.SensorResult(
        asset_events=[
            dg.AssetMaterialization(
                asset_key=readiness_asset.key, description=f"{decision.reason}: {done}", metadata=metadata
            )
        ],
        cursor=cursor,
        skip_reason=f"FLAG WRITTEN: {done}",
    )


def reassess(evaluation: Evaluation, figures: dict[str, Any], drift: Drift | None) -> Evaluation:
    """The readiness decision (core/readiness.py `assess`) on the check's figures, with the verdict of a drift
    check evaluated after it (vectors_match_model: a `match` clears a standing verdict, `model_changed` or
    `mismatch` blocks, `not_evaluated` changes nothing). An older drift verdict is in the check's own figures: it
    read the database after it was recorded."""
    if drift is not None and drift.id > evaluation.id:
        evaluation = dataclasses.replace(evaluation, id=drift.id)
        if drift.verdict in DECISIVE:
            standing = "" if drift.verdict == "match" else drift.verdict
            figures = {**figures, "drift_verdict": standing, "drift_at": "", "drift_detail": drift.description}
    if not all(k in figures for k in ("total", "missing", "coverage_pct")):
        return evaluation  # an evaluation without the figures (none recorded them): its own result stands
    verdict = assess(figures)
    blocked_by = "" if verdict.ready or verdict.blocker == "missing" else verdict.reason
    return dataclasses.replace(evaluation, passed=verdict.ready, blocked_by=blocked_by)


def _show(flag: bool | None) -> str:
    return "unset" if flag is None else str(flag).lower()


#: Runs missing_wiki_chunks, embedding_coverage and its check by their automation condition (LIVE_AUTOMATION):
#: after any write or change of the table, once on a new instance, on WIKI_EMBED_REFRESH_CRON - so the end of a
#: bootstrap (by Dagster or by the CLI) reaches the readiness sensor without anyone launching a run.
coverage_automation_sensor = dg.AutomationConditionSensorDefinition(
    "coverage_automation_sensor",
    target=dg.AssetSelection.assets(missing_wiki_chunks, embedding_coverage),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=sensor_interval(30),
    description="Refreshes missing_wiki_chunks, embedding_coverage and missing_is_zero after any write or change "
    "of the table (seen by embedding_state_sensor), once on a new instance, and on WIKI_EMBED_REFRESH_CRON.",
)

SENSORS = [readiness_sensor, coverage_automation_sensor, embedding_state_sensor]
