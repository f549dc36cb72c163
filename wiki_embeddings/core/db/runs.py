"""Run records and their liveness locks (a run whose session is gone is abandoned)."""

from __future__ import annotations

import json
import os
import socket
import time
import zlib
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from wiki_embeddings.core.db.connection import StoreBase
from wiki_embeddings.core.db.leases import lease_session_name

if TYPE_CHECKING:
    from wiki_embeddings.core.db import Store


# `pg_locks` row of a run's liveness lock (two-int4 advisory key: objsubid 2, never a chunk claim's bigint key).
_RUN_LOCK_HELD = (
    "EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid::bigint = %(run_ns)s AND l.objid::bigint = r.run_id)"
)


#: The application_name every session of a run carries once its id is known (the run's own session, its claim and
#: write sessions, reconnects included): `release_run` finds and ends them by it.
RUN_SESSION_PREFIX = "wiki-embeddings run "
#: A run marked released by an operator (`wiki-embeddings runs release`): its writes are refused in the statement
#: itself and its process ends without writing (core/backfill: state `released`).
RELEASED = "released"
_RUN_COLUMNS = (
    "run_id, mode, state, host, pid, model, options, started_at, heartbeat_at, finished_at, embedded, failed,"
    " chunks_per_s, message, locked, servers, extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_s"
)


def run_session_name(run_id: int) -> str:
    """The application_name of a run's database sessions."""
    return f"{RUN_SESSION_PREFIX}{run_id}"


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
        `running` without their lock are marked `abandoned` here first. The session is named after the run
        (`run_session_name`), as every other session of the run will be.
        """
        c = conn or self.conn
        self.abandon_dead_runs(c)
        row = c.execute(
            sql.SQL(
                "INSERT INTO {s}.runs (table_name, mode, state, host, pid, model, options)"
                " VALUES (%s, %s, 'running', %s, %s, %s, %s)"
                " RETURNING run_id, pg_try_advisory_lock(%s::int, run_id::int),"
                " set_config('application_name', %s || run_id, false)"
            ).format(s=self._s),
            (
                self.table.qualified,
                mode,
                socket.gethostname(),
                os.getpid(),
                model,
                json.dumps(options, default=str),
                self.run_lock_namespace,
                RUN_SESSION_PREFIX,
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
    ) -> bool:
        """The run is alive: its counts so far and its model servers' states (URLs masked). False when an operator
        released the run meanwhile (its row is left as the release wrote it): the run must end without writing."""
        row = self.conn.execute(
            sql.SQL(
                "UPDATE {s}.runs SET heartbeat_at = now(), embedded = greatest(embedded, %s), failed = %s,"
                " chunks_per_s = %s,"
                " servers = coalesce(%s::jsonb, servers) WHERE run_id = %s AND state <> %s RETURNING 1"
            ).format(s=self._s),
            (embedded, failed, chunks_per_s, json.dumps(servers) if servers is not None else None, run_id, RELEASED),
        ).fetchone()
        return row is not None

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
    ) -> bool:
        """Record the run's end; False (nothing changed) when an operator released the run meanwhile."""
        row = self.conn.execute(
            sql.SQL(
                "UPDATE {s}.runs SET state = %s, finished_at = now(), heartbeat_at = now(), embedded = %s,"
                " failed = %s, chunks_per_s = %s, message = %s, locked = %s,"
                " servers = coalesce(%s::jsonb, servers) WHERE run_id = %s AND state <> %s RETURNING 1"
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
                RELEASED,
            ),
        ).fetchone()
        return row is not None

    def last_run(self: Store, mode: str | None = None) -> dict[str, Any] | None:
        cur = self.conn.cursor(row_factory=dict_row)
        row = cur.execute(
            sql.SQL(
                "SELECT {columns}, {held} AS alive FROM {s}.runs r"
                " WHERE table_name = %(table)s AND (%(mode)s::text IS NULL OR mode = %(mode)s)"
                " ORDER BY run_id DESC LIMIT 1"
            ).format(s=self._s, held=sql.SQL(_RUN_LOCK_HELD), columns=sql.SQL(_RUN_COLUMNS)),
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

    def recent_runs(self: Store, limit: int = 20, running_only: bool = False) -> list[dict[str, Any]]:
        """This table's runs, most recent first (`running_only`: those recorded `running`, alive or not), each with
        `alive` (its session holds the run lock) and `heartbeat_age_s` (by the database's clock). Reads only."""
        rows = self.conn.cursor(row_factory=dict_row).execute(
            sql.SQL(
                "SELECT {columns}, {held} AS alive FROM {s}.runs r WHERE table_name = %(table)s"
                " AND (NOT %(running)s OR state = 'running') ORDER BY run_id DESC LIMIT %(limit)s"
            ).format(s=self._s, held=sql.SQL(_RUN_LOCK_HELD), columns=sql.SQL(_RUN_COLUMNS)),
            {"table": self.table.qualified, "run_ns": self.run_lock_namespace, "running": running_only, "limit": limit},
        )
        return [dict(r) for r in rows.fetchall()]

    def find_run(self: Store, run_id: int) -> dict[str, Any] | None:
        """One run of this table (the columns of `recent_runs`), or None."""
        row = (
            self.conn.cursor(row_factory=dict_row)
            .execute(
                sql.SQL(
                    "SELECT {columns}, {held} AS alive FROM {s}.runs r"
                    " WHERE table_name = %(table)s AND run_id = %(run)s"
                ).format(s=self._s, held=sql.SQL(_RUN_LOCK_HELD), columns=sql.SQL(_RUN_COLUMNS)),
                {"table": self.table.qualified, "run_ns": self.run_lock_namespace, "run": run_id},
            )
            .fetchone()
        )
        return dict(row) if row else None

    def run_signal(self: Store, conn: psycopg.Connection | None, run_id: int | None) -> str:
        """What a running run must hear, in one cheap query: "released" (an operator released it: end without
        writing), "stop" (a stop request for the table), or ""."""
        row = (
            (conn or self.conn)
            .execute(
                sql.SQL(
                    "SELECT EXISTS (SELECT 1 FROM {s}.runs WHERE run_id = %s AND state = %s),"
                    " EXISTS (SELECT 1 FROM {s}.table_state WHERE table_name = %s AND stop_requested_at IS NOT NULL)"
                ).format(s=self._s),
                (run_id, RELEASED, self.table.qualified),
            )
            .fetchone()
        )
        return "released" if row and row[0] else "stop" if row and row[1] else ""

    def mark_released(self: Store, run_id: int, message: str) -> bool:
        """Mark a `running` run of this table released (its writes refused from now on); False if it is not one."""
        row = self.conn.execute(
            sql.SQL(
                "UPDATE {s}.runs SET state = %s, finished_at = now(), message = %s"
                " WHERE run_id = %s AND table_name = %s AND state = 'running' RETURNING 1"
            ).format(s=self._s),
            (RELEASED, message, run_id, self.table.qualified),
        ).fetchone()
        return row is not None

    def run_sessions(self: Store, run_id: int) -> list[int]:
        """Backend pids of the run's sessions in this database: the holder of its run lock, every session named
        after it (its claim and write sessions hold the chunk claims) and its process's model-server lease session
        (core/spread.py: a frozen process must not keep its servers). This session excluded."""
        run = self.find_run(run_id)
        lease = lease_session_name(run["pid"], run["host"]) if run and run.get("pid") and run.get("host") else None
        rows = self.conn.execute(
            sql.SQL(
                "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
                " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND l.classid::bigint = %(run_ns)s AND l.objid::bigint = %(run)s"
                " UNION SELECT a.pid FROM pg_stat_activity a WHERE a.datname = current_database()"
                " AND a.application_name IN (%(name)s, %(lease)s)"
                " EXCEPT SELECT pg_backend_pid() ORDER BY 1"
            ),
            {"run_ns": self.run_lock_namespace, "run": run_id, "name": run_session_name(run_id), "lease": lease},
        ).fetchall()
        return [int(r[0]) for r in rows]

    def end_sessions(self: Store, pids: list[int], wait_sec: float = 5.0) -> dict[int, str]:
        """End these backends (`pg_terminate_backend`) and wait up to `wait_sec` for them to be gone; returns, per
        pid that is not, why (the privilege it takes, or that it did not end in time)."""
        refused: dict[int, str] = {}
        for pid in pids:
            try:
                self.conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            except psycopg.errors.InsufficientPrivilege as exc:
                refused[pid] = str(exc).strip().splitlines()[0]
        waiting = [pid for pid in pids if pid not in refused]
        deadline = time.monotonic() + wait_sec
        while waiting:
            row = self.conn.execute("SELECT array_agg(pid) FROM pg_stat_activity WHERE pid = ANY(%s)", (waiting,))
            found = row.fetchone()
            waiting = list(found[0] or []) if found else []
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        refused.update({pid: f"it did not end within {wait_sec:g} s" for pid in waiting})
        return refused
