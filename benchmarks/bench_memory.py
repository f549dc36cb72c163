"""Peak memory of a backfill over 1,000,000 chunks vs 100,000, and Store.status() time on 1,000,000 rows.

Each backfill runs in its own child process (``python -m benchmarks.bench_memory --child ...``), which
reports its peak RSS (VmHWM). The child's ru_maxrss from os.wait4 is logged too, but not used: Linux
counts into it the RSS of the image the child ran before exec (a vfork'd view of this parent's memory). The column
is vector(32) and the texts are short and repeat (``'chunk ' || id % 5000``), served by the hash
server's ``tiny:32`` model from its cache, so disk and time stay small.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.common import REPO_ROOT, Bench, Result, log, ollama_server, run_backfill, set_faults, warm_cache
from wiki_embeddings.settings import from_env

DIM = 32
MODEL = "tiny"
TOO_LONG_S = 120.0  # a 1M backfill at batch 64 / concurrency 1 estimated longer than this: batch 256, concurrency 2


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--ollama", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--max-chunks", type=int, default=None)
    a = p.parse_args(argv)
    settings = from_env(
        {},
        database_url=a.url,
        ollama_url=a.ollama,
        ollama_model=MODEL,
        table=a.table,
        batch_size=a.batch,
        concurrency=a.concurrency,
        max_chunks=a.max_chunks,
        report_every=10,
        stop_file=os.path.join(a.base, "wiki-embed.stop"),
        failure_log=os.path.join(a.base, "failures.jsonl"),
    )
    report, cpu = run_backfill(settings)
    out = {
        "embedded": report.embedded,
        "seconds": report.seconds,
        "chunks_per_s": report.chunks_per_s,
        "cpu": cpu,
        "vmhwm_mb": _vmhwm_mb(),
    }
    print(json.dumps(out), flush=True)
    return 0


def backfill_in_child(
    bench: Bench, url: str, table: str, batch: int, concurrency: int, max_chunks: int | None = None
) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", "--url", bench.url, "--ollama", url]
    cmd += ["--table", table, "--batch", str(batch), "--concurrency", str(concurrency), "--base", str(bench.base)]
    if max_chunks is not None:
        cmd += ["--max-chunks", str(max_chunks)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"memory child exited {proc.returncode}: {out[-500:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["ru_maxrss_mb"] = usage.ru_maxrss / 1024
    # VmHWM is the child's own peak. ru_maxrss from wait4 is not: Linux folds the RSS of the memory image the
    # child had before exec (the parent's, with vfork) into it, so it reads at least this process's RSS.
    result["peak_mb"] = result["vmhwm_mb"]
    result["wall"] = time.perf_counter() - t0
    return result


def timed_status(bench: Bench, table: str, repeats: int = 3) -> float:
    store = bench.store(table)
    try:
        store.status()  # connect and warm the catalog
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            store.status()
            times.append(time.perf_counter() - t0)
    finally:
        store.close()
    return min(times)


def run(bench: Bench) -> None:
    small_n, large_n = bench.n(100_000, 1000), bench.n(1_000_000, 10_000)
    with ollama_server("hash", models=[f"{MODEL}:{DIM}"], extra_args=["--cache-entries", "20000"]) as url:
        set_faults(url, latency_ms=0.0, slots=1)
        warm_cache(url, MODEL, [f"chunk {i}" for i in range(5000)])
        batch, conc = 64, 1
        small_table = bench.new_table(DIM, rows=small_n, source="series")
        small = backfill_in_child(bench, url, small_table, batch, conc)
        estimate = small["seconds"] * large_n / small_n
        log(
            f"  {small_n:,} chunks at batch {batch}, concurrency {conc}: {small['chunks_per_s']:.0f} chunks/s, "
            f"peak RSS {small['vmhwm_mb']:.0f} MB (ru_maxrss {small['ru_maxrss_mb']:.0f}); "
            f"{large_n:,} estimated at {estimate:.0f} s"
        )
        settings_note = "batch 64, concurrency 1"
        if estimate > TOO_LONG_S * bench.scale:
            batch, conc = 256, 2
            settings_note = f"batch 256, concurrency 2 (batch 64 / 1 in flight was estimated at {estimate:.0f} s)"
            bench.drop_schema_of(small_table)
            small_table = bench.new_table(DIM, rows=small_n, source="series")
            small = backfill_in_child(bench, url, small_table, batch, conc)
            log(
                f"  {small_n:,} chunks at batch {batch}, concurrency {conc}: {small['chunks_per_s']:.0f} chunks/s, "
                f"peak RSS {small['vmhwm_mb']:.0f} MB (ru_maxrss {small['ru_maxrss_mb']:.0f})"
            )
        bench.drop_schema_of(small_table)

        t0 = time.perf_counter()
        large_table = bench.new_table(DIM, rows=large_n, source="series")
        log(f"  {large_n:,}-row vector({DIM}) table made in {time.perf_counter() - t0:.0f} s")
        status_before = timed_status(bench, large_table)
        large = backfill_in_child(bench, url, large_table, batch, conc)
        status_after = timed_status(bench, large_table)
        log(
            f"  {large_n:,} chunks: {large['chunks_per_s']:.0f} chunks/s in {large['seconds']:.0f} s, peak RSS "
            f"{large['vmhwm_mb']:.0f} MB (ru_maxrss {large['ru_maxrss_mb']:.0f}); status {status_before:.3f} s "
            f"before, {status_after:.3f} s after"
        )
        bench.drop_schema_of(large_table)

    bench.add(
        Result(
            "memory",
            f"peak RSS of a backfill over {large_n:,} chunks / over {small_n:,} (vector({DIM}), {settings_note})",
            large["peak_mb"],
            small["peak_mb"],
            "MB",
            "<= 1.2",
            note=f"{large['chunks_per_s']:,.0f} chunks/s over {large_n:,}, {small['chunks_per_s']:,.0f} over "
            f"{small_n:,}; peak = the child's VmHWM (wait4's ru_maxrss, {large['ru_maxrss_mb']:.0f} MB, "
            "also counts the parent's image the child was spawned from)",
            baseline_name=f"{small_n:,} chunks",
        )
    )
    bench.add(
        Result(
            "memory",
            f"peak RSS of the backfill process over {large_n:,} chunks",
            large["peak_mb"],
            None,
            "MB",
            "< 300",
            target_on="measured",
        )
    )
    bench.add(
        Result(
            "status",
            f"Store.status() on {large_n:,} rows (slower of: all missing, all embedded)",
            max(status_before, status_after),
            None,
            "s",
            "< 2",
            note=f"{status_before:.3f} s all missing, {status_after:.3f} s all embedded",
            target_on="measured",
        )
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2:]))
    sys.exit("usage: python -m benchmarks.bench_memory --child ... (run the benchmarks with benchmarks/run.sh)")
