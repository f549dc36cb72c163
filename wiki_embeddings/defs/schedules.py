"""The runbook's periodic maintenance: `maintenance_job` on a cron that is a setting, one run at a time."""

import os

import dagster as dg

from wiki_embeddings.defs.config import MaintenanceConfig
from wiki_embeddings.defs.jobs import MODE_TAG, maintenance_job

MAINTENANCE_CRON_ENV = "WIKI_EMBED_MAINTENANCE_CRON"
MAINTENANCE_TZ_ENV = "WIKI_EMBED_MAINTENANCE_TZ"
DEFAULT_MAINTENANCE_CRON = "0 * * * *"  # hourly

MAINTENANCE_CRON = os.environ.get(MAINTENANCE_CRON_ENV, "").strip() or DEFAULT_MAINTENANCE_CRON
MAINTENANCE_TZ = os.environ.get(MAINTENANCE_TZ_ENV, "").strip() or "UTC"

#: A run in one of these states still holds (or is about to hold) the embedding server.
NOT_FINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def maintenance_run_config() -> dg.RunConfig:
    """The runbook's maintenance settings; a scheduled run never retries quarantined chunks."""
    return dg.RunConfig(ops={"wiki_chunk_embeddings_maintenance": MaintenanceConfig(retry_quarantined=False)})


@dg.schedule(
    name="maintenance_schedule",
    cron_schedule=MAINTENANCE_CRON,
    execution_timezone=MAINTENANCE_TZ,
    job=maintenance_job,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description=(
        f"Runs maintenance_job on `{MAINTENANCE_CRON}` ({MAINTENANCE_CRON_ENV}); a tick is skipped while an earlier "
        "maintenance run has not finished. Turn it on once the bootstrap backfill is done."
    ),
)
def maintenance_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    running = context.instance.get_runs(
        filters=dg.RunsFilter(job_name=maintenance_job.name, statuses=NOT_FINISHED), limit=1
    )
    if running:
        run = running[0]
        return dg.SkipReason(
            f"maintenance run {run.run_id} is still {run.status.value}; skipping this tick so two maintenance runs "
            "never overlap"
        )
    return dg.RunRequest(run_config=maintenance_run_config(), tags={MODE_TAG: "maintenance"})
