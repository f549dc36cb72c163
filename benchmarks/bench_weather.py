"""Production weather (issue 20 item 6): a run's speed under a steady 503 rate, a sick or a dead server among two,
a 503 storm on the only server and its end, a server that cuts long input silently and one whose runner crashes on
it.

Every figure is measured against the fault-free run of the same texts in the same benchmark run: a ratio of
chunks/s, or (the storm) the seconds from the storm's end until the run is back at 0.9 of the fault-free rate.
Default flags: the runbook's bootstrap (`--batch-size 64`, no `--sleep-ms`: depth and batch tune themselves per
server), the default retries and WIKI_EMBED_SERVER_WAIT_SEC (300 s). Every server is the project's Ollama-protocol
server (hash backend, own process, one slot as one Ollama runs one request a model) answering each embed request
after 20 ms (fault `latency_ms`). Texts: the first 3,000 real wiki chunks (2,000 with --quick).
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from benchmarks.common import MODEL, Bench, Result, fmt, log, ollama_server, server_stats, set_faults, warm_cache
from wiki_embeddings.core import importer
from wiki_embeddings.core.backfill import Backfill, RunReport
from wiki_embeddings.core.factories import build_client, build_store
from wiki_embeddings.core.health import PROBE_ALONE_SEC
from wiki_embeddings.core.pooling import Pooling
from wiki_embeddings.core.status import collect_status
from wiki_embeddings.core.text import clean_text
from wiki_embeddings.devtools.ollama_dev.backends import approx_tokens
from wiki_embeddings.devtools.ollama_dev.faults import draw
from wiki_embeddings.settings import Settings

SECTION = "weather"
LATENCY_MS = 20.0
FAIL_RATE = 0.2
STORM_SEC = 120.0  # scaled by --quick (12 s): the probes every 5 s and the ramp after are what is measured
STORM_AFTER_REQUESTS = 15  # the storm begins once the run has sent this many embed requests (~900 chunks)
AFTER_STORM_SEC = 10.0  # the storm run's table holds about this many seconds of full-rate work beyond its start
RECOVERY_WINDOW_SEC = 1.0  # the run's rate is measured over windows this long
RECOVERY_SHARE = 0.9
WINDOW = 2048  # what /api/show describes on the truncating and crashing servers (the client sends no num_batch)
NUM_BATCH = 256  # their physical batch: a longer input is cut silently (0.30) or crashes the runner (0.31)
RELOAD_MS = 500.0  # the model reload after a runner crash
WAIT_SEC = 300.0  # WIKI_EMBED_SERVER_WAIT_SEC: above the storm
SERVER_ARGS = ["--cache-entries", "200000", "--context-tokens", "4096"]  # every paragraph whole (max-chars 2000)
DEFAULTS = Settings()
DEFAULT_FLAGS: dict[str, Any] = {
    "concurrency": 0,  # self-tuning depth
    "batch_size": 64,  # the runbook's bootstrap
    "sleep_ms": 0,
    "retries": DEFAULTS.retries,
    "timeout_sec": DEFAULTS.timeout_sec,
    "server_wait_sec": WAIT_SEC,
}


# ------------------------------------------------------------------------------------------ one run
@dataclass
class Run:
    """One engine run and what explains its speed: the tuning's decisions and each server's health history."""

    report: RunReport
    wall: float  # seconds from the call to the end, start-up (probe, pre-flight) included
    requests: int  # requests the client sent (retries included)
    retries: int
    depth_changes: list[list[tuple[float, int, str]]]
    batch_changes: list[list[tuple[float, int, str]]]
    health: list[list[tuple[float, str, str]]]
    lines: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    window: int | None = None  # the model's window in tokens as the run understood it at its end (learned)
    server: dict[str, Any] = field(default_factory=dict)  # the (first) server's stats after the run
    by_url: dict[str, int] = field(default_factory=dict)  # requests the client sent to each server

    @property
    def rate(self) -> float:
        return self.report.chunks_per_s

    def summary(self) -> str:
        t = self.report.tuning
        states = [f"{s['state']}({s['failures']} failed/{s['successes']} ok)" for s in t.get("servers", [])]
        return (
            f"{self.report.embedded} chunks in {self.report.seconds:.2f} s ({self.rate:,.0f}/s, wall {self.wall:.2f} s)"
            f", {self.requests} requests ({self.retries} retries), depths {t.get('depths')} after "
            f"{t.get('depth_changes')} changes, batch {t.get('batch_sizes')}, servers {states}"
        )


def engine_run(bench: Bench, table: str, urls: Sequence[str], limit_s: float = 600.0, **overrides: Any) -> Run:
    """A default-flags `Backfill` in this process, cancelled after `limit_s` (a run that never ends is a finding)."""
    settings = bench.settings(table, ",".join(urls), **{**DEFAULT_FLAGS, **overrides})
    store = build_store(settings, bench.url)
    client = build_client(settings, MODEL)
    lines: list[str] = []
    engine = Backfill(settings, store, client, log=lines.append)
    t0 = time.perf_counter()
    try:
        report = asyncio.run(asyncio.wait_for(engine.arun(), limit_s))
    except TimeoutError as exc:
        raise RunDidNotEnd(f"the run did not end within {limit_s:g} s") from exc
    finally:
        store.close()
    wall = time.perf_counter() - t0
    if report.state != "completed":
        raise RuntimeError(f"backfill ended {report.state}: {report.message}")
    controls = client.tuning.controls
    return Run(
        report,
        wall,
        client.stats.requests,
        client.stats.retries,
        [list(c.depth.changes) for c in controls],
        [list(c.sizer.changes) for c in controls],
        [list(c.health.history) for c in controls],
        lines,
        by_url=dict(client.stats.by_url),
        urls=[u.rstrip("/") for u in urls],
        window=engine.worker.window.tokens,
    )


class RunDidNotEnd(RuntimeError):
    pass


def fresh_run(bench: Bench, texts: Sequence[str], urls: Sequence[str], **overrides: Any) -> Run:
    """A default-flags run on a fresh table of these texts; every chunk embedded, none failed."""
    rows = len(texts)
    table = bench.table_of_texts(texts)
    try:
        for u in urls:
            if u not in DEAD:
                server_stats(u, reset=True)
        run = engine_run(bench, table, urls, **overrides)
        if urls[0] not in DEAD:
            run.server = server_stats(urls[0])
        assert run.report.embedded == rows and run.report.failed == 0, run.report.summary()
        return run
    finally:
        bench.drop_schema_of(table)


DEAD: set[str] = set()  # the URLs dead_url made: no server to ask for stats


def dead_url() -> str:
    """A port nobody listens on: every connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    DEAD.add(url)
    return url


def faults(url: str, **extra: Any) -> None:
    set_faults(url, latency_ms=LATENCY_MS, **extra)


def rate_seeds(n: int, requests: int = 64) -> list[int]:
    """The first n seeds under which FAIL_RATE of the first `requests` request numbers fail, to the request (a run
    of 3,000 chunks sends ~64 requests; some seeds fail 10 %, others 30 %, of so few)."""
    want = round(FAIL_RATE * requests)
    seeds = (s for s in range(1, 10_000) if sum(draw(s, q) < FAIL_RATE for q in range(1, requests + 1)) == want)
    return [next(seeds) for _ in range(n)]


def rate_faults(seed: int) -> dict[str, Any]:
    return {"fail_rate": FAIL_RATE, "fail_seed": seed, "fail_status": 503}


def with_faults(url: str, go: Callable[[], Run], **extra: Any) -> Run:
    """`go()` while `url` has these faults (on top of the latency); the latency alone again after."""
    faults(url, **extra)
    try:
        return go()
    finally:
        faults(url)


def med(runs: Sequence[Run], key: Callable[[Run], float] = lambda r: r.rate) -> float:
    return statistics.median(key(r) for r in runs)


# ------------------------------------------------------------------------------------------ the storm
class Watcher:
    """Samples a server's answered texts every 0.1 s while a run goes on; optionally drives a 503 storm on it
    (fault `down`) that begins once the run has sent `after_requests` embed requests and lasts `storm_s`."""

    def __init__(self, url: str, storm_s: float | None = None, after_requests: int = STORM_AFTER_REQUESTS):
        self.url = url
        self.storm_s = storm_s
        self.after = after_requests
        self.samples: list[tuple[float, int]] = []
        self.began: float | None = None
        self.ended: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Watcher:
        server_stats(self.url, reset=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.began is not None and self.ended is None:
            faults(self.url)  # the run ended (or failed) during the storm: the server is well again for the next

    def _watch(self) -> None:
        with httpx.Client(trust_env=False, timeout=10) as http:
            while not self._stop.is_set():
                stats = http.get(f"{self.url}/_control/stats").json()
                now = time.monotonic()  # the clock of the engine's health history
                self.samples.append((now, int(stats["texts_embedded"])))
                if self.storm_s is not None:
                    if self.began is None and stats["embed_requests"] >= self.after:
                        faults(self.url, down=True)
                        self.began = time.monotonic()
                    elif self.began is not None and self.ended is None and now - self.began >= self.storm_s:
                        faults(self.url)
                        self.ended = time.monotonic()
                self._stop.wait(0.1)

    def rates(self, since: float = float("-inf"), window: float = RECOVERY_WINDOW_SEC) -> list[tuple[float, float]]:
        """(start, texts/s over the `window` seconds from it) for every sample from `since` that has a full window
        of samples after it."""
        out = []
        s = self.samples
        j = 0
        for i, (t, n) in enumerate(s):
            if t < since:
                continue
            j = max(j, i)
            while j < len(s) and s[j][0] < t + window:
                j += 1
            if j == len(s):
                break
            out.append((t, (s[j][1] - n) / (s[j][0] - t)))
        return out

    def steady_rate(self) -> float:
        """The median windowed rate while the run was going (the windows with texts answered)."""
        busy = [r for _, r in self.rates() if r > 0]
        return statistics.median(busy) if busy else 0.0

    def recovery(self, full: float) -> tuple[float | None, float]:
        """(seconds from the storm's end until a window's rate is >= RECOVERY_SHARE of `full`, None if never; the
        rate from then to the run's last answer)."""
        assert self.ended is not None
        total = self.samples[-1][1]
        last_answer = next(t for t, n in self.samples if n == total)
        for t, rate in self.rates(since=self.ended):
            if rate >= RECOVERY_SHARE * full:
                n0 = next(n for tt, n in self.samples if tt >= t)
                after = (total - n0) / (last_answer - t) if last_answer > t else 0.0
                return t - self.ended, after
        return None, 0.0


def storm_texts(texts: Sequence[str], rate: float) -> list[str]:
    """The texts over again, enough that the run outlives the storm by AFTER_STORM_SEC of full-rate work (at least
    10,000 chunks)."""
    rows = int(min(max(10_000, rate * AFTER_STORM_SEC + 1000), 80_000))
    return [texts[i % len(texts)] for i in range(rows)]


# ------------------------------------------------------------------------------------------ truncation
def long_chunks(texts: Sequence[str], limit: int) -> int:
    """Chunks over `limit` tokens as the dev server counts them (what the runner cuts or crashes on)."""
    return sum(1 for t in texts if approx_tokens(clean_text(t)) > limit)


def check_vectors(bench: Bench, table: str, ref_url: str, max_chars: int) -> tuple[int, int, list[int]]:
    """(stored vectors that are not the model's vector of exactly what provenance records, vectors checked, the
    tokens each cut chunk kept, as the dev server counts them).

    Each row's text is cut to --max-chars, cleaned, and cut to provenance's `chars_sent`; a pooled vector
    (`--long-text pool`, the default) is rebuilt from its recorded pieces and weights (core/pooling.py). Every text or
    piece is embedded again on a server that takes every text whole (`ref_url`, same model): the stored vector must
    be the one so made."""
    schema, name = table.split(".")
    query = sql.SQL(
        "SELECT t.id, t.content, t.embedding, p.chars_sent, p.pooling FROM {t} t LEFT JOIN {s}.embedding_provenance p"
        " ON p.table_name = %s AND p.chunk_id = t.id AND p.column_attnum = (SELECT attnum FROM pg_attribute"
        " WHERE attrelid = %s::regclass AND attname = 'embedding') WHERE t.embedding IS NOT NULL ORDER BY t.id"
    ).format(t=sql.Identifier(schema, name), s=sql.Identifier(DEFAULTS.state_schema))
    with psycopg.connect(bench.url, autocommit=True) as conn:
        register_vector(conn)
        rows = conn.execute(query, (table, f'"{schema}"."{name}"')).fetchall()
    plans: list[Pooling | None] = []
    inputs: list[list[str]] = []  # what each row's vector was made of: one text, or the pieces of a pooled one
    kept: list[int] = []
    for row in rows:
        whole = clean_text(row[1][:max_chars])
        text = whole[: row[3]] if row[3] is not None else whole
        plan = Pooling.from_json(row[4]) if row[4] else None
        plans.append(plan)
        inputs.append(plan.texts(text) if plan else [text])
        if plan is None and len(text) < len(whole):
            kept.append(approx_tokens(text))
    flat = [t for texts in inputs for t in texts]
    vectors: list[np.ndarray] = []
    with httpx.Client(trust_env=False, timeout=300) as http:
        for i in range(0, len(flat), 256):
            body = {"model": MODEL, "input": flat[i : i + 256], "truncate": False}
            r = http.post(f"{ref_url}/api/embed", json=body)
            r.raise_for_status()
            vectors.extend(np.asarray(v, dtype=np.float32) for v in r.json()["embeddings"])
    want, k = [], 0
    for plan, texts in zip(plans, inputs, strict=True):
        made = vectors[k : k + len(texts)]
        k += len(texts)
        want.append(plan.combine(made) if plan else made[0])
    got = np.stack([np.asarray(r[2].to_numpy(), dtype=np.float32) for r in rows])
    bad = ~np.all(np.isclose(got, np.stack(want), atol=1e-5), axis=1)
    return int(bad.sum()), len(rows), kept


@dataclass
class LongRun:
    """A run against a server that may cut or crash on long input, with what the database and the server say."""

    run: Run
    embed_requests: int
    status: dict[str, Any]
    wrong: int
    checked: int
    kept: list[int]  # tokens each cut chunk kept (the dev server's count)
    limit: int  # the tokens the server really takes

    @property
    def over_cut(self) -> int:
        """Cut chunks that kept under half of what the server takes: text lost to a window learned far too small."""
        return sum(1 for k in self.kept if k < self.limit / 2)

    def describe(self) -> str:
        kept = sorted(self.kept)
        spread = f"{kept[0]}/{kept[len(kept) // 2]}" if kept else "-"
        return (
            f"{self.run.summary()}; {self.embed_requests} embed requests, cut {self.status['cut_for_context']} (tokens "
            f"kept min/median {spread}; under half of {self.limit}: {self.over_cut}), pooled "
            f"{self.status.get('pooled')}, server_truncated "
            f"{self.status['server_truncated']}, wrong vectors {self.wrong}/{self.checked}, window at the end "
            f"{self.run.window}, runner crashes {self.run.server.get('runner_crashes')}"
        )


def long_run(bench: Bench, texts: Sequence[str], url: str, ref_url: str, limit: int) -> LongRun:
    table = bench.table_of_texts(texts)
    try:
        crashes = server_stats(url, reset=True)["runner_crashes"]  # counted since the server started
        run = engine_run(bench, table, [url])
        stats = server_stats(url)
        stats["runner_crashes"] -= crashes
        run.server = stats
        settings = bench.settings(table, url)
        store = build_store(settings, bench.url)
        try:
            status = collect_status(store, settings)
        finally:
            store.close()
        wrong, checked, kept = check_vectors(bench, table, ref_url, settings.max_chars)
        return LongRun(run, int(stats["embed_requests"]), status, wrong, checked, kept, limit)
    finally:
        bench.drop_schema_of(table)


# ------------------------------------------------------------------------------------------ the section
def run(bench: Bench) -> None:
    rows = bench.n(3000, minimum=2000)
    rounds = 5 if not bench.quick else 2  # the runs are short (~1 s): medians of 5
    long_rounds = 3 if not bench.quick else 2
    storm_s = STORM_SEC * (0.1 if bench.quick else 1.0)
    # What `wiki-embeddings import --limit N` loads: the sample's Korean and English chunks, 3 to 1 (the template's
    # first ids are Korean only).
    texts = [c.content for c in importer.iter_chunks(limit=rows)]
    with (
        ollama_server("hash", extra_args=SERVER_ARGS) as a,
        ollama_server("hash", extra_args=SERVER_ARGS) as b,
    ):
        for url in (a, b):
            set_faults(url, latency_ms=0.0, slots=0)
            warm_cache(url, MODEL, texts)
            faults(url)
        seeds = rate_seeds(rounds)
        conditions: dict[str, Callable[[int], Run]] = {
            "fault-free": lambda r: fresh_run(bench, texts, [a]),
            "503": lambda r: with_faults(a, lambda: fresh_run(bench, texts, [a]), **rate_faults(seeds[r])),
            # What explains the 503 figure: the same faults with depth pinned at 2, with ~no backoff pause, with both.
            "503 depth 2": lambda r: with_faults(
                a, lambda: fresh_run(bench, texts, [a], concurrency=2), **rate_faults(seeds[r])
            ),
            "503 no backoff": lambda r: with_faults(
                a, lambda: fresh_run(bench, texts, [a], backoff_base_sec=0.001), **rate_faults(seeds[r])
            ),
            "503 both": lambda r: with_faults(
                a, lambda: fresh_run(bench, texts, [a], concurrency=2, backoff_base_sec=0.001), **rate_faults(seeds[r])
            ),
            "sick": lambda r: with_faults(b, lambda: fresh_run(bench, texts, [a, b]), down=True),
            "dead": lambda r: fresh_run(bench, texts, [a, dead_url()]),
            "dead first": lambda r: fresh_run(bench, texts, [dead_url(), a]),
        }
        got: dict[str, list[Run]] = {k: [] for k in conditions}
        for r in range(rounds):  # interleaved: the machine's drift weighs on every condition alike
            for label, go in conditions.items():
                got[label].append(go(r))
                log(f"  weather round {r + 1} {label}: {got[label][-1].summary()}")
        base = med(got["fault-free"])
        add_steady_rate(bench, base, got, rows)
        add_one_of_two(bench, base, got["sick"], "always answers 503 (fault `down`), healthy first", 1)
        add_one_of_two(bench, base, got["dead"], "is dead (connection refused), healthy first", 1)
        add_one_of_two(bench, base, got["dead first"], "is dead, dead first (OLLAMA_URL=dead,healthy)", 0)
        # The storm: the same texts over again, enough of them to measure the rate after the storm.
        add_storm(bench, a, storm_texts(texts, base), storm_s)
    long_args = ["--cache-entries", "200000", "--context-tokens", str(WINDOW)]
    gen_30 = [*long_args, "--ollama-version", "0.30", "--num-batch", str(NUM_BATCH)]
    gen_31 = [*long_args, "--ollama-version", "0.31-crash", "--num-batch", str(NUM_BATCH), "--reload-ms"]
    with (
        ollama_server("hash", extra_args=SERVER_ARGS) as whole,
        ollama_server("hash", extra_args=long_args) as healthy,
        ollama_server("hash", extra_args=gen_30) as cutter,
        ollama_server("hash", extra_args=[*gen_31, f"{RELOAD_MS:g}"]) as crasher,
    ):
        for url in (whole, healthy, cutter, crasher):
            faults(url)
        servers = {  # label: (url, the tokens it really takes)
            "fault-free": (whole, 4096),
            "window 2048": (healthy, WINDOW),
            "0.30 cut": (cutter, NUM_BATCH),
            "0.31 crash": (crasher, NUM_BATCH),
        }
        done: dict[str, list[LongRun]] = {k: [] for k in servers}
        for r in range(long_rounds):
            for label, (url, limit) in servers.items():
                done[label].append(long_run(bench, texts, url, whole, limit))
                log(f"  weather round {r + 1} {label}: {done[label][-1].describe()}")
        free = done["fault-free"]
        add_long(bench, free, done["window 2048"], texts, "0.20 (no fault)", WINDOW)
        add_long(bench, free, done["0.30 cut"], texts, "0.30 (silent cut at num_batch)", NUM_BATCH)
        add_long(
            bench, free, done["0.31 crash"], texts, f"0.31-crash (runner crash, reload {RELOAD_MS:g} ms)", NUM_BATCH
        )


def add_steady_rate(bench: Bench, base: float, got: dict[str, list[Run]], rows: int) -> None:
    runs = got["503"]
    answers = [r.server.get("status_counts", {}) for r in runs]
    n503 = statistics.median(a.get("503", 0) for a in answers)
    reqs = statistics.median(sum(a.values()) for a in answers)
    lowered = sum(1 for r in runs for _, _, why in r.depth_changes[0] if why == "overload")
    grew = sum(1 for r in runs for _, d, _ in r.depth_changes[0] if d > 1)
    pinned, no_pause, both = (med(got[k]) / base for k in ("503 depth 2", "503 no backoff", "503 both"))
    bench.add(
        Result(
            SECTION,
            f"20 % random 503s (seeded), {rows:,} chunks / fault-free, same texts",
            med(runs),
            base,
            "chunks/s",
            ">= 0.6",
            baseline_name="fault-free",
            note=f"median of {len(runs)}",
            reason=f"{n503:.0f} of {reqs:.0f} requests answered 503, each delaying only its own retry; a 503 took the "
            f"depth down by one {lowered} times, it grew above 1 again {grew} times in {len(runs)} runs (final "
            f"{runs[-1].report.tuning.get('depths')}); batch stays "
            f"{runs[-1].report.tuning.get('batch_sizes')}; the same faults with depth pinned at 2: {pinned:.2f}, with "
            f"a 1 ms backoff: {no_pause:.2f}, with both: {both:.2f}",
        )
    )
    for label, what in (
        ("503 depth 2", "--concurrency 2 (depth pinned)"),
        ("503 no backoff", "backoff 1 ms"),
        ("503 both", "--concurrency 2 and backoff 1 ms"),
    ):
        bench.add(
            Result(
                SECTION,
                f"what explains it: 20 % random 503s with {what} / fault-free",
                med(got[label]),
                base,
                "chunks/s",
                baseline_name="fault-free",
                note=f"median of {len(got[label])}",
            )
        )


def add_one_of_two(bench: Bench, base: float, runs: list[Run], what: str, sick: int) -> None:
    """One of two servers (index `sick`) fails; the ratio is to the healthy server alone."""
    walls = [r.wall for r in runs]
    outs = [next((h for h in r.health[sick] if h[1] != "in"), None) for r in runs]
    to_sick = [r.by_url.get(r.urls[sick], 0) for r in runs]
    last = runs[-1].report
    cuts = [r.report.context_cut + r.report.pooled for r in runs]
    false_cuts = [r.window for r in runs if r.report.server_truncated]
    bench.add(
        Result(
            SECTION,
            f"one of two servers {what} / the healthy server alone, same texts",
            med(runs),
            base,
            "chunks/s",
            ">= 0.85",
            baseline_name="healthy server alone",
            note=f"median of {len(runs)}; every run ended by itself (wall {min(walls):.1f}-{max(walls):.1f} s)",
            reason=f"out of the rotation in {sum(1 for o in outs if o)}/{len(runs)} runs"
            + (f" ({outs[-1][2][:70]})" if outs[-1] else "")
            + f"; requests to it {statistics.median(to_sick):.0f} of {med(runs, lambda r: r.requests):.0f}; "
            f"window from /api/show {last.context_tokens}; chunks cut or pooled per run {cuts}"
            + (f"; server_truncated in {len(false_cuts)} runs, window learned {false_cuts}" if false_cuts else ""),
        )
    )


def add_storm(bench: Bench, url: str, texts: Sequence[str], storm_s: float) -> None:
    rows = len(texts)
    table = bench.table_of_texts(texts)
    try:
        with Watcher(url) as calm:
            free = engine_run(bench, table, [url])
        full = calm.steady_rate()
        log(f"  weather storm, fault-free: {free.summary()}; steady windowed rate {full:,.0f} texts/s")
    finally:
        bench.drop_schema_of(table)
    table = bench.table_of_texts(texts)
    try:
        with Watcher(url, storm_s=storm_s) as storm:
            run = engine_run(bench, table, [url], limit_s=storm_s + WAIT_SEC + 300)
        seconds, after = storm.recovery(full)
        assert storm.began is not None and storm.ended is not None
        health = run.health[0]
        out_at = next((t for t, state, _ in health if state != "in"), None)
        back_at = next((t for t, state, _ in health if state == "in" and t >= storm.ended), None)
        after_storm = [(round(t - storm.ended, 1), d, why) for t, d, why in run.depth_changes[0] if t >= storm.ended]
        moves = [(round(t - storm.began, 1), st, w[:60]) for t, st, w in health]
        log(
            f"  weather storm {storm_s:g} s: {run.summary()}; back at {RECOVERY_SHARE:g} of {full:,.0f}/s after "
            f"{seconds} s, {after:,.0f}/s from then; health {moves}"
            f" (s from the storm's start); depth changes after the storm {after_storm}"
        )
        back = f"{back_at - storm.ended:.1f} s after its end" if back_at else "never"
        if back_at and seconds is not None:  # the probe's phase decides the first part; the ramp after it is ours
            ramp = max(0.0, seconds - (back_at - storm.ended))
            back += f" (probed every {PROBE_ALONE_SEC:g} s: up to {PROBE_ALONE_SEC + ramp:.1f} s with another phase)"
        holds = [c for c in after_storm if c[2].startswith("no gain")]
        bench.add(
            Result(
                SECTION,
                f"{storm_s:g} s 503 storm on the only server ({rows:,} chunks): seconds from its end until the run "
                f"is back at >= {RECOVERY_SHARE:g} of its fault-free rate",
                seconds,
                None,
                "s",
                "<= 30",
                target_on="measured",
                note=f"fault-free rate {full:,.0f}/s (1 s windows), {after:,.0f}/s from then to the end",
                reason=(f"out of the rotation {out_at - storm.began:.1f} s into the storm, " if out_at else "")
                + f"back in {back}; depth after it: {len(after_storm)} changes, "
                + f"{[c[1] for c in after_storm][:4]}{' …' if len(after_storm) > 4 else ''} "
                + f"(final {run.report.tuning.get('depths')})"
                + (f" (a depth trial found no gain: depth 1 held for 300 s: {holds[0][2]})" if holds else "")
                + f"; the run ended {run.report.state} by itself after {run.wall:.0f} s",
            )
        )
    finally:
        bench.drop_schema_of(table)


def add_long(
    bench: Bench, free: list[LongRun], faulty: list[LongRun], texts: Sequence[str], what: str, limit: int
) -> None:
    """A server that describes a 2048-token window and takes `limit` tokens, against the fault-free server (a 4096
    window: every text whole, nothing to check) on the same texts."""
    n_long = long_chunks(texts, limit)
    extra = statistics.median(f.embed_requests - b.embed_requests for f, b in zip(faulty, free, strict=True))
    last = faulty[-1]
    failed = max(lr.status["failed"] + lr.status["quarantined"] + lr.status["missing"] for lr in faulty)
    crashes = statistics.median(lr.run.server.get("runner_crashes", 0) for lr in faulty)
    depth = last.run.report.tuning.get("depths")
    grew = any(d > 1 for lr in faulty for _, d, _ in lr.run.depth_changes[0])
    windows = [lr.run.window for lr in faulty]
    server = f"Ollama {what}, /api/show: window {WINDOW}" + (f", num_batch {limit}" if limit < WINDOW else "")
    bench.add(
        Result(
            SECTION,
            f"{server} / the same texts on a server that takes them all whole (window 4096)",
            med([lr.run for lr in faulty]),
            med([lr.run for lr in free]),
            "chunks/s",
            "",
            baseline_name="fault-free",
            note=f"median of {len(faulty)}; {n_long} of the chunks are over {limit} tokens",
            reason=f"{last.embed_requests} requests against {free[-1].embed_requests} fault-free ({LATENCY_MS:g} ms "
            f"each at the server, one slot)"
            + (f", {crashes:.0f} runner crashes ({RELOAD_MS:g} ms reload each)" if crashes else "")
            + f"; depth {depth}{'' if grew else ' throughout'}; window at the end of each run {windows}; chunks cut "
            f"{last.status['cut_for_context']}, pooled {last.status.get('pooled')}, server_truncated "
            f"{last.status['server_truncated']}; failed + "
            f"quarantined + missing {failed}",
        )
    )
    if n_long:
        bench.add(
            Result(
                SECTION,
                f"{server}: requests per long chunk (embed requests beyond the fault-free run's / chunks over {limit} "
                "tokens)",
                extra / n_long,
                None,
                "requests",
                "<= 4" if limit < WINDOW else "",  # issue 20's target for the cutting and crashing generations
                target_on="measured",
                note=f"{extra:.0f} extra requests for {n_long} long chunks",
            )
        )
    over = [lr.over_cut for lr in faulty]
    smallest = min((w for w in windows if w), default=None)
    bench.add(
        Result(
            SECTION,
            f"{server}: the smallest window a run learned / the {limit} tokens the server takes",
            float(smallest) if smallest is not None else None,
            float(limit),
            "tokens",
            ">= 0.5",
            baseline_name="the server's",
            note=f"window at the end of each run {windows}",
            reason=f"cut chunks that kept under half of {limit} tokens, per run: {over}"
            + (f"; pooled chunks {[lr.status.get('pooled') for lr in faulty]}" if max(over) else ""),
        )
    )
    wrong = max(lr.wrong for lr in faulty)
    bench.add(
        Result(
            SECTION,
            f"{server}: stored vectors not of exactly their recorded characters (each recomputed from its recorded "
            "cut on a server that takes it whole), worst run",
            float(wrong),
            None,
            "vectors",
            "<= 0",
            target_on="measured",
            note=f"{last.checked} checked a run, {len(faulty)} runs",
            reason=f"failed + quarantined + missing {failed}",
        )
    )


def table_lines(results: Sequence[Result]) -> list[str]:
    """The weather table: figure, target, met or not, and why."""
    lines = [
        "| condition | measured | baseline | unit | ratio | target | met? | reason |",
        "| --- | ---: | ---: | --- | ---: | --- | --- | --- |",
    ]
    for r in results:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        base = fmt(r.baseline) + (f" ({r.baseline_name})" if r.baseline_name and r.baseline is not None else "")
        metric = r.metric + (f" — {r.note}" if r.note else "")
        measured = fmt(r.measured) if r.measured is not None else "never"
        lines.append(f"| {metric} | {measured} | {base} | {r.unit} | {ratio} | {r.target} | {r.met} | {r.reason} |")
    return lines


# ------------------------------------------------------------------------------------------ RESULTS.md
BEGIN = "<!-- weather: written by `bash benchmarks/run.sh --only weather` (or a full run); other runs keep it -->"
END = "<!-- end of weather -->"

METHOD = f"""\
### How each weather figure is measured

- Servers: the project's Ollama-protocol server (hash backend, own process, one slot, vector cache warmed), each
  embed request answered after {LATENCY_MS:g} ms (fault `latency_ms`; a 503 or a refused connection costs no such
  time). Texts: `core/importer.iter_chunks(limit=3000)`, what `wiki-embeddings import --limit 3000` loads (2,250
  Korean and 750 English real wiki chunks; 2,000 with --quick), a fresh table of them per run. Engine: `Backfill` in
  the benchmark process with the runbook's bootstrap flags and no `--sleep-ms` (batch 64 at most, self-tuning depth
  and batch per server), default retries, `WIKI_EMBED_SERVER_WAIT_SEC` {WAIT_SEC:g}.
  chunks/s = the run report's (from the first claim to the end; the probe and pre-flight before it are not timed).
  Fault-free and faulty runs alternate, 5 rounds (3 for the long-input servers; 2 each with --quick); medians.
- *20 % random 503s*: fault `fail_rate 0.2`, answered at once, seeded: round r's seed is the r-th under which
  exactly 13 of the first 64 request numbers fail (a run sends ~64 requests; over so few, a random seed fails
  anywhere from 10 to 30 %), and the 503 run and its variants of a round meet the same request numbers failing. Ratio
  to the fault-free run of the same texts. What explains the figure is measured beside it: the same faults with the
  depth pinned at 2 (`--concurrency 2`), with a 1 ms backoff (`WIKI_EMBED_BACKOFF_BASE_SEC=0.001`), with both.
- *One of two servers sick / dead*: `OLLAMA_URL` = healthy, sick (fault `down`: every embed request 503) or
  healthy, dead (a port nobody listens on: connection refused), and dead, healthy: the first URL is the one the
  pre-flight asks to describe the model (`/api/show`). Ratio to the healthy server alone (the fault-free run); a run
  that does not end within 600 s is cancelled and reported as not ending.
- *Storm*: a table of the same texts over again, enough chunks for {AFTER_STORM_SEC:g} s of full-rate work beyond
  the storm's start (at least 10,000). The storm begins once the run has sent {STORM_AFTER_REQUESTS} embed
  requests: fault `down` for {STORM_SEC:g} s ({STORM_SEC / 10:g} s with --quick: the figure is the ramp after the
  storm, not its length, as long as the storm outlasts the out server's probe interval of 5 s), then the server is
  well. A thread samples the server's answered texts every 0.1 s; the run's rate = texts answered over the next
  {RECOVERY_WINDOW_SEC:g} s from each sample; its full rate = the median of those rates in a fault-free run of the
  same table. The figure: seconds from the storm's end to the first sample whose window reaches {RECOVERY_SHARE:g} of
  the full rate.
- *Silent truncation / runner crash*: servers describing a {WINDOW}-token window (`--context-tokens {WINDOW}`: the
  client sends no `num_batch`, which it does only over 2048) with `--num-batch {NUM_BATCH}`: generation 0.30 cuts an
  input over {NUM_BATCH} tokens silently, 0.31-crash aborts the runner on it (400 `… EOF`, then a {RELOAD_MS:g} ms
  reload that every request waits for); the window probe at the run's start finds either (the crash's window by a few
  crash probes), and long chunks are then pooled from pieces planned below it; and, with no fault, a 0.20 server with
  the same {WINDOW}-token window (nomic-embed-text's default num_ctx), which takes all but the few chunks over 2048
  tokens (the client cuts those). The baseline: the same texts on a server with a 4096-token window (every text whole,
  and no text can reach the window, so none is checked). Long chunks: those over the server's real limit as the dev
  server counts them; requests per long chunk = the embed requests the server received beyond the baseline run's, over
  the long chunks. Every stored vector is recomputed: the chunk cut to --max-chars, cleaned, cut to provenance's
  `chars_sent`, embedded on the 4096-token server (a pooled vector rebuilt from its recorded pieces and weights); it
  must equal the stored vector (atol 1e-5). The window each run learned (the worker's at its end) is compared with
  what the server really takes; with `--long-text cut` a window learned far too small loses text (cut chunks that kept
  under half of it are counted), with `--long-text pool` (the default) it splits long chunks into that many more
  pieces.
"""


def split_results(text: str) -> tuple[str, str]:
    """(the rest of RESULTS.md, its weather block with the markers); "" where absent."""
    if BEGIN not in text:
        return text, ""
    before, rest = text.split(BEGIN, 1)
    inside, _, after = rest.partition(END)
    return before.rstrip("\n") + "\n" + after.lstrip("\n"), BEGIN + inside + END + "\n"


def block(results: Sequence[Result], info: dict[str, str], cmd: str, quick: bool, notes: Sequence[str]) -> str:
    """The weather block of RESULTS.md: when and how it was written, the table, the misses with their reasons."""
    out = [
        BEGIN,
        "",
        "## Weather (issue 20): faults in production, each against the fault-free run of the same texts",
        "",
        f"Written by `{cmd}` on {info['date']}"
        + (" (**--quick**: 2,000 chunks, a 12 s storm)" if quick else "")
        + f"; machine as above ({info['cpus']} cores, {info['cpu model']}).",
        "",
        *table_lines(results),
        "",
        "### Weather targets not met",
        "",
    ]
    missed = [r for r in results if r.met in ("NO", "n/a")]
    out += [
        f"- {r.metric}: {fmt(r.ratio if r.target_on == 'ratio' else r.measured)} vs {r.target} — {r.reason}"
        for r in missed
    ] or ["- none"]
    if notes:
        out += ["", "### Weather notes", "", *[f"- {n}" for n in notes]]
    out += ["", METHOD, END]
    return "\n".join(out) + "\n"
