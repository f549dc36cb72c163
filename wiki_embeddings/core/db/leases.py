"""Model-server leases: which process embeds against which server, as session advisory locks in the chunk database.

Several processes that each tune their own depth against the same server fight over it (each reads the other's
load as its own overload). A process that should have a server to itself takes the server's lease: a two-int
session advisory lock (this namespace, a hash of the server's scheme, host, port and path) on a connection it keeps
for as long as it uses the server. The lock dies with the session, so a killed process frees its server at once;
nothing is written, nothing to clean up. Every process filling tables of one database sees the same leases.
"""

from __future__ import annotations

import os
import socket
import zlib
from urllib.parse import urlsplit

import psycopg

from wiki_embeddings.core.db.connection import StoreBase

#: First key of every server lease (the server's URL hash is the second); not the runs' or a swap's namespace.
LEASE_NAMESPACE = zlib.crc32(b"wiki_embeddings:model-server") & 0x7FFFFFFF


#: The application_name of a process's lease session: `runs release` of one of its runs ends it too (a frozen process
#: must not keep its servers), found by the host and pid its run rows record.
LEASE_SESSION_PREFIX = "wiki-embeddings leases "


def lease_session_name(pid: int | None = None, host: str | None = None) -> str:
    """The lease session's name for this process (PostgreSQL keeps the first 63 bytes; `runs` compares the same)."""
    name = f"{LEASE_SESSION_PREFIX}{pid or os.getpid()}@{host or socket.gethostname()}"
    return name.encode()[:63].decode(errors="ignore")


def lease_key(url: str) -> tuple[int, int]:
    """The advisory key of one server: its scheme, host and port (case-folded, RFC 3986) and path, without the
    credentials: another spelling of one server is the same lease, and the key (pg_locks shows it to every role)
    says nothing of a password."""
    return LEASE_NAMESPACE, zlib.crc32(server_identity(url).encode()) & 0x7FFFFFFF


def server_identity(url: str) -> str:
    """`scheme://host:port/path` of a server URL: no user-info, no trailing slash, scheme and host lower-cased."""
    try:
        parts = urlsplit(url.strip())
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:  # not a URL the client could use either: keyed as written, minus any user-info
        return url.strip().rstrip("/").rsplit("@", 1)[-1]
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme.lower()}://{host}{f':{port}' if port is not None else ''}{parts.path.rstrip('/')}"


class LeasesMixin(StoreBase):
    """Model-server leases (session advisory locks on a connection the caller keeps)."""

    def try_lease(self, conn: psycopg.Connection, url: str) -> bool:
        """Take `url`'s lease on `conn`'s session if no other session holds it (never waits)."""
        row = conn.execute("SELECT pg_try_advisory_lock(%s::int, %s::int)", lease_key(url)).fetchone()
        return bool(row and row[0])

    def release_lease(self, conn: psycopg.Connection, url: str) -> None:
        """Give back `url`'s lease on `conn`'s session (one taken and not wanted after all)."""
        conn.execute("SELECT pg_advisory_unlock(%s::int, %s::int)", lease_key(url))

    def lease_session_alive(self, conn: psycopg.Connection) -> bool:
        """Whether `conn`'s session (and with it every lease it took) still exists: a database restart, a failover,
        an idle-session timeout or a terminated backend ends it without a word to an idle connection."""
        if conn.closed or conn.broken:
            return False
        try:
            conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def release_leases(self, conn: psycopg.Connection) -> None:
        """Give back every lease `conn` holds now (closing it would too, but only once its backend has exited)."""
        conn.execute("SELECT pg_advisory_unlock_all()")

    def leased(self, urls: list[str]) -> list[bool]:
        """Whether some session holds each server's lease (what a status or a test reads)."""
        rows = self.conn.execute(
            "SELECT classid::bigint, objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objsubid = 2 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid::bigint = %s",
            (LEASE_NAMESPACE,),
        ).fetchall()
        held = {(int(c), int(o)) for c, o in rows}
        return [lease_key(u) in held for u in urls]
