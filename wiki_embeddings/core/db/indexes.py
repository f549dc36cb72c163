"""Vector indexes: one catalog reader; builds CONCURRENTLY under a free name; INVALID ones found and dropped."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from wiki_embeddings.core.db.connection import StoreBase

if TYPE_CHECKING:
    from wiki_embeddings.core.db import Store


class IndexesMixin(StoreBase):
    """Vector indexes (HNSW/IVFFlat) on the table's vector columns."""

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
