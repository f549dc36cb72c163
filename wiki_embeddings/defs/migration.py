"""Dagster side of a change of model: fill the shadow column over the same ID ranges, then swap it in.

`wiki-embeddings migrate-model --to MODEL` starts the migration (asks the model for its vector length, adds
the shadow column, records the target); `model_migration_job` then fills the shadow range by range (launch
it as a backfill of all ranges, like `bootstrap_job`), and `model_swap_job` swaps it in once complete. The
live column keeps serving, and the readiness flag stays as it is, until the swap.
"""

import dagster as dg

from wiki_embeddings.core import migration
from wiki_embeddings.defs.assets import (
    OLLAMA_POOL,
    TRANSIENT_RETRY,
    RangeRunConfig,
    _raise_if_stopped,
    _raise_on_trouble,
    _run,
    report_metadata,
)
from wiki_embeddings.defs.partitions import id_ranges, range_bounds
from wiki_embeddings.defs.resources import OllamaResource, WikiDatabaseResource

MODE_TAG = "wiki_embeddings/mode"


@dg.op(
    pool=OLLAMA_POOL,
    retry_policy=TRANSIENT_RETRY,
    description="Embed one ID range into the migration's shadow column with its target model.",
)
def fill_shadow_range(
    context: dg.OpExecutionContext, config: RangeRunConfig, database: WikiDatabaseResource, ollama: OllamaResource
) -> None:
    with database.store() as store:
        store.migrate()
        target, shadow = store.migration_target()
    if not target or not shadow:
        raise dg.Failure(
            description="no model migration recorded: start one with `wiki-embeddings migrate-model --to MODEL` "
            "(it asks the model for its vector length and adds the shadow column)",
            allow_retries=False,
        )
    key = context.partition_key
    id_min, id_max = range_bounds(key, key)
    what = f"migration to {target} range {key}"
    report, settings = _run(
        context,  # type: ignore[arg-type]
        database,
        ollama,
        mode=f"dagster migrate {key}",
        id_min=id_min,
        id_max=id_max,
        embedding_column=shadow,
        ollama_model=target,
        **config.engine_settings(),
    )
    metadata = {**report_metadata(report, settings), "id_min": id_min, "id_max": id_max, "shadow_column": shadow}
    _raise_on_trouble(report, metadata, what)
    _raise_if_stopped(report, metadata, what)
    if report.remaining > 0:
        raise dg.Failure(
            description=f"{what}: {report.remaining} chunks still missing in {shadow} ({report.failed} failed "
            f"this run, failure log {settings.failure_log}); fix and re-run the range",
            metadata=metadata,
            allow_retries=False,
        )
    context.log.info(f"{what}: {report.embedded} chunks embedded into {shadow}")


@dg.op(description="Swap the complete shadow column in (one transaction); refused while it is incomplete.")
def swap_model(context: dg.OpExecutionContext, database: WikiDatabaseResource) -> None:
    with database.store() as store:
        store.migrate()
        try:
            message = migration.swap(store, log=context.log.info)
        except migration.MigrationError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from None
    context.log.info(message)


@dg.job(
    partitions_def=id_ranges,
    tags={MODE_TAG: "migrate"},
    config=dg.RunConfig(ops={"fill_shadow_range": RangeRunConfig()}),
    description="Fill the model migration's shadow column, one run per ID range (launch as a backfill of all "
    "ranges); start the migration with `wiki-embeddings migrate-model --to MODEL` first.",
)
def model_migration_job() -> None:
    fill_shadow_range()


@dg.job(tags={MODE_TAG: "swap"}, description="Make the complete shadow column the live one (`migrate-model --swap`).")
def model_swap_job() -> None:
    swap_model()


MIGRATION_JOBS = [model_migration_job, model_swap_job]
