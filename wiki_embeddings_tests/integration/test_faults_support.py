"""Shared helpers of the fault suite (`test_faults_*.py`): subprocess runs, polling, bulk checks. No tests here."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psycopg

from wiki_embeddings.core.pooling import rebuild
from wiki_embeddings.core.text import clean_text
from wiki_embeddings.devtools.ollama_server import hash_vector
from wiki_embeddings_tests.integration.conftest import TEST_DIM, TEST_MODEL

# Test-only retry pacing: the fault suite proves behaviour, not patience.
FAST_RETRIES = {
    "WIKI_EMBED_BACKOFF_BASE_SEC": "0.01",
    "WIKI_EMBED_BACKOFF_MAX_SEC": "0.05",
    "WIKI_EMBED_RETRIES": "3",
    "WIKI_EMBED_DB_RECONNECT_SEC": "30",
}


def dagster_materialize(partition_key: str) -> list[str]:
    """`dagster asset materialize` of one range of `wiki_chunk_embeddings`, as an operator would run it."""
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    select = ["--select", "wiki_chunk_embeddings", "--partition", partition_key]
    return [dagster, "asset", "materialize", "-m", "wiki_embeddings.definitions", *select]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.02) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def cli_env(table, **extra: str) -> dict[str, str]:
    """Environment of a `wiki-embeddings` subprocess pointed at the test table and server."""
    s = table.settings
    env = {
        **os.environ,
        "DATABASE_URL": table.url,
        "WIKI_EMBED_TABLE": s.table,
        "OLLAMA_URL": s.ollama_url,
        "OLLAMA_MODEL": s.ollama_model or TEST_MODEL,
        "EMBED_STOP_FILE": s.stop_file,
        "WIKI_EMBED_FAILURE_LOG": s.failure_log or "",
        "PYTHONUNBUFFERED": "1",
        **FAST_RETRIES,
    }
    env.update(extra)
    return env


def start_cli(table, *args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """`python -m wiki_embeddings.cli ARGS` as a real, killable process; output to `log` (or discarded)."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "wiki_embeddings.cli", *args],
            env=env or cli_env(table),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log:
            out.close()


def run_cli(table, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wiki_embeddings.cli", *args],
        env=env or cli_env(table),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL: no handler, no cleanup, no goodbye to PostgreSQL or the server."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def filled(table) -> int:
    return int(table.sql(f"SELECT count(*) FROM {table.settings.table} WHERE embedding IS NOT NULL")[0][0])


def advisory_locks(table) -> list:
    """Advisory locks held on this table's chunks (hashed bigint keys) or on its runs (two-int keys: the run
    namespace and the run id; other tables' runs, e.g. another test's abandoned session, are not this table's)."""
    store = table.store
    runs = table.sql(
        "SELECT pid, classid, objid, objsubid FROM pg_locks WHERE locktype = 'advisory'"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND objsubid = 2 AND classid::bigint = %s"
        f" AND objid::bigint IN (SELECT run_id FROM {store.state_schema}.runs WHERE table_name = %s)",
        (store.run_lock_namespace, store.table.qualified),
    )
    return runs + [("claim", cid) for cid in store.held_claims()]


def updates_counted(table) -> int:
    """Rows updated in the table since it was created, as PostgreSQL's statistics count them."""
    rows = table.sql("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = to_regclass(%s)", (table.settings.table,))
    return int(rows[0][0]) if rows else 0


def expected_matrix(
    texts: list[str],
    max_chars: int,
    model: str = TEST_MODEL,
    dim: int = TEST_DIM,
    sent: list[int | None] | None = None,
    pooling: list[dict | None] | None = None,
) -> np.ndarray:
    """The hash server's vectors for the texts as the engine sends them: cut to max_chars, cleaned, and cut again
    to the characters provenance says were sent (a cut to fit the model's context)."""
    sent = sent or [None] * len(texts)
    pooled = pooling or [None] * len(texts)
    out = []
    for t, n, description in zip(texts, sent, pooled, strict=True):
        text = clean_text(t[:max_chars])[:n]
        if description is None:
            out.append(hash_vector(model, text, dim))
        else:  # a pooled vector: the recorded pieces' vectors, pooled with the recorded weights (core/pooling.py)
            out.append(rebuild(description, text, lambda pieces: [hash_vector(model, p, dim) for p in pieces]))
    return np.stack(out)


def wrong_vectors(table, max_chars: int | None = None, model: str = TEST_MODEL, dim: int = TEST_DIM) -> list[int]:
    """Ids of filled rows whose vector is not the server's vector for the chunk's cut, cleaned text."""
    max_chars = max_chars or table.settings.max_chars
    with psycopg.connect(table.url, autocommit=True) as conn:
        from pgvector.psycopg import register_vector

        register_vector(conn)
        schema, name = table.settings.table.split(".")
        rows = conn.execute(
            f"SELECT t.id, t.content, t.embedding, p.chars_sent, p.pooling FROM {table.settings.table} t"
            f" LEFT JOIN {table.settings.state_schema}.embedding_provenance p ON p.table_name = %s"
            " AND p.chunk_id = t.id AND p.column_attnum = (SELECT attnum FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attname = 'embedding')"
            " WHERE t.embedding IS NOT NULL ORDER BY t.id",
            (table.settings.table, f'"{schema}"."{name}"'),
        ).fetchall()
    if not rows:
        return []
    got = np.stack([r[2].to_numpy() for r in rows])
    want = expected_matrix([r[1] for r in rows], max_chars, model, dim, [r[3] for r in rows], [r[4] for r in rows])
    bad = ~np.all(np.isclose(got, want, atol=1e-6), axis=1)
    return [int(rows[i][0]) for i in np.flatnonzero(bad)]


class FilledWatcher:
    """Samples the count of filled rows from another session while runs are killed, resumed or cut off;
    a sample that fails (the server is down) is skipped. Every committed state must be whole batches."""

    def __init__(self, table):
        self.table = table
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen.add(filled(self.table))
            except psycopg.Error:
                time.sleep(0.05)
            time.sleep(0.003)

    def __enter__(self) -> FilledWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class SilentableProxy:
    """A TCP proxy in front of the test PostgreSQL's unix socket that can go silent: it stops forwarding in both
    directions and answers nothing, without closing anything (no FIN, no RST) - a black-holed network, through
    which no kernel keepalive of the client ever fires (the client's TCP peer is this live proxy)."""

    def __init__(self, pg_url: str) -> None:
        import socket
        import threading
        from urllib.parse import parse_qs, unquote, urlsplit

        parts = urlsplit(pg_url)
        self._socket_path = f"{unquote(parse_qs(parts.query)['host'][0])}/.s.PGSQL.5432"
        self._database = parts.path.lstrip("/")
        self.silent = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socket = socket
        self._threading = threading
        self._open: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self._database}?sslmode=disable"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._open.append(client)
            if self.silent.is_set():
                continue  # accepted, never answered
            upstream = self._socket.socket(self._socket.AF_UNIX)
            upstream.connect(self._socket_path)
            self._open.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            while self.silent.is_set():  # hold the bytes forever: the peer sees nothing, not even a close
                time.sleep(0.2)
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._listener.close()
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.close()
