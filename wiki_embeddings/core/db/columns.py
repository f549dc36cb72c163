"""Shadow columns of a model migration, the swap, and vector indexes (one catalog reader)."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from psycopg import sql

from wiki_embeddings.core.db.connection import StoreBase
from wiki_embeddings.core.db.errors import StoreError
from wiki_embeddings.core.db.records import TableRef, check_identifier
from wiki_embeddings.core.modelname import same_model

if TYPE_CHECKING:
    from wiki_embeddings.core.db import Store


class ColumnsMixin(StoreBase):
    """Shadow columns of a model migration, the swap, and vector indexes (one catalog reader)."""

    def column_exists(self: Store, column: str) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s AND NOT attisdropped",
            (self._regclass_text(), column),
        ).fetchone()
        return row is not None

    def start_migration(self: Store, model: str, dimensions: int, shadow: str) -> bool:
        """Add the shadow column vector(D) (idempotent) and record the migration; True if the column was added."""
        check_identifier(shadow, "shadow column")
        state = self.table_state()
        if state.get("migration_model") and not same_model(state["migration_model"], model):
            raise StoreError(
                f"a migration to {state['migration_model']!r} is in progress in column {state['migration_column']!r};"
                " finish it (--swap) or drop it (--abort) first"
            )
        added = False
        if self.column_exists(shadow):
            have = self.for_column(shadow).column_dimensions()
            if have != dimensions:
                raise StoreError(
                    f"column {shadow!r} already exists as vector({have}), but model {model!r} needs "
                    f"vector({dimensions}); drop it (`migrate-model --abort`) first"
                )
        else:
            # A brief ACCESS EXCLUSIVE lock (no rewrite: the column is NULL). lock_timeout, so a long query on the
            # table makes this fail plainly instead of queueing every reader behind it (search down).
            with self.conn.transaction():
                self.conn.execute("SET LOCAL lock_timeout = '10s'")
                self.conn.execute(
                    sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {c} vector({d})").format(
                        t=self._t, c=sql.Identifier(shadow), d=sql.Literal(int(dimensions))
                    )
                )
            added = True
        self.for_column(shadow).ensure_missing_index()
        self._ensure_state_row()
        self.conn.execute(
            sql.SQL(
                "UPDATE {s}.table_state SET migration_model = %s, migration_dimensions = %s, migration_column = %s,"
                " migration_started_at = coalesce(migration_started_at, now()), updated_at = now()"
                " WHERE table_name = %s"
            ).format(s=self._s),
            (model, dimensions, shadow, self.table.qualified),
        )
        return added

    def abort_migration(self: Store) -> str | None:
        """Drop the shadow column (and its provenance, failures) and forget the migration."""
        _, shadow = self.migration_target()
        with self.conn.transaction():
            if shadow and self.column_exists(shadow):
                attnum = self.for_column(shadow)._current_attnum(self.conn)
                self._forget_column(attnum, shadow)
                self.conn.execute(
                    sql.SQL("ALTER TABLE {t} DROP COLUMN IF EXISTS {c}").format(t=self._t, c=sql.Identifier(shadow))
                )
            self.conn.execute(
                sql.SQL(
                    "UPDATE {s}.table_state SET migration_model = NULL, migration_dimensions = NULL,"
                    " migration_column = NULL, migration_started_at = NULL, updated_at = now() WHERE table_name = %s"
                ).format(s=self._s),
                (self.table.qualified,),
            )
        return shadow

    def _forget_column(self: Store, attnum: int, column: str) -> None:
        self.conn.execute(
            sql.SQL("DELETE FROM {s}.embedding_provenance WHERE table_name = %s AND column_attnum = %s").format(
                s=self._s
            ),
            (self.table.qualified, attnum),
        )
        self.conn.execute(
            sql.SQL("DELETE FROM {s}.failures WHERE table_name = %s").format(s=self._s),
            (f"{self.table.qualified}#{column}",),
        )

    def for_column(self: Store, column: str) -> Store:
        """A store for another vector column of the same table (shares nothing but the settings)."""
        t = self.table
        ref = TableRef(t.schema, t.name, t.id_column, t.text_column, check_identifier(column, "embedding column"))
        return type(self)(self.dsn, ref, self.state_schema, self.app_name)

    def swap_columns(
        self: Store,
        *,
        to_live: str,
        from_live: str,
        model: str,
        dimensions: int,
        previous_model: str | None,
        previous_dimensions: int | None,
        migration: tuple[str | None, int | None, str | None],
    ) -> None:
        """In ONE transaction: drop an old `from_live` column, rename live -> `from_live`, `to_live` -> live name
        (their missing indexes follow), and record the live model. Readers see either the old or the new column
        under the live name, never a gap."""
        live = self.table.embedding_column
        ix = {c: self.for_column(c)._missing_index_name() for c in (live, to_live, from_live)}
        with self.conn.transaction():
            self.conn.execute("SET LOCAL lock_timeout = '10s'")
            self.conn.execute(sql.SQL("LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE").format(t=self._t))
            # No CREATE INDEX CONCURRENTLY can be under way now (it holds a lock this one conflicts with): an
            # INVALID index on these columns is a dead build's leftover. It would follow its column under the live
            # name and be maintained on every write, never used; it goes in this transaction.
            for dead in self.invalid_indexes([live, to_live, from_live]):
                self.conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(dead["schema"], dead["name"])))
            if self.column_exists(from_live):
                attnum = self.for_column(from_live)._current_attnum(self.conn)
                self._forget_column(attnum, from_live)
                self.conn.execute(
                    sql.SQL("ALTER TABLE {t} DROP COLUMN {c}").format(t=self._t, c=sql.Identifier(from_live))
                )
            # Vector indexes trade names too, so the live column keeps the operator's index names (queries,
            # hints and monitoring that name them go on working); paired by access method.
            renames = self._vector_index_name_swaps(live, to_live)
            self.conn.execute(
                sql.SQL("ALTER TABLE {t} RENAME COLUMN {a} TO {b}").format(
                    t=self._t, a=self._emb, b=sql.Identifier(from_live)
                )
            )
            self.conn.execute(
                sql.SQL("ALTER TABLE {t} RENAME COLUMN {a} TO {b}").format(
                    t=self._t, a=sql.Identifier(to_live), b=self._emb
                )
            )
            schema = sql.Identifier(self.table.schema)
            tmp = f"{ix[live]}_swap"[:63]
            for a, b in ((ix[live], tmp), (ix[to_live], ix[live]), (tmp, ix[from_live]), *renames):
                self.conn.execute(
                    sql.SQL("ALTER INDEX IF EXISTS {s}.{a} RENAME TO {b}").format(
                        s=schema, a=sql.Identifier(a), b=sql.Identifier(b)
                    )
                )
            self.conn.execute(
                sql.SQL("DELETE FROM {s}.failures WHERE table_name = %s").format(s=self._s),
                (f"{self.table.qualified}#{to_live}",),
            )
            self.conn.execute(
                sql.SQL(
                    "UPDATE {s}.table_state SET model = %s, dimensions = %s, previous_model = %s,"
                    " previous_dimensions = %s, migration_model = %s, migration_dimensions = %s,"
                    " migration_column = %s, migration_started_at = NULL, swapped_at = now(),"
                    " stale_text = NULL, stale_text_scanned_at = NULL, updated_at = now() WHERE table_name = %s"
                ).format(s=self._s),
                (model, dimensions, previous_model, previous_dimensions, *migration, self.table.qualified),
            )
        self._failure_key = None
        self._attnum = None

    def _vector_index_name_swaps(self: Store, live: str, incoming: str) -> list[tuple[str, str]]:
        """(old, new) index renames that give the incoming column's HNSW/IVFFlat indexes the live ones' names."""
        outgoing = {s["method"]: s["name"] for s in self.vector_index_specs(live)}
        renames: list[tuple[str, str]] = []
        for spec in self.vector_index_specs(incoming):
            name = outgoing.pop(spec["method"], None)
            if name is None:
                continue
            tmp = f"{name[:50]}_swap_tmp"
            renames += [(name, tmp), (spec["name"], name), (tmp, spec["name"])]
        return renames

    @property
    def swap_lock_key(self: Store) -> tuple[int, int]:
        """Two-int advisory key that serializes swaps and rollbacks of this table's columns."""
        table_key = zlib.crc32(self.table.qualified.encode()) & 0x7FFFFFFF
        return zlib.crc32(f"swap:{self.state_schema}".encode()) & 0x7FFFFFFF, table_key

    def try_swap_lock(self: Store) -> bool:
        """Take the table's swap lock on the store's session if free (never waits: a waiting statement would hold a
        snapshot that the other swap's CREATE INDEX CONCURRENTLY has to wait for)."""
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s::int, %s::int)", self.swap_lock_key).fetchone()
        return bool(row and row[0])

    def release_swap_lock(self: Store) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(%s::int, %s::int)", self.swap_lock_key)
