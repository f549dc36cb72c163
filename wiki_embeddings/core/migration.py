"""Model migration without downtime: a shadow column filled by the engine, then swapped in by one transaction.

The live column name always holds a complete set of vectors of one model: `swap` refuses an incomplete
shadow, and the renames happen in one transaction (`Store.swap_columns`). That transaction is one server-side
statement, so the ACCESS EXCLUSIVE lock never waits on this process: a client frozen inside a swap or rollback
cannot lock readers out. The dropped column's provenance is deleted after it, in batches. No SQL here: the store
owns it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from wiki_embeddings.core import identity
from wiki_embeddings.core.db import Store, StoreError
from wiki_embeddings.core.modelname import same_model, same_prefix


class MigrationError(RuntimeError):
    """A migration step refused: the message says what to do."""


def shadow_name(column: str) -> str:
    return f"{column[:58]}_next"


def prev_name(column: str) -> str:
    return f"{column[:58]}_prev"


@dataclass(frozen=True)
class Started:
    model: str
    dimensions: int
    shadow_column: str
    added: bool

    def message(self, live_column: str) -> str:
        return (
            f"migration to {self.model!r} ({self.dimensions}-d): shadow column {self.shadow_column} "
            f"{'added' if self.added else 'exists'}; the live column {live_column} keeps serving until the swap"
        )


def active_migration(store: Store) -> tuple[str, str] | None:
    """(target model, shadow column) of the migration in progress whose shadow column exists, else None."""
    target, shadow = store.migration_target()
    if not target or not shadow or not store.column_exists(shadow):
        return None
    return target, shadow


def check_target(store: Store, model: str, text_prefix: str | None = None) -> None:
    """Refuse a migration to the live model (cheap: callers run it before asking the model server anything) -
    unless `text_prefix` differs from the live column's: identity is model + dimensions + prefix (core/identity.py)."""
    live, _ = store.recorded_model()
    if live and same_model(live, model):
        have = (identity.recorded(store) or {}).get("text_prefix") or ""
        if text_prefix is not None and not same_prefix(text_prefix, have):
            return  # the same model with another text prefix: a migration of its own
        if (store.latest_trust("verify", live) or {}).get("verdict") == "model_changed":
            return  # `verify` found other weights behind the name: re-embedding with them is a migration
        raise MigrationError(
            f"model {model!r} is already the live model of {store.table.qualified}.{store.table.embedding_column}"
            f" (text prefix {have!r}); to change only the prefix pass --text-prefix"
        )


def start(
    store: Store,
    model: str,
    dimensions: int,
    log: Callable[[str], None] = lambda _m: None,
    text_prefix: str | None = None,
) -> Started:
    """Add the shadow column for `model` (whose vector length the caller asked the model for) and record the
    migration. Repeat-safe: starting the same migration again only reports it; another target is refused."""
    check_target(store, model, text_prefix)
    shadow = shadow_name(store.table.embedding_column)
    with swap_lock(store, log):
        drop_invalid_indexes(store, log)
    try:
        added = store.start_migration(model, dimensions, shadow)
    except StoreError as exc:
        raise MigrationError(str(exc)) from None
    return Started(model, dimensions, shadow, added)


def shadow_status(store: Store) -> dict[str, Any]:
    """The migration recorded for the table and the shadow column's coverage (total/embedded/missing/...)."""
    state = store.table_state()
    out: dict[str, Any] = {
        "live_model": state.get("model") or "",
        "live_column": store.table.embedding_column,
        "previous_model": state.get("previous_model") or "",
        "target_model": state.get("migration_model") or "",
        "shadow_column": state.get("migration_column") or "",
    }
    shadow = state.get("migration_column")
    if shadow and store.column_exists(shadow):
        with store.for_column(shadow) as sh:
            st = sh.status()
        out.update({k: st[k] for k in ("total", "embedded", "missing", "coverage_pct", "failed", "quarantined")})
        out["dimensions"] = state.get("migration_dimensions") or ""
    return out


def swap_blocker(store: Store) -> str | None:
    """Why the shadow cannot be swapped in now, or None when it can (complete, and no run of the table)."""
    active = active_migration(store)
    if active is None:
        return "no model migration in progress: start one with `migrate-model --to MODEL`"
    target, shadow = active
    info = shadow_status(store)
    if info.get("missing") != 0 or info.get("coverage_pct") != "100.00":
        return (
            f"the shadow column {shadow} is not complete (missing={info.get('missing')}, coverage_pct="
            f"{info.get('coverage_pct')}); run `migrate-model --to {target}` until missing=0, then swap"
        )
    if store.live_runs():
        return "a run of this table is in progress; stop it (`wiki-embeddings stop`) and swap after it ends"
    return None


def managed_columns(store: Store) -> list[str]:
    """The columns a migration renames: live, shadow and previous."""
    live = store.table.embedding_column
    return [live, shadow_name(live), prev_name(live)]


def drop_invalid_indexes(store: Store, log: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Drop INVALID indexes (an interrupted `CREATE INDEX CONCURRENTLY`) on the live, shadow and previous columns,
    so none follows a column under the live name; called with the swap lock held, so no build of ours is under
    way. One that cannot be dropped now is dropped by the swap's own transaction."""
    dropped = store.drop_invalid_indexes(managed_columns(store))
    for name in dropped:
        log(f"dropped INVALID index {name} (left by an interrupted CREATE INDEX CONCURRENTLY)")
    return dropped


@contextlib.contextmanager
def swap_lock(store: Store, log: Callable[[str], None] = lambda _m: None, poll_sec: float = 0.2) -> Iterator[None]:
    """One swap, rollback or index clean-up of a table at a time (a session advisory lock: it dies with a killed
    process). The loser waits, polling, without a statement open: a waiting statement's snapshot would hold up
    the winner's `CREATE INDEX CONCURRENTLY`."""
    if not store.try_swap_lock():
        log(f"another swap or rollback of {store.table.qualified} is in progress; waiting for it to end")
        while not store.try_swap_lock():
            time.sleep(poll_sec)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            store.release_swap_lock()


def _swapped_meanwhile(store: Store, before: dict[str, Any]) -> str | None:
    """The message for a swap or rollback that lost the race: another one committed while it waited."""
    after = store.table_state()
    if after.get("swapped_at") == before.get("swapped_at"):
        return None
    return (
        f"nothing to do: another swap or rollback of {store.table.qualified} finished while this one waited "
        f"(at {after['swapped_at']:%Y-%m-%d %H:%M:%S}); {store.table.embedding_column} now holds model "
        f"{after.get('model')!r}"
    )


def build_shadow_indexes(store: Store, shadow: str, log: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Give the shadow every HNSW/IVFFlat index the live column has (same method, operator class, options), so
    search is as fast right after the swap as before it. Built CONCURRENTLY: the table stays writable."""
    built = []
    for spec in store.vector_index_specs(store.table.embedding_column):
        if any(x["method"] == spec["method"] for x in store.vector_index_specs(shadow)):
            continue
        log(f"building a {spec['method']} index on {shadow} like {spec['name']} before the swap")
        started = time.perf_counter()
        name = store.build_vector_index(spec, shadow)
        log(f"built {name} in {time.perf_counter() - started:.1f} s")
        built.append(name)
    return built


def swap(store: Store, log: Callable[[str], None] = lambda _m: None) -> str:
    """Make the complete shadow column the live one in one transaction, after giving it the live indexes.
    Serialized per table (`swap_lock`): of two simultaneous swaps, the loser says the swap already happened."""
    before = store.table_state()
    with swap_lock(store, log):
        return _swapped_meanwhile(store, before) or _swap(store, log)


def _swap(store: Store, log: Callable[[str], None]) -> str:
    blocker = swap_blocker(store)
    if blocker:
        raise MigrationError(blocker)
    drop_invalid_indexes(store, log)
    state = store.table_state()
    target, shadow = state["migration_model"], state["migration_column"]
    live_column = store.table.embedding_column
    build_shadow_indexes(store, shadow, log)
    live_model, live_dims = store.recorded_model()
    store.swap_columns(
        to_live=shadow,
        from_live=prev_name(live_column),
        model=target,
        dimensions=int(state.get("migration_dimensions") or store.for_column(shadow).column_dimensions()),
        previous_model=live_model,
        previous_dimensions=live_dims,
        migration=(None, None, None),
    )
    return (
        f"swapped: {live_column} now holds model {target!r}; the previous vectors ({live_model!r}) are kept in "
        f"{prev_name(live_column)} (`migrate-model --rollback` swaps them back)"
    )


def rollback(store: Store, log: Callable[[str], None] = lambda _m: None) -> str:
    """Swap the previous column back in (serialized with swaps, like them)."""
    before = store.table_state()
    with swap_lock(store, log):
        return _swapped_meanwhile(store, before) or _rollback(store, log)


def _rollback(store: Store, log: Callable[[str], None]) -> str:
    state = store.table_state()
    live_column = store.table.embedding_column
    prev, nxt = prev_name(live_column), shadow_name(live_column)
    previous = state.get("previous_model")
    if not previous or not store.column_exists(prev):
        raise MigrationError(f"nothing to roll back to: no previous model or no column {prev}")
    if store.column_exists(nxt):
        raise MigrationError(f"a shadow column {nxt} exists (migration in progress); `migrate-model --abort` it first")
    with store.for_column(prev) as p:
        st = p.status()
    if st["missing"] != 0:
        raise MigrationError(
            f"{prev} lacks {st['missing']} vectors (chunks added since the swap); fill them with "
            f"`migrate-model --to {previous}` and swap instead"
        )
    if store.live_runs():
        raise MigrationError("a run of this table is in progress; stop it (`wiki-embeddings stop`) and roll back after")
    drop_invalid_indexes(store, log)
    live_model, live_dims = store.recorded_model()
    store.swap_columns(
        to_live=prev,
        from_live=nxt,
        model=previous,
        dimensions=int(state.get("previous_dimensions") or p.column_dimensions()),
        previous_model=live_model,
        previous_dimensions=live_dims,
        migration=(live_model, live_dims, nxt),
    )
    return (
        f"rolled back: {live_column} holds model {previous!r} again; the {live_model!r} vectors wait in {nxt} "
        "(`migrate-model --swap` makes them live again)"
    )
