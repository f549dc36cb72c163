"""The one `dg.Definitions` of the project (workspace.yaml loads this module).

Start the UI on the embedded PostgreSQL with `bash scripts/dagster_ui.sh`.
"""

import os

import dagster as dg

from wiki_embeddings.defs.resources import OllamaResource, ReadinessResource, WikiDatabaseResource


def _env(var: str) -> dg.EnvVar | None:
    """`dg.EnvVar(var)` when the variable is set now (the UI then shows where the value comes from, never the
    value); None otherwise, and the resource reads the environment of the run itself (core defaults apply)."""
    return dg.EnvVar(var) if os.environ.get(var, "").strip() else None


def build_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "database": WikiDatabaseResource(
            database_url=_env("DATABASE_URL"),
            table=_env("WIKI_EMBED_TABLE"),
            state_schema=_env("WIKI_EMBED_STATE_SCHEMA"),
            stop_file=_env("EMBED_STOP_FILE"),
        ),
        "ollama": OllamaResource(
            url=_env("OLLAMA_URL"),
            model=_env("OLLAMA_MODEL"),
            api=_env("WIKI_EMBED_API"),
            api_key=_env("WIKI_EMBED_API_KEY"),
        ),
        "readiness": ReadinessResource(
            env_file=_env("WIKI_EMBEDDINGS_ENV_FILE"),
            restart_cmd=_env("WIKI_EMBEDDINGS_RESTART_CMD"),
            on_regression=_env("WIKI_EMBEDDINGS_READY_ON_REGRESSION"),
        ),
    }


@dg.definitions
def defs() -> dg.Definitions:
    """Built when Dagster loads the code location, not when this module is imported: the declarations are
    imported here, so the settings they read (ID ranges, cron strings, the auto-swap default) and the resources'
    environment are those of the load."""
    from wiki_embeddings.defs.assets import ASSETS
    from wiki_embeddings.defs.checks import missing_is_zero
    from wiki_embeddings.defs.jobs import JOBS
    from wiki_embeddings.defs.migration import MIGRATION_JOBS, MIGRATION_SENSORS
    from wiki_embeddings.defs.schedules import maintenance_schedule
    from wiki_embeddings.defs.sensors import SENSORS
    from wiki_embeddings.defs.trust import vectors_match_model

    return dg.Definitions(
        assets=ASSETS,
        asset_checks=[missing_is_zero, vectors_match_model],
        jobs=[*JOBS, *MIGRATION_JOBS],
        schedules=[maintenance_schedule],
        sensors=[*SENSORS, *MIGRATION_SENSORS],
        resources=build_resources(),
    )
