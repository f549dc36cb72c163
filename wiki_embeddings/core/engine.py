"""The backfill loop: claim missing chunks, embed them, write the vectors, isolate what cannot be embedded.

Three stages overlap so the embedding server never waits on PostgreSQL or on bookkeeping:
  producer (keyset claim of the next batch) -> N embed workers (HTTP, bisection) -> writer (bulk write).
Queues between them are bounded, so memory depends on batch size and concurrency, never on table size.

The stop file (and a stop request in the database) is checked between batches: once seen, no new request
is sent, what is in flight is written, and the run ends with state `stopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wiki_embeddings.core import identity
from wiki_embeddings.core.client import (
    AmbiguousFailure,
    ContextExceeded,
    EmbedFailure,
    InputRejected,
    InvalidVectors,
    ModelNotFound,
    OllamaClient,
    ServerUnavailable,
)
from wiki_embeddings.core.context import (
    MAX_TOKENS_PER_CHAR,
    PREFLIGHT_SAMPLE,
    SAFETY,
    ContextRefused,
    TokenEstimator,
    Window,
    fit_prefix,
    fit_text,
    format_preflight,
    preflight,
    window_from_show,
)
from wiki_embeddings.core.db import (
    DatabaseError,
    DatabaseUnavailable,
    DataRefused,
    ModelMismatch,
    Provenance,
    Store,
    VectorNotes,
)
from wiki_embeddings.core.failure_log import FailureLog
from wiki_embeddings.core.progress import LineReporter, Progress, Reporter
from wiki_embeddings.core.text import clean_text
from wiki_embeddings.core.tuning import Tuning
from wiki_embeddings.settings import Settings, redact, url_secrets

CANARY_TEXT = "The quick brown fox jumps over the lazy dog."
# Failures decided from the text alone: recorded without asking the server whether it is well.
TEXT_ERRORS = {"empty_text", "invalid_utf8", "write_error"}
CLEAN_STATES = {"completed", "stopped", "max_chunks"}
EXIT_CODES = {
    "server_unavailable": 3,
    "model_not_found": 4,
    "database_unavailable": 5,
    "failure_log_error": 6,
    "locked": 7,
    "model_changed": 8,
}
DB_STOP_CHECK_EVERY_SEC = 1.0
DB_RECONNECT_MAX_DELAY_SEC = 5.0
DB_CLIENT_MARGIN_SEC = 5.0  # the client-side deadline of a database call: statement_timeout + this
BUSY_RETRY_SEC = 0.05  # pause before chunks held elsewhere are claimed again, for the first BUSY_RETRY_FAST_SEC
BUSY_RETRY_FAST_SEC = 2.0
BUSY_RETRY_MAX_SEC = 1.0  # the longest pause after that
DB_STOP_GRACE_SEC = 3.0  # after a stop request, how long a database call may still take before it is abandoned
HEARTBEAT_EVERY_SEC = 10.0  # the run's row is touched this often; `status` calls a run stalled past its lease
# A batch whose `prompt_eval_count` is below this share of its estimated tokens is re-checked text by text.
SILENT_TRUNCATION_SHARE = 0.6
RECHECK_MAX = 8  # the longest texts of a suspect batch re-checked alone


class DimensionMismatch(RuntimeError):
    """The model's vectors do not fit the column: refused before anything is written."""


class ModelChanged(DimensionMismatch):
    """A run with another model than the one recorded for the column: refused before anything is written."""


def same_model(a: str | None, b: str | None) -> bool:
    """Model names as Ollama resolves them: `name` and `name:latest` are one model."""

    def norm(m: str | None) -> str:
        m = (m or "").strip()
        return m[: -len(":latest")] if m.endswith(":latest") else m

    return norm(a) == norm(b)


@dataclass
class RunReport:
    """What one run did; `state` is completed | stopped | max_chunks | server_unavailable | model_not_found."""

    state: str
    mode: str
    model: str
    dimensions: int
    embedded: int = 0
    failed: int = 0
    skipped_busy: int = 0
    locked: int = 0  # chunks still held by another session when the run ended (state `locked`)
    remaining: int = 0
    seconds: float = 0.0
    requests: int = 0
    run_id: int | None = None
    message: str = ""
    failed_ids: list[int] = field(default_factory=list)
    refreshed: int = 0  # chunks re-embedded in place because their text changed (maintenance)
    changed_found: int | None = None  # changed chunks the content scan found (None: no complete scan)
    index_seconds: dict[str, Any] = field(default_factory=dict)
    context_tokens: int | None = None  # the model's window as this run understood it
    context_cut: int = 0  # chunks embedded from a cut below --max-chars, to fit the context
    server_truncated: int = 0  # chunks the server was caught truncating silently
    fit_searches: int = 0  # refused chunks whose longest fitting prefix was searched
    fit_requests: int = 0  # requests those searches sent (average = fit_requests / fit_searches)
    preflight: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = ""  # why a `stopped` run stopped (stop file, signal, run window: core/window.py)
    tuning: dict[str, Any] = field(default_factory=dict)  # depth per server and batch size (core/tuning.py)

    @property
    def chunks_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 for a clean end (done, stopped on request, max-chunks reached); non-zero for any other end."""
        return 0 if self.state in CLEAN_STATES else EXIT_CODES.get(self.state, 1)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["chunks_per_s"] = round(self.chunks_per_s, 2)
        return out


@dataclass
class _Batch:
    rows: list[tuple[int, str]]
    invalid: list[tuple[int, str, int]] = field(default_factory=list)  # (id, reason, byte length)

    @property
    def ids(self) -> list[int]:
        return [r[0] for r in self.rows] + [r[0] for r in self.invalid]


@dataclass
class _Embedded:
    """Vectors ready to write, with what was actually sent for each."""

    ids: list[int]
    vectors: list[np.ndarray]
    chars: list[int]
    cut: list[bool]
    truncated: list[bool]

    def keep(self, positions: list[int]) -> _Embedded:
        return _Embedded(
            [self.ids[k] for k in positions],
            [self.vectors[k] for k in positions],
            [self.chars[k] for k in positions],
            [self.cut[k] for k in positions],
            [self.truncated[k] for k in positions],
        )


class _NoAnswer(Exception):
    """A database call passed its client-side deadline."""


def _run_and_deliver(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future, fn: Callable[..., Any], args: tuple, kwargs: dict
) -> None:
    """Run `fn(*args, **kwargs)` here (a worker thread) and hand its outcome to `future` on its loop."""

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(deliver, future.set_exception, exc)
    else:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(deliver, future.set_result, result)


def in_daemon_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future:
    """`fn(*args)` on a daemon thread, as a future of the running loop.

    Not `asyncio.to_thread`: the default executor's threads are joined when the loop and the interpreter end, so a
    call stuck on a black-holed socket would hold the process forever; a daemon thread is simply left behind.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    work = (loop, future, fn, args, kwargs)
    threading.Thread(target=_run_and_deliver, args=work, name="wiki-embeddings-db", daemon=True).start()
    return future


class _Lane:
    """One daemon thread that runs the calls on one connection in order, as futures of the running loop.

    A thread per call (`in_daemon_thread`) costs a thread start on every database call of every batch; a lane is
    started once per connection. A call that never answers leaves its lane stuck inside it: the lane is abandoned
    with its connection (a daemon thread never holds the process) and the reconnected role gets a new one.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._calls.put((loop, future, fn, args, kwargs))
        return future

    def close(self) -> None:
        """The thread ends once the calls already queued are done."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            _run_and_deliver(*call)


class _Fatal(RuntimeError):
    def __init__(self, state: str, message: str):
        super().__init__(message)
        self.state = state


@dataclass
class RunState:
    """The mutable state of one run, shared by its stages (claim, embed, write, bookkeeping)."""

    stop_event: asyncio.Event = field(
        default_factory=asyncio.Event
    )  # set by the stop file, a database stop request, SIGTERM or the run window
    stop_reason: str = ""
    deadline: tuple[float, str] | None = None  # --until / --max-minutes (core/window.py)
    fatal: _Fatal | None = None  # the first error that ends the run
    last_db_stop_check: float = 0.0
    known_good: str | None = None  # a text the server embedded: the canary that tells a sick server from a bad chunk
    report: RunReport | None = None
    batches_written: int = 0
    claimed: int = 0
    total: int = 0
    started: float = 0.0
    conns: dict[str, Any] = field(default_factory=dict)  # the pipeline's connections by role: run, claim, write
    retired: list[Any] = field(
        default_factory=list
    )  # lost connections, closed when no stage can be using them any more
    abandoned: set[Any] = field(default_factory=set)  # connections whose call never answered: never touched again
    lanes: dict[Any, _Lane] = field(default_factory=dict)  # each connection's worker thread (the store's: "store")
    stop_waiter: tuple[asyncio.Event, asyncio.Future] | None = None  # (stop_event, the waiter every call shares)
    db_silent: bool = False  # a call went unanswered after a stop request: later calls get no grace
    reconnecting: dict[str, asyncio.Lock] = field(default_factory=dict)
    held: set[int] = field(default_factory=set)  # chunk ids this run has claimed and not yet released
    md5: dict[int, str] = field(default_factory=dict)  # md5 of the whole text of each held chunk, as claimed
    phase: str = "missing"  # then "busy" (chunks held elsewhere, retried), "refresh" (text changed)
    busy: set[int] = field(
        default_factory=set
    )  # chunks another session held (claim key or row lock): retried at the end
    shadow: bool = False  # filling a model migration's shadow column
    provenance: Provenance | None = None
    scan_complete: bool = False
    window: Window = field(default_factory=Window)  # the model's context as this run understands it
    estimator: TokenEstimator = field(default_factory=TokenEstimator)  # tokens per text, learned from the server


class Backfill:
    """One run of the loop over a store and a client, configured by one Settings object."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: OllamaClient,
        *,
        mode: str = "backfill",
        log: Callable[[str], None] | None = None,
        handle_signals: bool = False,
        reporter: Reporter | None = None,
    ):
        self.s = settings.validate()
        self.store = store
        self.client = client
        self.mode = mode
        self._log = log or (lambda line: print(line, flush=True))
        self.handle_signals = handle_signals
        self.reporter: Reporter = reporter or LineReporter(self._log)
        self.failure_log = FailureLog(settings.failure_log)
        self.stop_file = Path(settings.stop_file) if settings.stop_file else None
        self._secrets: list[str | None] = list(url_secrets(settings.database_url))
        # Everything one run changes, in one place (stages read and update it; nothing else does).
        self.state = RunState(window=Window(num_ctx=settings.num_ctx))
        self._call_deadline = settings.db_statement_timeout_sec + DB_CLIENT_MARGIN_SEC

    # ------------------------------------------------------------ public
    def run(self) -> RunReport:
        return asyncio.run(self.arun())

    def request_stop(self, reason: str = "signal") -> None:
        """Graceful stop from inside the process (SIGTERM, Ctrl-C): same path as the stop file."""
        if not self.state.stop_event.is_set():
            self.state.stop_reason = reason
            self.state.stop_event.set()

    async def arun(self) -> RunReport:
        """One run; the client's HTTP pool is closed at the end (it belongs to this event loop)."""
        try:
            return await self._arun()
        finally:
            self._close_lanes()
            if self.state.stop_waiter is not None:
                self.state.stop_waiter[1].cancel()
                self.state.stop_waiter = None
            await self.client.aclose()

    async def _arun(self) -> RunReport:
        s = self.s
        self.state.stop_event = asyncio.Event()
        self.state.deadline = s.run_deadline()
        dimensions = await asyncio.to_thread(self._prepare_database)
        self.state.shadow = await asyncio.to_thread(self._check_recorded_model)
        self.failure_log.check()  # a symlink planted at the path is refused before anything is sent
        report = RunReport(state="running", mode=self.mode, model=self.client.model, dimensions=dimensions)
        self.state.report = report
        idle = not self._refresh_wanted() and await asyncio.to_thread(self._count_remaining) == 0
        try:
            if not idle:  # nothing missing and no refresh pass: the model server is not contacted at all
                await self._check_model(dimensions)
                await self._learn_context(report)
        except EmbedFailure as exc:
            report.state = "model_not_found" if isinstance(exc, ModelNotFound) else "server_unavailable"
            report.message = self._clean(exc.message)
            if not isinstance(exc, (ServerUnavailable, ModelNotFound)):  # a hung, trickling or garbling server
                report.message = (
                    f"the embedding server at {self.client.where} (OLLAMA_URL) did not embed a known-good probe "
                    f"text: {report.message}"
                )
            report.remaining = await asyncio.to_thread(self._count_remaining)
            return report
        if not self.state.shadow and not idle:  # a shadow fill leaves the live model as it is until the swap
            await asyncio.to_thread(self.store.record_model, self.client.model, dimensions)
        digest, model = None, self.client.model
        if not idle:  # the column's identity (core/identity.py) and the model's digest (`verify` shows it)
            await asyncio.to_thread(identity.record, self.store, model, dimensions, s.text_prefix, s.query_prefix)
            digest = await self.client.model_digest()
        self.state.provenance = Provenance(self.client.model, dimensions, s.max_chars, s.text_prefix)
        # The run's own session: it holds the run's liveness lock (status tells a dead run by its absence)
        # and asks for database stop requests.
        self.state.conns = {"run": await asyncio.to_thread(self._connect)}
        try:
            report.run_id = await asyncio.to_thread(
                self.store.start_run, self.mode, s.options_for_resume(), self.client.model, self.state.conns["run"]
            )
            if digest:
                record = self.store.record_trust
                await asyncio.to_thread(record, "model_digest", {"digest": digest}, run_id=report.run_id, model=model)
            return await self._run_started(report, dimensions)
        finally:
            await self._close_connections(list(self.state.conns))

    def _connect(self) -> Any:
        """A pipeline connection: statement_timeout and lock_timeout set, keepalives on (core/db/connection.py)."""
        return self.store.connect(statement_timeout_sec=self.s.db_statement_timeout_sec)

    async def _close_connections(self, roles: list[str]) -> None:
        """Close the roles' connections and every retired one (closing a session releases its claims).
        Abandoned ones (a call never answered) are left to the process's exit."""
        conns = [self.state.conns.pop(role) for role in roles if role in self.state.conns] + self.state.retired
        self.state.retired = []
        for conn in conns:
            lane = self.state.lanes.pop(conn, None)
            if lane is not None:
                lane.close()
            if conn in self.state.abandoned:
                continue
            with contextlib.suppress(Exception):
                await self._answer(in_daemon_thread(conn.close))

    async def _run_started(self, report: RunReport, dimensions: int) -> RunReport:
        s = self.s
        self.state.total = await asyncio.to_thread(self._count_remaining)
        if s.max_chunks is not None:
            self.state.total = min(self.state.total, s.max_chunks)
        self._log(
            f"{self.mode}: {self.state.total} chunks to embed in {self.store.table.qualified} with model "
            f"{self.client.model!r} ({dimensions}-d) at {self.client.where}; {describe_tuning(self.client.tuning)}"
        )
        dropped = await asyncio.to_thread(self._drop_vector_indexes, report)
        self.state.started = time.perf_counter()
        removers = self._install_signal_handlers()
        heartbeats = asyncio.create_task(self._heartbeats(report))
        try:
            await self._pipeline(report)
            await self._retry_busy(report)
            if self._may_refresh():
                self.state.phase = "refresh"
                self.state.scan_complete = False
                report.changed_found = 0
                await self._pipeline(report)
                if self.state.scan_complete and self.state.fatal is None:
                    stale = max(report.changed_found - report.refreshed, 0)
                    await self._db(
                        "store", lambda _c: self.store.record_stale_text(stale, self.store.count_unverified())
                    )
                else:
                    report.changed_found = None
        finally:
            heartbeats.cancel()
            for remove in removers:
                remove()
            report.seconds = time.perf_counter() - self.state.started
            if dropped:
                await asyncio.to_thread(self._rebuild_vector_indexes, dropped, report)
        report.requests = self.client.stats.requests
        report.tuning = self.client.tuning.snapshot()
        try:
            report.remaining = await self._db("store", lambda _c: self._count_remaining())
        except (_Fatal, DatabaseError) as exc:  # the database (or the table) is gone: report what is known
            self.state.fatal = self.state.fatal or (
                exc if isinstance(exc, _Fatal) else _Fatal("error", self._clean(str(exc)))
            )
            report.remaining = max(self.state.total - report.embedded - report.failed, 0)
        if self.state.fatal is not None:
            report.state, report.message = self.state.fatal.state, self._clean(str(self.state.fatal))
        elif self.state.stop_event.is_set():
            report.state, report.stop_reason = "stopped", self.state.stop_reason
            report.message = f"stopped on request ({self.state.stop_reason}); {report.remaining} chunks remain"
        elif self.state.busy:
            report.state = "locked"
            report.locked = len(self.state.busy)
            report.message = (
                f"{report.locked} chunks locked by another session (a concurrent run holds their claim, or a "
                f"transaction holds their row) for over {s.busy_wait_sec:g} s; run again later; "
                f"{report.remaining} chunks remain"
            )
        elif s.max_chunks is not None and self.state.claimed >= s.max_chunks and report.remaining > 0:
            report.state = "max_chunks"
            report.message = f"--max-chunks {s.max_chunks} reached; {report.remaining} chunks remain"
        else:
            report.state = "completed"
            report.message = f"done; {report.remaining} chunks remain missing ({report.failed} failed this run)"
        try:
            run_id = report.run_id
            assert run_id is not None  # recorded before the pipeline started
            await self._db(
                "store",
                lambda _c: self.store.finish_run(
                    run_id,
                    report.state,
                    report.embedded,
                    report.failed,
                    report.chunks_per_s,
                    report.message,
                    report.locked,
                ),
            )
        except _Fatal:
            self._log(
                "could not record the end of the run (database gone); status will show it as abandoned, or as "
                "stalled while the server keeps its session"
            )
        self.reporter.finish()
        self._log(
            f"{self.mode} {report.state}: embedded={report.embedded} failed={report.failed} "
            f"remaining={report.remaining} refreshed={report.refreshed} seconds={report.seconds:.1f} "
            f"chunks/s={report.chunks_per_s:.1f} cut_for_context={report.context_cut} "
            f"server_truncated={report.server_truncated}{self._fit_summary(report)}. "
            f"{report.message}"
        )
        return report

    # ------------------------------------------------------------ preparation
    def _prepare_database(self) -> int:
        self.store.migrate()
        self.store.ensure_extension()
        self.store.ensure_missing_index()
        _ = self.store.failure_key  # decided once, before the stages share the store
        return self.store.column_dimensions()

    def _check_recorded_model(self) -> bool:
        """The column's model is recorded in the database: another model is refused before anything is written.

        The live column takes only the live model (a change of model goes through `migrate-model`); a
        migration's shadow column takes only the migration's target model. Returns whether the column is a
        migration's shadow column.
        """
        live, _ = self.store.recorded_model()
        target, shadow = self.store.migration_target()
        column = f"{self.store.table.qualified}.{self.store.table.embedding_column}"
        is_shadow = shadow is not None and shadow == self.store.table.embedding_column
        if is_shadow:
            if not same_model(target, self.client.model):
                raise ModelChanged(
                    f"{column} is the shadow column of the migration to model {target!r}; model "
                    f"{self.client.model!r} is refused there; nothing was written"
                )
        elif live and not same_model(live, self.client.model):
            raise ModelChanged(
                f"{column} holds vectors of model {live!r}; a backfill with model {self.client.model!r} is refused "
                f"and nothing was written. To change the model without downtime use "
                f"`wiki-embeddings migrate-model --to {self.client.model}` (then --swap)"
            )
        prefix = identity.prefix_problem(self.store, self.client.model, self.client.text_prefix, shadow=is_shadow)
        if prefix:  # identity is model + dimensions + text prefix
            raise ModelChanged(prefix)
        return is_shadow

    def _refresh_wanted(self) -> bool:
        """Does this run include the pass over embedded chunks (changed text; with --reembed-cut, cut ones)?"""
        s = self.s
        if s.retry_failed:
            return False
        if s.reembed_cut:
            return True
        return s.refresh_changed if s.refresh_changed is not None else s.max_chunks is not None

    def _may_refresh(self) -> bool:
        """Maintenance re-embeds changed chunks after the missing ones, unless stopped, failed or capped."""
        s = self.s
        if not self._refresh_wanted() or self.state.fatal is not None or self.state.stop_event.is_set():
            return False
        return s.max_chunks is None or self.state.claimed < s.max_chunks

    async def _check_model(self, dimensions: int) -> None:
        """Refuse a model whose vectors have another length than the column, before anything is written."""
        got = await self.client.probe_dimensions(CANARY_TEXT)
        column = f"{self.store.table.qualified}.{self.store.table.embedding_column}"
        if got != dimensions and self.s.request_dimensions and dimensions < got:
            # A Matryoshka model (nomic-embed-text v1.5, ...) can answer shorter vectors when asked: opt-in,
            # because not every model is trained for it (the server would just cut an ordinary model's vectors).
            self.client.ask_dimensions(dimensions)
            try:
                got = await self.client.probe_dimensions(CANARY_TEXT)
            except InputRejected as exc:
                raise DimensionMismatch(
                    f"model {self.client.model!r} refused `dimensions: {dimensions}` ({exc.message}); {column} is "
                    f"vector({dimensions}); nothing was written"
                ) from exc
        if got != dimensions:
            hint = (
                f" (the model answers {got} values: --request-dimensions asks a Matryoshka model for {dimensions})"
                if dimensions < got and not self.s.request_dimensions
                else ""
            )
            raise DimensionMismatch(
                f"model {self.client.model!r} returns {got}-dimensional vectors but {column} is vector({dimensions});"
                f" nothing was written. Use the model the column was built for, or migrate the column{hint}."
            )
        self.client.expect_dimensions(dimensions)
        self.state.known_good = CANARY_TEXT

    async def _learn_context(self, report: RunReport) -> None:
        """Ask the server for the model's context (`/api/show`) and print the pre-flight estimate."""
        self.state.window = window_from_show(await self.client.show(), self.s.num_ctx)
        report.context_tokens = self.state.window.tokens
        try:
            sample = await asyncio.to_thread(self.store.sample_texts, PREFLIGHT_SAMPLE, self.s.max_chars)
        except DatabaseError as exc:  # an estimate only: it never stops a run
            self._log(f"pre-flight: no sample ({type(exc).__name__}); model context {self.state.window.describe()}")
            return
        report.preflight = preflight(
            sample, self.state.window, self.state.estimator, self.s.max_chars, self.client.text_prefix
        )
        self._log(format_preflight(report.preflight))

    def _drop_vector_indexes(self, report: RunReport) -> list[dict[str, str]]:
        """Bulk-load policy: an HNSW/IVFFlat index makes every write several times slower (pgvector #810).

        Only with the operator's consent (`--drop-vector-index`) is it dropped for the run and rebuilt after;
        otherwise it stays and the operator is told what it costs.
        """
        indexes = self.store.vector_indexes()
        if not indexes:
            return []
        names = ", ".join(i["name"] for i in indexes)
        if not self.s.drop_vector_index:
            self._log(
                f"note: vector index {names} stays in place; bulk writes are several times slower with it "
                "(pass --drop-vector-index to drop it for the bootstrap and rebuild it after)"
            )
            return []
        for index in indexes:
            seconds = self.store.drop_index(index["schema"], index["name"])
            self._log(f"dropped vector index {index['name']} for the bulk load ({seconds:.2f} s)")
        report.index_seconds["dropped"] = [i["name"] for i in indexes]
        return indexes

    def _rebuild_vector_indexes(self, indexes: list[dict[str, str]], report: RunReport) -> None:
        total = 0.0
        for index in indexes:
            seconds = self.store.create_index(index["definition"], self.s.maintenance_work_mem)
            total += seconds
            self._log(f"rebuilt vector index {index['name']} in {seconds:.1f} s")
        report.index_seconds["rebuild_seconds"] = round(total, 2)

    def _claim_mode(self) -> str:
        if self.s.retry_failed:
            return "retry_failed"
        return "all" if self.s.include_quarantined else "normal"

    def _count_remaining(self) -> int:
        if self.s.retry_failed:
            return len([f for f in self.store.list_failures(self.s.max_attempts) if f["still_missing"]])
        return self.store.count_missing(self.s.id_min, self.s.id_max)

    # ------------------------------------------------------------ stop handling
    def _install_signal_handlers(self) -> list[Callable[[], object]]:
        if not self.handle_signals:
            return []
        loop = asyncio.get_running_loop()
        removers: list[Callable[[], object]] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
                removers.append(functools.partial(loop.remove_signal_handler, sig))
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        return removers

    def _stop_file_present(self) -> bool:
        return self.stop_file is not None and os.path.lexists(self.stop_file)

    def _window_over(self) -> bool:
        """Past the run window's end (--until / --max-minutes): stop as on the stop file."""
        if self.state.deadline is not None and time.time() >= self.state.deadline[0]:
            self.request_stop(self.state.deadline[1])
            return True
        return False

    async def _should_stop(self) -> bool:
        if self.state.stop_event.is_set() or self.state.fatal is not None:
            return True
        if self._stop_file_present() or self._window_over():
            if not self.state.stop_event.is_set():
                self.request_stop(f"stop file {self.stop_file}")
            return True
        now = time.monotonic()
        if now - self.state.last_db_stop_check >= DB_STOP_CHECK_EVERY_SEC:
            self.state.last_db_stop_check = now
            if await self._db("run", self.store.stop_requested):
                self.request_stop("stop request in the database")
                return True
        return False

    def _stopping(self) -> bool:
        """Cheap check for workers before each new request (no database round trip)."""
        if self.state.stop_event.is_set() or self.state.fatal is not None:
            return True
        if self._stop_file_present() or self._window_over():
            if not self.state.stop_event.is_set():
                self.request_stop(f"stop file {self.stop_file}")
            return True
        return False

    # ------------------------------------------------------------ pipeline
    # ------------------------------------------------------------ database calls that survive a restart
    async def _db(self, role: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn(conn, ...)` on the role's connection in a thread; on a lost connection, reconnect with backoff.

        Every call has a client-side deadline (the server's statement_timeout plus a margin): a black-holed
        network never answers, and no kernel keepalive fires through a user-space proxy. A call past its deadline
        is abandoned with its connection (its thread is a daemon: it can never hold the process) and handled as a
        lost connection. A stop request (stop file, SIGTERM) is honoured within seconds whatever a call waits on.

        The claim connection holds the run's claims (session advisory locks), which die with a lost session:
        after reconnecting they are re-taken, and chunks another run took meanwhile are dropped from this run.
        A write is repeat-safe (it only fills rows still missing), so it is simply tried again.
        """
        delay = self.s.backoff_base_sec
        deadline = time.monotonic() + self.s.db_reconnect_sec
        while True:
            conn = self.state.conns.get(role) if role != "store" else None
            try:
                return await self._answer(self._lane(conn).submit(fn, conn, *args, **kwargs))
            except (DatabaseUnavailable, _NoAnswer) as exc:  # (the store's own connection reopens itself)
                if isinstance(exc, _NoAnswer):
                    self._abandon(role, conn)
                if time.monotonic() >= deadline:
                    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise _Fatal(
                        "database_unavailable",
                        f"lost the database connection and could not reconnect within {self.s.db_reconnect_sec:g} s: "
                        f"{first_line}",
                    ) from exc
                self._log(f"database connection lost ({type(exc).__name__}); reconnecting in {delay:.1f} s")
                await self._sleep_unless_stopped(delay)
                delay = min(delay * 2, DB_RECONNECT_MAX_DELAY_SEC)
                if conn is not None and (conn.closed or conn.broken or conn in self.state.abandoned):
                    await self._reconnect(role, conn)

    async def _answer(self, call: asyncio.Future) -> Any:
        """The call's result within its deadline; a stop request cuts the wait to a short grace."""
        stop = self._stop_waiter()
        done, _ = await asyncio.wait({call, stop}, timeout=self._call_deadline, return_when="FIRST_COMPLETED")
        if call not in done and stop in done:
            # Once one call went unanswered after a stop, the database is taken as silent: no more graces.
            grace = 0.2 if self.state.db_silent else DB_STOP_GRACE_SEC
            done, _ = await asyncio.wait({call}, timeout=grace)
            if call not in done:
                call.cancel()
                self.state.db_silent = True
                raise _Fatal(
                    "stopped",
                    f"stopped on request ({self.state.stop_reason}) while the database did not answer for "
                    f"{DB_STOP_GRACE_SEC:g} s; the chunks in flight stay missing and a re-run takes them",
                )
        if call not in done:
            call.cancel()
            raise _NoAnswer(f"no answer from the database within {self._call_deadline:g} s (client deadline)")
        return call.result()

    def _stop_waiter(self) -> asyncio.Future:
        """One task waiting on the stop event, shared by every call's wait (a task per call costs CPU per batch)."""
        event, loop = self.state.stop_event, asyncio.get_running_loop()
        if self.state.stop_waiter is not None:
            waited, waiter = self.state.stop_waiter
            if waited is event and waiter.get_loop() is loop:
                return waiter
            waiter.cancel()
        waiter = asyncio.ensure_future(event.wait())
        self.state.stop_waiter = (event, waiter)
        return waiter

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.state.stop_event.wait(), seconds)

    def _abandon(self, role: str, conn: Any) -> None:
        """A connection whose call never answered is dropped, never closed (its thread may be inside it)."""
        lane = self.state.lanes.pop(conn if conn is not None else "store", None)
        if lane is not None:
            lane.close()  # the thread ends if that call ever returns
        if conn is not None:
            self.state.abandoned.add(conn)
        else:
            self.store.forget_connection()

    def _lane(self, conn: Any) -> _Lane:
        """The worker thread of a pipeline connection (None: the store's own connection)."""
        key = conn if conn is not None else "store"
        lane = self.state.lanes.get(key)
        if lane is None:
            lane = self.state.lanes[key] = _Lane("wiki-embeddings-db")
        return lane

    def _close_lanes(self) -> None:
        for lane in self.state.lanes.values():
            lane.close()
        self.state.lanes.clear()

    async def _reconnect(self, role: str, lost: Any) -> None:
        """Replace the role's lost connection once, however many stages noticed; re-take what its session held.

        The lost connection is retired, not closed: another stage's thread may still be inside a call on it,
        and closing a socket under a thread that polls it can block that thread for good.
        """
        async with self.state.reconnecting.setdefault(role, asyncio.Lock()):
            if self.state.conns.get(role) is not lost:
                return  # another stage reconnected this role already
            try:
                fresh = await self._answer(in_daemon_thread(self._connect))
            except (DatabaseUnavailable, _NoAnswer):
                return  # still down: the caller's loop waits and tries again
            if lost not in self.state.abandoned:
                self.state.retired.append(lost)
            self.state.conns[role] = fresh
            try:
                if role == "run" and self.state.report is not None and self.state.report.run_id is not None:
                    await self._answer(in_daemon_thread(self.store.hold_run_lock, fresh, self.state.report.run_id))
                if role == "claim" and self.state.held:
                    wanted = sorted(self.state.held)
                    held = await self._answer(in_daemon_thread(self.store.relock, fresh, wanted))
                    gone = set(wanted) - set(held)
                    if gone:
                        self._log(
                            f"{len(gone)} claimed chunks were taken by another run while reconnecting; skipping them"
                        )
                    self.state.held -= gone
            except (DatabaseUnavailable, _NoAnswer):
                return  # lost again at once: the next call sees a broken connection and comes back here

    async def _release(self, ids: list[int]) -> None:
        mine = [i for i in ids if i in self.state.held]
        self.state.held.difference_update(mine)
        for i in mine:
            self.state.md5.pop(i, None)
        if mine:
            await self._db("claim", self.store.release, mine)

    async def _release_quietly(self, ids: list[int]) -> None:
        """Release on the way out of a failing run: a dead database must not hide the first error."""
        try:
            await self._release(ids)
        except _Fatal as exc:
            self.state.fatal = self.state.fatal or exc

    async def _pipeline(self, report: RunReport) -> None:
        # Both at once: a connection takes a few milliseconds that the first batch would otherwise wait for.
        opened = await asyncio.gather(*(asyncio.to_thread(self._connect) for _ in range(2)), return_exceptions=True)
        for role, conn in zip(("claim", "write"), opened, strict=True):
            if not isinstance(conn, BaseException):
                self.state.conns[role] = conn  # closed with the run's other connections if the other failed
        for conn in opened:
            if isinstance(conn, BaseException):
                raise conn
        tuning = self.client.tuning
        workers_n = tuning.max_workers  # self-tuning: at most total-depth of them hold a batch (client.turn)
        # Claimed batches waiting for a worker: enough that no server waits on a claim, few enough that this run
        # holds no more chunks than it is about to send (other runs on the same table claim the rest).
        prefetch = workers_n if not tuning.auto else tuning.servers + 1
        todo: asyncio.Queue[_Batch | None] = asyncio.Queue(maxsize=prefetch)
        done: asyncio.Queue[_Embedded | None] = asyncio.Queue(maxsize=workers_n * 2)
        try:
            producer = asyncio.create_task(self._produce(todo, workers_n, report))
            workers = [asyncio.create_task(self._work(todo, done, report)) for _ in range(workers_n)]
            writer = asyncio.create_task(self._write(done, report))
            await producer
            await asyncio.gather(*workers)
            await done.put(None)
            await writer
        finally:
            await self._close_connections(["claim", "write"])  # a closed session releases every claim it held
            self.state.held.clear()
            self.state.md5.clear()

    def _unexpected(self, where: str, exc: BaseException) -> None:
        """A bug or an unforeseen error in one stage stops the run cleanly instead of hanging the others."""
        if self.state.fatal is None:
            gone = self.store.vanished(exc)  # the table dropped or renamed under the run: state table_gone
            message = gone or f"unexpected error in the {where}: {type(exc).__name__}: {exc}"
            self.state.fatal = _Fatal("table_gone" if gone else "error", self._clean(message))

    async def _produce(self, todo: asyncio.Queue, workers_n: int, report: RunReport) -> None:
        s = self.s
        after_id: int | None = None
        try:
            while not await self._should_stop():
                if self.state.phase == "busy":
                    await self._produce_busy(todo)
                    break
                limit = min(s.batch_size, self.client.tuning.batch_size)  # trouble / polite mode shrink it
                if s.max_chunks is not None:
                    limit = min(limit, s.max_chunks - self.state.claimed)
                    if limit <= 0:
                        break
                claim = await self._db(
                    "claim",
                    self.store.claim_changed if self.state.phase == "refresh" else self.store.claim,
                    after_id=after_id,
                    limit=limit,
                    max_chars=s.max_chars,
                    id_min=s.id_min,
                    id_max=s.id_max,
                    mode=self._claim_mode(),
                    max_attempts=s.max_attempts,
                    **({"include_cut": True} if self.state.phase == "refresh" and s.reembed_cut else {}),
                )
                if claim.last_scanned_id is None:
                    self.state.scan_complete = True
                    break
                after_id = claim.last_scanned_id
                report.skipped_busy += claim.busy
                if self.state.phase == "missing":
                    self.state.busy.update(claim.busy_ids)
                if self.state.phase == "refresh" and report.changed_found is not None:
                    report.changed_found += claim.found
                if claim.rows or claim.invalid:
                    batch = _Batch([(cid, clean_text(text)) for cid, text in claim.rows], claim.invalid)
                    self.state.claimed += len(batch.ids)
                    self.state.held.update(batch.ids)
                    self.state.md5.update(claim.text_md5)
                    await todo.put(batch)
        except _Fatal as exc:
            self.state.fatal = self.state.fatal or exc
        except Exception as exc:  # noqa: BLE001 - reported as the run's end state
            self._unexpected("claim loop", exc)
        finally:
            for _ in range(workers_n):
                await todo.put(None)

    async def _produce_busy(self, todo: asyncio.Queue) -> None:
        """Claim again the chunks that were busy; those still held stay in `busy` for the next round.

        Each claim looks at every pending id and takes the first batch of those still missing, so ids that other
        runs embedded meanwhile (most of them, at the end of a shared bootstrap) cost no round trip of their own.
        """
        s = self.s
        pending = sorted(self.state.busy)
        self.state.busy.clear()
        if s.max_chunks is not None:
            pending = pending[: max(s.max_chunks - self.state.claimed, 0)]
        while pending:
            if await self._should_stop():
                self.state.busy.update(pending)
                return
            claim = await self._db(
                "claim",
                self.store.claim_ids,
                pending,
                max_chars=s.max_chars,
                mode=self._claim_mode(),
                max_attempts=s.max_attempts,
                limit=s.batch_size,
            )
            if claim.last_scanned_id is None:
                return  # none of them is missing any more
            self.state.busy.update(claim.busy_ids)
            if claim.rows or claim.invalid:
                batch = _Batch([(cid, clean_text(text)) for cid, text in claim.rows], claim.invalid)
                self.state.claimed += len(batch.ids)
                self.state.held.update(batch.ids)
                self.state.md5.update(claim.text_md5)
                await todo.put(batch)
            last = claim.last_scanned_id
            pending = [cid for cid in pending if cid > last]

    async def _retry_busy(self, report: RunReport) -> None:
        """Chunks another session held (a concurrent run's claim, a colliding claim key, a row lock) are never
        skipped for good: they are retried until free or `busy_wait_sec` has passed (then the run ends `locked`)."""
        if self.s.max_chunks is not None and self.state.claimed >= self.s.max_chunks:
            self.state.busy.clear()  # a capped run (maintenance) took its share: the rest is another run's business
            return
        began = time.monotonic()
        deadline = began + self.s.busy_wait_sec
        while self.state.busy and self.state.fatal is None and not self.state.stop_event.is_set():
            self.state.phase = "busy"
            await self._pipeline(report)
            now = time.monotonic()
            if not self.state.busy or now >= deadline:
                break
            # Most are another run's batch in flight, free within a request's time: asked again soon at first;
            # chunks held longer (a colliding claim key, a long transaction) are asked about less and less often.
            waited = now - began
            pause = BUSY_RETRY_SEC if waited < BUSY_RETRY_FAST_SEC else min(waited / 2, BUSY_RETRY_MAX_SEC)
            await asyncio.sleep(min(pause, max(deadline - now, 0)))
        self.state.phase = "missing"

    async def _work(self, todo: asyncio.Queue, done: asyncio.Queue, report: RunReport) -> None:
        while True:
            async with self.client.turn():  # no more workers hold a batch than the servers' depths take
                if not await self._work_one(todo, done, report):
                    return

    async def _work_one(self, todo: asyncio.Queue, done: asyncio.Queue, report: RunReport) -> bool:
        """One batch from the queue, embedded and handed to the writer; False at the end of the queue."""
        batch = await todo.get()
        if batch is None:
            return False
        if self._stopping():
            # Not sent: give the claims back untouched for the next run.
            await self._release_quietly(batch.ids)
            return True
        try:
            for cid, reason, size in batch.invalid:
                await self._isolate((cid, ""), "invalid_utf8", reason, None, report, text_length=size)
            await self._embed_rows(batch.rows, done, report)
        except _Fatal as exc:
            if self.state.fatal is None:
                self.state.fatal = exc
            await self._release_quietly(batch.ids)
        except Exception as exc:  # noqa: BLE001 - reported as the run's end state
            self._unexpected("embedding worker", exc)
            await self._release_quietly(batch.ids)
        return True

    async def _call(self, texts: list[str]) -> tuple[list[np.ndarray], int | None]:
        try:
            return await self.client.embed_counted(texts)
        finally:
            if self.s.sleep_ms:
                await asyncio.sleep(self.s.sleep_ms / 1000)

    def _fit(self, text: str) -> str:
        return fit_text(text, self.client.text_prefix, self.state.window.tokens, self.state.estimator)

    async def _embed_rows(self, rows: list[tuple[int, str]], done: asyncio.Queue, report: RunReport) -> None:
        """Embed rows; on an input-tied failure split the batch until the bad chunks stand alone.

        Each text is first cut to fit the model's context (estimated in tokens); a text the server still
        refuses as too long is cut to the longest prefix it takes (`_fit_one`), never failed for its length.
        """
        if not rows:
            return
        blank = [r for r in rows if not r[1].strip()]
        if blank:
            for row in blank:
                await self._isolate(row, "empty_text", "text is empty or whitespace only", None, report)
            rows = [r for r in rows if r[1].strip()]
            if not rows:
                return
        sent = [self._fit(r[1]) for r in rows]
        try:
            vectors, count = await self._call(sent)
        except ServerUnavailable as exc:
            raise _Fatal("server_unavailable", exc.message) from exc
        except ModelNotFound as exc:
            raise _Fatal("model_not_found", exc.message) from exc
        except ContextExceeded as exc:
            if len(rows) == 1:
                await self._fit_one(rows[0], len(sent[0]), done, report, exc)
                return
            # The estimate was short for some text: the texts nearest the window go alone, the rest together.
            budget = (self.state.window.tokens or 0) * SAFETY
            risky = [k for k, t in enumerate(sent) if budget and self.state.estimator.estimate(t) >= 0.6 * budget]
            if not risky or len(risky) == len(rows):
                half = len(rows) // 2
                await self._embed_rows(rows[:half], done, report)
                await self._embed_rows(rows[half:], done, report)
                return
            for k in risky:
                await self._embed_rows([rows[k]], done, report)
            alone = set(risky)
            await self._embed_rows([r for k, r in enumerate(rows) if k not in alone], done, report)
            return
        except InvalidVectors as exc:
            good = [k for k, v in enumerate(exc.vectors) if v is not None]
            if good:
                await done.put(self._embedded(rows, sent, exc.vectors, good))
                self.state.known_good = sent[good[0]]
            bad = [rows[i] for i in sorted(exc.reasons)]
            if len(rows) == 1:
                await self._isolate(bad[0], exc.kind, exc.reasons[0], exc.http_status, report)
            else:
                for row in bad:  # each alone: a vector that is bad again is the chunk's
                    await self._embed_rows([row], done, report)
            return
        except (InputRejected, AmbiguousFailure) as exc:
            if isinstance(exc, AmbiguousFailure) and not await self._server_well():
                raise _Fatal(
                    "server_unavailable",
                    f"the embedding server fails even on a known-good text after: {exc.message}",
                ) from exc
            if len(rows) == 1:
                await self._isolate(rows[0], exc.kind, exc.message, exc.http_status, report)
            else:
                half = len(rows) // 2
                await self._embed_rows(rows[:half], done, report)
                await self._embed_rows(rows[half:], done, report)
            return
        self.state.known_good = sent[0]
        embedded = self._embedded(rows, sent, vectors, list(range(len(rows))))
        if count is not None:
            await self._check_truncation(embedded, sent, count, report)
        await done.put(embedded)

    @staticmethod
    def _embedded(
        rows: list[tuple[int, str]], sent: list[str], vectors: Sequence[np.ndarray | None], positions: list[int]
    ) -> _Embedded:
        return _Embedded(
            [rows[k][0] for k in positions],
            [v for k in positions if (v := vectors[k]) is not None],
            [len(sent[k]) for k in positions],
            [len(sent[k]) < len(rows[k][1]) for k in positions],
            [False] * len(positions),
        )

    async def _check_truncation(self, embedded: _Embedded, sent: list[str], count: int, report: RunReport) -> None:
        """A server that truncates silently evaluates fewer tokens than the texts have: `prompt_eval_count` well
        below the estimate. Then the longer texts are re-checked one by one; a text whose own count is far below
        its estimate was cut by the server (flagged, and the window learned); otherwise the counts teach the
        estimator. A batch that looks right teaches it directly."""
        prefix = self.client.text_prefix
        window = self.state.window.tokens
        if window and (len(prefix) + max(map(len, sent), default=0)) * MAX_TOKENS_PER_CHAR <= window * SAFETY:
            return  # no text of this batch can reach the window: nothing to detect, nothing worth learning
        estimates = [self.state.estimator.estimate(prefix + t) for t in sent]
        if count >= SILENT_TRUNCATION_SHARE * sum(estimates) or len(sent) == 0:
            self.state.estimator.observe([prefix + t for t in sent], count)
            return
        order = sorted(range(len(sent)), key=lambda k: estimates[k], reverse=True)[:RECHECK_MAX]
        for k in order:
            try:
                _, own = await self._call([sent[k]])
            except EmbedFailure:
                continue  # the batch's vector stands; only the flag is unknown
            if own is None:
                continue
            if own < SILENT_TRUNCATION_SHARE * estimates[k]:
                embedded.truncated[k] = True
                report.server_truncated += 1
                self.state.window.learn(own)
            else:
                self.state.estimator.observe([prefix + sent[k]], own)
        if any(embedded.truncated):
            self._log(
                f"the server truncated {sum(embedded.truncated)} chunk(s) silently (it evaluated fewer tokens than "
                f"they have); recorded as server_truncated; texts are now cut to {self.state.window.tokens} tokens"
            )

    async def _fit_one(
        self, row: tuple[int, str], refused_chars: int, done: asyncio.Queue, report: RunReport, exc: ContextExceeded
    ) -> None:
        """One chunk refused as over the context: embed the longest prefix the server takes (>= 90 % of it)."""

        async def embed_one(text: str) -> tuple[np.ndarray, int | None]:
            try:
                vectors, count = await self._call([text])
            except ContextExceeded as refused:
                raise ContextRefused(refused.message) from refused
            return vectors[0], count

        try:
            found = await fit_prefix(
                row[1],
                embed_one,
                window_tokens=self.state.window.tokens,
                estimator=self.state.estimator,
                refused_at=refused_chars,
            )
        except ServerUnavailable as failure:
            raise _Fatal("server_unavailable", failure.message) from failure
        except ModelNotFound as failure:
            raise _Fatal("model_not_found", failure.message) from failure
        except EmbedFailure as failure:  # a real fault of this text (NaN, another 400): isolated as always
            reason = failure.reasons[0] if isinstance(failure, InvalidVectors) else failure.message
            await self._isolate(row, failure.kind, reason, failure.http_status, report)
            return
        report.fit_searches += 1
        if found is None:
            await self._isolate(
                row, exc.kind, f"no prefix of this chunk fits the model's context: {exc.message}", 400, report
            )
            return
        report.fit_requests += found.requests
        believed = self.state.window.tokens
        if found.tokens and (not believed or found.tokens < 0.9 * believed) and found.chars >= 0.9 * found.refused_at:
            # The server takes less than it said (or said nothing): its window is about what this prefix used.
            self.state.window.learn(found.tokens)
        self.state.known_good = row[1][: found.chars]
        await done.put(_Embedded([row[0]], [found.vector], [found.chars], [found.chars < len(row[1])], [False]))

    async def _server_well(self) -> bool:
        try:
            await self._call([self.state.known_good or CANARY_TEXT])
            return True
        except EmbedFailure:
            return False

    async def _isolate(
        self,
        row: tuple[int, str],
        error: str,
        message: str,
        http_status: int | None,
        report: RunReport,
        text_length: int | None = None,
    ) -> None:
        """Record one chunk that cannot be embedded (database + JSONL), after proving the server is well."""
        if error not in TEXT_ERRORS and not await self._server_well():
            raise _Fatal("server_unavailable", f"the embedding server fails even on a known-good text: {message}")
        chunk_id, text = row
        message = self._clean(message)
        attempts = await self._db(
            "store",
            lambda _c, *a, **k: self.store.record_failure(*a, **k),
            chunk_id,
            error=error,
            message=message,
            http_status=http_status,
            run_id=report.run_id,
        )
        try:
            self.failure_log.record(
                chunk_id=chunk_id,
                error=error,
                message=message,
                http_status=http_status,
                attempts=attempts,
                text_length=len(text) if text_length is None else text_length,
                model=self.client.model,
                table=self.store.table.qualified,
                run_id=report.run_id,
            )
        except OSError as exc:
            raise _Fatal(
                "failure_log_error",
                f"{exc}; the failure is recorded in the database (`wiki-embeddings failures`)",
            ) from exc
        report.failed += 1
        report.failed_ids.append(chunk_id)
        quarantined = " (quarantined)" if attempts >= self.s.max_attempts else ""
        self._log(f"chunk {chunk_id} failed{quarantined}: {error}: {message}")
        await self._release([chunk_id])

    async def _write(self, done: asyncio.Queue, report: RunReport) -> None:
        while True:
            item = await done.get()
            if item is None:
                return
            if self.state.fatal is not None and self.state.fatal.state == "database_unavailable":
                continue  # drain: nothing can be written, the claims die with the sessions
            keep = [k for k, cid in enumerate(item.ids) if cid in self.state.held]
            if len(keep) < len(item.ids):  # claims lost in a reconnect: another run owns those chunks now
                item = item.keep(keep)
            ids = item.ids
            try:
                written = await self._write_batch(item, report)
                await self._release(ids)
            except ModelMismatch as exc:
                self.state.fatal = self.state.fatal or _Fatal("model_changed", str(exc))
                continue
            except _Fatal as exc:
                self.state.fatal = self.state.fatal or exc
                continue
            except Exception as exc:  # noqa: BLE001 - reported as the run's end state
                self._unexpected("writer", exc)
                continue
            if self.state.phase == "refresh":
                report.refreshed += written
            else:
                report.embedded += written
            self.state.batches_written += 1
            await self._progress(report)

    async def _write_batch(self, item: _Embedded, report: RunReport) -> int:
        """Write one batch; a row the database refuses (a trigger, a constraint) is isolated like a chunk that
        cannot be embedded: the batch is split until it stands alone, recorded `write_error`, the others written.
        Rows another transaction holds are not waited for: they are retried at the end of the run."""
        md5s = [self.state.md5.get(i) for i in item.ids]
        try:
            written = await self._db(
                "write",
                self.store.write_vectors,
                item.ids,
                item.vectors,
                md5s if all(m is not None for m in md5s) else None,
                self.state.provenance,
                self.state.phase == "refresh",
                VectorNotes(item.chars, item.cut, item.truncated),
            )
        except DataRefused as exc:  # not a lost connection (`_db` handles those): this data is refused
            if len(item.ids) == 1:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                await self._isolate(
                    (item.ids[0], ""),
                    "write_error",
                    f"the database refused the write: {reason}",
                    None,
                    report,
                    text_length=item.chars[0],
                )
                return 0
            half = len(item.ids) // 2
            first = await self._write_batch(item.keep(list(range(half))), report)
            return first + await self._write_batch(item.keep(list(range(half, len(item.ids)))), report)
        locked = set(written.locked)
        if locked and self.state.phase != "refresh":
            self.state.busy.update(locked)
        report.context_cut += sum(c for cid, c in zip(item.ids, item.cut, strict=True) if cid not in locked)
        return int(written)

    # ------------------------------------------------------------ reporting
    async def _progress(self, report: RunReport) -> None:
        elapsed = max(time.perf_counter() - self.state.started, 1e-9)
        rate = report.embedded / elapsed
        total = max(self.state.total, report.embedded + report.failed)
        left = max(total - report.embedded - report.failed, 0)
        eta = left / rate if rate > 0 else float("inf")
        figures = Progress(report.embedded, report.failed, total, rate, eta)
        self.reporter.progress(figures, self.state.batches_written % self.s.report_every == 0)

    async def _heartbeats(self, report: RunReport) -> None:
        """Touch the run's row every HEARTBEAT_EVERY_SEC whatever the pipeline waits on: `status` tells a run that
        stopped doing so (a frozen process, a black-holed database) by its heartbeat, not by hope."""
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY_SEC)
            if report.run_id is None:
                continue
            elapsed = max(time.perf_counter() - self.state.started, 1e-9)
            try:  # off the event loop: the embed workers keep the server busy meanwhile
                await self._answer(
                    in_daemon_thread(
                        self.store.heartbeat_run,
                        report.run_id,
                        report.embedded,
                        report.failed,
                        report.embedded / elapsed,
                    )
                )
            except _NoAnswer:
                self.store.forget_connection()
            except (DatabaseError, _Fatal):
                self.store.close()  # the next bookkeeping call reconnects

    @staticmethod
    def _fit_summary(report: RunReport) -> str:
        if not report.fit_searches:
            return ""
        return (
            f" refused_as_too_long={report.fit_searches} (longest fitting prefix found in "
            f"{report.fit_requests / report.fit_searches:.1f} requests on average)"
        )

    def _clean(self, message: str) -> str:
        return redact(message, self._secrets)


def describe_tuning(tuning: Tuning) -> str:
    depth = "self-tuning depth per server (from 1)" if tuning.auto else f"{tuning.pinned_depth} in flight per server"
    if tuning.target_sec is not None:
        return f"polite: batch {tuning.max_batch} at most, sized to {tuning.target_sec:g} s per request, {depth}"
    return f"batch {tuning.max_batch} at most (halved on trouble, grown back on success), {depth}"
