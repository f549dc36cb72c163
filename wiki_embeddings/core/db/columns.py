"""Shadow columns of a model migration, the swap, and vector indexes (one catalog reader)."""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from wiki_embeddings.core.db.connection import StoreBase
from wiki_embeddings.core.db.errors import StoreError
from wiki_embeddings.core.db.records import TableRef, check_identifier

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
        if state.get("migration_model") and state["migration_model"] != model:
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

    def vector_index_specs(self: Store, column: str | None = None) -> list[dict[str, Any]]:
        """HNSW/IVFFlat indexes on a column as parts (method, operator class, storage options) to rebuild them
        on another column."""
        rows = self.conn.execute(
            "SELECT ic.relname, am.amname, opc.opcname, coalesce(ic.reloptions, '{}')"
            " FROM pg_index ix JOIN pg_class ic ON ic.oid = ix.indexrelid JOIN pg_am am ON am.oid = ic.relam"
            " JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = ix.indkey[0]"
            " JOIN pg_opclass opc ON opc.oid = ix.indclass[0]"
            " WHERE ix.indrelid = to_regclass(%s) AND a.attname = %s AND am.amname IN ('hnsw', 'ivfflat')"
            " AND ix.indisvalid",
            (self._regclass_text(), column or self.table.embedding_column),
        ).fetchall()
        return [{"name": r[0], "method": r[1], "opclass": r[2], "options": list(r[3])} for r in rows]

    def build_vector_index(self: Store, spec: dict[str, Any], column: str, maintenance_work_mem: str = "512MB") -> str:
        """Build the index `spec` describes on `column` (a shadow column before the swap); returns its name.

        CONCURRENTLY, so writes to the table (the live column's maintenance, new chunks) go on during a build
        that takes minutes on millions of rows. A free name is chosen, so an index left by an earlier
        migration never turns the build into a silent no-op; a failed build's INVALID index is dropped.
        """
        options = []
        for opt in spec["options"]:
            key, _, value = str(opt).partition("=")
            options.append(sql.SQL("{} = {}").format(sql.Identifier(key), sql.Literal(value)))
        with_clause = sql.SQL(" WITH ({})").format(sql.SQL(", ").join(options)) if options else sql.SQL("")
        name = self._free_index_name(f"{self.table.name}_{column}_{spec['method']}_idx")
        self.conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (maintenance_work_mem,))
        # A killed client (kill -9) ends the build within a second instead of leaving an orphan backend that
        # finishes an index nobody waits for; the INVALID leftover is dropped by the next swap.
        self.conn.execute("SELECT set_config('client_connection_check_interval', '1s', false)")
        try:
            self.conn.execute(
                sql.SQL("CREATE INDEX CONCURRENTLY {ix} ON {t} USING {am} ({c} {opc}){w}").format(
                    ix=sql.Identifier(name),
                    t=self._t,
                    am=sql.Identifier(spec["method"]),
                    c=sql.Identifier(column),
                    opc=sql.Identifier(spec["opclass"]),
                    w=with_clause,
                )
            )
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                self.conn.execute(
                    sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(self.table.schema, name))
                )
            raise
        finally:
            with contextlib.suppress(psycopg.Error):
                self.conn.execute("RESET maintenance_work_mem")
                self.conn.execute("RESET client_connection_check_interval")
        return name

    def _free_index_name(self: Store, base: str) -> str:
        """`base` (cut to 63 bytes) or, when a relation of the schema has that name, `base_2`, `base_3`, ..."""
        taken = {
            r[0]
            for r in self.conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s",
                (self.table.schema,),
            )
        }
        name, n = base[:63], 1
        while name in taken:
            n += 1
            name = f"{base[: 63 - len(str(n)) - 1]}_{n}"
        return name

    def invalid_indexes(self: Store, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """INVALID indexes on the chunk table (on one of `columns`, when given): leftovers of a `CREATE INDEX
        CONCURRENTLY` whose session died or failed. Never used by queries, yet maintained on every write once
        `ready`. Builds still under way (`pg_stat_progress_create_index`) are left out. A catalog query."""
        rows = self.conn.execute(
            # Columns from pg_depend: those of the key, of expressions and of the predicate alike.
            "SELECT ns.nspname, ic.relname, ix.indisready, array(SELECT DISTINCT a.attname::text FROM pg_depend d"
            " JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid"
            " WHERE d.classid = 'pg_class'::regclass AND d.objid = ix.indexrelid AND d.refobjid = ix.indrelid)"
            " FROM pg_index ix JOIN pg_class ic ON ic.oid = ix.indexrelid"
            " JOIN pg_namespace ns ON ns.oid = ic.relnamespace"
            " WHERE ix.indrelid = to_regclass(%s) AND NOT ix.indisvalid"
            " AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p WHERE p.index_relid = ix.indexrelid)"
            " ORDER BY ic.relname",
            (self._regclass_text(),),
        ).fetchall()
        found = [{"schema": r[0], "name": r[1], "ready": bool(r[2]), "columns": list(r[3])} for r in rows]
        if columns is not None:
            found = [ix for ix in found if set(ix["columns"]) & set(columns)]
        return found

    def drop_invalid_indexes(self: Store, columns: Sequence[str], lock_timeout: str = "5s") -> list[str]:
        """Drop (CONCURRENTLY: the table stays readable and writable) the INVALID indexes on `columns`; returns
        the names dropped. One that cannot be dropped within `lock_timeout` is left (the swap drops it)."""
        dropped = []
        for dead in self.invalid_indexes(columns):
            try:
                self.conn.execute("SELECT set_config('lock_timeout', %s, false)", (lock_timeout,))
                self.conn.execute(
                    sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(dead["schema"], dead["name"]))
                )
                dropped.append(dead["name"])
            except psycopg.errors.LockNotAvailable:
                continue
            finally:
                with contextlib.suppress(psycopg.Error):
                    self.conn.execute("RESET lock_timeout")
        return dropped

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

    def vector_indexes(self: Store) -> list[dict[str, str]]:
        """HNSW / IVFFlat indexes on the embedding column: they make every bulk write several times slower."""
        rows = self.conn.execute(
            "SELECT ns.nspname, ic.relname, pg_get_indexdef(ix.indexrelid), am.amname"
            " FROM pg_index ix JOIN pg_class ic ON ic.oid = ix.indexrelid JOIN pg_am am ON am.oid = ic.relam"
            " JOIN pg_namespace ns ON ns.oid = ic.relnamespace"
            " JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = ANY(ix.indkey)"
            " WHERE ix.indrelid = to_regclass(%s) AND a.attname = %s AND am.amname IN ('hnsw', 'ivfflat')",
            (self._regclass_text(), self.table.embedding_column),
        ).fetchall()
        return [{"schema": r[0], "name": r[1], "definition": r[2], "method": r[3]} for r in rows]

    def drop_index(self: Store, schema: str, name: str) -> float:
        started = time.perf_counter()
        self.conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(schema, name)))
        return time.perf_counter() - started

    def create_index(self: Store, definition: str, maintenance_work_mem: str = "512MB") -> float:
        """Re-run a saved `pg_get_indexdef` definition (text PostgreSQL itself produced) with more build memory."""
        started = time.perf_counter()
        with self.conn.transaction():
            self.conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (maintenance_work_mem,))
            self.conn.execute(sql.SQL(definition))  # type: ignore[arg-type, unused-ignore]
        return time.perf_counter() - started
