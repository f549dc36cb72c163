"""Applying the bookkeeping migrations; the chunk table's shape (column and id types, partial index); import."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from wiki_embeddings.core.db.connection import StoreBase
from wiki_embeddings.core.db.errors import StoreError, driver_error
from wiki_embeddings.core.db.migrations import MIGRATIONS

if TYPE_CHECKING:
    from wiki_embeddings.core.db import Store


class SchemaMixin(StoreBase):
    """Applying the bookkeeping migrations; the chunk table's shape (column and id types, partial index); import."""

    def migrate(self: Store, record: bool = True) -> int:
        """Bring the bookkeeping schema to the current version; safe to repeat and to race.

        At the current version (the steady state) it is one read of `schema_migrations`: no DDL, no lock, so a
        role without `CREATE` on the database (or a read-only monitoring role) runs every command. Only a
        pending migration takes the advisory lock and the DDL path. `record=False` (status) writes nothing but
        the clean-up below: the chunk table's identity (`forget_if_recreated`) is left to the next writing command.

        Both clean up after a swap, rollback or abort whose process died between its locked step and the
        batched delete of the dropped column's provenance (`purge_dropped_provenance`); a role that may not
        delete (status under a read-only role) leaves them to the next command that may.
        """
        if self._pending_migrations():
            self._apply_migrations()
        if record:
            with self.conn.transaction():
                self.forget_if_recreated()
            self.purge_dropped_provenance()
        else:
            self.purge_dropped_provenance_if_allowed()
        return len(MIGRATIONS)

    def _bookkeeping_schema_exists(self: Store) -> bool:
        row = self.conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.state_schema,)).fetchone()
        return row is not None

    def _pending_migrations(self: Store) -> bool:
        """True when a migration is missing; read-only (catalog lookups, then `schema_migrations`)."""
        row = self.conn.execute(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = 'schema_migrations'",
            (self.state_schema,),
        ).fetchone()
        if row is None:
            return True
        try:
            done = self.conn.execute(
                sql.SQL(
                    "SELECT count(DISTINCT version) FROM {}.schema_migrations WHERE version BETWEEN 1 AND %s"
                ).format(self._s),
                (len(MIGRATIONS),),
            ).fetchone()
        except psycopg.errors.InsufficientPrivilege as exc:
            raise StoreError(self._privilege_message(exc, "USAGE on schema {s} and SELECT on its tables")) from exc
        return not done or int(done[0]) < len(MIGRATIONS)

    def _apply_migrations(self: Store) -> None:
        try:
            with self.conn.transaction():
                self.conn.execute("SELECT pg_advisory_xact_lock(hashtext('wiki_embeddings.migrate'))")
                if not self._bookkeeping_schema_exists():  # CREATE SCHEMA IF NOT EXISTS needs CREATE even if it is
                    self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(self._s))
                self.conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {}.schema_migrations "
                        "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                    ).format(self._s)
                )
                done = {
                    r[0]
                    for r in self.conn.execute(
                        sql.SQL("SELECT version FROM {}.schema_migrations").format(self._s)
                    ).fetchall()
                }
                for version, statement in enumerate(MIGRATIONS, start=1):
                    if version in done:
                        continue
                    self.conn.execute(sql.SQL(statement).format(s=self._s))  # type: ignore[arg-type, unused-ignore]
                    self.conn.execute(
                        sql.SQL("INSERT INTO {}.schema_migrations (version) VALUES (%s)").format(self._s),
                        (version,),
                    )
        except psycopg.errors.InsufficientPrivilege as exc:
            if not self._bookkeeping_schema_exists():
                need = "CREATE on database {db}, needed once to create the bookkeeping schema {s}"
                grant = "CREATE ON DATABASE {db}"
            else:
                need = "CREATE on schema {s} (or ownership of its tables), needed once to upgrade it"
                grant = "CREATE ON SCHEMA {s}"
            raise StoreError(self._privilege_message(exc, need, grant)) from exc

    def _privilege_message(self: Store, exc: psycopg.Error, need: str, grant: str | None = None) -> str:
        """`the role X lacks <need>; ...`: which privilege, for which role, and the way out."""
        row = self.conn.execute("SELECT current_user, current_database()").fetchone()
        role, db = (str(row[0]), str(row[1])) if row else ("?", "?")

        def ident(name: str) -> str:  # quoted only when it must be, so the GRANT can be pasted as shown
            plain = re.fullmatch(r"[a-z_][a-z0-9_]*", name)
            return name if plain else sql.Identifier(name).as_string(self.conn)

        s, dbq, roleq = ident(self.state_schema), ident(db), ident(role)
        text = f"the role {role} lacks {need.format(db=db, s=s)} ({exc.diag.message_primary or exc})"
        if grant:
            return (
                f"{text}; ask an administrator to run any wiki-embeddings command (e.g. `wiki-embeddings status`) "
                f"once with a DATABASE_URL whose role has it, or to GRANT {grant.format(db=dbq, s=s)} TO {roleq} "
                "(README, Database privileges)"
            )
        return f"{text}; see README, Database privileges, for the GRANT statements"

    def ensure_extension(self: Store) -> None:
        row = self.conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
        if row is None:
            try:
                self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.Error as exc:
                raise StoreError(
                    "the pgvector extension is not installed in this database and could not be created "
                    f"({exc.diag.message_primary}); ask a superuser to run CREATE EXTENSION vector"
                ) from exc
        self._register(self.conn)

    def table_exists(self: Store) -> bool:
        row = self.conn.execute("SELECT to_regclass(%s)", (self._regclass_text(),)).fetchone()
        return bool(row and row[0])

    def _regclass_text(self: Store) -> str:
        return sql.Identifier(self.table.schema, self.table.name).as_string(self.conn)

    def ensure_table(self: Store, dimensions: int) -> bool:
        """Create the chunk table (and the partial index on missing embeddings) when absent; True if created."""
        self.ensure_extension()
        created = not self.table_exists()
        if created:
            self.conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {t} ({id} bigint PRIMARY KEY, title text, chunk_index integer, "
                    "{text} text NOT NULL, {emb} vector({dim}))"
                ).format(t=self._t, id=self._id, text=self._text, emb=self._emb, dim=sql.Literal(int(dimensions)))
            )
        self.ensure_missing_index()
        return created

    def _missing_index_name(self: Store) -> str:
        return f"{self.table.name}_{self.table.embedding_column}_missing_idx"[:63]

    def ensure_missing_index(self: Store) -> None:
        """The partial index that keeps status and claims fast however large the table grows.

        Looked up first: `CREATE INDEX IF NOT EXISTS` needs ownership of the table even when the index exists,
        and the backfill role need not own it (README, Database privileges)."""
        row = self.conn.execute(
            "SELECT 1 FROM pg_index ix JOIN pg_class ic ON ic.oid = ix.indexrelid"
            " WHERE ix.indrelid = to_regclass(%s) AND ic.relname = %s",
            (self._regclass_text(), self._missing_index_name()),
        ).fetchone()
        if row is not None:
            return
        try:
            self.conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {ix} ON {t} ({id}) WHERE {emb} IS NULL").format(
                    ix=sql.Identifier(self._missing_index_name()), t=self._t, id=self._id, emb=self._emb
                )
            )
        except psycopg.errors.InsufficientPrivilege as exc:
            need = f"ownership of {self.table.qualified}, needed once to create its index {self._missing_index_name()}"
            raise StoreError(
                self._privilege_message(exc, need.replace("{", "{{").replace("}", "}}"))
                + " (or ask the table's owner to run `wiki-embeddings import` once)"
            ) from exc

    def column_dimensions(self: Store) -> int:
        """D of the embedding column, read from its type (vector(D)); a clear error when it is not a vector."""
        row = self.conn.execute(
            "SELECT format_type(a.atttypid, a.atttypmod), a.atttypmod, t.typname FROM pg_attribute a "
            "JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND NOT a.attisdropped",
            (self._regclass_text(), self.table.embedding_column),
        ).fetchone()
        if row is None:
            if not self.table_exists():
                raise StoreError(
                    f"table {self.table.qualified} does not exist; run `wiki-embeddings import` to create and load it"
                )
            raise StoreError(f"column {self.table.embedding_column!r} not found in {self.table.qualified}")
        type_text, typmod, typname = row
        if typname != "vector" or typmod is None or typmod <= 0:
            raise StoreError(
                f"column {self.table.qualified}.{self.table.embedding_column} is {type_text}, "
                "expected vector(D) with a fixed dimension"
            )
        self.check_id_column()
        return int(typmod)

    def vanished(self: Store, exc: BaseException) -> str | None:
        """The message for an error saying the chunk table or one of its columns is gone (dropped or renamed
        under a run), else None. From the error alone: no query, so a run's event loop may call it."""
        exc = driver_error(exc)
        if not isinstance(exc, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn)):
            return None
        return (
            f"the chunk table {self.table.qualified} or its column {self.table.embedding_column!r} disappeared "
            f"during the run (dropped or renamed): {exc.diag.message_primary or exc}; committed batches stay written"
        )

    def check_id_column(self: Store) -> None:
        """Refuse an id column that is not smallint/integer/bigint (a domain over one counts), before anything is
        sent: claims, locks, ranges and the bookkeeping hold ids as bigint."""
        row = self.conn.execute(
            "SELECT format_type(a.atttypid, a.atttypmod), b.typname FROM pg_attribute a"
            " JOIN pg_type t ON t.oid = a.atttypid"
            " JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END"
            " WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND NOT a.attisdropped",
            (self._regclass_text(), self.table.id_column),
        ).fetchone()
        if row is None:
            raise StoreError(f"id column {self.table.id_column!r} not found in {self.table.qualified}")
        if row[1] not in ("int2", "int4", "int8"):
            raise StoreError(
                f"id column {self.table.qualified}.{self.table.id_column} is {row[0]}; it must be smallint, integer "
                "or bigint (set WIKI_EMBED_ID_COLUMN / --id-column to an integer key); nothing was sent"
            )

    def insert_chunks(self: Store, rows: Iterable[tuple[int, str, int, str]], page: int = 5000) -> int:
        """Insert (id, title, chunk_index, content) rows that are not there yet; returns how many were new."""
        inserted = 0
        batch: list[tuple[int, str, int, str]] = []
        stmt = sql.SQL(
            "INSERT INTO {t} ({id}, title, chunk_index, {text}) "
            "SELECT * FROM unnest(%s::bigint[], %s::text[], %s::int[], %s::text[]) ON CONFLICT ({id}) DO NOTHING"
        ).format(t=self._t, id=self._id, text=self._text)

        def flush() -> int:
            ids, titles, idx, texts = zip(*batch, strict=True)
            with self.conn.transaction():
                cur = self.conn.execute(stmt, (list(ids), list(titles), list(idx), list(texts)))
            batch.clear()
            return cur.rowcount

        for row in rows:
            batch.append(row)
            if len(batch) >= page:
                inserted += flush()
        if batch:
            inserted += flush()
        return inserted

    def forget_if_recreated(self: Store) -> bool:
        """A chunk table dropped and created again (another oid) starts with no provenance, failures or scan
        result of its predecessor, whose chunk ids named other rows. The live model is kept only if the new
        column already holds vectors. True when something was forgotten. Called by `migrate()`."""
        row = self.conn.execute("SELECT to_regclass(%s)::oid", (self._regclass_text(),)).fetchone()
        oid = row[0] if row else None
        if oid is None:
            return False
        state = self.table_state()
        if state and state.get("table_oid") not in (None, oid):
            has_vectors = (
                self.column_exists(self.table.embedding_column)
                and self.conn.execute(
                    sql.SQL("SELECT EXISTS (SELECT 1 FROM {t} WHERE {emb} IS NOT NULL)").format(
                        t=self._t, emb=self._emb
                    )
                ).fetchone()
            )
            self.conn.execute(
                sql.SQL("DELETE FROM {s}.embedding_provenance WHERE table_name = %s").format(s=self._s),
                (self.table.qualified,),
            )
            self.conn.execute(
                sql.SQL("DELETE FROM {s}.failures WHERE table_name = %s OR starts_with(table_name, %s)").format(
                    s=self._s
                ),
                (self.table.qualified, f"{self.table.qualified}#"),
            )
            keep_model = bool(has_vectors and has_vectors[0])
            shadow = state.get("migration_column")
            keep_migration = bool(shadow and self.column_exists(shadow))
            self.conn.execute(
                sql.SQL(
                    "UPDATE {s}.table_state SET table_oid = %s, stale_text = NULL, stale_text_scanned_at = NULL,"
                    " unverified = NULL, model = CASE WHEN %s THEN model END,"
                    " dimensions = CASE WHEN %s THEN dimensions END,"
                    " migration_model = CASE WHEN %s THEN migration_model END,"
                    " migration_dimensions = CASE WHEN %s THEN migration_dimensions END,"
                    " migration_column = CASE WHEN %s THEN migration_column END,"
                    " updated_at = now() WHERE table_name = %s"
                ).format(s=self._s),
                (oid, keep_model, keep_model, *[keep_migration] * 3, self.table.qualified),
            )
            return True
        if state.get("table_oid") is None:
            self._ensure_state_row()
            self.conn.execute(
                sql.SQL("UPDATE {s}.table_state SET table_oid = %s WHERE table_name = %s").format(s=self._s),
                (oid, self.table.qualified),
            )
        return False
