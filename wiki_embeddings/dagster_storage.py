"""Dagster instance storage of this project: dagster-postgres, with the embedded PostgreSQL as the local default.

`dagster.yaml` names the three classes below as its run, event-log and schedule storage. Each is the plain
dagster-postgres class (every feature - concurrency pools, asset status cache, NOTIFY watchers - unchanged);
only where its URL comes from differs:

1. `postgres_url` in the instance config (e.g. `{env: DAGSTER_PG_URL}` in a production `dagster.yaml`), else
2. the `DAGSTER_PG_URL` environment variable, else
3. locally (`WIKI_EMBED_DEPLOYMENT` is not `production`) with the `local` extra installed: the project's embedded
   PostgreSQL (started if needed), its `dagster` database;
4. otherwise a clear error naming what is missing.

So a bare `dagster dev`, `dg dev`, `dg check defs` or `dagster definitions validate` from the repo root works,
and a production instance never silently falls back to a database on the local disk.
"""

from __future__ import annotations

import os
from typing import Any

from dagster import Field, StringSource
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.run_storage import PostgresRunStorage
from dagster_postgres.schedule_storage import PostgresScheduleStorage

from wiki_embeddings.local_services import DAGSTER_PG_URL_ENV, embedded_allowed, missing_connection

_CONFIG = {
    "postgres_url": Field(StringSource, is_required=False),
    "should_autocreate_tables": Field(bool, is_required=False, default_value=True),
}


def instance_storage_url(configured: str | None = None) -> str:
    """The SQLAlchemy URL (psycopg2 driver) of Dagster's own database; see the module docstring for the order."""
    url = (configured or "").strip() or os.environ.get(DAGSTER_PG_URL_ENV, "").strip()
    if url:
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            # SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql:// URL; dagster-postgres needs psycopg2.
            url = "postgresql+psycopg2://" + url.split("://", 1)[1]
        return url
    allowed, why = embedded_allowed()
    if not allowed:
        raise missing_connection(DAGSTER_PG_URL_ENV, "the Dagster instance's database", why)
    from wiki_embeddings.devtools import embedded_postgres

    return embedded_postgres.dagster_storage_url()


def _from_config(cls: Any, inst_data: Any, config_value: dict[str, Any]) -> Any:
    return cls(
        postgres_url=instance_storage_url(config_value.get("postgres_url")),
        should_autocreate_tables=config_value.get("should_autocreate_tables", True),
        inst_data=inst_data,
    )


class _ProjectStorage:
    """The project's config for each dagster-postgres storage: the URL resolved by `instance_storage_url`."""

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return _CONFIG

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return _from_config(cls, inst_data, config_value)


class ProjectRunStorage(_ProjectStorage, PostgresRunStorage):
    pass


class ProjectEventLogStorage(_ProjectStorage, PostgresEventLogStorage):
    pass


class ProjectScheduleStorage(_ProjectStorage, PostgresScheduleStorage):
    pass
