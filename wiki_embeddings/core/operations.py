"""Every operation the CLI and the Dagster layer both offer, written once: a backfill run (a range, a bootstrap or
a maintenance run, which during a model migration also fills the shadow column), the start of a model migration,
the fill of its shadow column, the swap behind the quality gate, and the rollback.

The front-ends translate arguments into Settings and these keyword arguments, then print (CLI) or build metadata
and outcomes (Dagster); the decisions are made here. Each operation opens its own store (connections) from
`settings.database_url`, which the front-end has resolved (the embedded PostgreSQL or DATABASE_URL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wiki_embeddings.checks import AT_LEAST_ONE, Range, check_number
from wiki_embeddings.core import identity, migration, quality
from wiki_embeddings.core.backfill import Backfill, RunReport
from wiki_embeddings.core.db import Store
from wiki_embeddings.core.embedders import PooledClient
from wiki_embeddings.core.factories import build_client, build_store, probe_model_dimensions, resolve_model
from wiki_embeddings.core.modelname import InvalidModelName, check_model_name
from wiki_embeddings.core.progress import Reporter
from wiki_embeddings.settings import Settings

ClientFactory = Callable[[Settings, Store], PooledClient]
ReporterFactory = Callable[[], Reporter | None]
Log = Callable[[str], None]
#: End states after which a maintenance run goes on to the migration's shadow column: a clean end that was not
#: a stop (a stop request or a closed run window end the maintenance there; the shadow waits for the next run).
SHADOW_AFTER = {"completed", "max_chunks"}


def default_client(settings: Settings, store: Store) -> PooledClient:
    """The configured model (OLLAMA_MODEL), else the one recorded for the table, at OLLAMA_URL."""
    return build_client(settings, resolve_model(settings, store))


def _store(settings: Settings) -> Store:
    if not settings.database_url:
        raise ValueError("an operation needs settings.database_url (the embedded one or DATABASE_URL)")
    return build_store(settings, settings.database_url)


# ---------------------------------------------------------------------------- backfill runs
def run_backfill(
    settings: Settings,
    *,
    mode: str,
    log: Log,
    client: ClientFactory = default_client,
    reporter: Reporter | None = None,
    handle_signals: bool = False,
) -> RunReport:
    """One engine run on its own store (connections) and client; `settings.database_url` must be resolved."""
    for warning in settings.api_warnings():
        log(warning)
    with _store(settings) as store:
        engine = Backfill(
            settings,
            store,
            client(settings, store),
            mode=mode,
            log=log,
            handle_signals=handle_signals,
            reporter=reporter,
        )
        return engine.run()


@dataclass(frozen=True)
class BackfillOutcome:
    """A backfill run and, for maintenance during a model migration, the shadow fill that followed it."""

    live: RunReport
    shadow: RunReport | None = None

    @property
    def last(self) -> RunReport:
        """The run whose end decides the outcome (exit code, error line): the shadow fill when there was one."""
        return self.shadow or self.live


def is_maintenance(settings: Settings) -> bool:
    """The runbook's maintenance run is the one with --max-chunks (a re-run of the failures is not)."""
    return settings.max_chunks is not None and not settings.retry_failed


def backfill(
    settings: Settings,
    *,
    mode: str,
    log: Log,
    maintenance: bool,
    client: ClientFactory = default_client,
    urls: list[str] | None = None,
    handle_signals: bool = False,
    reporter: ReporterFactory = lambda: None,
    shadow_mode: str = "migrate (maintenance)",
) -> BackfillOutcome:
    """A backfill run of the live column. A `maintenance` run that ended cleanly (not stopped) also fills the
    shadow column of a model migration in progress with its target model (same cap), so chunks added or edited
    after their range was migrated never hold the swap back. `urls`: the shadow fill's servers (default: the
    settings')."""
    live = run_backfill(settings, mode=mode, log=log, client=client, handle_signals=handle_signals, reporter=reporter())
    if not maintenance or live.state not in SHADOW_AFTER:
        return BackfillOutcome(live)
    with _store(settings) as store:
        overrides = shadow_overrides(store)
    if overrides is None:
        return BackfillOutcome(live)
    shadow = fill_shadow(
        settings, overrides, mode=shadow_mode, log=log, urls=urls, handle_signals=handle_signals, reporter=reporter()
    )
    return BackfillOutcome(live, shadow)


# ---------------------------------------------------------------------------- model migration
def shadow_overrides(store: Store) -> dict[str, Any] | None:
    """Settings overrides for a fill of the active migration's shadow column - the column, the target model and
    the prefixes the migration was started with - or None when no migration with a shadow column is under way."""
    active = migration.active_migration(store)
    if active is None:
        return None
    target, shadow = active
    return {"embedding_column": shadow, "ollama_model": target, **identity.shadow_prefixes(store, shadow)}


class NoMigration(migration.MigrationError):
    """A shadow fill was asked for, but no migration with a shadow column is recorded."""


def active_shadow(settings: Settings) -> dict[str, Any]:
    """`shadow_overrides` of the table, or NoMigration."""
    with _store(settings) as store:
        store.migrate()
        overrides = shadow_overrides(store)
    if overrides is None:
        raise NoMigration(
            "no model migration recorded: start one with `wiki-embeddings migrate-model --to MODEL` (Dagster: "
            "start_model_migration_job), which asks the model for its vector length and adds the shadow column"
        )
    return overrides


def fill_shadow(
    settings: Settings,
    overrides: dict[str, Any],
    *,
    mode: str,
    log: Log,
    urls: list[str] | None = None,
    handle_signals: bool = False,
    reporter: Reporter | None = None,
) -> RunReport:
    """One engine run on the shadow column with the migration's target model (and its prefixes): `overrides`
    from `shadow_overrides` / `active_shadow`, or the column and model a start just returned."""
    shadow_settings = settings.replace(**overrides)
    target = str(overrides["ollama_model"])
    return run_backfill(
        shadow_settings,
        mode=mode,
        log=log,
        client=lambda s, _store: build_client(s, target, urls),
        handle_signals=handle_signals,
        reporter=reporter,
    )


def migration_settings(settings: Settings, target: str) -> Settings:
    """Checks before the model server is asked anything: the table and its column exist, and `target` is not the
    live model (unless the text prefix changes, or `verify` found other weights behind its name). Returns the
    settings to start and fill with: a continued migration, given no prefix, keeps the prefixes it was started
    with."""
    if not target.strip():
        raise migration.MigrationError("the target model is empty: name the Ollama model to migrate to")
    try:  # before the database or the server is asked anything: a name no server means is never recorded
        check_model_name(target, settings.api, "the target model (--to / to_model)")
    except InvalidModelName as exc:
        raise migration.MigrationError(str(exc)) from None
    with _store(settings) as store:
        store.migrate()
        store.column_dimensions()  # a clear error when the table or its column is absent
        migration.check_target(store, target, settings.text_prefix)
        if not settings.text_prefix and not settings.query_prefix:
            shadow = migration.shadow_name(store.table.embedding_column)
            settings = settings.replace(**identity.shadow_prefixes(store, shadow))
    return settings


def start_migration(
    settings: Settings, target: str, *, log: Log, probe: Callable[[Settings, str], int] = probe_model_dimensions
) -> migration.Started:
    """Ask `target` for its vector length, add the shadow column and record the migration (with the settings'
    text prefix: the same model with a new prefix is a migration of its own). Run `migration_settings` first.

    The shadow column's identity (model, prefixes) is recorded now, before any vector: every fill of the migration
    (`shadow_overrides`: a Dagster range, maintenance, `migrate-model --to` again) then embeds with the prefixes it
    was started with, whatever prefix the live column's settings carry."""
    dimensions = probe(settings, target)
    with _store(settings) as store:
        started = migration.start(store, target, dimensions, log=log, text_prefix=settings.text_prefix)
        with store.for_column(started.shadow_column) as shadow:
            if identity.recorded(shadow) is None:  # a continued migration keeps what it was started with
                identity.record(shadow, target, dimensions, settings)
    return started


def swap(
    settings: Settings,
    *,
    force: bool,
    sample: int = quality.DEFAULT_SAMPLE,
    margin: float = quality.DEFAULT_MARGIN,
    log: Log,
    gated: Callable[[Store, quality.QualityReport], None] = lambda _store, _report: None,
) -> str:
    """The retrieval self-test (QualityRefused, with the recorded figures, unless it passes or `force`), then the
    swap of the complete shadow column in one transaction. `gated` sees the self-test's report before the swap."""
    check_number("quality sample (--quality-sample / quality_sample)", sample, AT_LEAST_ONE)
    check_number("quality margin (--quality-margin / quality_margin)", margin, Range(0, 1))
    with _store(settings) as store:
        store.migrate()
        store.column_dimensions()  # a clear error when the table or its column is absent
        report = quality.gate(store, settings, force=force, sample=sample, margin=margin, log=log)
        gated(store, report)
        return migration.swap(store, log=log)


def rollback(settings: Settings, *, log: Log) -> str:
    """Swap the previous column back in (refused unless it is complete and nothing runs)."""
    with _store(settings) as store:
        store.migrate()
        store.column_dimensions()
        return migration.rollback(store, log=log)
