"""Model migration without downtime: a shadow column filled by the engine, then swapped in by one transaction.

The live column name always holds a complete set of vectors of one model: `swap` refuses an incomplete
shadow, and the renames happen in one transaction (`Store.swap_columns`). No SQL here: the store owns it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wiki_embeddings.core.store import Store


class MigrationError(RuntimeError):
    """A migration step refused: the message says what to do."""


def shadow_name(column: str) -> str:
    return f"{column[:58]}_next"


def prev_name(column: str) -> str:
    return f"{column[:58]}_prev"


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


def swap(store: Store, log: Callable[[str], None] = lambda _m: None) -> str:
    state = store.table_state()
    target, shadow = state.get("migration_model"), state.get("migration_column")
    if not target or not shadow or not store.column_exists(shadow):
        raise MigrationError("no model migration in progress: start one with `migrate-model --to MODEL`")
    info = shadow_status(store)
    if info.get("missing") != 0 or info.get("coverage_pct") != "100.00":
        raise MigrationError(
            f"the shadow column {shadow} is not complete (missing={info.get('missing')}, coverage_pct="
            f"{info.get('coverage_pct')}); run `migrate-model --to {target}` until missing=0, then swap"
        )
    if store.live_runs():
        raise MigrationError(
            "a run of this table is in progress; stop it (`wiki-embeddings stop`) and swap after it ends"
        )
    live_column = store.table.embedding_column
    for spec in store.vector_index_specs(live_column):
        if not any(x["method"] == spec["method"] for x in store.vector_index_specs(shadow)):
            log(f"building {spec['method']} index on {shadow} like {spec['name']} before the swap")
            seconds = store.build_vector_index(spec, shadow)
            log(f"built in {seconds:.1f} s")
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


def rollback(store: Store) -> str:
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
