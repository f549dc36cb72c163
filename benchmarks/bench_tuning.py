"""Self-tuning depth and batch size (core/tuning.py): default flags against the embedder's ceiling, several servers
and several workers, client CPU against a minimal script, a live user's query wait beside maintenance, and
per-batch claim + write cost as the table grows.

Ceiling = a bare client (prebuilt bodies, answers read but not parsed) at the depth that keeps the server(s)
busiest (the best of K and K + 1 in flight per server), measured in the same run as the figure it divides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import numpy as np
import orjson
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from benchmarks.bench_memory import backfill_in_child
from benchmarks.common import (
    MODEL,
    REPO_ROOT,
    Bench,
    Result,
    bare_client,
    log,
    ollama_server,
    run_backfill,
    server_stats,
    set_faults,
    warm_cache,
)
from wiki_embeddings.settings import from_env

LATENCY_MS = 40.0
QUERY_EVERY_S = 1.0
# A context that holds every paragraph (max-chars 2000): the ceiling and the pipeline send the very same texts.
SERVER_ARGS = ["--cache-entries", "200000", "--context-tokens", "4096"]
RSS_CHUNKS = 50_000  # chunks of the capped run whose peak RSS is compared on the small and the large table
CPU_PER_TEXT_MS = 42.0  # all-minilm on 2 CPU cores: ~2.7 s for a batch of 64 (README)


# ------------------------------------------------------------------------------------------ ceilings
def ceiling(urls: list[str], texts: list[str], slots: int) -> tuple[float, int]:
    """(chunks/s, depth) of the bare client at the depth (slots or slots + 1 per server) that does best."""
    best = max(((bare_client(urls, MODEL, texts, d), d) for d in (slots, slots + 1)), key=lambda x: x[0])
    return best


def default_run(bench: Bench, urls: list[str], rows: int, **overrides: Any) -> tuple[float, dict[str, Any]]:
    table = bench.new_table(rows=rows)
    try:
        report, _ = bench.backfill(bench.settings(table, ",".join(urls), concurrency=0, **overrides))
        assert report.embedded == rows, report
        return report.chunks_per_s, report.tuning
    finally:
        bench.drop_schema_of(table)


def median_of(values: list[float]) -> float:
    return statistics.median(values)


# ------------------------------------------------------------------------------------------ workers
def child(argv: list[str]) -> int:
    """One worker process: waits for the go file, runs a default-flags backfill, prints a JSON line."""
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--ollama", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--go", required=True)
    p.add_argument("--name", required=True)
    a = p.parse_args(argv)
    settings = from_env(
        {},
        database_url=a.url,
        ollama_url=a.ollama,
        ollama_model=MODEL,
        table=a.table,
        concurrency=0,
        stop_file=os.path.join(a.base, "wiki-embed.stop"),
        failure_log=os.path.join(a.base, f"failures-{a.name}.jsonl"),
        busy_wait_sec=60.0,
    )
    print("ready", flush=True)
    while not os.path.exists(a.go):
        time.sleep(0.005)
    t0 = time.time()
    report, cpu = run_backfill(settings)
    print(
        json.dumps(
            {
                "embedded": report.embedded,
                "start": t0,
                "end": time.time(),
                "cpu": cpu,
                "tuning": report.tuning,
                "pipeline_s": report.seconds,
            }
        ),
        flush=True,
    )
    return 0


def workers_run(bench: Bench, urls: list[str], rows: int, n: int) -> tuple[float, int, list[dict[str, Any]]]:
    """n worker processes at once on one table: (chunks/s over the wall time, texts the servers embedded,
    each worker's report)."""
    table = bench.new_table(rows=rows)
    go = bench.base / f"go-{time.time_ns()}"
    procs = []
    try:
        for i in range(n):
            cmd = [sys.executable, "-m", "benchmarks.bench_tuning", "--child", "--url", bench.url, "--ollama"]
            cmd += [",".join(urls), "--table", table, "--base", str(bench.base), "--go", str(go), "--name", str(i)]
            procs.append(
                subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        for proc in procs:
            line = proc.stdout.readline() if proc.stdout else ""
            if line.strip() != "ready":
                raise RuntimeError(f"worker did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        for u in urls:
            server_stats(u, reset=True)
        go.write_text("go")
        outs = []
        for proc in procs:
            out, err = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"worker failed: {err.strip().splitlines()[-1:]}")
            outs.append(json.loads(out.strip().splitlines()[-1]))
        texts = sum(server_stats(u)["texts_embedded"] for u in urls)
        missing = bench.sql(f"SELECT count(*) FROM {table} WHERE embedding IS NULL")[0][0]
        assert missing == 0, f"{missing} chunks left missing"
        embedded = sum(o["embedded"] for o in outs)
        wall = max(o["end"] for o in outs) - min(o["start"] for o in outs)
        return embedded / wall, texts, outs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        bench.drop_schema_of(table)


# ------------------------------------------------------------------------------------------ client CPU
def minimal_script(bench: Bench, table: str, url: str, batch: int = 64, use_async: bool = False) -> tuple[float, int]:
    """Only the unavoidable work, sequential: keyset read, httpx POST, orjson parse + validation (float32 matrix,
    finite, right length), binary write (`UPDATE … FROM unnest(%b, %b)`). Returns (CPU s per 1,000, chunks).

    `use_async`: the same with httpx's AsyncClient on an event loop (what a pipeline that overlaps requests
    needs), to show how much of the pipeline's CPU is the async HTTP stack itself."""
    schema, name = table.split(".")
    t = sql.Identifier(schema, name)
    read = sql.SQL(
        "SELECT id, left(content, 2000) FROM {} WHERE embedding IS NULL AND id > %s ORDER BY id LIMIT %s"
    ).format(t)
    write = sql.SQL(
        "UPDATE {} AS t SET embedding = u.e FROM unnest(%b::bigint[], %b::vector[]) AS u(id, e) "
        "WHERE t.id = u.id AND t.embedding IS NULL"
    ).format(t)
    headers = {"content-type": "application/json"}

    def step(conn: psycopg.Connection, rows: list[Any], content: bytes) -> None:
        matrix = np.array(orjson.loads(content)["embeddings"], dtype=np.float32)
        if matrix.shape != (len(rows), 384) or not np.isfinite(matrix).all():
            raise RuntimeError("bad answer")
        conn.execute(write, ([r[0] for r in rows], list(matrix)))

    def body(rows: list[Any]) -> bytes:
        return orjson.dumps({"model": MODEL, "input": [r[1] for r in rows], "truncate": False})

    done, last = 0, 0
    cpu0 = time.process_time()
    with psycopg.connect(bench.url, autocommit=True) as conn:
        register_vector(conn)
        if not use_async:
            with httpx.Client(trust_env=False, timeout=120) as http:
                while rows := conn.execute(read, (last, batch)).fetchall():
                    step(conn, rows, http.post(f"{url}/api/embed", content=body(rows), headers=headers).content)
                    last, done = rows[-1][0], done + len(rows)
        else:

            async def go() -> int:
                n, after = 0, 0
                async with httpx.AsyncClient(trust_env=False, timeout=120) as http:
                    while rows := conn.execute(read, (after, batch)).fetchall():
                        resp = await http.post(f"{url}/api/embed", content=body(rows), headers=headers)
                        step(conn, rows, resp.content)
                        after, n = rows[-1][0], n + len(rows)
                return n

            done = asyncio.run(go())
    return (time.process_time() - cpu0) / done * 1000, done


# ------------------------------------------------------------------------------------------ a live user's query
def query_waits(url: str, stop: threading.Event, waits: list[float]) -> None:
    """One single-text embed a second (the beta backend's user query); each answer's latency in seconds."""
    with httpx.Client(trust_env=False, timeout=120) as http:
        i = 0
        while not stop.is_set():
            i += 1
            t0 = time.perf_counter()
            r = http.post(f"{url}/api/embed", json={"model": MODEL, "input": [f"user query {i} about Seoul"]})
            if r.status_code == 200:
                waits.append(time.perf_counter() - t0)
            stop.wait(max(0.0, QUERY_EVERY_S - (time.perf_counter() - t0)))


def with_user(bench: Bench, url: str, rows: int, seconds: float, **flags: Any) -> tuple[float, float, list[float]]:
    """A maintenance-like run (run window `seconds`) beside the user client: (chunks/s, p95 query s, waits)."""
    table = bench.new_table(rows=rows)
    stop = threading.Event()
    waits: list[float] = []
    user = threading.Thread(target=query_waits, args=(url, stop, waits), daemon=True)
    try:
        settings = bench.settings(table, url, max_minutes=seconds / 60, max_chunks=rows, refresh_changed=False)
        settings = settings.replace(**flags)
        user.start()
        time.sleep(1.5)  # the user's first query alone: its own service time
        from wiki_embeddings.core.backfill import Backfill
        from wiki_embeddings.core.factories import build_client, build_store

        store = build_store(settings, bench.url)
        engine = Backfill(settings, store, build_client(settings, MODEL), log=lambda _m: None)
        try:
            report = engine.run()
        finally:
            store.close()
        stop.set()
        user.join(timeout=30)
        body = waits[1:] or waits
        p95 = float(np.percentile(body, 95)) if body else float("nan")
        return report.chunks_per_s, p95, body
    finally:
        stop.set()
        bench.drop_schema_of(table)


# ------------------------------------------------------------------------------------------ growth
def growth(bench: Bench, sizes: tuple[int, int], url: str, rounds: int = 3, batches: int = 10) -> list[dict[str, Any]]:
    """Per table size: the median seconds of one claim + write + release of 64 rows (vector(8)) at the start and
    near the end of the table, Store.status() seconds, and a capped default-flags backfill of RSS_CHUNKS chunks in a
    child process (its peak RSS: memory must not grow with the table).

    Both tables exist before anything is timed, and the two are measured in alternation (`rounds` x `batches`
    batches at each end of each table): a machine that drifts (a checkpoint after loading 5M rows, the VM's own
    speed) then weighs on both sides alike instead of on whichever was measured second."""
    from wiki_embeddings.core.db import Provenance

    prov = Provenance("tiny", 8, 2000, "")
    vec = [np.ones(8, dtype=np.float32)] * 64
    tables = [bench.new_table(dim=8, rows=rows, source="series") for rows in sizes]
    stores = [bench.store(t) for t in tables]
    try:
        bench.sql("CHECKPOINT")
        conns = []
        for store in stores:
            store.migrate()
            conns.append(store.connect())
        times: list[list[float]] = [[] for _ in sizes]
        cursors = [[0, rows - rounds * batches * 64 - 1] for rows in sizes]  # keyset positions: start, near end
        for _ in range(rounds):
            for k, store in enumerate(stores):
                for region in (0, 1):
                    for _ in range(batches):
                        t0 = time.perf_counter()
                        claim = store.claim(conns[k], after_id=cursors[k][region], limit=64, max_chars=2000)
                        ids = [r[0] for r in claim.rows]
                        store.write_vectors(conns[k], ids, vec[: len(ids)], None, prov)
                        store.release(conns[k], ids)
                        times[k].append(time.perf_counter() - t0)
                        cursors[k][region] = claim.last_scanned_id
        for conn in conns:
            conn.close()
        out = []
        for k, store in enumerate(stores):
            t0 = time.perf_counter()
            store.status()
            status_s = time.perf_counter() - t0
            run = backfill_in_child(bench, url, tables[k], 64, 0, max_chunks=bench.n(RSS_CHUNKS, minimum=20_000))
            out.append({"per_batch": statistics.median(times[k]), "status": status_s, "run": run})
        return out
    finally:
        for store, table in zip(stores, tables, strict=True):
            store.close()
            bench.drop_schema_of(table)


# ------------------------------------------------------------------------------------------ the section
def run(bench: Bench) -> None:
    rounds = 3 if not bench.quick else 2
    n1 = bench.n(6400, minimum=1920)
    texts = bench.texts(max(n1 * 4, 2560))
    with (
        ollama_server("hash", extra_args=SERVER_ARGS) as a,
        ollama_server("hash", extra_args=SERVER_ARGS) as b,
    ):
        for url in (a, b):
            set_faults(url, latency_ms=0.0, slots=0)
            warm_cache(url, MODEL, texts)
        # 1. Default flags against one server with 1, 2 and 4 slots.
        for k in (1, 2, 4):
            set_faults(a, latency_ms=LATENCY_MS, slots=k)
            rows = min(n1 * k, len(texts))
            caps, pipes, depths = [], [], []
            for _ in range(rounds):
                cap, depth = ceiling([a], texts[:rows], k)
                caps.append(cap)
                rate, tuning = default_run(bench, [a], rows)
                pipes.append(rate)
                depths.append(tuning.get("depths"))
            log(
                f"  tuning K={k}: ceiling {[round(c) for c in caps]}, default flags {[round(p) for p in pipes]}, "
                f"final depths {depths}"
            )
            note = f"final depth {depths[-1]}; median of {rounds}"
            if k == 4:
                note += "; 2 cores run the server, PostgreSQL and the pipeline: the client binds first"
            bench.add(
                Result(
                    "tuning",
                    f"default flags (no --concurrency, no --batch-size), {k} slot(s) / ceiling (bare client, best "
                    f"depth)",
                    median_of(pipes),
                    median_of(caps),
                    "chunks/s",
                    ">= 0.97" if k < 4 else "",
                    note=note,
                    baseline_name="bare client",
                )
            )
        # 2. Two servers, one slot each, default flags; 3. four worker processes over them.
        for url in (a, b):
            set_faults(url, latency_ms=LATENCY_MS, slots=1)
        rows = min(n1 * 2, len(texts))
        caps, pipes = [], []
        for _ in range(rounds):
            caps.append(max(bare_client([a, b], MODEL, texts[:rows], d) for d in (1, 2)))
            rate, tuning = default_run(bench, [a, b], rows)
            pipes.append(rate)
        log(f"  two servers: ceiling {[round(c) for c in caps]}, default flags {[round(p) for p in pipes]}")
        joint = median_of(caps)
        bench.add(
            Result(
                "tuning",
                "2 servers (1 slot each), default flags / joint ceiling (bare client driving both)",
                median_of(pipes),
                joint,
                "chunks/s",
                ">= 0.95",
                note=f"final depths {tuning.get('depths')}",
                baseline_name="bare client, both",
            )
        )
        # Twice the rows (the template's texts over again): each worker's start-up (process, probe, pre-flight)
        # is part of the figure, and a bootstrap worker runs for hours, not for the few seconds of n1 * 4 chunks.
        rows_w = n1 * 8
        workers_texts = bench.texts(rows_w)
        joint_w = median_of([max(bare_client([a, b], MODEL, workers_texts, d) for d in (1, 2)) for _ in range(rounds)])
        rate, texts_sent, outs = workers_run(bench, [a, b], rows_w, 4)
        probes = len(outs)  # each worker's dimension probe is one text
        log(f"  4 workers over 2 servers: {rate:.0f} chunks/s, texts sent {texts_sent} for {rows_w} chunks")
        bench.add(
            Result(
                "tuning",
                f"4 worker processes over 2 servers, default flags, {rows_w:,} chunks / joint ceiling, same texts "
                f"— includes each worker's start-up (probe, pre-flight); per worker {[o['embedded'] for o in outs]} "
                "chunks",
                rate,
                joint_w,
                "chunks/s",
                ">= 0.95",
                baseline_name="bare client, both",
            )
        )
        bench.add(
            Result(
                "tuning",
                "4 workers: texts the servers embedded beyond the chunks (double work; the workers' start-up probes "
                "and canaries excluded)",
                float(texts_sent - rows_w - probes),
                None,
                "texts",
                "<= 0",
                target_on="measured",
            )
        )
        # 4. Client CPU per 1,000 chunks against the minimal script, zero-latency server.
        set_faults(a, latency_ms=0.0, slots=1)
        n_cpu = bench.n(12_800, minimum=2560)
        pipe_cpu, base_cpu, async_cpu = [], [], []
        for _ in range(rounds + 2):  # the machine's speed drifts: five interleaved rounds, medians
            table = bench.new_table(rows=n_cpu)
            report, cpu = bench.backfill(bench.settings(table, a, concurrency=0))
            assert report.embedded == n_cpu
            pipe_cpu.append(cpu / n_cpu * 1000)
            bench.drop_schema_of(table)
            for use_async, into in ((False, base_cpu), (True, async_cpu)):
                table = bench.new_table(rows=n_cpu)
                per_k, done = minimal_script(bench, table, a, use_async=use_async)
                assert done == n_cpu
                into.append(per_k)
                bench.drop_schema_of(table)
        log(
            f"  CPU s/1k: pipeline {[round(c, 3) for c in pipe_cpu]}, minimal script {[round(c, 3) for c in base_cpu]}"
            f", minimal script with httpx.AsyncClient {[round(c, 3) for c in async_cpu]}"
        )
        bench.add(
            Result(
                "tuning",
                f"client CPU per 1,000 chunks, default flags / minimal script (keyset read, POST, orjson + "
                f"validation, binary write), zero-latency server, {n_cpu} chunks",
                median_of(pipe_cpu),
                median_of(base_cpu),
                "CPU s/1k",
                "<= 1.15",
                baseline_name="minimal script",
            )
        )
        bench.add(
            Result(
                "tuning",
                "client CPU per 1,000 chunks: the minimal script with httpx.AsyncClient / the same with httpx.Client "
                "(what the async HTTP stack alone costs)",
                median_of(async_cpu),
                median_of(base_cpu),
                "CPU s/1k",
                baseline_name="minimal script",
            )
        )
        bench.add(
            Result(
                "tuning",
                "client CPU per 1,000 chunks, default flags / the minimal script with httpx.AsyncClient",
                median_of(pipe_cpu),
                median_of(async_cpu),
                "CPU s/1k",
                baseline_name="minimal script, async",
            )
        )
        # 5. A user's query beside maintenance on a CPU-model-like server (42 ms per text, 1 slot).
        set_faults(a, latency_ms=5.0, per_text_ms=CPU_PER_TEXT_MS, slots=1)
        seconds = 15.0 if bench.quick else 30.0
        rows = 4000
        modes = {
            "runbook maintenance flags (--batch-size 32 --sleep-ms 100)": {"batch_size": 32, "sleep_ms": 100},
            "throughput mode (default flags, not polite)": {"polite": False},
            "polite mode (--polite, --target-request-sec 0.5)": {"polite": True, "target_request_sec": 0.5},
        }
        found: dict[str, tuple[float, float, int]] = {}
        for label, flags in modes.items():
            rate, p95, waits = with_user(bench, a, rows, seconds, **flags)
            found[label] = (rate, p95, len(waits))
            log(f"  user query beside {label}: p95 {p95:.2f} s over {len(waits)} queries, run {rate:.1f} chunks/s")
        runbook_label, thr_label, polite_label = list(modes)
        for label, (rate, p95, count) in found.items():
            bench.add(
                Result(
                    "politeness",
                    f"user query (1/s) p95 latency beside {label} — {count} queries; run {rate:.1f} chunks/s",
                    p95,
                    0.5,
                    "s",
                    "<= 1.5" if label == polite_label else "",
                    baseline_name="target 0.5 s",
                )
            )
        bench.add(
            Result(
                "politeness",
                "user query p95: polite mode / runbook maintenance flags",
                found[polite_label][1],
                found[runbook_label][1],
                "s",
                "<= 1",
                baseline_name="runbook flags",
            )
        )
        bench.add(
            Result(
                "politeness",
                "throughput: polite mode / throughput mode (what politeness costs)",
                found[polite_label][0],
                found[thr_label][0],
                "chunks/s",
                baseline_name="throughput mode",
            )
        )
        bench.add(
            Result(
                "politeness",
                "throughput: polite mode / runbook maintenance flags",
                found[polite_label][0],
                found[runbook_label][0],
                "chunks/s",
                baseline_name="runbook flags",
            )
        )
    # 6. Cost growth: claim + write per batch, status and a capped run's peak RSS as the table grows.
    small, large = 100_000, (500_000 if bench.quick else 5_000_000)
    t0 = time.perf_counter()
    with ollama_server("hash", models=["tiny:8"], extra_args=["--cache-entries", "20000"]) as url:
        set_faults(url, latency_ms=0.0, slots=1)
        warm_cache(url, "tiny", [f"chunk {i}" for i in range(5000)])
        at_small, at_large = growth(bench, (small, large), url)
    per_small, status_small, run_small = at_small["per_batch"], at_small["status"], at_small["run"]
    per_large, status_large, run_large = at_large["per_batch"], at_large["status"], at_large["run"]
    log(
        f"  growth: claim+write per batch {per_small * 1000:.2f} ms at {small:,} rows, {per_large * 1000:.2f} ms at "
        f"{large:,}; status {status_small:.2f} s / {status_large:.2f} s; capped run peak RSS "
        f"{run_small['peak_mb']:.1f} / {run_large['peak_mb']:.1f} MB ({time.perf_counter() - t0:.0f} s)"
    )
    bench.add(
        Result(
            "growth",
            f"claim + write of one batch of 64 (vector(8)), median, at {large:,} rows / at {small:,} rows",
            per_large * 1000,
            per_small * 1000,
            "ms",
            "<= 1.2",
            baseline_name=f"{small:,} rows",
        )
    )
    bench.add(
        Result("growth", f"Store.status() on {large:,} rows", status_large, None, "s", "< 2", target_on="measured")
    )
    capped = int(run_large["embedded"])
    bench.add(
        Result(
            "growth",
            f"peak RSS of a default-flags run capped at {capped:,} chunks (--max-chunks), on {large:,} rows / on "
            f"{small:,} rows — child process VmHWM; {run_large['chunks_per_s']:,.0f} vs "
            f"{run_small['chunks_per_s']:,.0f} chunks/s",
            run_large["peak_mb"],
            run_small["peak_mb"],
            "MB",
            "<= 1.2",
            baseline_name=f"{small:,} rows",
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    raise SystemExit("run through benchmarks/run.py")
