"""The write path with precomputed vectors: Store.write_vectors against the database's limit and alternatives.

Each method writes every row of a fresh table (the project's DDL: primary key + partial index on missing
embeddings) in transactions of `batch` rows on one autocommit connection, as the engine's writer does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import psycopg
from psycopg import sql

from benchmarks.common import DIM, Bench, Result, log
from benchmarks.prototypes import UnnestStore
from wiki_embeddings.core.db import Store

Writer = Callable[[psycopg.Connection, Store, sql.Composable, Sequence[int], Sequence[np.ndarray]], None]


def _update_stmt(t: sql.Composable) -> sql.Composed:
    return sql.SQL("UPDATE {} SET embedding = %b WHERE id = %b AND embedding IS NULL").format(t)


def w_store(
    conn: psycopg.Connection, store: Store, t: sql.Composable, ids: Sequence[int], vecs: Sequence[np.ndarray]
) -> None:
    store.write_vectors(conn, ids, vecs)


def w_executemany(
    conn: psycopg.Connection, store: Store, t: sql.Composable, ids: Sequence[int], vecs: Sequence[np.ndarray]
) -> None:
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(_update_stmt(t), list(zip(vecs, ids, strict=True)))


def w_executemany_pipeline(
    conn: psycopg.Connection, store: Store, t: sql.Composable, ids: Sequence[int], vecs: Sequence[np.ndarray]
) -> None:
    with conn.transaction(), conn.pipeline(), conn.cursor() as cur:
        cur.executemany(_update_stmt(t), list(zip(vecs, ids, strict=True)))


def w_execute_per_row(
    conn: psycopg.Connection, store: Store, t: sql.Composable, ids: Sequence[int], vecs: Sequence[np.ndarray]
) -> None:
    stmt = _update_stmt(t)
    with conn.transaction(), conn.cursor() as cur:
        for cid, vec in zip(ids, vecs, strict=True):
            cur.execute(stmt, (vec, cid))


def w_store_one_pipeline(
    conn: psycopg.Connection, store: Store, t: sql.Composable, ids: Sequence[int], vecs: Sequence[np.ndarray]
) -> None:
    """write_vectors' two statements (per-row UPDATEs, DELETE of failure records) in one pipeline: one sync."""
    with conn.transaction(), conn.pipeline(), conn.cursor() as cur:
        cur.executemany(_update_stmt(t), list(zip(vecs, ids, strict=True)))
        cur.execute(
            sql.SQL("DELETE FROM {s}.failures WHERE table_name = %s AND chunk_id = ANY(%s)").format(s=store._s),
            (store.table.qualified, list(ids)),
        )


def w_proto_unnest(
    conn: psycopg.Connection, store: Store, t: sql.Composable, ids: Sequence[int], vecs: Sequence[np.ndarray]
) -> None:
    UnnestStore.write_vectors(store, conn, ids, vecs)  # type: ignore[arg-type]


def async_commit(writer: Writer) -> Writer:
    """The same writer on a session with synchronous_commit = off (no WAL flush wait at each commit)."""

    def write(
        conn: psycopg.Connection, store: Store, t: sql.Composable, ids: Sequence[int], vecs: Sequence[np.ndarray]
    ) -> None:
        if not getattr(conn, "_bench_async", False):
            conn.execute("SET synchronous_commit = off")
            conn._bench_async = True  # type: ignore[attr-defined]
        writer(conn, store, t, ids, vecs)

    return write


def _ensure_tmp(conn: psycopg.Connection) -> None:
    if not getattr(conn, "_bench_tmp", False):
        conn.execute(f"CREATE TEMP TABLE bench_tmp (id bigint, embedding vector({DIM})) ON COMMIT DELETE ROWS")
        conn._bench_tmp = True  # type: ignore[attr-defined]


def _copy(conn: psycopg.Connection, ids: Sequence[int], vecs: Sequence[np.ndarray]) -> None:
    with conn.cursor() as cur, cur.copy("COPY bench_tmp (id, embedding) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "vector"])
        for cid, vec in zip(ids, vecs, strict=True):
            copy.write_row((cid, vec))


def _update_from_tmp(t: sql.Composable) -> sql.Composed:
    return sql.SQL(
        "UPDATE {} t SET embedding = s.embedding FROM bench_tmp s WHERE t.id = s.id AND t.embedding IS NULL"
    ).format(t)


def copy_writer(mode: str) -> Writer:
    """COPY (binary) into an ON COMMIT DELETE ROWS temp table, then one UPDATE ... FROM, per batch."""

    def write(
        conn: psycopg.Connection, store: Store, t: sql.Composable, ids: Sequence[int], vecs: Sequence[np.ndarray]
    ) -> None:
        _ensure_tmp(conn)
        with conn.transaction():
            _copy(conn, ids, vecs)
            if mode == "nohash":
                conn.execute("SET LOCAL enable_hashjoin = off")
                conn.execute("SET LOCAL enable_mergejoin = off")
            elif mode == "analyze":
                conn.execute("ANALYZE bench_tmp")
            conn.execute(_update_from_tmp(t))

    return write


def unnest_writer(fmt: str) -> Writer:
    """UPDATE ... FROM unnest(ids::bigint[], vectors::vector[]): %s lets psycopg choose, %b forces binary."""

    def write(
        conn: psycopg.Connection, store: Store, t: sql.Composable, ids: Sequence[int], vecs: Sequence[np.ndarray]
    ) -> None:
        stmt = sql.SQL(
            "UPDATE {} t SET embedding = u.e FROM unnest(%{f}::bigint[], %{f}::vector[]) AS u(id, e)"
            " WHERE t.id = u.id AND t.embedding IS NULL"
        ).format(t, f=sql.SQL(fmt))
        with conn.transaction():
            conn.execute(stmt, (list(ids), list(vecs)))

    return write


def bulk_limit(conn: psycopg.Connection, t: sql.Composable, ids: Sequence[int], vecs: Sequence[np.ndarray]) -> None:
    """The database's limit: one binary COPY of every row into a temp table + one UPDATE ... FROM."""
    with conn.transaction():
        conn.execute(f"CREATE TEMP TABLE bench_all (id bigint, embedding vector({DIM})) ON COMMIT DROP")
        with conn.cursor() as cur, cur.copy("COPY bench_all (id, embedding) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "vector"])
            for cid, vec in zip(ids, vecs, strict=True):
                copy.write_row((cid, vec))
        conn.execute("ANALYZE bench_all")
        conn.execute(
            sql.SQL(
                "UPDATE {} t SET embedding = s.embedding FROM bench_all s WHERE t.id = s.id AND t.embedding IS NULL"
            ).format(t)
        )


METHODS: dict[str, tuple[str, Writer]] = {
    "store": ("Store.write_vectors (one UPDATE…FROM unnest %b with provenance insert + failure delete)", w_store),
    "executemany": ("executemany per-row UPDATE (psycopg pipelines it)", w_executemany),
    "executemany_pipeline": ("executemany per-row UPDATE inside conn.pipeline()", w_executemany_pipeline),
    "copy_plain": ("COPY into ON COMMIT DELETE ROWS temp + UPDATE…FROM, planner defaults", copy_writer("plain")),
    "copy_nohash": ("COPY into temp + UPDATE…FROM, SET LOCAL enable_hashjoin/mergejoin=off", copy_writer("nohash")),
    "copy_analyze": ("COPY into temp + ANALYZE temp + UPDATE…FROM", copy_writer("analyze")),
    "unnest_binary": ("UPDATE…FROM unnest(%b::bigint[], %b::vector[]) (binary arrays)", unnest_writer("b")),
    "store_one_pipeline": ("write_vectors' UPDATEs + DELETE in one conn.pipeline() (one sync)", w_store_one_pipeline),
    "proto_unnest_store": ("prototypes.UnnestStore.write_vectors (unnest %b + DELETE)", w_proto_unnest),
    "store_async_commit": ("Store.write_vectors, session synchronous_commit=off", async_commit(w_store)),
    "unnest_async_commit": ("unnest %b, session synchronous_commit=off", async_commit(unnest_writer("b"))),
    "unnest_text": ("UPDATE…FROM unnest(%s::bigint[], %s::vector[]) (psycopg's choice: text)", unnest_writer("s")),
    "execute_per_row": ("one execute() per row, no pipelining (the runbook loop's way)", w_execute_per_row),
}
SLOW = {"unnest_text": 0.25, "execute_per_row": 0.25}  # share of the rows these slow methods write


def measure(bench: Bench, rows: int, vecs: np.ndarray, method: str, batch: int, table_rows: int) -> tuple[float, float]:
    """(rows/s, client CPU µs per row) of one method writing the first `rows` rows of a fresh table."""
    table = bench.new_table(DIM, rows=table_rows, source="series")
    schema, name = table.split(".")
    t = sql.Identifier(schema, name)
    store = bench.store(table)
    ids = list(range(1, rows + 1))
    vectors = list(vecs[:rows])
    conn = store.connect()
    try:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        if method == "bulk":
            bulk_limit(conn, t, ids, vectors)
        else:
            write = METHODS[method][1]
            for i in range(0, rows, batch):
                write(conn, store, t, ids[i : i + batch], vectors[i : i + batch])
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        written = conn.execute(sql.SQL("SELECT count(embedding) FROM {}").format(t)).fetchone()[0]  # type: ignore[index]
        if written != rows:
            raise RuntimeError(f"{method}: wrote {written} of {rows} rows")
    finally:
        conn.close()
        store.close()
        bench.drop_schema_of(table)
    return rows / seconds, cpu / rows * 1e6


def run(bench: Bench) -> None:
    rows = bench.n(20_000, minimum=2048)
    table_rows = rows * 5  # the target table is larger than what is written: a join that scans it shows
    rng = np.random.default_rng(7)
    vecs = rng.standard_normal((rows, DIM), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    rounds = 2
    log(f"write path: {rows} rows of {DIM}-d per method into a fresh {table_rows}-row table, best of {rounds}")
    best: dict[tuple[str, int], tuple[float, float]] = {}

    def take(method: str, batch: int, n: int) -> None:
        monitor = bench.monitor()
        runs = [measure(bench, n, vecs, method, batch, table_rows) for _ in range(rounds)]
        others = monitor.foreign_cores()
        rate = max(r[0] for r in runs)
        cpu = min(r[1] for r in runs)
        best[(method, batch)] = (rate, cpu)
        log(
            f"  {method:22s} batch {batch:4d}: {rate:8.0f} rows/s, client CPU {cpu:6.1f} µs/row "
            f"(other processes: {others:.2f} cores)"
        )

    take("bulk", rows, rows)
    for batch in (64, 256):
        for method in METHODS:
            n = max(batch * 4, int(rows * SLOW.get(method, 1.0)))
            take(method, batch, n)

    bulk_rate, bulk_cpu = best[("bulk", rows)]
    store64 = best[("store", 64)]
    bench.add(
        Result(
            "write path",
            "Store.write_vectors, batch 64 / one binary COPY + one UPDATE…FROM of all rows (database limit)",
            store64[0],
            bulk_rate,
            "rows/s",
            ">= 0.5",
            note=f"client CPU {store64[1]:.0f} vs {bulk_cpu:.0f} µs/row",
            baseline_name="bulk COPY",
        )
    )
    bench.add(
        Result(
            "write path",
            "Store.write_vectors, batch 64 / psycopg executemany per-row UPDATE, batch 64",
            store64[0],
            best[("executemany", 64)][0],
            "rows/s",
            ">= 0.95",
            baseline_name="executemany",
        )
    )
    for batch in (64, 256):
        ranked = sorted(METHODS, key=lambda m: -best[(m, batch)][0])
        for method in ranked:
            rate, cpu = best[(method, batch)]
            bench.add(
                Result(
                    "write path",
                    f"batch {batch}: {METHODS[method][0]} / database limit",
                    rate,
                    bulk_rate,
                    "rows/s",
                    note=f"client CPU {cpu:.0f} µs/row",
                    baseline_name="bulk COPY",
                )
            )
        bench.notes.append(
            f"write path, batch {batch}: fastest is {ranked[0]} ({best[(ranked[0], batch)][0]:,.0f} rows/s); "
            f"order: {', '.join(ranked)}"
        )
