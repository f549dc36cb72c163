"""Resources: typed wrappers around the core's store (all SQL), client (all HTTP) and readiness settings.

Every field is optional. A field left unset falls back, *at run time*, to the environment variable named in
its description and then to the core default (`wiki_embeddings.settings.from_env`), so the definitions load
(and `dagster definitions validate` passes) with no variable set, and a run reads the environment of the
process that executes it. `definitions.py` binds `dg.EnvVar(...)` to a field when that variable is set at
load time, so the UI shows where the value comes from without ever showing a secret.

Precedence for one run: run config > resource field > environment variable > core default.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg
from pydantic import Field

from wiki_embeddings.core import control
from wiki_embeddings.core.db import Store
from wiki_embeddings.core.embedders import PooledClient
from wiki_embeddings.core.factories import build_store, probe_model_dimensions
from wiki_embeddings.core.operations import default_client
from wiki_embeddings.core.readiness import ReadinessSettings
from wiki_embeddings.local_services import database_url
from wiki_embeddings.settings import OPTIONS, Settings, from_env


def _set(**values: Any) -> dict[str, Any]:
    """The fields an operator actually set ('' counts as unset, like an empty environment variable)."""
    return {k: v for k, v in values.items() if v is not None and v != ""}


def _overrides(resource: dg.ConfigurableResource, **renamed: str) -> dict[str, Any]:
    """The settings a resource's fields set: each field is the setting of its name (or of `renamed[field]`)."""
    values = {renamed.get(name, name): getattr(resource, name) for name in type(resource).model_fields}
    unknown = set(values) - set(OPTIONS)
    if unknown:
        raise TypeError(f"{type(resource).__name__} has fields that are no setting: {sorted(unknown)}")
    return _set(**values)


class WikiDatabaseResource(dg.ConfigurableResource):
    """The PostgreSQL database holding the chunk table; wraps the core `Store`."""

    database_url: str | None = Field(
        default=None,
        description="libpq URL [DATABASE_URL]. Empty: the project's embedded PostgreSQL (started if needed).",
    )
    table: str | None = Field(default=None, description="chunk table [WIKI_EMBED_TABLE] (public.wiki_chunks)")
    id_column: str | None = Field(default=None, description="[WIKI_EMBED_ID_COLUMN] (id)")
    text_column: str | None = Field(default=None, description="[WIKI_EMBED_TEXT_COLUMN] (content)")
    embedding_column: str | None = Field(default=None, description="[WIKI_EMBED_EMBEDDING_COLUMN] (embedding)")
    state_schema: str | None = Field(
        default=None, description="schema of the tool's bookkeeping tables [WIKI_EMBED_STATE_SCHEMA] (wiki_embeddings)"
    )
    stop_file: str | None = Field(
        default=None,
        description="the operators' brake: runs stop after their batch [EMBED_STOP_FILE] (/tmp/wiki-embed.stop)",
    )
    max_attempts: int | None = Field(
        default=None,
        description="failures of the same text before a chunk is quarantined [WIKI_EMBED_MAX_ATTEMPTS] (3)",
    )

    def overrides(self) -> dict[str, Any]:
        return _overrides(self)

    def settings(self, **run: Any) -> Settings:
        """Environment, then this resource's fields, then `run` (run config) on top; checked (`checked`)."""
        return checked(lambda: from_env(**{**self.overrides(), **_set(**run)}))

    @contextlib.contextmanager
    def store(self, settings: Settings | None = None) -> Iterator[Store]:
        """A core Store on the configured (or embedded) database, closed afterwards."""
        settings = settings or self.settings()
        with build_store(settings, database_url(settings)) as store:
            yield store

    def request_stop(self, reason: str = "operator (Dagster)") -> str:
        """The runbook's safe stop: stop file + stop request in the database. Returns the stop file path."""
        settings = self.settings()
        with self.store(settings) as store:
            control.request_stop(store, settings.stop_file, reason)
        return settings.stop_file

    def clear_stop(self) -> tuple[str, bool]:
        """The runbook's resume (without the run): clear the database request, remove the stop file."""
        settings = self.settings()
        with self.store(settings) as store:
            removed = control.clear_stop(store, settings.stop_file)
        return settings.stop_file, removed


class OllamaResource(dg.ConfigurableResource):
    """The Ollama embedding server(s); wraps the core `OllamaClient`."""

    url: str | None = Field(
        default=None,
        description="[OLLAMA_URL] (http://ollama:11434); comma-separated for several servers, used round-robin (pool "
        "`ollama` above 1: each run leases its share of them, docs/dagster.md)",
    )
    model: str | None = Field(
        default=None, description="[OLLAMA_MODEL]; unset: the model recorded for the table by its last run"
    )
    timeout_sec: float | None = Field(
        default=None, description="deadline of one embedding request; a run's config value wins (120)"
    )
    max_chars: int | None = Field(default=None, description="text cut before sending; a run's config value wins (2000)")
    retries: int | None = Field(
        default=None, description="retries of transport errors / overload [WIKI_EMBED_RETRIES] (5)"
    )
    concurrency: int | None = Field(
        default=None, description="requests in flight per server; 0: self-tuning [WIKI_EMBED_CONCURRENCY] (0)"
    )
    text_prefix: str | None = Field(
        default=None, description="prepended to every text, e.g. 'search_document: ' [WIKI_EMBED_TEXT_PREFIX]"
    )
    query_prefix: str | None = Field(
        default=None, description="the model's query prefix, e.g. 'search_query: ' [WIKI_EMBED_QUERY_PREFIX]"
    )
    api: str | None = Field(default=None, description="ollama, or openai (/v1/embeddings) [WIKI_EMBED_API] (ollama)")
    api_key: str | None = Field(
        default=None, description="bearer key of an OpenAI-compatible server, via dg.EnvVar [WIKI_EMBED_API_KEY]"
    )

    def overrides(self) -> dict[str, Any]:
        return _overrides(self, url="ollama_url", model="ollama_model")

    def client(self, settings: Settings, store: Store) -> PooledClient:
        """A client for the model to use: the configured one, else the one recorded for the table."""
        return default_client(settings, store)

    def probe_dimensions(self, settings: Settings, model: str) -> int:
        """Ask `model` for one vector: its length sizes a migration's shadow column."""
        return probe_model_dimensions(settings, model)


class ReadinessResource(dg.ConfigurableResource):
    """Where the runbook's readiness flag lives and what happens when it flips."""

    env_file: str | None = Field(
        default=None,
        description="env file holding WIKI_EMBEDDINGS_READY [WIKI_EMBEDDINGS_ENV_FILE] (.env.beta, from the "
        "directory Dagster runs in)",
    )
    restart_cmd: str | None = Field(
        default=None, description="backend restart command run after the flag flips [WIKI_EMBEDDINGS_RESTART_CMD]"
    )
    on_regression: str | None = Field(
        default=None,
        description="when missing rises again: 'keep' the flag (a warning) or 'unset' it "
        "[WIKI_EMBEDDINGS_READY_ON_REGRESSION] (keep)",
    )
    restart_timeout_sec: float | None = Field(
        default=None, description="[WIKI_EMBEDDINGS_RESTART_TIMEOUT_SEC] (45; a sensor tick has ~60 s)"
    )

    def settings(self) -> ReadinessSettings:
        return ReadinessSettings.from_env(
            **_set(
                env_file=self.env_file,
                restart_cmd=self.restart_cmd,
                on_regression=self.on_regression,
                restart_timeout_sec=self.restart_timeout_sec,
            )
        )


def run_settings(database: WikiDatabaseResource, ollama: OllamaResource, **run: Any) -> Settings:
    """The settings of one run of a core operation: environment, both resources' fields, then `run` (run config),
    checked (`checked`), with the database URL resolved (the embedded PostgreSQL when empty)."""
    settings = checked(lambda: from_env(**{**database.overrides(), **ollama.overrides(), **_set(**run)}))
    return settings.replace(database_url=database_url(settings))


def checked(build: Callable[[], Settings]) -> Settings:
    """Settings built and validated (`Settings.validate`: ranges, names, URLs) before anything is written; a value
    refused is a failure naming the setting that no retry can help (the step's RetryPolicy would retry a plain
    error)."""
    try:
        return build().validate()
    except ValueError as exc:
        raise dg.Failure(description=f"a setting is refused: {exc}", allow_retries=False) from None
