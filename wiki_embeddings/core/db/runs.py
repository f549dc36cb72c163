"""Run records and their liveness locks (a run whose session is gone is abandoned)."""

from __future__ import annotations

import json
import os
import socket
import zlib
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from wiki_embeddings.core.db.connection import StoreBase

if TYPE_CHECKING:
    from wiki_embeddings.core.db import Store


# `pg_locks` row of a run's liveness lock (two-int4 advisory key: objsubid 2, never a chunk claim's bigint key).
_RUN_LOCK_HELD = (
    "EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid::bigint = %(run_ns)s AND l.objid::bigint = r.run_id)"
)


class RunsMixin(StoreBase):
    """Run records and their liveness locks (a run whose session is gone is abandoned)."""

    @property
    def run_lock_namespace(self: Store) -> int:
        """First key of every run's liveness lock (per bookkeeping schema; the run id is the second)."""
        return zlib.crc32(f"runs:{self.state_schema}".encode()) & 0x7FFFFFFF

    def start_run(
        self: Store, mode: str, options: dict[str, Any], model: str | None, conn: psycopg.Connection | None = None
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

    def hold_run_lock(self: Store, conn: psycopg.Connection, run_id: int) -> bool:
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

    def abandon_dead_runs(self: Store, conn: psycopg.Connection | None = None) -> int:
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

    def heartbeat_run(
        self: Store,
        run_id: int,
        embedded: int,
        failed: int,
        chunks_per_s: float,
        servers: list[dict[str, Any]] | None = None,
    ) -> None:
        """The run is alive: its counts so far and its model servers' states (URLs masked)."""
        self.conn.execute(
            sql.SQL(
                "UPDATE {s}.runs SET heartbeat_at = now(), embedded = %s, failed = %s, chunks_per_s = %s,"
                " servers = coalesce(%s::jsonb, servers) WHERE run_id = %s"
            ).format(s=self._s),
            (embedded, failed, chunks_per_s, json.dumps(servers) if servers is not None else None, run_id),
        )

    def finish_run(
        self: Store,
        run_id: int,
        state: str,
        embedded: int,
        failed: int,
        chunks_per_s: float,
        message: str,
        locked: int = 0,
        servers: list[dict[str, Any]] | None = None,
    ) -> None:
        self.conn.execute(
            sql.SQL(
                "UPDATE {s}.runs SET state = %s, finished_at = now(), heartbeat_at = now(), embedded = %s,"
                " failed = %s, chunks_per_s = %s, message = %s, locked = %s,"
                " servers = coalesce(%s::jsonb, servers) WHERE run_id = %s"
            ).format(s=self._s),
            (
                state,
                embedded,
                failed,
                chunks_per_s,
                message,
                locked,
                json.dumps(servers) if servers is not None else None,
                run_id,
            ),
        )

    def last_run(self: Store, mode: str | None = None) -> dict[str, Any] | None:
        cur = self.conn.cursor(row_factory=dict_row)
        row = cur.execute(
            sql.SQL(
                "SELECT run_id, mode, state, host, pid, model, options, started_at, heartbeat_at, finished_at,"
                " embedded, failed, chunks_per_s, message, locked, servers, {held} AS alive FROM {s}.runs r"
                " WHERE table_name = %(table)s AND (%(mode)s::text IS NULL OR mode = %(mode)s)"
                " ORDER BY run_id DESC LIMIT 1"
            ).format(s=self._s, held=sql.SQL(_RUN_LOCK_HELD)),
            {"table": self.table.qualified, "mode": mode, "run_ns": self.run_lock_namespace},
        ).fetchone()
        return dict(row) if row else None

    def embedded_since(self: Store, since: Any) -> bool:
        """Whether a run of this store's column that started after `since` wrote vectors (a re-embed)."""
        row = self.conn.execute(
            sql.SQL(
                "SELECT EXISTS (SELECT 1 FROM {s}.runs WHERE table_name = %(t)s AND started_at > %(since)s"
                " AND embedded > 0 AND coalesce(options->>'embedding_column', %(c)s) = %(c)s)"
            ).format(s=self._s),
            {"t": self.table.qualified, "since": since, "c": self.table.embedding_column},
        ).fetchone()
        return bool(row and row[0])

    def live_runs(self: Store) -> int:
        """Runs of this table that are running and alive (their session holds the liveness lock)."""
        self.abandon_dead_runs()
        row = self.conn.execute(
            sql.SQL("SELECT count(*) FROM {s}.runs WHERE table_name = %s AND state = 'running'").format(s=self._s),
            (self.table.qualified,),
        ).fetchone()
        return int(row[0]) if row else 0
