"""Connections: the store's own self-reopening connection and the pipeline's per-role ones (timeouts, keepalives)."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Self

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from wiki_embeddings.core.db.records import TableRef, check_identifier
from wiki_embeddings.settings import redact, url_secrets

# Every pipeline connection bounds how long the server may work or wait on one statement (the client adds its
# own deadline on top: a black-holed network never answers at all). Keepalives and tcp_user_timeout end a dead
# TCP connection at the kernel level too, where the path lets them (not through a user-space proxy).
STATEMENT_TIMEOUT_SEC = 60.0

LOCK_TIMEOUT_SEC = 10.0

TCP_OPTIONS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}

TCP_USER_TIMEOUT_MS = 30_000


def _is_sql_ascii(conn: psycopg.Connection) -> bool:
    """A database without an encoding: its text is whatever bytes were stored."""
    return conn.info.parameter_status("server_encoding") == "SQL_ASCII"


class StoreBase:
    """Connections of one store: its own short-statement connection and new ones per pipeline role."""

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
        # Statements of every batch, composed once (core/db/writes.py, claims.py).
        self._write_statements: dict[tuple[bool, bool, bool], bytes] = {}
        self._claim_statements: dict[tuple[str, str], bytes] = {}
        self._read_statements: dict[bool, bytes] = {}
        self._release_statement: bytes | None = None

    def connect(
        self, register: bool = True, statement_timeout_sec: float | None = None, application_name: str | None = None
    ) -> psycopg.Connection:
        """A new autocommit connection (vector type registered when the extension exists).

        The client encoding is always UTF-8: the server converts from its own encoding, and a `SQL_ASCII`
        database (which has none) passes its bytes through; `claim` reads chunk text from such a database
        as bytes and decodes it itself, so one bad chunk cannot break a whole read.
        """
        options = ""  # a pipeline connection (claims, writes, the run's row) never waits long on the server
        if statement_timeout_sec:
            # Whole milliseconds, at least 1: PostgreSQL reads 0 as "no timeout" (1e-4 s must not turn it off).
            lock_ms, statement_ms = int(LOCK_TIMEOUT_SEC * 1000), max(1, math.ceil(statement_timeout_sec * 1000))
            options = f"-c lock_timeout={lock_ms} -c statement_timeout={statement_ms}"
        try:
            params: dict[str, Any] = {
                "application_name": application_name or self.app_name,
                "connect_timeout": 10,
                "client_encoding": "UTF8",
                "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
                **TCP_OPTIONS,
            }
            if options:
                params["options"] = options
            conn = psycopg.connect(self.dsn, autocommit=True, **params)
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ping(self) -> str:
        row = self.conn.execute("SELECT current_setting('server_version')").fetchone()
        return str(row[0]) if row else "?"
