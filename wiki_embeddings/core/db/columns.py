"""Shadow columns of a model migration, the swap, and vector indexes (one catalog reader)."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from wiki_embeddings.core.db.connection import STATEMENT_TIMEOUT_SEC, StoreBase
from wiki_embeddings.core.db.errors import StoreError
from wiki_embeddings.core.db.records import TableRef, check_identifier
from wiki_embeddings.core.modelname import same_model

if TYPE_CHECKING:
    from wiki_embeddings.core.db import Store

#: A session of a swap, rollback or abort is ended by the server if it ever sits in an open transaction this long
#: (the locked step is one statement, so it never should: belt and braces for a driver or caller that opens one).
IDLE_IN_TRANSACTION_SEC = 10.0

#: Provenance rows of a dropped column deleted per statement after the swap.
PURGE_BATCH = 10_000


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
            # A brief ACCESS EXCLUSIVE lock (no rewrite: the column is NULL), one server-side statement like the swap.
            # lock_timeout, so a long query on the table makes this fail plainly instead of queueing every reader
            # behind it (search down).
            self._locked_step(
                [
                    sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {c} vector({d})").format(
                        t=self._t, c=sql.Identifier(shadow), d=sql.Literal(int(dimensions))
                    )
                ]
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
        """Drop the shadow column and forget the migration in one server-side step (`_locked_step`); the column's
        provenance goes after the lock, in batches (`purge_dropped_provenance`)."""
        _, shadow = self.migration_target()
        steps: list[sql.Composable] = []
        if shadow:
            check_identifier(shadow, "shadow column")
            steps += [
                sql.SQL("LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE").format(t=self._t),
                sql.SQL("ALTER TABLE {t} DROP COLUMN IF EXISTS {c}").format(t=self._t, c=sql.Identifier(shadow)),
                self._forget_failures_step(shadow),
            ]
        steps.append(
            sql.SQL(
                "UPDATE {s}.table_state SET migration_model = NULL, migration_dimensions = NULL,"
                " migration_column = NULL, migration_started_at = NULL, updated_at = now() WHERE table_name = {n}"
            ).format(s=self._s, n=sql.Literal(self.table.qualified))
        )
        self._locked_step(steps)
        self.purge_dropped_provenance()
        return shadow

    def _forget_failures_step(self: Store, column: str) -> sql.Composable:
        """The failures recorded for another column of the table (`table#column`), as one statement."""
        return sql.SQL("DELETE FROM {s}.failures WHERE table_name = {k}").format(
            s=self._s, k=sql.Literal(f"{self.table.qualified}#{column}")
        )

    def _locked_step(self: Store, statements: list[sql.Composable]) -> None:
        """Run `statements` as ONE statement (a DO block: one implicit transaction, no client round trip inside
        it) on a fresh session that bounds its lock waits (`lock_timeout`) and any idle transaction
        (`idle_in_transaction_session_timeout`). A client frozen, paused or cut off after sending it cannot keep
        an ACCESS EXCLUSIVE lock: the server commits (or fails) the step alone and releases the lock."""
        with self.connect(register=False, statement_timeout_sec=STATEMENT_TIMEOUT_SEC) as conn:
            conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                (f"{int(IDLE_IN_TRANSACTION_SEC * 1000)}",),
            )
            body = sql.SQL("DECLARE r record; BEGIN {} END").format(
                sql.SQL(" ").join(sql.SQL("{};").format(x) for x in statements)
            )
            conn.execute(sql.SQL("DO {}").format(sql.Literal(body.as_string(conn))))

    def dropped_provenance_columns(self: Store) -> list[int]:
        """Attnums of this table's dropped columns that still have provenance (or identity) rows: what a swap,
        rollback or abort leaves for after its lock (and what a process that died between the two left). Index
        probes only."""
        rows = self.conn.execute(
            sql.SQL(
                "SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = to_regclass(%(rel)s) AND a.attisdropped"
                " AND (EXISTS (SELECT 1 FROM {s}.embedding_provenance p WHERE p.table_name = %(t)s"
                " AND p.column_attnum = a.attnum) OR EXISTS (SELECT 1 FROM {s}.column_identity c"
                " WHERE c.table_name = %(t)s AND c.column_attnum = a.attnum)) ORDER BY a.attnum"
            ).format(s=self._s),
            {"rel": self._regclass_text(), "t": self.table.qualified},
        ).fetchall()
        return [int(r[0]) for r in rows]

    def purge_dropped_provenance(self: Store, batch: int = PURGE_BATCH) -> int:
        """Delete the provenance (and recorded identity) of this table's dropped columns, `batch` rows per
        statement (keyset order, each its own short transaction: nothing of the chunk table is locked); returns
        how many provenance rows went. An attnum is never reused by PostgreSQL, so these rows name nothing."""
        removed = 0
        for attnum in self.dropped_provenance_columns():
            after = -(2**63)  # keyset: each statement starts past the rows the previous one deleted
            while True:
                row = self.conn.execute(
                    sql.SQL(
                        "WITH doomed AS (SELECT chunk_id FROM {s}.embedding_provenance WHERE table_name = %(t)s"
                        " AND column_attnum = %(a)s AND chunk_id > %(after)s"
                        " ORDER BY chunk_id LIMIT %(n)s),"
                        " gone AS (DELETE FROM {s}.embedding_provenance p USING doomed d WHERE p.table_name = %(t)s"
                        " AND p.column_attnum = %(a)s AND p.chunk_id = d.chunk_id RETURNING p.chunk_id)"
                        " SELECT count(*), max(chunk_id) FROM gone"
                    ).format(s=self._s),
                    {"t": self.table.qualified, "a": attnum, "after": after, "n": batch},
                ).fetchone()
                count = int(row[0]) if row else 0
                removed += count
                if count < batch:
                    break
                after = int(row[1]) if row and row[1] is not None else after
            self.conn.execute(
                sql.SQL("DELETE FROM {s}.column_identity WHERE table_name = %s AND column_attnum = %s").format(
                    s=self._s
                ),
                (self.table.qualified, attnum),
            )
        return removed

    def purge_dropped_provenance_if_allowed(self: Store) -> int:
        """`purge_dropped_provenance` for a command that may run under a read-only role (`status`): without the
        privilege (or in a read-only session) the leftovers stay for the next writing command; nothing fails."""
        try:
            return self.purge_dropped_provenance()
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ReadOnlySqlTransaction):
            return 0

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
        """In ONE server-side step (`_locked_step`: a DO block, no client round trip while the table is locked):
        drop an old `from_live` column, rename live -> `from_live`, `to_live` -> live name (their missing indexes
        follow), and record the live model. Readers see either the old or the new column under the live name,
        never a gap, and wait for the lock at most `lock_timeout` plus the step itself. The dropped column's
        provenance is deleted after the lock, in batches (a process that dies in between leaves it to the next
        `migrate()`, which every command runs)."""
        live = self.table.embedding_column
        for column in (to_live, from_live):
            check_identifier(column, "embedding column")
        ix = {c: self.for_column(c)._missing_index_name() for c in (live, to_live, from_live)}
        # Read before the lock (under the swap's advisory lock, so no swap or index build of ours changes them);
        # every rename says IF EXISTS.
        renames = self._vector_index_name_swaps(live, to_live)
        schema = sql.Identifier(self.table.schema)
        tmp = f"{ix[live]}_swap"[:63]
        columns = sql.SQL("ARRAY[{}]::text[]").format(
            sql.SQL(", ").join(sql.Literal(c) for c in (live, to_live, from_live))
        )
        rel = sql.Literal(self._regclass_text())
        steps: list[sql.Composable] = [
            sql.SQL("LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE").format(t=self._t),
            # No CREATE INDEX CONCURRENTLY can be under way now (it holds a lock this one conflicts with): an
            # INVALID index on these columns is a dead build's leftover. It would follow its column under the live
            # name and be maintained on every write, never used; it goes in this step.
            sql.SQL(
                "FOR r IN SELECT ns.nspname, ic.relname FROM pg_index ix JOIN pg_class ic ON ic.oid = ix.indexrelid"
                " JOIN pg_namespace ns ON ns.oid = ic.relnamespace WHERE ix.indrelid = {rel}::regclass"
                " AND NOT ix.indisvalid AND EXISTS (SELECT 1 FROM pg_depend d JOIN pg_attribute a"
                " ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid WHERE d.classid = 'pg_class'::regclass"
                " AND d.objid = ix.indexrelid AND d.refobjid = ix.indrelid AND a.attname = ANY({cols}))"
                " LOOP EXECUTE format('DROP INDEX %I.%I', r.nspname, r.relname); END LOOP"
            ).format(rel=rel, cols=columns),
            self._forget_failures_step(from_live),
            sql.SQL("ALTER TABLE {t} DROP COLUMN IF EXISTS {c}").format(t=self._t, c=sql.Identifier(from_live)),
            # Vector indexes trade names too, so the live column keeps the operator's index names (queries,
            # hints and monitoring that name them go on working); paired by access method.
            sql.SQL("ALTER TABLE {t} RENAME COLUMN {a} TO {b}").format(
                t=self._t, a=self._emb, b=sql.Identifier(from_live)
            ),
            sql.SQL("ALTER TABLE {t} RENAME COLUMN {a} TO {b}").format(
                t=self._t, a=sql.Identifier(to_live), b=self._emb
            ),
            *(
                sql.SQL("ALTER INDEX IF EXISTS {s}.{a} RENAME TO {b}").format(
                    s=schema, a=sql.Identifier(a), b=sql.Identifier(b)
                )
                for a, b in ((ix[live], tmp), (ix[to_live], ix[live]), (tmp, ix[from_live]), *renames)
            ),
            self._forget_failures_step(to_live),
            sql.SQL(
                "UPDATE {s}.table_state SET model = {m}, dimensions = {d}, previous_model = {pm},"
                " previous_dimensions = {pd}, migration_model = {mm}, migration_dimensions = {md},"
                " migration_column = {mc}, migration_started_at = NULL, swapped_at = now(),"
                " stale_text = NULL, stale_text_scanned_at = NULL, updated_at = now() WHERE table_name = {n}"
            ).format(
                s=self._s,
                m=sql.Literal(model),
                d=sql.Literal(int(dimensions)),
                pm=sql.Literal(previous_model),
                pd=sql.Literal(previous_dimensions),
                mm=sql.Literal(migration[0]),
                md=sql.Literal(migration[1]),
                mc=sql.Literal(migration[2]),
                n=sql.Literal(self.table.qualified),
            ),
        ]
        self._locked_step(steps)
        self._failure_key = None
        self._attnum = None
        self.purge_dropped_provenance()

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
