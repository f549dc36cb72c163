"""Every SQL statement of the project: the chunk table, claims, bulk vector writes and the tool's bookkeeping.

Identifiers (table, columns, the bookkeeping schema) are settings, so they only ever reach SQL through
`psycopg.sql.Identifier`; values always travel as parameters.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.rows import dict_row

from wiki_embeddings.core.text import UTF8_MAX_BYTES_PER_CHAR, InvalidText, decode_utf8_prefix
from wiki_embeddings.settings import redact, url_secrets

# Characters never accepted in a configured identifier, even though quoting would make them harmless:
# a table name with a quote or a semicolon in it is far more likely an injection attempt than a real name.
_FORBIDDEN_IDENTIFIER_CHARS = set("\"';\\\x00") | {chr(c) for c in range(32)}


class StoreError(RuntimeError):
    """A problem with the database that the operator must fix (missing table, wrong column type...)."""


class ModelMismatch(StoreError):
    """A batch of one model's vectors met a column that now takes another model (a swap during the run)."""


def check_identifier(name: str, what: str) -> str:
    if not name or len(name.encode()) > 63:
        raise StoreError(f"{what} {name!r} must be 1 to 63 bytes long")
    bad = sorted(set(name) & _FORBIDDEN_IDENTIFIER_CHARS)
    if bad:
        raise StoreError(f"{what} {name!r} contains forbidden characters {bad!r}; refusing it")
    return name


@dataclass(frozen=True)
class TableRef:
    """The chunk table and its three columns, validated once."""

    schema: str
    name: str
    id_column: str = "id"
    text_column: str = "content"
    embedding_column: str = "embedding"

    @classmethod
    def parse(
        cls,
        table: str,
        id_column: str = "id",
        text_column: str = "content",
        embedding_column: str = "embedding",
    ) -> TableRef:
        schema, _, name = table.rpartition(".")
        return cls(
            check_identifier(schema or "public", "schema"),
            check_identifier(name, "table"),
            check_identifier(id_column, "id column"),
            check_identifier(text_column, "text column"),
            check_identifier(embedding_column, "embedding column"),
        )

    @property
    def qualified(self) -> str:
        """The key under which the bookkeeping tables remember this table."""
        return f"{self.schema}.{self.name}"

    @property
    def lock_namespace(self) -> str:
        """Hashed with each chunk id into its advisory-lock key (see `_lock_key_sql`)."""
        return f"wiki_embeddings claim {self.qualified}:"


@dataclass(frozen=True)
class Claim:
    """Chunks locked by one claim: (id, cut text) to embed, and how far the keyset scan got."""

    rows: list[tuple[int, str]]
    last_scanned_id: int | None
    busy: int  # candidates another worker holds
    # Claimed chunks whose stored bytes are not text (SQL_ASCII databases only): (id, reason, byte length).
    invalid: list[tuple[int, str, int]] = field(default_factory=list)
    # md5 of the whole stored text of each claimed chunk (what PostgreSQL recomputes as md5(content)).
    text_md5: dict[int, str] = field(default_factory=dict)
    found: int = 0  # content-change scans: changed chunks found in the window (locked or not)
    busy_ids: list[int] = field(default_factory=list)  # candidates whose claim key another session holds


@dataclass(frozen=True)
class Provenance:
    """How a batch of vectors was made: recorded beside every vector written."""

    model: str
    dimensions: int
    max_chars: int
    text_prefix: str = ""


class WriteResult(int):
    """Rows written by one batch write; `locked` holds the ids another session held a row lock on (not waited
    for: the engine retries them at the end of its run)."""

    locked: tuple[int, ...]

    def __new__(cls, written: int, locked: tuple[int, ...] = ()) -> WriteResult:
        obj = super().__new__(cls, written)
        obj.locked = locked
        return obj


def _same_model(a: str, b: str) -> bool:
    return a.removesuffix(":latest") == b.removesuffix(":latest")


@dataclass(frozen=True)
class VectorNotes:
    """Per-vector provenance of one batch, parallel to its ids: what was actually embedded."""

    chars_sent: list[int]
    context_cut: list[bool]  # cut below --max-chars to fit the model's context
    server_truncated: list[bool]  # the server evaluated fewer tokens than the text has (silent truncation)


MIGRATIONS: list[str] = [
    # 1: bookkeeping tables.
    """
    CREATE TABLE IF NOT EXISTS {s}.failures (
        table_name  text        NOT NULL,
        chunk_id    bigint      NOT NULL,
        error       text        NOT NULL,
        message     text        NOT NULL,
        http_status integer,
        attempts    integer     NOT NULL DEFAULT 1,
        text_md5    text,
        text_length integer,
        run_id      bigint,
        first_seen  timestamptz NOT NULL DEFAULT now(),
        last_seen   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (table_name, chunk_id)
    );
    CREATE TABLE IF NOT EXISTS {s}.runs (
        run_id       bigserial PRIMARY KEY,
        table_name   text        NOT NULL,
        mode         text        NOT NULL,
        state        text        NOT NULL,
        host         text,
        pid          integer,
        model        text,
        options      jsonb       NOT NULL DEFAULT '{{}}',
        started_at   timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now(),
        finished_at  timestamptz,
        embedded     bigint      NOT NULL DEFAULT 0,
        failed       bigint      NOT NULL DEFAULT 0,
        chunks_per_s double precision,
        message      text
    );
    CREATE INDEX IF NOT EXISTS runs_table_started_idx ON {s}.runs (table_name, started_at DESC);
    CREATE TABLE IF NOT EXISTS {s}.table_state (
        table_name        text PRIMARY KEY,
        model             text,
        dimensions        integer,
        stop_requested_at timestamptz,
        stop_reason       text,
        updated_at        timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 2: provenance of every stored vector (issue 6), per column attnum so a column RENAME keeps it valid;
    #    model migration and content-change scan state in table_state.
    """
    CREATE TABLE IF NOT EXISTS {s}.embedding_provenance (
        table_name    text        NOT NULL,
        column_attnum smallint    NOT NULL,
        chunk_id      bigint      NOT NULL,
        model         text        NOT NULL,
        dimensions    integer     NOT NULL,
        text_md5      text        NOT NULL,
        max_chars     integer     NOT NULL,
        text_prefix   text        NOT NULL DEFAULT '',
        embedded_at   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (table_name, column_attnum, chunk_id)
    );
    CREATE INDEX IF NOT EXISTS embedding_provenance_model_idx
        ON {s}.embedding_provenance (table_name, column_attnum, model);
    ALTER TABLE {s}.table_state
        ADD COLUMN IF NOT EXISTS previous_model        text,
        ADD COLUMN IF NOT EXISTS previous_dimensions   integer,
        ADD COLUMN IF NOT EXISTS migration_model       text,
        ADD COLUMN IF NOT EXISTS migration_dimensions  integer,
        ADD COLUMN IF NOT EXISTS migration_column      text,
        ADD COLUMN IF NOT EXISTS migration_started_at  timestamptz,
        ADD COLUMN IF NOT EXISTS swapped_at            timestamptz,
        ADD COLUMN IF NOT EXISTS stale_text            bigint,
        ADD COLUMN IF NOT EXISTS stale_text_scanned_at timestamptz;
    """,
    # 3: the chunk table's oid (a dropped and recreated table must not inherit provenance or failures) and the
    #    count of vectors without provenance (written before this tool, or by another writer), from the scan.
    """
    ALTER TABLE {s}.table_state
        ADD COLUMN IF NOT EXISTS table_oid  oid,
        ADD COLUMN IF NOT EXISTS unverified bigint;
    """,
    # 4: what was actually embedded (issue 10): characters sent, whether the text was cut below --max-chars
    #    to fit the model's context, and whether the server was caught truncating it silently. Provenance, not
    #    identity: text_md5 stays md5 of the whole stored text. A partial index keeps their counts cheap.
    """
    ALTER TABLE {s}.embedding_provenance
        ADD COLUMN IF NOT EXISTS chars_sent       integer,
        ADD COLUMN IF NOT EXISTS context_cut      boolean NOT NULL DEFAULT false,
        ADD COLUMN IF NOT EXISTS server_truncated boolean NOT NULL DEFAULT false;
    CREATE INDEX IF NOT EXISTS embedding_provenance_cut_idx
        ON {s}.embedding_provenance (table_name, column_attnum, chunk_id) WHERE context_cut OR server_truncated;
    """,
    # 5: chunks another session still held when a run ended (state `locked`), for `status`.
    """
    ALTER TABLE {s}.runs ADD COLUMN IF NOT EXISTS locked bigint NOT NULL DEFAULT 0;
    """,
    # 6: trust in the vectors (issue 15): each column's identity (model, dimensions, prefixes) and the log of
    #    verifications, quality gates and model digests. A numbered migration, so the documented grants (ON ALL
    #    TABLES IN SCHEMA) cover them and no run needs CREATE later.
    """
    CREATE TABLE IF NOT EXISTS {s}.column_identity (
        table_name    text        NOT NULL,
        column_attnum smallint    NOT NULL,
        model         text        NOT NULL,
        dimensions    integer     NOT NULL,
        text_prefix   text        NOT NULL DEFAULT '',
        query_prefix  text        NOT NULL DEFAULT '',
        recorded_at   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (table_name, column_attnum)
    );
    CREATE TABLE IF NOT EXISTS {s}.trust_log (
        id          bigserial   PRIMARY KEY,
        table_name  text        NOT NULL,
        kind        text        NOT NULL,
        run_id      bigint,
        model       text,
        recorded_at timestamptz NOT NULL DEFAULT now(),
        result      jsonb       NOT NULL DEFAULT '{{}}'
    );
    CREATE INDEX IF NOT EXISTS trust_log_kind_idx ON {s}.trust_log (table_name, kind, id DESC);
    """,
]

# Every pipeline connection bounds how long the server may work or wait on one statement (the client adds its
# own deadline on top: a black-holed network never answers at all). Keepalives and tcp_user_timeout end a dead
# TCP connection at the kernel level too, where the path lets them (not through a user-space proxy).
STATEMENT_TIMEOUT_SEC = 60.0
LOCK_TIMEOUT_SEC = 10.0
TCP_OPTIONS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
TCP_USER_TIMEOUT_MS = 30_000


# `pg_locks` row of a run's liveness lock (two-int4 advisory key: objsubid 2, never a chunk claim's bigint key).
_RUN_LOCK_HELD = (
    "EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid::bigint = %(run_ns)s AND l.objid::bigint = r.run_id)"
)


def _lock_key_sql(namespace: str) -> sql.Composable:
    """Advisory-lock key of a chunk id: a 64-bit hash of the table's name and the id.

    No key scheme maps every (table, bigint id) to a distinct 64-bit key (the old `(ns << 40) | id` lost the table's
    bits for negative ids and ids >= 2^40), so a collision is made harmless instead: a chunk whose key is busy is
    not skipped for good but retried at the end of the run (`Backfill._retry_busy`), and a run never ends
    `completed` while chunks it was meant to cover are still held elsewhere.
    """
    return sql.SQL("hashtextextended({ns} || c.id::text, 0)").format(ns=sql.Literal(namespace))


class Store:
    """Owns the database side of the pipeline. One instance per process; connections are opened per role."""

    def __init__(
        self,
        dsn: str,
        table: TableRef,
        state_schema: str = "wiki_embeddings",
        app_name: str = "wiki-embeddings",
    ):
        self.dsn = dsn
        self.table = table
        self.state_schema = check_identifier(state_schema, "state schema")
        self.app_name = app_name
        self._conn: psycopg.Connection | None = None
        t = table
        self._t = sql.Identifier(t.schema, t.name)
        self._id = sql.Identifier(t.id_column)
        self._text = sql.Identifier(t.text_column)
        self._emb = sql.Identifier(t.embedding_column)
        self._s = sql.Identifier(self.state_schema)
        self._failure_key: str | None = None
        self._attnum: int | None = None

    # ---------------------------------------------------------------- connections
    def connect(self, register: bool = True, statement_timeout_sec: float | None = None) -> psycopg.Connection:
        """A new autocommit connection (vector type registered when the extension exists).

        The client encoding is always UTF-8: the server converts from its own encoding, and a `SQL_ASCII`
        database (which has none) passes its bytes through; `claim` reads chunk text from such a database
        as bytes and decodes it itself, so one bad chunk cannot break a whole read.
        """
        options = ""  # a pipeline connection (claims, writes, the run's row) never waits long on the server
        if statement_timeout_sec:
            lock_ms, statement_ms = int(LOCK_TIMEOUT_SEC * 1000), int(statement_timeout_sec * 1000)
            options = f"-c lock_timeout={lock_ms} -c statement_timeout={statement_ms}"
        try:
            conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                application_name=self.app_name,
                connect_timeout=10,
                client_encoding="UTF8",
                **({"options": options} if options else {}),
                tcp_user_timeout=TCP_USER_TIMEOUT_MS,
                **TCP_OPTIONS,
            )
        except psycopg.Error as exc:
            # libpq quotes a malformed URL whole in its message: never let the password ride along.
            message = str(exc)
            cleaned = redact(message, list(url_secrets(self.dsn)))
            if cleaned != message:
                raise type(exc)(cleaned) from None
            raise
        if register:
            self._register(conn)
        return conn

    @staticmethod
    def _register(conn: psycopg.Connection) -> None:
        with contextlib.suppress(psycopg.ProgrammingError):  # no extension yet: migrate()/ensure_table() create it
            register_vector(conn)

    @property
    def conn(self) -> psycopg.Connection:
        """The store's own connection for short statements (status, bookkeeping)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self.connect()
        return self._conn

    def forget_connection(self) -> None:
        """Drop the store's own connection without closing it (a call on it never answered; its thread may still
        be inside it); the next statement opens a fresh one."""
        self._conn = None

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ping(self) -> str:
        row = self.conn.execute("SELECT current_setting('server_version')").fetchone()
        return str(row[0]) if row else "?"

    # ---------------------------------------------------------------- schema
    def migrate(self, record: bool = True) -> int:
        """Bring the bookkeeping schema to the current version; safe to repeat and to race.

        At the current version (the steady state) it is one read of `schema_migrations`: no DDL, no lock, so a
        role without `CREATE` on the database (or a read-only monitoring role) runs every command. Only a
        pending migration takes the advisory lock and the DDL path. `record=False` (status) writes nothing:
        the chunk table's identity (`forget_if_recreated`) is then left to the next writing command.
        """
        if self._pending_migrations():
            self._apply_migrations()
        if record:
            with self.conn.transaction():
                self.forget_if_recreated()
        return len(MIGRATIONS)

    def _bookkeeping_schema_exists(self) -> bool:
        row = self.conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.state_schema,)).fetchone()
        return row is not None

    def _pending_migrations(self) -> bool:
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

    def _apply_migrations(self) -> None:
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
                    self.conn.execute(sql.SQL(statement).format(s=self._s))  # type: ignore[arg-type]
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

    def _privilege_message(self, exc: psycopg.Error, need: str, grant: str | None = None) -> str:
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

    def ensure_extension(self) -> None:
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

    def table_exists(self) -> bool:
        row = self.conn.execute("SELECT to_regclass(%s)", (self._regclass_text(),)).fetchone()
        return bool(row and row[0])

    def _regclass_text(self) -> str:
        return sql.Identifier(self.table.schema, self.table.name).as_string(self.conn)

    def ensure_table(self, dimensions: int) -> bool:
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

    def _missing_index_name(self) -> str:
        return f"{self.table.name}_{self.table.embedding_column}_missing_idx"[:63]

    def ensure_missing_index(self) -> None:
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

    def column_dimensions(self) -> int:
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

    def vanished(self, exc: BaseException) -> str | None:
        """The message for an error saying the chunk table or one of its columns is gone (dropped or renamed
        under a run), else None. From the error alone: no query, so a run's event loop may call it."""
        if not isinstance(exc, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn)):
            return None
        return (
            f"the chunk table {self.table.qualified} or its column {self.table.embedding_column!r} disappeared "
            f"during the run (dropped or renamed): {exc.diag.message_primary or exc}; committed batches stay written"
        )

    def check_id_column(self) -> None:
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

    # ---------------------------------------------------------------- import
    def insert_chunks(self, rows: Iterable[tuple[int, str, int, str]], page: int = 5000) -> int:
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

    # ---------------------------------------------------------------- claims and writes
    def _candidate_filter(self, mode: str) -> sql.Composable:
        """Which missing chunks a run may take: normal runs skip quarantined chunks, retries take only failures."""
        failures = sql.SQL("{s}.failures f WHERE f.table_name = %(table)s AND f.chunk_id = t.{id}").format(
            s=self._s, id=self._id
        )
        quarantined = sql.SQL("f.attempts >= %(cap)s AND f.text_md5 IS NOT DISTINCT FROM md5(t.{text})").format(
            text=self._text
        )
        if mode == "normal":
            return sql.SQL("AND NOT EXISTS (SELECT 1 FROM {f} AND {q})").format(f=failures, q=quarantined)
        if mode == "retry_failed":
            return sql.SQL("AND EXISTS (SELECT 1 FROM {f})").format(f=failures)
        if mode == "all":
            return sql.SQL("")
        raise ValueError(f"unknown claim mode {mode!r}")

    def claim(
        self,
        conn: psycopg.Connection,
        *,
        after_id: int | None,
        limit: int,
        max_chars: int,
        id_min: int | None = None,
        id_max: int | None = None,
        mode: str = "normal",
        max_attempts: int = 3,
    ) -> Claim:
        """Keyset-read the next missing chunks after `after_id` and lock them on `conn` (session advisory locks).

        The locks live as long as `conn`'s session, so they die with the process; no transaction stays open
        across the HTTP call. Text is read after locking, so a chunk another worker just wrote is not taken.
        """
        lower = after_id if after_id is not None else (id_min - 1 if id_min is not None else None)
        key = _lock_key_sql(self.table.lock_namespace)
        query = sql.SQL(
            "WITH cand AS MATERIALIZED ("
            " SELECT t.{id} AS id FROM {t} t WHERE t.{emb} IS NULL"
            " AND (%(lower)s::bigint IS NULL OR t.{id} > %(lower)s)"
            " AND (%(upper)s::bigint IS NULL OR t.{id} <= %(upper)s) {filter}"
            " ORDER BY t.{id} LIMIT %(limit)s)"
            " SELECT c.id, pg_try_advisory_lock({key}) AS locked FROM cand c ORDER BY c.id"
        ).format(id=self._id, t=self._t, emb=self._emb, filter=self._candidate_filter(mode), key=key)
        params = {
            "lower": lower,
            "upper": id_max,
            "limit": limit,
            "table": self.failure_key,
            "cap": max_attempts,
        }
        cand = conn.execute(query, params).fetchall()
        if not cand:
            return Claim([], None, 0)
        locked = [cid for cid, ok in cand if ok]
        rows, invalid, md5s = self._read_claimed(conn, locked, max_chars, sql.SQL("AND {emb} IS NULL"), {})
        busy = [int(cid) for cid, ok in cand if not ok]
        return Claim(rows, int(cand[-1][0]), len(busy), invalid, md5s, busy_ids=busy)

    def claim_ids(
        self,
        conn: psycopg.Connection,
        ids: Sequence[int],
        *,
        max_chars: int,
        mode: str = "normal",
        max_attempts: int = 3,
    ) -> Claim:
        """Claim these ids again (chunks that were busy earlier in the run), those still missing only."""
        key = _lock_key_sql(self.table.lock_namespace)
        cand = conn.execute(
            sql.SQL(
                "WITH cand AS MATERIALIZED (SELECT t.{id} AS id FROM {t} t WHERE t.{id} = ANY(%(ids)s)"
                " AND t.{emb} IS NULL {filter})"
                " SELECT c.id, pg_try_advisory_lock({key}) AS locked FROM cand c ORDER BY c.id"
            ).format(id=self._id, t=self._t, emb=self._emb, filter=self._candidate_filter(mode), key=key),
            {"ids": list(ids), "table": self.failure_key, "cap": max_attempts},
        ).fetchall()
        locked = [int(cid) for cid, ok in cand if ok]
        rows, invalid, md5s = self._read_claimed(conn, locked, max_chars, sql.SQL("AND {emb} IS NULL"), {})
        busy = [int(cid) for cid, ok in cand if not ok]
        last = int(cand[-1][0]) if cand else None
        return Claim(rows, last, len(busy), invalid, md5s, busy_ids=busy)

    def _read_claimed(
        self,
        conn: psycopg.Connection,
        locked: list[int],
        max_chars: int,
        condition: sql.Composable,
        expected_md5: dict[int, str],
    ) -> tuple[list[tuple[int, str]], list[tuple[int, str, int]], dict[int, str]]:
        """Read the cut text and md5(whole text) of locked chunks still matching `condition`; release the rest.

        With `expected_md5`, a chunk whose text changed again since it was found is released, not taken.
        """
        rows: list[tuple[int, str]] = []
        invalid: list[tuple[int, str, int]] = []
        md5s: dict[int, str] = {}
        if not locked:
            return rows, invalid, md5s
        condition = condition.format(emb=self._emb) if isinstance(condition, sql.SQL) else condition
        if _is_sql_ascii(conn):
            rows, invalid, md5s = self._read_undeclared_bytes(conn, locked, max_chars, condition)
        else:
            for r in conn.execute(
                sql.SQL(
                    "SELECT {id}, left({text}, %s), md5({text}) FROM {t} WHERE {id} = ANY(%s) {cond} ORDER BY {id}"
                ).format(id=self._id, text=self._text, t=self._t, cond=condition),
                (max_chars, locked),
            ).fetchall():
                rows.append((int(r[0]), r[1]))
                md5s[int(r[0])] = r[2]
        if expected_md5:
            moved = {cid for cid, m in md5s.items() if expected_md5.get(cid) != m}
            rows = [r for r in rows if r[0] not in moved]
            invalid = [r for r in invalid if r[0] not in moved]
        taken = {r[0] for r in rows} | {r[0] for r in invalid}
        stale = [cid for cid in locked if cid not in taken]
        if stale:
            self.release(conn, stale)
        return rows, invalid, {cid: m for cid, m in md5s.items() if cid in taken}

    def _read_undeclared_bytes(
        self, conn: psycopg.Connection, ids: list[int], max_chars: int, condition: sql.Composable
    ) -> tuple[list[tuple[int, str]], list[tuple[int, str, int]], dict[int, str]]:
        """Claimed texts from a `SQL_ASCII` database: raw bytes, decoded as UTF-8 here, chunk by chunk.

        There `left()` counts bytes, so enough bytes for `max_chars` characters are read and cut after
        decoding; `convert_to(..., 'SQL_ASCII')` hands the stored bytes over unchecked.
        """
        limit = min(max_chars * UTF8_MAX_BYTES_PER_CHAR, 2**31 - 1)
        fetched = conn.execute(
            sql.SQL(
                "SELECT {id}, convert_to(left({text}, %s), 'SQL_ASCII'), octet_length({text}), md5({text}) FROM {t}"
                " WHERE {id} = ANY(%s) {cond} ORDER BY {id}"
            ).format(id=self._id, text=self._text, t=self._t, cond=condition),
            (limit, ids),
        ).fetchall()
        rows: list[tuple[int, str]] = []
        invalid: list[tuple[int, str, int]] = []
        md5s: dict[int, str] = {}
        for cid, raw, size, digest in fetched:
            md5s[int(cid)] = digest
            try:
                rows.append((int(cid), decode_utf8_prefix(bytes(raw), max_chars, complete=size <= limit)))
            except InvalidText as exc:
                invalid.append((int(cid), exc.reason, int(size)))
        return rows, invalid, md5s

    def held_claims(self) -> list[int]:
        """Ids of this table whose claim lock some session holds (a full scan: for tests and diagnosis)."""
        key = _lock_key_sql(self.table.lock_namespace)
        rows = self.conn.execute(
            sql.SQL(
                "SELECT c.id FROM (SELECT {id} AS id FROM {t}) c JOIN pg_locks l ON l.locktype = 'advisory'"
                " AND l.objsubid = 1 AND l.granted"
                " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND ((l.classid::bigint << 32) | l.objid::bigint) = {key} ORDER BY 1"
            ).format(id=self._id, t=self._t, key=key)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def release(self, conn: psycopg.Connection, ids: Sequence[int]) -> None:
        """Give back claims (after their vectors are committed, or when they are skipped)."""
        if not ids:
            return
        key = _lock_key_sql(self.table.lock_namespace)
        conn.execute(
            sql.SQL("SELECT count(pg_advisory_unlock({key})) FROM unnest(%s::bigint[]) AS c(id)").format(key=key),
            (list(ids),),
        )

    def relock(self, conn: psycopg.Connection, ids: Sequence[int]) -> list[int]:
        """Re-take claims after a reconnect; returns the ids this session holds again."""
        if not ids:
            return []
        key = _lock_key_sql(self.table.lock_namespace)
        rows = conn.execute(
            sql.SQL("SELECT c.id FROM unnest(%s::bigint[]) AS c(id) WHERE pg_try_advisory_lock({key})").format(key=key),
            (list(ids),),
        ).fetchall()
        return [int(r[0]) for r in rows]

    def write_vectors(
        self,
        conn: psycopg.Connection,
        ids: Sequence[int],
        vectors: Sequence[np.ndarray],
        md5s: Sequence[str] | None = None,
        provenance: Provenance | None = None,
        replace: bool = False,
        notes: VectorNotes | None = None,
    ) -> WriteResult:
        """Write one batch of vectors in one short transaction, with their provenance.

        Default: only rows still missing are touched. `replace=True` (content refresh) overwrites a vector in
        place (never a NULL in between). With `md5s`, a row is written only if its text is still the one
        claimed (`md5(text) = claimed md5`). One statement does it all: an `UPDATE … FROM unnest(…)` over
        binary arrays (ids, vectors, md5s) joined on the primary key, whose RETURNING feeds the provenance
        insert and the clearing of failure records - one round trip per batch, the least client CPU measured
        (benchmarks/RESULTS.md).
        """
        if not ids:
            return WriteResult(0)
        guard = sql.SQL("") if replace else sql.SQL(" AND t.{emb} IS NULL").format(emb=self._emb)
        if md5s is not None:
            guard = sql.Composed([guard, sql.SQL(" AND md5(t.{text}) = u.md5").format(text=self._text)])
        params: dict[str, Any] = {
            "ids": list(ids),
            "vectors": list(vectors),
            "md5s": list(md5s) if md5s is not None else [None] * len(ids),
            "chars": notes.chars_sent if notes is not None else [None] * len(ids),
            "cut": notes.context_cut if notes is not None else [False] * len(ids),
            "trunc": notes.server_truncated if notes is not None else [False] * len(ids),
            "failure_key": self.failure_key,
        }
        record, column_check, attnum_out = sql.SQL(""), sql.SQL(""), sql.SQL("NULL::smallint, NULL::text")
        model_cte = sql.SQL("")
        if provenance is not None:
            # The column's attnum is read in the same statement, after the UPDATE has locked the table: a swap
            # (ACCESS EXCLUSIVE) cannot commit in between. A batch whose column was swapped since this run's
            # first batch writes nothing (old-model vectors never land in the new column) and is refused below.
            params.update(
                expected=self._attnum,
                table=self.table.qualified,
                model=provenance.model,
                dim=provenance.dimensions,
                max_chars=provenance.max_chars,
                prefix=provenance.text_prefix,
            )
            # The model the column takes now (the live model, or a migration's target for its shadow column) is
            # read in the same statement too: a run started before a swap never writes its model's vectors into
            # a column that now belongs to another model.
            column_check = sql.SQL(
                " AND (%(expected)s::smallint IS NULL OR (SELECT attnum FROM a) = %(expected)s)"
                " AND ((SELECT m FROM cm) IS NULL OR regexp_replace((SELECT m FROM cm), ':latest$', '')"
                " = regexp_replace(%(model)s, ':latest$', ''))"
            )
            attnum_out = sql.SQL("(SELECT attnum FROM a), (SELECT m FROM cm)")
            model_cte = sql.SQL(
                " cm AS (SELECT CASE WHEN ts.migration_column = %(column)s THEN ts.migration_model ELSE ts.model END"
                " AS m FROM {s}.table_state ts WHERE ts.table_name = %(table)s),"
            ).format(s=self._s)
            record = sql.SQL(
                ", p AS (INSERT INTO {s}.embedding_provenance AS p (table_name, column_attnum, chunk_id, model,"
                " dimensions, text_md5, max_chars, text_prefix, embedded_at, chars_sent, context_cut,"
                " server_truncated)"
                " SELECT %(table)s, (SELECT attnum FROM a), w.id, %(model)s, %(dim)s, w.md5, %(max_chars)s, %(prefix)s,"
                " now(), w.chars, w.cut, w.trunc FROM w"
                " ON CONFLICT (table_name, column_attnum, chunk_id) DO UPDATE SET model = EXCLUDED.model,"
                " dimensions = EXCLUDED.dimensions, text_md5 = EXCLUDED.text_md5,"
                " max_chars = EXCLUDED.max_chars, text_prefix = EXCLUDED.text_prefix,"
                " embedded_at = EXCLUDED.embedded_at, chars_sent = EXCLUDED.chars_sent,"
                " context_cut = EXCLUDED.context_cut, server_truncated = EXCLUDED.server_truncated)"
            ).format(s=self._s)
        stmt = sql.SQL(
            "WITH a AS (SELECT attnum FROM pg_attribute WHERE attrelid = to_regclass(%(rel)s) AND attname = %(column)s"
            " AND NOT attisdropped),{model_cte}"
            " lk AS (SELECT t.{id} AS id FROM {t} AS t WHERE t.{id} = ANY(%(ids)b::bigint[]) FOR UPDATE SKIP LOCKED),"
            " w AS (UPDATE {t} AS t SET {emb} = u.e"
            " FROM unnest(%(ids)b::bigint[], %(vectors)b::vector[], %(md5s)s::text[], %(chars)s::int[],"
            " %(cut)s::bool[], %(trunc)s::bool[]) AS u(id, e, md5, chars, cut, trunc)"
            " WHERE t.{id} = u.id AND t.{id} IN (SELECT id FROM lk){guard}{column_check}"
            " RETURNING t.{id} AS id, coalesce(u.md5, md5(t.{text})) AS md5, u.chars, u.cut, u.trunc){record},"
            " d AS (DELETE FROM {s}.failures f USING w WHERE f.table_name = %(failure_key)s AND f.chunk_id = w.id)"
            " SELECT (SELECT count(*) FROM w), {attnum_out},"
            " (SELECT array_agg(x) FROM unnest(%(ids)b::bigint[]) AS x WHERE x NOT IN (SELECT id FROM lk))"
        ).format(
            t=self._t,
            emb=self._emb,
            id=self._id,
            text=self._text,
            guard=guard,
            column_check=column_check,
            record=record,
            s=self._s,
            attnum_out=attnum_out,
            model_cte=model_cte,
        )
        params.update(
            rel=sql.Identifier(self.table.schema, self.table.name).as_string(conn), column=self.table.embedding_column
        )
        with conn.transaction():
            row = conn.execute(stmt, params, binary=True).fetchone()
            if provenance is not None:
                attnum = row[1] if row else None
                if attnum is None:
                    raise StoreError(f"column {self.table.embedding_column!r} not found in {self.table.qualified}")
                if self._attnum is not None and attnum != self._attnum:
                    raise StoreError(
                        f"column {self.table.embedding_column!r} was swapped during this run; nothing written "
                        "in this batch (start the run again)"
                    )
                self._attnum = int(attnum)
                column_model = row[2] if row else None
                if column_model is not None and not _same_model(column_model, provenance.model):
                    raise ModelMismatch(
                        f"{self.table.qualified}.{self.table.embedding_column} now takes model {column_model!r} "
                        f"(a swap or another run changed it); nothing of model {provenance.model!r} was written in "
                        "this batch: start the run again"
                    )
        return WriteResult(int(row[0]) if row else 0, tuple(row[-1] or ()) if row else ())

    def _current_attnum(self, conn: psycopg.Connection | None = None) -> int:
        c = conn or self.conn
        row = c.execute(
            "SELECT attnum FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s AND NOT attisdropped",
            (sql.Identifier(self.table.schema, self.table.name).as_string(c), self.table.embedding_column),
        ).fetchone()
        if row is None:
            raise StoreError(f"column {self.table.embedding_column!r} not found in {self.table.qualified}")
        return int(row[0])

    @property
    def failure_key(self) -> str:
        """Failure records of the live column are keyed by the table; those of a migration's shadow column by
        table#column, so a shadow fill never mixes its failures with the live column's."""
        if self._failure_key is None:
            _, column = self.migration_target()
            shadow = column is not None and column == self.table.embedding_column
            self._failure_key = f"{self.table.qualified}#{column}" if shadow else self.table.qualified
        return self._failure_key

    def provenance(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Provenance rows of this column for `ids`."""
        rows = self.conn.cursor(row_factory=dict_row).execute(
            sql.SQL(
                "SELECT chunk_id, model, dimensions, text_md5, max_chars, text_prefix, embedded_at, chars_sent,"
                " context_cut, server_truncated"
                " FROM {s}.embedding_provenance WHERE table_name = %s AND column_attnum = %s AND chunk_id = ANY(%s)"
            ).format(s=self._s),
            (self.table.qualified, self._current_attnum(), list(ids)),
        )
        return {int(r["chunk_id"]): dict(r) for r in rows.fetchall()}

    # ---------------------------------------------------------------- content changes
    def _changed_window(self, include_cut: bool = False) -> sql.Composable:
        """Embedded rows of one keyset window whose stored text no longer matches their provenance hash (and, with
        `include_cut`, those embedded from a text cut to fit the context or truncated by the server)."""
        also = sql.SQL(" OR p.context_cut OR p.server_truncated") if include_cut else sql.SQL("")
        return sql.SQL(
            "WITH win AS MATERIALIZED ("
            " SELECT t.{id} AS id, md5(t.{text}) AS md5 FROM {t} t WHERE t.{emb} IS NOT NULL"
            " AND (%(lower)s::bigint IS NULL OR t.{id} > %(lower)s)"
            " AND (%(upper)s::bigint IS NULL OR t.{id} <= %(upper)s) ORDER BY t.{id} LIMIT %(window)s)"
            " SELECT w.id, w.md5, (SELECT max(id) FROM win) AS last FROM win w"
            " JOIN {s}.embedding_provenance p ON p.table_name = %(ptable)s AND p.column_attnum = %(attnum)s"
            " AND p.chunk_id = w.id WHERE p.text_md5 <> w.md5{also} ORDER BY w.id"
        ).format(id=self._id, text=self._text, t=self._t, emb=self._emb, s=self._s, also=also)

    def claim_changed(
        self,
        conn: psycopg.Connection,
        *,
        after_id: int | None,
        limit: int,
        max_chars: int,
        id_min: int | None = None,
        id_max: int | None = None,
        scan_window: int = 5000,
        include_cut: bool = False,
        **_: Any,
    ) -> Claim:
        """Keyset scan (one window of ids per call) for embedded chunks whose text changed since it was embedded;
        lock the first `limit` found. `last_scanned_id` is where the next call continues."""
        lower = after_id if after_id is not None else (id_min - 1 if id_min is not None else None)
        found = conn.execute(
            self._changed_window(include_cut),
            {
                "lower": lower,
                "upper": id_max,
                "window": scan_window,
                "ptable": self.table.qualified,
                "attnum": self._current_attnum(conn),
            },
        ).fetchall()
        if not found:
            # Nothing changed in this window: continue after its end (or stop when the window was empty).
            row = conn.execute(
                sql.SQL(
                    "SELECT max(id) FROM (SELECT t.{id} AS id FROM {t} t WHERE t.{emb} IS NOT NULL"
                    " AND (%(lower)s::bigint IS NULL OR t.{id} > %(lower)s)"
                    " AND (%(upper)s::bigint IS NULL OR t.{id} <= %(upper)s) ORDER BY t.{id} LIMIT %(window)s) w"
                ).format(id=self._id, t=self._t, emb=self._emb),
                {"lower": lower, "upper": id_max, "window": scan_window},
            ).fetchone()
            last = row[0] if row else None
            return Claim([], None if last is None else int(last), 0)
        found = found[:limit]
        last = int(found[-1][0]) if len(found) == limit else int(found[0][2])
        key = _lock_key_sql(self.table.lock_namespace)
        locked = [
            int(r[0])
            for r in conn.execute(
                sql.SQL("SELECT c.id FROM unnest(%s::bigint[]) AS c(id) WHERE pg_try_advisory_lock({key})").format(
                    key=key
                ),
                ([int(r[0]) for r in found],),
            ).fetchall()
        ]
        expected = {int(r[0]): r[1] for r in found}
        rows, invalid, md5s = self._read_claimed(
            conn, locked, max_chars, sql.SQL("AND {emb} IS NOT NULL"), {c: expected[c] for c in locked}
        )
        return Claim(rows, last, len(found) - len(locked), invalid, md5s, len(found))

    def scan_changed(self, record: bool = True) -> int:
        """Count embedded chunks whose text changed since it was embedded, and vectors without provenance, in
        one set-based scan of the table; recorded in table_state with its time for `status` (which never scans)."""
        row = self.conn.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE p.text_md5 <> md5(t.{text})), count(*) FILTER (WHERE p.chunk_id IS NULL)"
                " FROM {t} t LEFT JOIN {s}.embedding_provenance p ON p.table_name = %s"
                " AND p.column_attnum = %s AND p.chunk_id = t.{id} WHERE t.{emb} IS NOT NULL"
            ).format(t=self._t, s=self._s, id=self._id, emb=self._emb, text=self._text),
            (self.table.qualified, self._current_attnum()),
        ).fetchone()
        changed, unverified = (int(row[0]), int(row[1])) if row else (0, 0)
        if record:
            self.record_stale_text(changed, unverified)
        return changed

    def count_unverified(self) -> int:
        """Vectors with no provenance row: written before this tool (e.g. by the shell scripts) or by another
        writer, so their model and text are unknown. One anti-join pass over the embedded rows."""
        row = self.conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {t} t WHERE t.{emb} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM"
                " {s}.embedding_provenance p WHERE p.table_name = %s AND p.column_attnum = %s AND p.chunk_id = t.{id})"
            ).format(t=self._t, s=self._s, id=self._id, emb=self._emb),
            (self.table.qualified, self._current_attnum()),
        ).fetchone()
        return int(row[0]) if row else 0

    def record_stale_text(self, count: int, unverified: int | None = None) -> None:
        """Record a content scan's result; `unverified` None keeps the last recorded count."""
        self._ensure_state_row()
        self.conn.execute(
            sql.SQL(
                "UPDATE {s}.table_state SET stale_text = %s, stale_text_scanned_at = now(),"
                " unverified = coalesce(%s, unverified), updated_at = now() WHERE table_name = %s"
            ).format(s=self._s),
            (count, unverified, self.table.qualified),
        )

    def forget_if_recreated(self) -> bool:
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

    def read_vectors(self, ids: Sequence[int]) -> dict[int, np.ndarray | None]:
        rows = self.conn.execute(
            sql.SQL("SELECT {id}, {emb} FROM {t} WHERE {id} = ANY(%s)").format(id=self._id, emb=self._emb, t=self._t),
            (list(ids),),
        ).fetchall()
        return {int(r[0]): (None if r[1] is None else np.asarray(r[1].to_numpy(), dtype=np.float32)) for r in rows}

    def read_texts(self, ids: Sequence[int], max_chars: int | None = None) -> dict[int, str]:
        expr = sql.SQL("left({}, %s)").format(self._text) if max_chars else self._text
        params: tuple[Any, ...] = (max_chars, list(ids)) if max_chars else (list(ids),)
        rows = self.conn.execute(
            sql.SQL("SELECT {id}, {e} FROM {t} WHERE {id} = ANY(%s)").format(id=self._id, e=expr, t=self._t),
            params,
        ).fetchall()
        return {int(r[0]): r[1] for r in rows}

    # ---------------------------------------------------------------- failures
    def record_failure(
        self,
        chunk_id: int,
        *,
        error: str,
        message: str,
        http_status: int | None,
        run_id: int | None,
    ) -> int:
        """Upsert a failure record; attempts count up for the same text and restart at 1 when the text changed."""
        row = self.conn.execute(
            sql.SQL(
                "INSERT INTO {s}.failures AS f (table_name, chunk_id, error, message, http_status, attempts,"
                " text_md5, text_length, run_id)"
                " SELECT %(table)s, t.{id}, %(error)s, %(message)s, %(status)s, 1, md5(t.{text}),"
                " length(t.{text}), %(run)s FROM {t} t WHERE t.{id} = %(cid)s"
                " ON CONFLICT (table_name, chunk_id) DO UPDATE SET error = EXCLUDED.error,"
                " message = EXCLUDED.message, http_status = EXCLUDED.http_status, run_id = EXCLUDED.run_id,"
                " text_length = EXCLUDED.text_length, last_seen = now(),"
                " attempts = CASE WHEN f.text_md5 IS NOT DISTINCT FROM EXCLUDED.text_md5"
                " THEN f.attempts + 1 ELSE 1 END,"
                " text_md5 = EXCLUDED.text_md5"
                " RETURNING attempts"
            ).format(s=self._s, id=self._id, text=self._text, t=self._t),
            {
                "table": self.failure_key,
                "error": error,
                "message": message[:2000],
                "status": http_status,
                "run": run_id,
                "cid": chunk_id,
            },
        ).fetchone()
        return int(row[0]) if row else 0

    def list_failures(self, max_attempts: int = 3, limit: int | None = None) -> list[dict[str, Any]]:
        rows = self.conn.cursor(row_factory=dict_row).execute(
            sql.SQL(
                "SELECT f.chunk_id, f.error, f.message, f.http_status, f.attempts, f.text_length, f.first_seen,"
                " f.last_seen, (f.attempts >= %s AND f.text_md5 IS NOT DISTINCT FROM md5(t.{text})) AS quarantined,"
                " (t.{emb} IS NULL) AS still_missing"
                " FROM {s}.failures f LEFT JOIN {t} t ON t.{id} = f.chunk_id"
                " WHERE f.table_name = %s ORDER BY f.chunk_id LIMIT %s"
            ).format(s=self._s, t=self._t, id=self._id, text=self._text, emb=self._emb),
            (max_attempts, self.failure_key, limit),
        )
        return list(rows.fetchall())

    def clear_failures(self, ids: Sequence[int] | None = None) -> int:
        if ids:
            cur = self.conn.execute(
                sql.SQL("DELETE FROM {s}.failures WHERE table_name = %s AND chunk_id = ANY(%s)").format(s=self._s),
                (self.failure_key, list(ids)),
            )
        else:
            cur = self.conn.execute(
                sql.SQL("DELETE FROM {s}.failures WHERE table_name = %s").format(s=self._s),
                (self.failure_key,),
            )
        return cur.rowcount

    # ---------------------------------------------------------------- stop requests and table state
    def _ensure_state_row(self) -> None:
        self.conn.execute(
            sql.SQL("INSERT INTO {s}.table_state (table_name) VALUES (%s) ON CONFLICT DO NOTHING").format(s=self._s),
            (self.table.qualified,),
        )

    def request_stop(self, reason: str = "operator") -> None:
        self._ensure_state_row()
        self.conn.execute(
            sql.SQL(
                "UPDATE {s}.table_state SET stop_requested_at = now(), stop_reason = %s, updated_at = now()"
                " WHERE table_name = %s"
            ).format(s=self._s),
            (reason, self.table.qualified),
        )

    def clear_stop(self) -> None:
        self.conn.execute(
            sql.SQL(
                "UPDATE {s}.table_state SET stop_requested_at = NULL, stop_reason = NULL, updated_at = now()"
                " WHERE table_name = %s"
            ).format(s=self._s),
            (self.table.qualified,),
        )

    def stop_requested(self, conn: psycopg.Connection | None = None) -> bool:
        row = (
            (conn or self.conn)
            .execute(
                sql.SQL("SELECT stop_requested_at IS NOT NULL FROM {s}.table_state WHERE table_name = %s").format(
                    s=self._s
                ),
                (self.table.qualified,),
            )
            .fetchone()
        )
        return bool(row and row[0])

    def recorded_model(self) -> tuple[str | None, int | None]:
        row = self.conn.execute(
            sql.SQL("SELECT model, dimensions FROM {s}.table_state WHERE table_name = %s").format(s=self._s),
            (self.table.qualified,),
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def record_model(self, model: str, dimensions: int, replace: bool = False) -> None:
        """Record the live column's model; another recorded model is never overwritten (unless `replace`, by hand)."""
        self._ensure_state_row()
        if replace:
            self.conn.execute(
                sql.SQL("UPDATE {s}.table_state SET model = NULL WHERE table_name = %s").format(s=self._s),
                (self.table.qualified,),
            )
        self.conn.execute(
            sql.SQL(
                "UPDATE {s}.table_state SET model = %s, dimensions = %s, updated_at = now() WHERE table_name = %s"
                " AND (model IS NULL OR regexp_replace(model, ':latest$', '') = regexp_replace(%s, ':latest$', ''))"
            ).format(s=self._s),
            (model, dimensions, self.table.qualified, model),
        )
        recorded, _ = self.recorded_model()
        if recorded is not None and not _same_model(recorded, model):
            # A swap committed between this run's model check and now: the column belongs to `recorded`.
            raise ModelMismatch(
                f"{self.table.qualified}.{self.table.embedding_column} holds model {recorded!r} now (swapped while "
                f"this run started); a run with model {model!r} is refused and nothing was written"
            )

    # ---------------------------------------------------------------- model migration (shadow column)
    def migration_target(self) -> tuple[str | None, str | None]:
        """(target model, shadow column) of the migration in progress, or (None, None)."""
        row = self.conn.execute(
            sql.SQL("SELECT migration_model, migration_column FROM {s}.table_state WHERE table_name = %s").format(
                s=self._s
            ),
            (self.table.qualified,),
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def table_state(self) -> dict[str, Any]:
        row = (
            self.conn.cursor(row_factory=dict_row)
            .execute(
                sql.SQL("SELECT * FROM {s}.table_state WHERE table_name = %s").format(s=self._s),
                (self.table.qualified,),
            )
            .fetchone()
        )
        return dict(row) if row else {}

    def column_exists(self, column: str) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s AND NOT attisdropped",
            (self._regclass_text(), column),
        ).fetchone()
        return row is not None

    def start_migration(self, model: str, dimensions: int, shadow: str) -> bool:
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

    def abort_migration(self) -> str | None:
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

    def _forget_column(self, attnum: int, column: str) -> None:
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

    def for_column(self, column: str) -> Store:
        """A store for another vector column of the same table (shares nothing but the settings)."""
        t = self.table
        ref = TableRef(t.schema, t.name, t.id_column, t.text_column, check_identifier(column, "embedding column"))
        return Store(self.dsn, ref, self.state_schema, self.app_name)

    def live_runs(self) -> int:
        """Runs of this table that are running and alive (their session holds the liveness lock)."""
        self.abandon_dead_runs()
        row = self.conn.execute(
            sql.SQL("SELECT count(*) FROM {s}.runs WHERE table_name = %s AND state = 'running'").format(s=self._s),
            (self.table.qualified,),
        ).fetchone()
        return int(row[0]) if row else 0

    def swap_columns(
        self,
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

    def _vector_index_name_swaps(self, live: str, incoming: str) -> list[tuple[str, str]]:
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

    def vector_index_specs(self, column: str | None = None) -> list[dict[str, Any]]:
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

    def build_vector_index(self, spec: dict[str, Any], column: str, maintenance_work_mem: str = "512MB") -> str:
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

    def _free_index_name(self, base: str) -> str:
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

    def invalid_indexes(self, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
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

    def drop_invalid_indexes(self, columns: Sequence[str], lock_timeout: str = "5s") -> list[str]:
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
    def swap_lock_key(self) -> tuple[int, int]:
        """Two-int advisory key that serializes swaps and rollbacks of this table's columns."""
        table_key = zlib.crc32(self.table.qualified.encode()) & 0x7FFFFFFF
        return zlib.crc32(f"swap:{self.state_schema}".encode()) & 0x7FFFFFFF, table_key

    def try_swap_lock(self) -> bool:
        """Take the table's swap lock on the store's session if free (never waits: a waiting statement would hold a
        snapshot that the other swap's CREATE INDEX CONCURRENTLY has to wait for)."""
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s::int, %s::int)", self.swap_lock_key).fetchone()
        return bool(row and row[0])

    def release_swap_lock(self) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(%s::int, %s::int)", self.swap_lock_key)

    # ---------------------------------------------------------------- runs
    @property
    def run_lock_namespace(self) -> int:
        """First key of every run's liveness lock (per bookkeeping schema; the run id is the second)."""
        return zlib.crc32(f"runs:{self.state_schema}".encode()) & 0x7FFFFFFF

    def start_run(
        self, mode: str, options: dict[str, Any], model: str | None, conn: psycopg.Connection | None = None
    ) -> int:
        """Record a run as `running` and take its liveness lock on `conn`, in one statement.

        The lock (a session advisory lock keyed by the run id) lives as long as the run's session: a run
        whose process died (kill -9, a lost host) no longer holds it, which is how `status` tells a live run
        from an abandoned one without trusting a pid on another host. Runs of the table that are still
        `running` without their lock are marked `abandoned` here first.
        """
        c = conn or self.conn
        self.abandon_dead_runs(c)
        row = c.execute(
            sql.SQL(
                "INSERT INTO {s}.runs (table_name, mode, state, host, pid, model, options)"
                " VALUES (%s, %s, 'running', %s, %s, %s, %s)"
                " RETURNING run_id, pg_try_advisory_lock(%s::int, run_id::int)"
            ).format(s=self._s),
            (
                self.table.qualified,
                mode,
                socket.gethostname(),
                os.getpid(),
                model,
                json.dumps(options, default=str),
                self.run_lock_namespace,
            ),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def hold_run_lock(self, conn: psycopg.Connection, run_id: int) -> bool:
        """Take the run's liveness lock again (after a reconnect); a run marked abandoned meanwhile is live again."""
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s::int, %s::int)", (self.run_lock_namespace, run_id)
        ).fetchone()
        conn.execute(
            sql.SQL(
                "UPDATE {s}.runs SET state = 'running', finished_at = NULL WHERE run_id = %s AND state = 'abandoned'"
            ).format(s=self._s),
            (run_id,),
        )
        return bool(row and row[0])

    def abandon_dead_runs(self, conn: psycopg.Connection | None = None) -> int:
        """Mark this table's `running` runs whose session is gone as `abandoned`; returns how many."""
        cur = (conn or self.conn).execute(
            sql.SQL(
                "UPDATE {s}.runs r SET state = 'abandoned', finished_at = r.heartbeat_at,"
                " message = 'its process ended without finishing the run (killed, or lost its database session)'"
                " WHERE r.table_name = %(table)s AND r.state = 'running' AND NOT {held}"
            ).format(s=self._s, held=sql.SQL(_RUN_LOCK_HELD)),
            {"table": self.table.qualified, "run_ns": self.run_lock_namespace},
        )
        return cur.rowcount

    def heartbeat_run(self, run_id: int, embedded: int, failed: int, chunks_per_s: float) -> None:
        self.conn.execute(
            sql.SQL(
                "UPDATE {s}.runs SET heartbeat_at = now(), embedded = %s, failed = %s, chunks_per_s = %s"
                " WHERE run_id = %s"
            ).format(s=self._s),
            (embedded, failed, chunks_per_s, run_id),
        )

    def finish_run(
        self,
        run_id: int,
        state: str,
        embedded: int,
        failed: int,
        chunks_per_s: float,
        message: str,
        locked: int = 0,
    ) -> None:
        self.conn.execute(
            sql.SQL(
                "UPDATE {s}.runs SET state = %s, finished_at = now(), heartbeat_at = now(), embedded = %s,"
                " failed = %s, chunks_per_s = %s, message = %s, locked = %s WHERE run_id = %s"
            ).format(s=self._s),
            (state, embedded, failed, chunks_per_s, message, locked, run_id),
        )

    def last_run(self, mode: str | None = None) -> dict[str, Any] | None:
        cur = self.conn.cursor(row_factory=dict_row)
        row = cur.execute(
            sql.SQL(
                "SELECT run_id, mode, state, host, pid, model, options, started_at, heartbeat_at, finished_at,"
                " embedded, failed, chunks_per_s, message, locked, {held} AS alive FROM {s}.runs r"
                " WHERE table_name = %(table)s AND (%(mode)s::text IS NULL OR mode = %(mode)s)"
                " ORDER BY run_id DESC LIMIT 1"
            ).format(s=self._s, held=sql.SQL(_RUN_LOCK_HELD)),
            {"table": self.table.qualified, "mode": mode, "run_ns": self.run_lock_namespace},
        ).fetchone()
        return dict(row) if row else None

    # ---------------------------------------------------------------- status
    def status(self, max_attempts: int = 3) -> dict[str, Any]:
        """Exact counts: total from the primary key, missing from the partial index, failures from bookkeeping."""
        cur = self.conn.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM {t}),"
                " (SELECT count(*) FROM {t} WHERE {emb} IS NULL),"
                " (SELECT count(*) FROM {s}.failures f JOIN {t} t ON t.{id} = f.chunk_id"
                "   WHERE f.table_name = %(table)s AND t.{emb} IS NULL),"
                " (SELECT count(*) FROM {s}.failures f JOIN {t} t ON t.{id} = f.chunk_id"
                "   WHERE f.table_name = %(table)s AND t.{emb} IS NULL AND f.attempts >= %(cap)s"
                "   AND f.text_md5 IS NOT DISTINCT FROM md5(t.{text}))"
            ).format(t=self._t, emb=self._emb, s=self._s, id=self._id, text=self._text),
            {"table": self.failure_key, "cap": max_attempts},
        ).fetchone()
        assert cur is not None
        total, missing, failed, quarantined = (int(x) for x in cur)
        embedded = total - missing
        return {
            "total": total,
            "embedded": embedded,
            "missing": missing,
            "coverage_pct": coverage_pct(embedded, total),
            "failed": failed,
            "quarantined": quarantined,
            "stop_requested": self.stop_requested(),
        }

    def model_status(self) -> dict[str, Any]:
        """Beside `status`: embedded vectors of another model than the live one (from provenance, an index-only
        count) and the result of the last content-change scan (never scanned here, so status stays fast)."""
        state = self.table_state()
        stale_model = 0
        if state.get("model"):
            row = self.conn.execute(
                sql.SQL(
                    "SELECT count(*) FROM {s}.embedding_provenance WHERE table_name = %s AND column_attnum = %s"
                    " AND model <> %s"
                ).format(s=self._s),
                (self.table.qualified, self._current_attnum(), state["model"]),
            ).fetchone()
            stale_model = int(row[0]) if row else 0
        scanned = state.get("stale_text_scanned_at")
        unverified = state.get("unverified")
        cut = self.conn.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE context_cut), count(*) FILTER (WHERE server_truncated)"
                " FROM {s}.embedding_provenance WHERE table_name = %s AND column_attnum = %s"
                " AND (context_cut OR server_truncated)"
            ).format(s=self._s),
            (self.table.qualified, self._current_attnum()),
        ).fetchone()
        return {
            "cut_for_context": int(cut[0]) if cut else 0,
            "server_truncated": int(cut[1]) if cut else 0,
            "stale_model": stale_model,
            "stale_text": int(state.get("stale_text") or 0),
            "unverified": "" if unverified is None else int(unverified),
            "stale_text_scanned_at": scanned.isoformat(timespec="seconds") if scanned else "",
            "migration_model": state.get("migration_model") or "",
            "migration_column": state.get("migration_column") or "",
            "previous_model": state.get("previous_model") or "",
        }

    def sample_texts(self, size: int, max_chars: int, missing_only: bool = True) -> list[str]:
        """About `size` chunk texts (cut to `max_chars`) spread over the table, for the pre-flight estimate:
        a Bernoulli sample sized from the planner's row estimate, so it costs one pass over few pages."""
        row = self.conn.execute(
            "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass(%s)",
            (sql.Identifier(self.table.schema, self.table.name).as_string(self.conn),),
        ).fetchone()
        estimate = int(row[0]) if row and row[0] else 0
        percent = 100.0 if estimate <= size * 4 else max(100.0 * size * 4 / estimate, 0.01)
        where = sql.SQL("WHERE {emb} IS NULL").format(emb=self._emb) if missing_only else sql.SQL("")
        if _is_sql_ascii(self.conn):  # undeclared bytes: decoded here, a bad byte replaced (an estimate only)
            raw = self.conn.execute(
                sql.SQL(
                    "SELECT convert_to(left({text}, %s), 'SQL_ASCII') FROM {t} TABLESAMPLE BERNOULLI (%s) {where}"
                    " LIMIT %s"
                ).format(text=self._text, t=self._t, where=where),
                (max_chars * UTF8_MAX_BYTES_PER_CHAR, percent, size),
            ).fetchall()
            return [bytes(r[0]).decode("utf-8", errors="replace")[:max_chars] for r in raw if r[0]]
        rows = self.conn.execute(
            sql.SQL("SELECT left({text}, %s) FROM {t} TABLESAMPLE BERNOULLI (%s) {where} LIMIT %s").format(
                text=self._text, t=self._t, where=where
            ),
            (max_chars, percent, size),
        ).fetchall()
        return [r[0] for r in rows if r[0]]

    def missing_id_bounds(self, id_min: int | None = None, id_max: int | None = None) -> tuple[int | None, int | None]:
        """The smallest and largest missing id (in the range): two probes of the partial index."""
        row = self.conn.execute(
            sql.SQL(
                "SELECT min({id}), max({id}) FROM {t} WHERE {emb} IS NULL"
                " AND (%(lo)s::bigint IS NULL OR {id} >= %(lo)s) AND (%(hi)s::bigint IS NULL OR {id} <= %(hi)s)"
            ).format(id=self._id, t=self._t, emb=self._emb),
            {"lo": id_min, "hi": id_max},
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def count_missing(self, id_min: int | None = None, id_max: int | None = None) -> int:
        row = self.conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {t} WHERE {emb} IS NULL AND (%s::bigint IS NULL OR {id} >= %s)"
                " AND (%s::bigint IS NULL OR {id} <= %s)"
            ).format(t=self._t, emb=self._emb, id=self._id),
            (id_min, id_min, id_max, id_max),
        ).fetchone()
        return int(row[0]) if row else 0

    def missing_by_range(self, width: int) -> list[tuple[int, int]]:
        """(range start, missing count) for every ID range of `width` that has missing chunks."""
        rows = self.conn.execute(
            sql.SQL(
                "SELECT ({id} / %s) * %s AS start, count(*) FROM {t} WHERE {emb} IS NULL GROUP BY 1 ORDER BY 1"
            ).format(id=self._id, t=self._t, emb=self._emb),
            (width, width),
        ).fetchall()
        return [(int(r[0]), int(r[1])) for r in rows]

    def failed_by_range(self, width: int) -> list[tuple[int, int]]:
        rows = self.conn.execute(
            sql.SQL(
                "SELECT (f.chunk_id / %s) * %s, count(*) FROM {s}.failures f JOIN {t} t ON t.{id} = f.chunk_id"
                " WHERE f.table_name = %s AND t.{emb} IS NULL GROUP BY 1 ORDER BY 1"
            ).format(s=self._s, t=self._t, id=self._id, emb=self._emb),
            (width, width, self.failure_key),
        ).fetchall()
        return [(int(r[0]), int(r[1])) for r in rows]

    def id_bounds(self) -> tuple[int | None, int | None, int]:
        row = self.conn.execute(
            sql.SQL("SELECT min({id}), max({id}), count(*) FROM {t}").format(id=self._id, t=self._t)
        ).fetchone()
        assert row is not None
        return row[0], row[1], int(row[2])

    # ---------------------------------------------------------------- vector indexes (bulk-load policy)
    def vector_indexes(self) -> list[dict[str, str]]:
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

    def drop_index(self, schema: str, name: str) -> float:
        started = time.perf_counter()
        self.conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(schema, name)))
        return time.perf_counter() - started

    def create_index(self, definition: str, maintenance_work_mem: str = "512MB") -> float:
        """Re-run a saved `pg_get_indexdef` definition (text PostgreSQL itself produced) with more build memory."""
        started = time.perf_counter()
        with self.conn.transaction():
            self.conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (maintenance_work_mem,))
            self.conn.execute(sql.SQL(definition))  # type: ignore[arg-type]
        return time.perf_counter() - started

    # ---------------------------------------------------------------- Dagster's picture of the table (defs/state.py)
    # Read-only queries behind the Dagster state sensor and the coverage asset: which ID ranges hold chunks, the
    # per-range counts, and the rate of the runs under way. Kept cheap: the sensor calls them every minute.
    def occupied_ranges(self, width: int, count: int) -> list[int]:
        """Starts of the first `count` ID ranges of `width` holding at least one chunk (a primary-key probe each)."""
        rows = self.conn.execute(
            sql.SQL(
                "SELECT s * %(w)s FROM generate_series(0, %(n)s - 1) AS s"
                " WHERE EXISTS (SELECT 1 FROM {t} WHERE {id} >= s * %(w)s AND {id} < (s + 1) * %(w)s)"
                " ORDER BY 1"
            ).format(t=self._t, id=self._id),
            {"w": width, "n": count},
        ).fetchall()
        return [int(r[0]) for r in rows]

    def rows_by_range(self, width: int) -> list[tuple[int, int, int]]:
        """(range start, chunks, missing) for every ID range of `width` that holds chunks."""
        rows = self.conn.execute(
            sql.SQL(
                "SELECT ({id} / %s) * %s, count(*), count(*) FILTER (WHERE {emb} IS NULL) FROM {t}"
                " GROUP BY 1 ORDER BY 1"
            ).format(id=self._id, emb=self._emb, t=self._t),
            (width, width),
        ).fetchall()
        return [(int(r[0]), int(r[1]), int(r[2])) for r in rows]

    def running_rate(self) -> tuple[int, float]:
        """(runs of this table under way, their summed chunks/s from the last heartbeats); dead runs abandoned first."""
        self.abandon_dead_runs()
        row = self.conn.execute(
            sql.SQL(
                "SELECT count(*), coalesce(sum(chunks_per_s), 0) FROM {s}.runs"
                " WHERE table_name = %s AND state = 'running'"
            ).format(s=self._s),
            (self.table.qualified,),
        ).fetchone()
        return (int(row[0]), float(row[1])) if row else (0, 0.0)

    # ---------------------------------------------------------------- trust: verify, identity, retrieval gate
    # Everything `core/verify.py`, `core/identity.py` and `core/quality.py` ask of the database, in one block.
    # Their two bookkeeping tables are created here on first use (idempotent DDL, not a numbered migration):
    #   column_identity: per vector column (by attnum, so it follows a swap's renames) the model, dimensions and
    #                    text prefix its vectors were made with, and the model's query prefix;
    #   trust_log:       results of `verify` / the drift check, retrieval self-tests, forced swaps and the model
    #                    digest `/api/tags` reported per run (append-only; the latest of a kind is what counts).
    # Reads are samples: primary-key probes at random points spread over the id range, never a table scan
    # (except `embedded_ids_after`, the keyset pages of an explicit `verify --full`).
    _trust_ready: bool = False

    def ensure_trust_schema(self) -> None:
        if self._trust_ready:
            return
        if self._trust_table("column_identity") and self._trust_table("trust_log"):  # no DDL when present: a role
            self._trust_ready = True  # without CREATE on the database or the schema must run (README, privileges)
            return
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(hashtext('wiki_embeddings.trust_schema'))")
            self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(self._s))
            self.conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {s}.column_identity ("
                    " table_name text NOT NULL, column_attnum smallint NOT NULL, model text NOT NULL,"
                    " dimensions integer NOT NULL, text_prefix text NOT NULL DEFAULT '',"
                    " query_prefix text NOT NULL DEFAULT '', recorded_at timestamptz NOT NULL DEFAULT now(),"
                    " PRIMARY KEY (table_name, column_attnum))"
                ).format(s=self._s)
            )
            self.conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {s}.trust_log ("
                    " id bigserial PRIMARY KEY, table_name text NOT NULL, kind text NOT NULL, run_id bigint,"
                    " model text, recorded_at timestamptz NOT NULL DEFAULT now(),"
                    " result jsonb NOT NULL DEFAULT '{{}}');"
                    " CREATE INDEX IF NOT EXISTS trust_log_kind_idx ON {s}.trust_log (table_name, kind, id DESC)"
                ).format(s=self._s)
            )
        self._trust_ready = True

    def _trust_table(self, name: str) -> bool:
        """Readers never create (a monitoring role with SELECT only runs `status`): absent tables read as empty."""
        if self._trust_ready:
            return True
        qualified = sql.Identifier(self.state_schema, name).as_string(self.conn)
        row = self.conn.execute("SELECT to_regclass(%s)", (qualified,)).fetchone()
        return bool(row and row[0])

    def column_identity(self) -> dict[str, Any] | None:
        """The recorded identity of this store's vector column (model, dimensions, text_prefix, query_prefix)."""
        if not self._trust_table("column_identity"):
            return None
        row = (
            self.conn.cursor(row_factory=dict_row)
            .execute(
                sql.SQL(
                    "SELECT model, dimensions, text_prefix, query_prefix, recorded_at FROM {s}.column_identity"
                    " WHERE table_name = %s AND column_attnum = %s"
                ).format(s=self._s),
                (self.table.qualified, self._current_attnum()),
            )
            .fetchone()
        )
        return dict(row) if row else None

    def record_column_identity(self, model: str, dimensions: int, text_prefix: str, query_prefix: str = "") -> None:
        """Upsert the column's identity; an empty query prefix keeps the one recorded (it is not in the vectors)."""
        self.ensure_trust_schema()
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {s}.column_identity AS c (table_name, column_attnum, model, dimensions, text_prefix,"
                " query_prefix) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (table_name, column_attnum) DO UPDATE"
                " SET model = EXCLUDED.model, dimensions = EXCLUDED.dimensions, text_prefix = EXCLUDED.text_prefix,"
                " query_prefix = coalesce(nullif(EXCLUDED.query_prefix, ''), c.query_prefix), recorded_at = now()"
            ).format(s=self._s),
            (self.table.qualified, self._current_attnum(), model, dimensions, text_prefix, query_prefix),
        )

    def forget_column_identity(self) -> None:
        self.ensure_trust_schema()
        self.conn.execute(
            sql.SQL("DELETE FROM {s}.column_identity WHERE table_name = %s AND column_attnum = %s").format(s=self._s),
            (self.table.qualified, self._current_attnum()),
        )

    def provenance_prefix(self) -> tuple[str, str] | None:
        """(model, text_prefix) of one provenance row of this column (the first by id: an index probe), or None."""
        row = self.conn.execute(
            sql.SQL(
                "SELECT model, text_prefix FROM {s}.embedding_provenance WHERE table_name = %s AND column_attnum = %s"
                " ORDER BY chunk_id LIMIT 1"
            ).format(s=self._s),
            (self.table.qualified, self._current_attnum()),
        ).fetchone()
        return (str(row[0]), str(row[1])) if row else None

    def record_trust(
        self, kind: str, result: dict[str, Any], *, run_id: int | None = None, model: str | None = None
    ) -> None:
        self.ensure_trust_schema()
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {s}.trust_log (table_name, kind, run_id, model, result) VALUES (%s, %s, %s, %s, %s)"
            ).format(s=self._s),
            (self.table.qualified, kind, run_id, model, json.dumps(result, default=str)),
        )

    def latest_trust(self, kind: str, model: str | None = None) -> dict[str, Any] | None:
        """The latest trust_log row of `kind` for the table (and `model`): result keys plus recorded_at, run_id."""
        if not self._trust_table("trust_log"):
            return None
        row = (
            self.conn.cursor(row_factory=dict_row)
            .execute(
                sql.SQL(
                    "SELECT run_id, model, recorded_at, result FROM {s}.trust_log WHERE table_name = %s AND kind = %s"
                    " AND (%s::text IS NULL OR model = %s) ORDER BY id DESC LIMIT 1"
                ).format(s=self._s),
                (self.table.qualified, kind, model, model),
            )
            .fetchone()
        )
        if not row:
            return None
        extra = {"run_id": row["run_id"], "model": row["model"], "recorded_at": row["recorded_at"]}
        return {**(row["result"] or {}), **extra}

    def sample_ids(self, size: int, columns: Sequence[str] = (), seed: int | None = None) -> list[int]:
        """About `size` distinct random ids of chunks whose vector columns (`columns`, default this store's) are all
        set, spread over the whole id range, never by a table scan of a large table. A table of up to
        `_SMALL_TABLE` rows: its ids read and sampled. A larger one: strata of equal row counts from PostgreSQL's
        statistics of the id column (`pg_stats.histogram_bounds`, else [min, max]), one random point per wanted id
        in its stratum, then the first such chunk at or after it within the stratum (a primary-key probe each)."""
        if size <= 0:
            return []
        cols = list(columns) or [self.table.embedding_column]
        present = sql.SQL(" AND ").join(sql.SQL("t.{} IS NOT NULL").format(sql.Identifier(c)) for c in cols)
        rng = np.random.default_rng(seed)
        row = self.conn.execute(
            sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {t} LIMIT %s) x").format(t=self._t), (_SMALL_TABLE + 1,)
        ).fetchone()
        if row and int(row[0]) <= _SMALL_TABLE:
            ids = [
                int(r[0])
                for r in self.conn.execute(
                    sql.SQL("SELECT t.{id} FROM {t} t WHERE {present}").format(id=self._id, t=self._t, present=present)
                ).fetchall()
            ]
            return sorted(int(x) for x in rng.choice(ids, min(size, len(ids)), replace=False)) if ids else []
        bounds_row = self.conn.execute(
            "SELECT histogram_bounds::text::bigint[] FROM pg_stats WHERE schemaname = %s AND tablename = %s"
            " AND attname = %s",
            (self.table.schema, self.table.name, self.table.id_column),
        ).fetchone()
        edges = [int(x) for x in (bounds_row[0] if bounds_row and bounds_row[0] else [])]
        if len(edges) < 2:
            mm = self.conn.execute(sql.SQL("SELECT min({id}), max({id}) FROM {t}").format(id=self._id, t=self._t))
            low_high = mm.fetchone()
            if not low_high or low_high[0] is None:
                return []
            edges = [int(low_high[0]), int(low_high[1])]
        edges[-1] += 1  # the last stratum includes the largest id
        found: set[int] = set()
        for _round in range(3):
            want = size - len(found)
            if want <= 0:
                break
            strata = rng.integers(0, len(edges) - 1, size=want)
            lows = np.asarray(edges[:-1])[strata]
            highs = np.asarray(edges[1:])[strata]
            points = (lows + rng.random(want) * (highs - lows)).astype(np.int64)
            rows = self.conn.execute(
                sql.SQL(
                    "SELECT DISTINCT x.id FROM unnest(%s::bigint[], %s::bigint[]) AS p(start, stop) CROSS JOIN LATERAL"
                    " (SELECT t.{id} AS id FROM {t} t WHERE t.{id} >= p.start AND t.{id} < p.stop AND {present}"
                    " ORDER BY t.{id} LIMIT 1) x"
                ).format(id=self._id, t=self._t, present=present),
                (points.tolist(), highs.tolist()),
            ).fetchall()
            before = len(found)
            found.update(int(r[0]) for r in rows)
            if len(found) == before:
                break
        return sorted(found)[:size] if len(found) <= size else sorted(rng.choice(sorted(found), size, replace=False))

    def embedded_ids_after(self, after: int | None, limit: int) -> list[int]:
        """The next `limit` ids with a vector in this column after `after` (keyset pages for `verify --full`)."""
        rows = self.conn.execute(
            sql.SQL(
                "SELECT {id} FROM {t} WHERE {emb} IS NOT NULL AND (%(a)s::bigint IS NULL OR {id} > %(a)s)"
                " ORDER BY {id} LIMIT %(n)s"
            ).format(id=self._id, t=self._t, emb=self._emb),
            {"a": after, "n": limit},
        ).fetchall()
        return [int(r[0]) for r in rows]

    def read_for_verify(self, ids: Sequence[int], default_chars: int) -> list[dict[str, Any]]:
        """For each id with a vector: the stored vector, its provenance, md5 of the current text, and the text cut
        as it was embedded (`chars_sent` characters when recorded, else the recorded --max-chars)."""
        rows = (
            self.conn.cursor(row_factory=dict_row)
            .execute(
                sql.SQL(
                    "SELECT t.{id} AS id, t.{emb} AS vector, md5(t.{text}) AS current_md5, p.model, p.text_md5,"
                    " p.text_prefix, p.chars_sent, p.max_chars, left(t.{text}, coalesce(p.chars_sent, p.max_chars,"
                    " %(chars)s)) AS text FROM {t} t LEFT JOIN {s}.embedding_provenance p ON p.table_name = %(tn)s"
                    " AND p.column_attnum = %(att)s AND p.chunk_id = t.{id}"
                    " WHERE t.{id} = ANY(%(ids)s) AND t.{emb} IS NOT NULL ORDER BY t.{id}"
                ).format(id=self._id, emb=self._emb, text=self._text, t=self._t, s=self._s),
                {"chars": default_chars, "tn": self.table.qualified, "att": self._current_attnum(), "ids": list(ids)},
            )
            .fetchall()
        )
        for r in rows:
            r["vector"] = np.asarray(r["vector"].to_numpy(), dtype=np.float32)
        return list(rows)

    def read_pairs(
        self, ids: Sequence[int], other: str, max_chars: int
    ) -> list[tuple[int, str, np.ndarray, np.ndarray]]:
        """(id, text cut to `max_chars`, this column's vector, column `other`'s vector) for ids with both set."""
        rows = self.conn.execute(
            sql.SQL(
                "SELECT {id}, left({text}, %s), {emb}, {other} FROM {t} WHERE {id} = ANY(%s)"
                " AND {emb} IS NOT NULL AND {other} IS NOT NULL ORDER BY {id}"
            ).format(id=self._id, text=self._text, emb=self._emb, other=sql.Identifier(other), t=self._t),
            (max_chars, list(ids)),
        ).fetchall()
        return [
            (int(r[0]), r[1] or "", np.asarray(r[2].to_numpy(), np.float32), np.asarray(r[3].to_numpy(), np.float32))
            for r in rows
        ]


#: `Store.sample_ids` reads every id of a table up to this many rows (cheap) instead of probing strata.
_SMALL_TABLE = 50_000


def _is_sql_ascii(conn: psycopg.Connection) -> bool:
    """A database without an encoding: its text is whatever bytes were stored."""
    return conn.info.parameter_status("server_encoding") == "SQL_ASCII"


def coverage_pct(embedded: int, total: int) -> str:
    """Two decimals, truncated so that 100.00 appears only when nothing is missing.

    An empty table reports 0.00: nothing is embedded, and readiness must not flip on an empty import.
    """
    if total == 0:
        return "0.00"
    hundredths = embedded * 10000 // total
    return f"{hundredths // 100}.{hundredths % 100:02d}"
