"""A Dagster backfill of every range spread over 2 model servers against the CLI over the same 2 (issue 22 item 5c).

The same table (ROWS chunks: the first DISTINCT real wiki paragraphs over again, ids spread evenly over the 100 id
ranges as a table of 10 million chunks spreads them) is filled twice per round, once by each side, each on a fresh
copy; two rounds, the sides' order reversed in the second:

- *CLI*: `wiki-embeddings backfill` (its defaults: batch 64, no sleep, self-tuning depth) in its own process, with
  both servers in `OLLAMA_URL`; chunks/s = chunks / wall time from the process's start to its exit.
- *Dagster*: the real machinery, as in production and as the spread test runs it: `dagster-daemon run` (backfill
  daemon, queued run coordinator) on the shipped dagster.yaml with its PostgreSQL storage, the DefaultRunLauncher
  (a process per run, the multiprocess executor's process per step), pool `ollama` at 2 (`dagster instance
  concurrency set ollama 2`), the backfill added as the UI's "Materialize all" adds it, with the run config's
  defaults (the runbook's bootstrap: batch 64, no sleep). Each run leases one of the 2 servers (core/spread.py).
  chunks/s = chunks / time from adding the backfill to the end of its last run (every daemon tick, run launch,
  code load and step process inside); the runs' own span (first run's start to last run's end) is shown beside it.

Servers: the project's Ollama-protocol server (hash backend, own process, one slot, vector cache warmed), each
request answered after LATENCY_MS: the servers are the ceiling, as GPU servers are, and the client's CPU is not.

Where Dagster's time goes is measured per item (Overheads: the wait for the first run, each run's launch and end, the
gaps between ranges; the engine runs' own start-and-end times from the bookkeeping's runs table), and a model built
from those costs (Model) gives the ratio at this run's size, to check it, and at 1 and 10 million chunks on the
shipped partitioning.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from psycopg import sql

from benchmarks.common import MODEL, REPO_ROOT, Bench, Result, log, ollama_server, server_stats, set_faults, warm_cache
from wiki_embeddings.devtools import embedded_postgres

SECTION = "ceiling"
#: Per request of up to 64 texts, one slot: 1,600 chunks/s a server (BENCH_SPREAD_LATENCY_MS to change it).
LATENCY_MS = float(os.environ.get("BENCH_SPREAD_LATENCY_MS", "40"))
#: ~20 s of work at the 2 servers' joint rate (6,000 with --quick). Dagster's fixed costs (the backfill daemon's
#: 30 s loop, each run's launch) do not shrink with the data: BENCH_SPREAD_ROWS=1500000 measures a production-sized
#: backfill (~8 min a side), BENCH_SPREAD_ROUNDS=1 halves the time.
ROWS = int(os.environ.get("BENCH_SPREAD_ROWS", "60000"))
ROUNDS = int(os.environ.get("BENCH_SPREAD_ROUNDS", "2"))
DISTINCT = 5_000  # distinct paragraphs among them: the servers' caches are warmed with these
POOL_LIMIT = 2
BIN = Path(sys.executable).parent
SERVER_ARGS = ["--cache-entries", "200000", "--context-tokens", "4096"]


@dataclass
class Side:
    """One fill of the table: chunks, the seconds it took, and what explains them."""

    rows: int
    seconds: float
    span: float = 0.0  # Dagster: first run's start to last run's end
    runs: int = 0
    servers: str = ""
    texts: int = 0  # texts the servers embedded (probes included)
    engine_rate: float = 0.0  # chunks/s inside the engine runs, summed over the servers (Engines.rate)
    over: Overheads | None = None  # Dagster: where the time outside the engines went
    per_range: tuple[float, float] = (0.0, 0.0)  # Dagster: an engine run's seconds and chunks, on average

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def spread_table(bench: Bench, rows: int, width: int, ranges: int) -> str:
    """A fresh chunk table of `rows` paragraphs (the template's first DISTINCT, over again) whose ids go round the
    `ranges` id ranges of `width`: row g gets id (g mod ranges) * width + g div ranges + 1, so every range holds the
    same share."""
    table = bench.new_table()
    schema, name = table.split(".")
    with bench.connect() as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, title, chunk_index, content)"
                " SELECT (g %% %s) * %s + g / %s + 1, w.title, w.chunk_index, w.content"
                " FROM generate_series(0, %s - 1) g"
                " JOIN (SELECT row_number() OVER (ORDER BY id) - 1 AS k, title, chunk_index, content,"
                "       count(*) OVER () AS n FROM (SELECT * FROM bench_src.wiki_template ORDER BY id LIMIT %s) t) w"
                " ON w.k = g %% w.n"
            ).format(sql.Identifier(schema, name)),
            (ranges, width, ranges, rows, DISTINCT),
        )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(schema, name)))
    return table


def filled(bench: Bench, table: str) -> int:
    schema, name = table.split(".")
    q = sql.SQL("SELECT count(*) FROM {} WHERE embedding IS NOT NULL").format(sql.Identifier(schema, name))
    return int(bench.sql(q.as_string())[0][0])


def base_env(bench: Bench, table: str, urls: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "WIKI_EMBED_", "OLLAMA_"))}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "DATABASE_URL": bench.url,
            "WIKI_EMBED_TABLE": table,
            "OLLAMA_URL": ",".join(urls),
            "OLLAMA_MODEL": MODEL,
            "EMBED_STOP_FILE": str(bench.base / "wiki-embed.stop"),
            "WIKI_EMBED_FAILURE_LOG_DIR": str(bench.base),
        }
    )
    return env


def texts_embedded(urls: list[str]) -> int:
    return sum(int(server_stats(u)["texts_embedded"]) for u in urls)


# ------------------------------------------------------------------------------------------ the CLI
def cli_fill(bench: Bench, table: str, urls: list[str], rows: int) -> Side:
    for u in urls:
        server_stats(u, reset=True)
    cmd = [sys.executable, "-m", "wiki_embeddings.cli", "backfill", "--failure-log", str(bench.base / "cli.jsonl")]
    out = bench.base / "cli.log"
    since = time.time()
    t0 = time.perf_counter()
    with out.open("w") as f:
        code = subprocess.run(cmd, cwd=REPO_ROOT, env=base_env(bench, table, urls), stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    got = filled(bench, table)
    if code.returncode != 0 or got != rows:
        raise RuntimeError(f"CLI backfill exit {code.returncode}, {got}/{rows} filled: {out.read_text()[-1500:]}")
    rate = engines(bench, table, since).rate()
    return Side(rows, seconds, runs=1, servers="both", texts=texts_embedded(urls), engine_rate=rate)


# ------------------------------------------------------------------------------------------ Dagster
@contextlib.contextmanager
def daemon(bench: Bench, table: str, urls: list[str], home: Path) -> Iterator[dict[str, str]]:
    """`dagster-daemon run` on the shipped dagster.yaml (storage in this benchmark's PostgreSQL), its code location
    benchmarks/dagster_defs.py; yields its environment once the backfill daemon and the run queue beat."""
    import dagster as dg

    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())))
    pgdata = bench.base / "pgdata"
    database = f"dagster_{uuid.uuid4().hex[:8]}"
    embedded_postgres.ensure_running(pgdata, database)
    storage = embedded_postgres.dagster_storage_url(pgdata).replace("/dagster?", f"/{database}?")
    env = {**base_env(bench, table, urls), "DAGSTER_HOME": str(home), "DAGSTER_PG_URL": storage}
    saved = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "DAGSTER_PG_URL")}
    os.environ.update({"DAGSTER_HOME": env["DAGSTER_HOME"], "DAGSTER_PG_URL": storage})
    cmd = [str(BIN / "dagster-daemon"), "run", "-m", "benchmarks.dagster_defs"]
    with (home / "daemon.log").open("w") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        started = time.monotonic()
        with dg.DagsterInstance.get() as instance:
            instance.event_log_storage.set_concurrency_slots("ollama", POOL_LIMIT)
            deadline = started + 180
            while not {"BACKFILL", "QUEUED_RUN_COORDINATOR"} <= set(instance.get_daemon_heartbeats()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dagster-daemon did not start: {(home / 'daemon.log').read_text()[-1500:]}")
                time.sleep(0.5)
        log(f"  dagster-daemon up in {time.monotonic() - started:.0f} s")
        yield env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)  # its runs are over: nothing to wait for
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def dagster_fill(bench: Bench, table: str, urls: list[str], rows: int, home: Path) -> Side:
    import dagster as dg
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill

    from wiki_embeddings.defs.spread import SERVER_TAG

    asset = dg.AssetKey("wiki_chunk_embeddings")
    with daemon(bench, table, urls, home), dg.DagsterInstance.get() as instance:
        from benchmarks.dagster_defs import defs

        for u in urls:
            server_stats(u, reset=True)
        backfill_id = "bench" + uuid.uuid4().hex[:6]
        t0 = time.time()
        instance.add_backfill(
            PartitionBackfill.from_asset_partitions(
                backfill_id=backfill_id,
                asset_graph=defs.resolve_asset_graph(),
                partition_names=None,
                asset_selection=[asset],
                backfill_timestamp=t0,
                tags={},
                dynamic_partitions_store=instance,
                all_partitions=True,
                title=None,
                description=None,
                run_config={},
            )
        )

        def runs() -> list[Any]:
            return list(instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id})))

        deadline = time.monotonic() + 900 + rows / 100  # a production-sized run: ~100 chunks/s at the very least
        while True:
            records = runs()
            backfill = instance.get_backfill(backfill_id)
            done = backfill is not None and backfill.status != BulkActionStatus.REQUESTED
            if done and records and all(r.dagster_run.is_finished for r in records):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Dagster backfill did not end in time: {len(records)} runs")
            time.sleep(0.25)
        failed = [r.dagster_run.run_id for r in records if r.dagster_run.status != dg.DagsterRunStatus.SUCCESS]
        got = filled(bench, table)
        if failed or got != rows:
            raise RuntimeError(f"Dagster backfill: runs {failed} failed, {got}/{rows} filled (daemon log: {home})")
        end = max(r.end_time for r in records)
        tags = sorted(str(r.dagster_run.tags.get(SERVER_TAG, "all")) for r in records)
        eng = engines(bench, table, t0)
        return Side(
            rows,
            end - t0,
            span=end - min(r.start_time for r in records),
            runs=len(records),
            servers=",".join(tags),
            texts=texts_embedded(urls),
            engine_rate=eng.rate(),
            over=overheads(records, eng, urls, t0),
            per_range=eng.per_range(),
        )


# ------------------------------------------------------------------------------------------ where the time went
@dataclass
class Engines:
    """The engine runs (core/backfill, one a range under Dagster) recorded in the bookkeeping's runs table."""

    rows: list[tuple[str, float, float, int]]  # (server URL, started, finished, embedded), epoch seconds

    def rate(self) -> float:
        """Chunks/s summed over the servers: each server's chunks / the seconds its engine runs took."""
        by_url: dict[str, tuple[float, int]] = {}
        for url, start, end, embedded in self.rows:
            s, n = by_url.get(url, (0.0, 0))
            by_url[url] = (s + end - start, n + embedded)
        return sum(n / s for s, n in by_url.values() if s > 0)

    def per_range(self) -> tuple[float, float]:
        """(engine seconds, chunks) of an engine run, averaged over the runs."""
        n = max(len(self.rows), 1)
        return sum(b - a for _, a, b, _ in self.rows) / n, sum(e for *_, e in self.rows) / n

    def within(self, url: str, start: float, end: float) -> list[tuple[float, float]]:
        return sorted((a, b) for u, a, b, _ in self.rows if u == url and start <= a and b <= end + 1)


def engines(bench: Bench, table: str, since: float) -> Engines:
    """The runs table's rows for `table` that embedded something since `since` (epoch seconds)."""
    got = bench.sql(
        "SELECT coalesce(options->>'ollama_url', ''), extract(epoch FROM started_at), extract(epoch FROM finished_at),"
        " embedded FROM wiki_embeddings.runs WHERE table_name = %s AND embedded > 0"
        " AND started_at >= to_timestamp(%s) ORDER BY started_at",
        (table, since - 1),
    )
    return Engines([(str(u), float(a), float(b), int(n)) for u, a, b, n in got])


@dataclass
class Overheads:
    """Dagster's time outside the engines, per item (seconds, averaged over the runs of a backfill)."""

    wait: float  # adding the backfill -> its first run starts (the backfill daemon's tick, the run queue)
    launch: float  # a run starts -> its first range's engine starts (process, code load, step process, lease)
    between: float  # per range with chunks: the gap between one range's engine end and the next one's start
    tail: float  # a run's last range's engine ends -> the run ends (events, the step and run processes end)


def overheads(records: list[Any], eng: Engines, urls: list[str], t0: float) -> Overheads:
    from wiki_embeddings.defs.spread import SERVER_TAG

    launch, between, tail = [], [], []
    for r in records:
        url = urls[int(str(r.dagster_run.tags.get(SERVER_TAG, "0")).split(",")[0])]
        spans = eng.within(url, r.start_time, r.end_time)
        if not spans:
            continue
        launch.append(spans[0][0] - r.start_time)
        tail.append(r.end_time - spans[-1][1])
        between += [b[0] - a[1] for a, b in zip(spans, spans[1:], strict=False)]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return Overheads(min(r.start_time for r in records) - t0, mean(launch), mean(between), mean(tail))


# ------------------------------------------------------------------------------------------ the section
@dataclass
class Model:
    """Each side's time for N chunks from the costs measured here, on the shipped partitioning (RANGES ranges, PER_RUN
    a run, 2 runs at once: each server takes RANGES / 2 ranges in RANGES / PER_RUN / 2 runs one after another)."""

    rate: float  # the CLI engine's chunks/s over both servers: the servers' joint rate
    cli_fixed: float  # the CLI's start-up and end: its wall time less rows / rate
    wait: float
    launch_tail: float  # a run's launch and its tail
    per_range: float  # between two ranges, plus an engine run's start-up beyond its chunks' time
    ranges: int
    per_run: int

    def cli(self, n: float) -> float:
        return self.cli_fixed + n / self.rate

    def dagster(self, n: float) -> float:
        waves = max(1, -(-self.ranges // self.per_run) // POOL_LIMIT)
        return self.wait + waves * self.launch_tail + self.ranges / POOL_LIMIT * self.per_range + n / self.rate

    def ratio(self, n: float) -> float:
        return self.cli(n) / self.dagster(n)


def model_of(cli: Side, dag: Side, ranges: int, per_run: int) -> Model:
    assert dag.over is not None
    rate = cli.engine_rate
    seconds, chunks = dag.per_range
    startup = seconds - chunks / (rate / POOL_LIMIT)  # an engine run's time beyond its chunks' at one server's rate
    return Model(
        rate,
        cli.seconds - cli.rows / rate,
        dag.over.wait,
        dag.over.launch + dag.over.tail,
        dag.over.between + startup,
        ranges,
        per_run,
    )


def run(bench: Bench) -> dict[str, Any]:
    """Rounds of CLI and Dagster fills (order alternating); adds the figures, returns what the README needs."""
    from wiki_embeddings.defs.partitions import RANGE_COUNT, RANGE_WIDTH, RANGES_PER_RUN

    rows = bench.n(ROWS, minimum=5000)
    rounds = ROUNDS
    cli: list[Side] = []
    dag: list[Side] = []
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(ollama_server("hash", extra_args=SERVER_ARGS)) for _ in range(2)]
        texts = bench.texts(min(rows, DISTINCT))
        for u in urls:
            warm_cache(u, MODEL, texts)
            set_faults(u, latency_ms=LATENCY_MS)
        for r in range(rounds):
            for side in ("cli", "dagster") if r % 2 == 0 else ("dagster", "cli"):
                table = spread_table(bench, rows, RANGE_WIDTH, RANGE_COUNT)
                try:
                    if side == "cli":
                        got = cli_fill(bench, table, urls, rows)
                        cli.append(got)
                    else:
                        got = dagster_fill(bench, table, urls, rows, bench.base / f"dagster-home-{r}")
                        dag.append(got)
                finally:
                    bench.drop_schema_of(table)
                log(
                    f"  spread round {r + 1}, {side}: {rows} chunks in {got.seconds:.1f} s ({got.rate:,.0f}/s, "
                    f"in the engines {got.engine_rate:,.0f}/s); texts embedded beyond the chunks {got.texts - rows}"
                    + (
                        f"; runs' span {got.span:.1f} s, {got.runs} runs, servers {got.servers}; {got.over}"
                        if got.over
                        else ""
                    )
                )
    best_cli = max(cli, key=lambda s: s.rate)
    best_dag = max(dag, key=lambda s: s.rate)
    models = [model_of(c, d, RANGE_COUNT, RANGES_PER_RUN) for c, d in zip(cli, dag, strict=True)]
    shape = f"{rows:,} chunks spread over the {RANGE_COUNT} ranges, {RANGES_PER_RUN} a run"
    rounds_note = (
        "rounds: CLI "
        + ", ".join(f"{s.rate:,.0f}" for s in cli)
        + "; Dagster "
        + ", ".join(f"{s.rate:,.0f}" for s in dag)
    )
    o = best_dag.over or Overheads(0, 0, 0, 0)
    best_model = models[dag.index(best_dag)]
    bench.add(
        Result(
            SECTION,
            f"c. Dagster backfill over 2 servers (pool ollama = {POOL_LIMIT}, {best_dag.runs} runs) / the CLI over the "
            f"same 2 ({shape}): from adding the backfill to its last run's end",
            best_dag.rate,
            best_cli.rate,
            "chunks/s",
            ">= 0.9",
            baseline_name="CLI, both servers",
            note=rounds_note,
            reason=f"fixed costs at this size: {o.wait:.0f} s before the first run starts (the backfill daemon looks "
            f"every 30 s, the run queue every 5 s), {o.launch:.1f} s to launch a run, {o.tail:.1f} s to end one, "
            f"{o.between:.2f} s between ranges, {best_model.per_range - o.between:.2f} s of engine start-up a range",
        )
    )
    bench.add(
        Result(
            SECTION,
            "— the same, Dagster timed over its runs' span (first run's start to last run's end)",
            max(rows / s.span for s in dag),
            best_cli.rate,
            "chunks/s",
            baseline_name="CLI, both servers",
            reason="the daemon's wait left out; launches, per-range start-ups and the waves remain",
        )
    )
    bench.add(
        Result(
            SECTION,
            "— inside the engines (each server's chunks / its engine runs' seconds, summed over the 2 servers)",
            max(s.engine_rate for s in dag),
            max(s.engine_rate for s in cli),
            "chunks/s",
            baseline_name="CLI engine",
            reason="each range's engine run starts anew (probe, pre-flight, depth from 1): "
            f"{best_dag.per_range[1]:,.0f} chunks a range here",
        )
    )
    for n in (1_000_000, 10_000_000):
        got_r = [m.ratio(n) for m in models]
        bench.add(
            Result(
                SECTION,
                f"— Dagster / CLI projected at {n:,} chunks on the shipped partitioning from the costs above",
                max(got_r),
                None,
                "ratio (not measured)",
                reason=f"rounds {', '.join(f'{x:.2f}' for x in got_r)}; at this run's {rows:,} the model gives "
                + ", ".join(f"{m.ratio(rows):.2f}" for m in models)
                + ", measured "
                + ", ".join(f"{d.rate / c.rate:.2f}" for c, d in zip(cli, dag, strict=True)),
            )
        )
    return {"rows": rows, "cli": cli, "dagster": dag, "models": models}
