"""Shared plumbing of the benchmarks: the embedded PostgreSQL, chunk tables, the Ollama-protocol server, results."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
from psycopg import sql

from wiki_embeddings.core import importer
from wiki_embeddings.core.backfill import Backfill, RunReport
from wiki_embeddings.core.db import Store
from wiki_embeddings.core.factories import build_client, build_store
from wiki_embeddings.devtools import embedded_postgres
from wiki_embeddings.devtools.ollama_server import start_subprocess, stop_subprocess
from wiki_embeddings.settings import Settings, from_env

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "all-minilm"  # served at 384-d by the hash backend, and the real model by the minilm backend
DIM = 384
TEMPLATE = "bench_src.wiki_template"  # real wiki paragraphs, loaded once per benchmark run

# Nothing the operator's shell exported may point a benchmark at real services.
for _var in ("DATABASE_URL", "OLLAMA_URL", "OLLAMA_MODEL", "OLALA_START_OLLAMA", "EMBED_STOP_FILE", "WIKI_EMBED_TABLE"):
    os.environ.pop(_var, None)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ results
@dataclass
class Result:
    """One row of the results table: measured / baseline = ratio, compared with the target."""

    section: str
    metric: str
    measured: float | None
    baseline: float | None
    unit: str
    target: str = ""  # e.g. ">= 0.95", "<= 0.15", "< 2" or "" (informative)
    ratio: float | None = None
    note: str = ""
    baseline_name: str = ""
    target_on: str = "ratio"  # "ratio" or "measured": which figure the target bounds
    reason: str = ""  # why the figure is what it is (the weather table shows it)

    def __post_init__(self) -> None:
        if self.ratio is None and self.measured is not None and self.baseline:
            self.ratio = self.measured / self.baseline

    @property
    def met(self) -> str:
        if not self.target:
            return ""
        op, _, num = self.target.partition(" ")
        value = self.ratio if self.target_on == "ratio" else self.measured
        if value is None:
            return "n/a"
        limit = float(num)
        ok = {">=": value >= limit, "<=": value <= limit, "<": value < limit, ">": value > limit}[op]
        return "yes" if ok else "NO"


@dataclass
class Bench:
    """One benchmark run: its own PostgreSQL data dir under /tmp, scratch files, and sizes (scaled by --quick)."""

    quick: bool
    base: Path
    url: str = ""
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    postmaster_pid: int | None = None
    _tables: int = 0

    def monitor(self) -> CpuMonitor:
        m = CpuMonitor(self.postmaster_pid)
        m.start()
        return m

    @property
    def scale(self) -> float:
        return 0.1 if self.quick else 1.0

    def n(self, full: int, minimum: int = 64) -> int:
        return max(minimum, int(full * self.scale))

    def add(self, result: Result) -> Result:
        self.results.append(result)
        ratio = f"{result.ratio:.3f}" if result.ratio is not None else "-"
        meas = _fmt(result.measured)
        base = _fmt(result.baseline)
        log(f"  {result.section} | {result.metric}: {meas} vs {base} {result.unit} -> {ratio} {result.met}")
        return result

    # -------------------------------------------------------------------------------- database
    def connect(self, **kw: Any) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, **kw)

    def sql(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            cur = conn.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def load_template(self, rows: int) -> int:
        """Real wiki paragraphs (importer) into the template table that every chunk table is copied from."""
        have = 0
        with self.connect() as conn:
            conn.execute("CREATE SCHEMA IF NOT EXISTS bench_src")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS bench_src.wiki_template (id bigint PRIMARY KEY, title text, "
                "chunk_index integer, content text NOT NULL)"
            )
            have = conn.execute("SELECT count(*) FROM bench_src.wiki_template").fetchone()[0]  # type: ignore[index]
            if have >= rows:
                return have
            conn.execute("TRUNCATE bench_src.wiki_template")
            chunks = [(c.id, c.title, c.chunk_index, c.content) for c in importer.iter_chunks(limit=rows)]
            with (
                conn.cursor() as cur,
                cur.copy("COPY bench_src.wiki_template (id, title, chunk_index, content) FROM STDIN") as copy,
            ):
                for row in chunks:
                    copy.write_row(row)
            conn.execute("ANALYZE bench_src.wiki_template")
            return len(chunks)

    def texts(self, n: int) -> list[str]:
        """The first n texts of a `new_table(rows=n)` in id order, as the pipeline claims them (max-chars 2000 cuts
        nothing): the template's, over again from its start when n is larger than the template."""
        rows = self.sql("SELECT left(content, 2000) FROM bench_src.wiki_template ORDER BY id LIMIT %s", (n,))
        texts = [r[0] for r in rows]
        return [texts[i % len(texts)] for i in range(n)] if texts else []

    def new_table(self, dim: int = DIM, rows: int = 0, source: str = "wiki") -> str:
        """A fresh chunk table (the project's own DDL: ensure_table) in its own schema; returns 'schema.table'.

        source 'wiki': the first `rows` template paragraphs; 'series': short generated texts
        ('chunk <id mod 5000>', so the hash server's cache holds them all).
        """
        self._tables += 1
        schema = f"b{self._tables}"
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        table = f"{schema}.wiki_chunks"
        store = build_store(Settings(table=table), self.url)
        with store:
            store.migrate()
            store.ensure_table(dim)
        with self.connect() as conn:
            t = sql.Identifier(schema, "wiki_chunks")
            if rows and source == "wiki":  # the template's rows in id order, over again (new ids) if rows > them
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (id, title, chunk_index, content)"
                        " SELECT c.k * m.top + w.id, w.title, w.chunk_index, w.content"
                        " FROM (SELECT max(id) AS top, count(*) AS n FROM bench_src.wiki_template) m,"
                        " generate_series(0, (%s - 1) / greatest(m.n, 1)) AS c(k), bench_src.wiki_template w"
                        " ORDER BY 1 LIMIT %s"
                    ).format(t),
                    (rows, rows),
                )
            elif rows:
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (id, title, chunk_index, content) SELECT g, 'title ' || g, 0, "
                        "'chunk ' || (g %% 5000) FROM generate_series(1, %s) g"
                    ).format(t),
                    (rows,),
                )
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(t))
        return table

    def fitting_texts(self, n: int, window_tokens: int, share: float = 0.7) -> list[str]:
        """The first n template texts (id order) that a model with a `window_tokens` context takes whole: estimated
        (core/context.py's estimator) at most `share` of the window, so the pipeline cuts none of them and a bare
        client can send the very same texts (the strict dev server refuses a text over the window)."""
        from wiki_embeddings.core.context import TokenEstimator

        estimator = TokenEstimator()
        rows = self.sql("SELECT left(content, 2000) FROM bench_src.wiki_template ORDER BY id")
        fitting = [r[0] for r in rows if estimator.estimate(r[0]) <= share * window_tokens]
        return fitting[:n]

    def table_of_texts(self, texts: Sequence[str], dim: int = DIM) -> str:
        """A fresh chunk table (the project's DDL) holding exactly these texts, ids 1..n in this order."""
        table = self.new_table(dim=dim)
        schema, name = table.split(".")
        with self.connect() as conn, conn.cursor() as cur:
            copy_sql = sql.SQL("COPY {} (id, title, chunk_index, content) FROM STDIN").format(
                sql.Identifier(schema, name)
            )
            with cur.copy(copy_sql) as copy:
                for i, text in enumerate(texts, start=1):
                    copy.write_row((i, f"text {i}", 0, text))
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(schema, name)))
        return table

    def drop_schema_of(self, table: str) -> None:
        schema = table.split(".")[0]
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            conn.execute("CHECKPOINT")

    def store(self, table: str) -> Store:
        return build_store(Settings(table=table), self.url)

    # -------------------------------------------------------------------------------- pipeline
    def settings(self, table: str, ollama_url: str, model: str = MODEL, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": self.url,
            "ollama_url": ollama_url,
            "ollama_model": model,
            "table": table,
            "stop_file": str(self.base / "wiki-embed.stop"),
            "failure_log": str(self.base / "failures.jsonl"),
            "batch_size": 64,
            "report_every": 10,
            "timeout_sec": 120.0,
            "sleep_ms": 0,
            "concurrency": 1,
            "retries": 2,
        }
        values.update(overrides)
        return from_env({}, **values)

    def backfill(self, settings: Settings) -> tuple[RunReport, float]:
        """One engine run in this process; returns its report and this process's CPU seconds during the run."""
        return run_backfill(settings)


def run_backfill(
    settings: Settings, profile: Callable[[Callable[[], Any]], Any] | None = None
) -> tuple[RunReport, float]:
    store = build_store(settings, settings.database_url or "")
    client = build_client(settings, settings.ollama_model or MODEL)
    engine = Backfill(settings, store, client, log=lambda _m: None)

    async def go() -> RunReport:
        try:
            return await engine.arun()
        finally:
            await client.aclose()

    cpu0 = time.process_time()
    try:
        report = asyncio.run(go()) if profile is None else profile(lambda: asyncio.run(go()))
    finally:
        store.close()
    cpu = time.process_time() - cpu0
    if report.state not in ("completed", "max_chunks"):  # max_chunks: a capped run (--max-chunks) took its share
        raise RuntimeError(f"backfill ended {report.state}: {report.message}")
    return report, cpu


# ------------------------------------------------------------------------------------------ the embedding server
@contextlib.contextmanager
def ollama_server(
    backend: str = "hash", models: Sequence[str] = (f"{MODEL}:{DIM}",), extra_args: Sequence[str] = ()
) -> Iterator[str]:
    """The project's Ollama-protocol server in its own process (so it does not share our GIL); yields its URL.

    The hash backend gets a 4,096-token window unless the caller sets one: the throughput figures compare the
    pipeline with bare clients sending the same whole texts (the cut-to-fit path is measured in the tests)."""
    args = list(extra_args)
    if backend == "hash" and "--context-tokens" not in args:
        args += ["--context-tokens", "4096"]
    proc, url = start_subprocess(backend=backend, models=list(models), extra_args=args, timeout=300)
    try:
        yield url
    finally:
        stop_subprocess(proc)


def set_faults(url: str, **faults: Any) -> None:
    r = httpx.post(f"{url}/_control/faults", json={"reset": True, **faults}, trust_env=False, timeout=10)
    r.raise_for_status()


def server_stats(url: str, reset: bool = False) -> dict[str, Any]:
    path = "/_control/stats/reset" if reset else "/_control/stats"
    method = httpx.post if reset else httpx.get
    r = method(f"{url}{path}", trust_env=False, timeout=10)
    r.raise_for_status()
    return r.json()


def batches_of(texts: Sequence[str], size: int) -> list[list[str]]:
    return [list(texts[i : i + size]) for i in range(0, len(texts), size)]


def bare_client(urls: str | Sequence[str], model: str, texts: Sequence[str], in_flight: int, batch: int = 64) -> float:
    """The server(s) driven alone: `in_flight` requests outstanding on each, prebuilt bodies (sent as the pipeline
    sends them, `truncate: false`), answers read but not parsed. Returns chunks/s: the capacity as the pipeline
    could see it at best."""
    targets = [urls] if isinstance(urls, str) else list(urls)
    bodies = [orjson.dumps({"model": model, "input": b, "truncate": False}) for b in batches_of(texts, batch)]
    total = sum(len(b) for b in batches_of(texts, batch))

    async def go() -> float:
        n = in_flight * len(targets) + 2
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as http:
            headers = {"content-type": "application/json"}
            # one request per connection first, so connection set-up is not timed
            await asyncio.gather(
                *(
                    http.post(f"{u}/api/embed", content=bodies[0], headers=headers)
                    for u in targets
                    for _ in range(in_flight)
                )
            )
            todo = iter(range(len(bodies)))

            async def worker(url: str) -> None:
                for i in todo:
                    r = await http.post(f"{url}/api/embed", content=bodies[i], headers=headers)
                    if r.status_code != 200:
                        raise RuntimeError(f"bare client: HTTP {r.status_code}: {r.text[:200]}")
                    _ = r.content

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(u) for u in targets for _ in range(in_flight)))
            return time.perf_counter() - t0

    return total / asyncio.run(go())


def warm_cache(url: str, model: str, texts: Sequence[str], batch: int = 256) -> None:
    """Have the hash server compute and cache every vector once (zero latency), so later runs cost it little."""
    with httpx.Client(trust_env=False, timeout=300) as http:
        for chunk in batches_of(texts, batch):
            http.post(f"{url}/api/embed", json={"model": model, "input": chunk}).raise_for_status()


# ------------------------------------------------------------------------------------------ machine
def machine_info(url: str) -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    with psycopg.connect(url, autocommit=True) as conn:
        pg = conn.execute("SELECT current_setting('server_version')").fetchone()[0]  # type: ignore[index]
        vec = conn.execute(
            "SELECT coalesce((SELECT extversion FROM pg_extension WHERE extname = 'vector'), default_version)"
            " FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone()
        settings = dict(
            conn.execute(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN "
                "('shared_buffers', 'synchronous_commit', 'max_wal_size', 'maintenance_work_mem', 'fsync')"
            ).fetchall()
        )
    from importlib.metadata import version

    return {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpus": str(os.cpu_count()),
        "cpu model": model,
        "ram": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgresql": str(pg),
        "pgvector": vec[0] if vec else "?",
        "postgresql settings": ", ".join(f"{k}={v}" for k, v in sorted(settings.items())),
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__})",
        "httpx / orjson / numpy": f"{httpx.__version__} / {version('orjson')} / {version('numpy')}",
    }


def start_postgres(quick: bool, keep: bool) -> Bench:
    base = Path(tempfile.mkdtemp(prefix="wiki-bench-", dir="/tmp"))
    bench = Bench(quick=quick, base=base)
    bench.url = embedded_postgres.ensure_running(base / "pgdata", database="bench")
    with contextlib.suppress(OSError, ValueError):
        bench.postmaster_pid = int((base / "pgdata" / "postmaster.pid").read_text().split()[0])
    bench.keep = keep  # type: ignore[attr-defined]
    return bench


def stop_postgres(bench: Bench) -> None:
    embedded_postgres.stop(bench.base / "pgdata")
    if not getattr(bench, "keep", False):
        shutil.rmtree(bench.base, ignore_errors=True)


def _cpu_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    return sum(parts) - idle, sum(parts)


def machine_busy(seconds: float = 2.0) -> float:
    """CPU cores busy on the whole machine over `seconds` (call it while this process is idle: others' load)."""
    b0, t0 = _cpu_ticks()
    time.sleep(seconds)
    b1, t1 = _cpu_ticks()
    return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.3) -> float:
    """Wait (up to max_wait_s) until other processes use less than `threshold` cores; returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    busy = machine_busy()
    while busy > threshold and time.monotonic() < deadline:
        log(f"  the machine is busy ({busy:.2f} cores used by other processes); waiting for it to calm down")
        time.sleep(10)
        busy = machine_busy()
    return busy


class CpuMonitor:
    """CPU used on the machine by processes other than this benchmark's own during an interval, in cores.

    Own = this process and its descendants (servers, workers), plus the benchmark's PostgreSQL (its postmaster
    and backends); exited ones count through their parents' children times. Everything else busy on the
    machine (/proc/stat) is someone else's work competing for the same cores.
    """

    def __init__(self, postmaster_pid: int | None) -> None:
        self.postmaster_pid = postmaster_pid
        self._start: tuple[float, float, float] | None = None

    def _own_seconds(self) -> float:
        import psutil

        roots = [psutil.Process()]
        if self.postmaster_pid:
            with contextlib.suppress(psutil.Error):
                roots.append(psutil.Process(self.postmaster_pid))
        total = 0.0
        for root in roots:
            with contextlib.suppress(psutil.Error):
                t = root.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
                for child in root.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        c = child.cpu_times()
                        total += c.user + c.system
        return total

    def _sample(self) -> tuple[float, float, float]:
        busy, _ = _cpu_ticks()
        return busy / os.sysconf("SC_CLK_TCK"), self._own_seconds(), time.perf_counter()

    def start(self) -> None:
        self._start = self._sample()

    def foreign_cores(self) -> float:
        assert self._start is not None
        busy1, own1, t1 = self._sample()
        busy0, own0, t0 = self._start
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9)


def read_block(path: Path, begin: str, end: str) -> str | None:
    """A section's own block of RESULTS.md, markers included; None when absent."""
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        return begin + old.partition(begin)[2].partition(end)[0] + end
    return None


def write_block(path: Path, begin: str, end: str, block: str) -> None:
    """Put a section's block into RESULTS.md in place of its previous version (else at the end), the rest kept."""
    old = path.read_text() if path.exists() else ""
    block = block.rstrip("\n")
    if begin in old and end in old:
        head, _, rest = old.partition(begin)
        new = head + block + rest.partition(end)[2]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block + "\n"
    path.write_text(new)


def child_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


fmt = _fmt
