"""What the CLI and the Dagster layer both do with the core, written once: a backfill run, and the fill of a
model migration's shadow column (by `migrate-model --to`, by maintenance during a migration, by range runs).

The CLI parses and prints; the Dagster layer declares and reports; both call these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wiki_embeddings.core import identity, migration
from wiki_embeddings.core.backfill import Backfill, RunReport
from wiki_embeddings.core.db import Store
from wiki_embeddings.core.embedders import PooledClient
from wiki_embeddings.core.factories import build_client, build_store, resolve_model
from wiki_embeddings.core.progress import Reporter
from wiki_embeddings.settings import Settings

ClientFactory = Callable[[Settings, Store], PooledClient]


def default_client(settings: Settings, store: Store) -> PooledClient:
    """The configured model (OLLAMA_MODEL), else the one recorded for the table, at OLLAMA_URL."""
    return build_client(settings, resolve_model(settings, store))


def run_backfill(
    settings: Settings,
    *,
    mode: str,
    log: Callable[[str], None],
    client: ClientFactory = default_client,
    handle_signals: bool = False,
    reporter: Reporter | None = None,
) -> RunReport:
    """One engine run on its own store (connections) and client; `settings.database_url` must be resolved."""
    if not settings.database_url:
        raise ValueError("run_backfill needs settings.database_url (the embedded one or DATABASE_URL)")
    for warning in settings.api_warnings():
        log(warning)
    with build_store(settings, settings.database_url) as store:
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


def shadow_overrides(store: Store) -> dict[str, Any] | None:
    """Settings overrides for a fill of the active migration's shadow column - the column, the target model and
    the prefixes the migration was started with - or None when no migration with a shadow column is under way."""
    active = migration.active_migration(store)
    if active is None:
        return None
    target, shadow = active
    return {"embedding_column": shadow, "ollama_model": target, **identity.shadow_prefixes(store, shadow)}


def fill_shadow(
    settings: Settings,
    overrides: dict[str, Any],
    *,
    mode: str,
    log: Callable[[str], None],
    urls: list[str] | None = None,
    handle_signals: bool = False,
    reporter: Reporter | None = None,
) -> RunReport:
    """One engine run on the shadow column with the migration's target model (and its prefixes)."""
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


def maintain_shadow(
    settings: Settings,
    store: Store,
    *,
    mode: str,
    log: Callable[[str], None],
    urls: list[str] | None = None,
    handle_signals: bool = False,
    reporter: Reporter | None = None,
) -> RunReport | None:
    """Maintenance during a model migration also fills the shadow column with the target model (same cap), so
    chunks added or edited after their range was migrated never hold the swap back. None: no migration."""
    overrides = shadow_overrides(store)
    if overrides is None:
        return None
    return fill_shadow(
        settings, overrides, mode=mode, log=log, urls=urls, handle_signals=handle_signals, reporter=reporter
    )
