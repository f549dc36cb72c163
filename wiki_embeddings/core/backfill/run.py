"""One backfill run: the stages wired together.

  claimer (keyset claims) -> N embed workers (HTTP, bisection, context fit) -> writer (bulk write)

Queues between them are bounded, so memory depends on batch size and concurrency, never on table size; the
embedding server never waits on PostgreSQL or on bookkeeping. A stop (stop file, database request, signal, run
window) lets what is in flight be written; the run then ends `stopped`. The end state is endstate.end_state of
what the stages counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from pathlib import Path

from wiki_embeddings.core.backfill import prepare
from wiki_embeddings.core.backfill.claimer import Claimer
from wiki_embeddings.core.backfill.dbcalls import DbCalls
from wiki_embeddings.core.backfill.endstate import RunCounts, end_state
from wiki_embeddings.core.backfill.errors import BadSetting, Fatal
from wiki_embeddings.core.backfill.failures import FailureRecorder
from wiki_embeddings.core.backfill.halt import Halt
from wiki_embeddings.core.backfill.liveness import heartbeats_of, install_signal_handlers, record_end
from wiki_embeddings.core.backfill.outcomes import Batch, Embedded, Isolated
from wiki_embeddings.core.backfill.report import RunReport
from wiki_embeddings.core.backfill.servercheck import ServerCheck
from wiki_embeddings.core.backfill.worker import CANARY_TEXT, EmbedWorker
from wiki_embeddings.core.backfill.writer import Writer
from wiki_embeddings.core.db import DatabaseError, ModelMismatch, Provenance, RunReleased, Store
from wiki_embeddings.core.db.runs import run_session_name
from wiki_embeddings.core.embedders import Embedder, EmbedFailure, ModelNotFound, ServerUnavailable
from wiki_embeddings.core.embedders.base import StopWhileWaiting
from wiki_embeddings.core.failure_log import FailureLog
from wiki_embeddings.core.progress import LineReporter, Progress, Reporter, servers_note
from wiki_embeddings.core.tuning import Tuning
from wiki_embeddings.settings import Settings, redact, url_secrets


class Backfill:
    """One run of the pipeline over a store and an embedder, configured by one Settings object."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: Embedder,
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
        self._build_stages()

    def _build_stages(self) -> None:
        s = self.s
        self.halt = Halt(self.stop_file, s.run_deadline())
        self.db = DbCalls(
            self.store,
            self.halt,
            statement_timeout_sec=s.db_statement_timeout_sec,
            reconnect_sec=s.db_reconnect_sec,
            backoff_base_sec=s.backoff_base_sec,
            log=self._log,
        )
        self.claimer = Claimer(self.store, self.db.call, s, lambda: self.client.tuning.batch_size, log=self._log)
        self.worker = EmbedWorker(
            self.client, num_ctx=s.num_ctx, sleep_ms=s.sleep_ms, log=self._log, long_text=s.long_text
        )
        self.writer = Writer(self.store, self.db.call, None)
        self.servers = ServerCheck(self.store, self.client, s, self.halt)  # each server's model, the column's
        self.recorder = FailureRecorder(
            self.store,
            self.db.call,
            self.failure_log,
            self.claimer.release,
            model=self.client.model,
            max_attempts=s.max_attempts,
            clean=self._clean,
            log=self._log,
        )
        self.db.on_reconnect["claim"] = functools.partial(self.claimer.retake, self.db.thread)
        self.total = 0
        self.started = 0.0
        self._recorded: float | None = None  # the silent window's finding already recorded

    # ------------------------------------------------------------ public
    def run(self) -> RunReport:
        return asyncio.run(self.arun())

    def request_stop(self, reason: str = "signal") -> None:
        """Graceful stop from inside the process (SIGTERM, Ctrl-C): same path as the stop file."""
        self.halt.request_stop(reason)

    async def arun(self) -> RunReport:
        """One run; the client's HTTP pool is closed at the end (it belongs to this event loop)."""
        try:
            return await self._arun()
        finally:
            self.db.shut()
            await self.client.aclose()

    # ------------------------------------------------------------ before the pipeline
    async def _arun(self) -> RunReport:
        s, store, client = self.s, self.store, self.client
        self._build_stages()  # a fresh run: its stop event belongs to this event loop
        dimensions = await asyncio.to_thread(prepare.prepare_database, store)
        shadow = await asyncio.to_thread(prepare.check_recorded_model, store, client.model, client.text_prefix, s.api)
        await asyncio.to_thread(prepare.check_long_text, store, s)
        self.failure_log.check()  # a symlink planted at the path is refused before anything is sent
        report = RunReport(state="running", mode=self.mode, model=client.model, dimensions=dimensions)
        idle = not prepare.refresh_wanted(s) and await asyncio.to_thread(prepare.count_remaining, store, s) == 0
        try:
            if not idle:  # nothing missing and no refresh pass: the model server is not contacted at all
                column = f"{store.table.qualified}.{store.table.embedding_column}"
                await prepare.check_dimensions(client, dimensions, column, s.request_dimensions)
                self.worker.known_good = CANARY_TEXT
                report.preflight = await prepare.learn_context(self.worker, store, s, self._log)
                report.context_tokens = self.worker.window.tokens
                await self.servers.at_start(self.worker.probe_vectors)  # another model under the name: refused
        except EmbedFailure as exc:
            refused = prepare.refused_setting(exc, s, client.text_prefix, client.model)
            if refused:  # our own setting, not the server: exit 2 naming it
                raise BadSetting(refused) from exc
            report.state = "model_not_found" if isinstance(exc, ModelNotFound) else "server_unavailable"
            report.message = self._clean(exc.message)
            if not isinstance(exc, (ServerUnavailable, ModelNotFound)):  # a hung, trickling or garbling server
                report.message = (
                    f"the embedding server at {client.where} (OLLAMA_URL) did not embed a known-good probe "
                    f"text: {report.message}"
                )
            report.remaining = await asyncio.to_thread(prepare.count_remaining, store, s)
            return report
        if not shadow and not idle:  # a shadow fill leaves the live model as it is until the swap
            await asyncio.to_thread(store.record_model, client.model, dimensions)
        digest = None
        if not idle:  # the column's identity (core/identity.py) and the model's digest (`verify` shows it)
            await asyncio.to_thread(self.servers.record, dimensions)
            digest = await client.model_digest()
        self.writer.provenance = Provenance(client.model, dimensions, s.max_chars, s.text_prefix)
        # The run's own session: it holds the run's liveness lock (status tells a dead run by its absence) and
        # asks for database stop requests.
        await self.db.open("run")
        try:
            report.run_id = run_id = await asyncio.to_thread(
                store.start_run, self.mode, s.options_for_resume(), client.model, self.db.conns["run"]
            )
            self.writer.run_id, self.db.application_name = run_id, run_session_name(run_id)  # release finds them
            self.claimer.run_id = run_id  # --reembed-cut leaves what this run cut itself
            self.db.on_reconnect["run"] = lambda fresh: self.db.thread(store.hold_run_lock, fresh, run_id)
            if digest:
                record = store.record_trust
                await asyncio.to_thread(record, "model_digest", {"digest": digest}, run_id=run_id, model=client.model)
            await self._record_silent_window(run_id)  # found by the window probe: before any pass claims
            return await self._run_started(report, dimensions)
        finally:
            await self.db.close(*list(self.db.conns))

    # ------------------------------------------------------------ the run
    async def _run_started(self, report: RunReport, dimensions: int) -> RunReport:
        s, store = self.s, self.store
        self.total = await asyncio.to_thread(prepare.count_remaining, store, s)
        if s.max_chunks is not None:
            self.total = min(self.total, s.max_chunks)
        self._log(
            f"{self.mode}: {self.total} chunks to embed in {store.table.qualified} with model "
            f"{self.client.model!r} ({dimensions}-d) at {self.client.where}; {describe_tuning(self.client.tuning)}"
        )
        dropped = await asyncio.to_thread(prepare.drop_vector_indexes, store, s, self._log)
        if dropped:
            report.index_seconds["dropped"] = [i["name"] for i in dropped]
        self.started = time.perf_counter()
        removers = install_signal_handlers(self.request_stop) if self.handle_signals else []
        heartbeats = asyncio.create_task(
            heartbeats_of(
                report, self.store, self.db, self.client, lambda: self.recorder.failed, self.started, self.halt
            )
        )
        self.client.stop_waiting_on(self.halt.event)
        watcher = asyncio.create_task(self._watch_stop())
        try:
            await self._pipeline(report)
            await self.claimer.wait_busy(lambda: self._pipeline(report), lambda: self.halt.halted)
            if self._may_refresh():
                self.claimer.begin("refresh")
                await self._pipeline(report)
                if self.claimer.scan_complete and self.halt.fatal is None:
                    report.changed_found = self.claimer.changed_found
                    stale = max(report.changed_found - report.refreshed, 0)
                    await self.db.call("store", lambda _c: store.record_stale_text(stale, store.count_unverified()))
        finally:
            heartbeats.cancel()
            watcher.cancel()
            for remove in removers:
                remove()
            report.seconds = time.perf_counter() - self.started
            if dropped:
                rebuild = prepare.rebuild_vector_indexes
                report.index_seconds["rebuild_seconds"] = await asyncio.to_thread(rebuild, store, dropped, s, self._log)
        await self._finish(report)
        return report

    def _may_refresh(self) -> bool:
        """Maintenance re-embeds changed chunks after the missing ones, unless stopped, failed or capped."""
        return prepare.refresh_wanted(self.s) and not self.halt.halted and not self.claimer.capped

    async def _finish(self, report: RunReport) -> None:
        """Counts into the report, the end state decided, the run's row closed, the summary line."""
        store = self.store
        counts_into(report, self.client, self.worker, self.claimer, self.recorder)
        await self._record_silent_window(report.run_id)
        try:
            report.remaining = await self.db.call("store", lambda _c: prepare.count_remaining(store, self.s))
        except (Fatal, DatabaseError) as exc:  # the database (or the table) is gone: report what is known
            self.halt.fail(exc if isinstance(exc, Fatal) else Fatal("error", self._clean(str(exc))))
            report.remaining = max(self.total - report.embedded - report.failed, 0)
        fatal = self.halt.fatal
        end = end_state(
            RunCounts(
                remaining=report.remaining,
                failed=report.failed,
                claimed=self.claimer.claimed,
                busy=len(self.claimer.busy),
                max_chunks=self.s.max_chunks,
                busy_wait_sec=self.s.busy_wait_sec,
                fatal_state=fatal.state if fatal else None,
                fatal_message=self._clean(str(fatal)) if fatal else "",
                stopped=self.halt.stop_requested,
                stop_reason=self.halt.reason,
            )
        )
        report.state, report.message = end.state, end.message
        report.locked, report.stop_reason = end.locked, end.stop_reason
        await record_end(report, store, self.db, self.client.server_states(), self._log)
        self.reporter.finish()
        self._log(report.summary())

    async def _record_silent_window(self, run_id: int | None) -> None:
        """A silent cutter found: earlier vectors of texts that long may be suspect (status, --reembed-cut)."""
        worker = self.worker
        if worker.silent_found_at is None or not worker.window.tokens or worker.silent_found_at == self._recorded:
            return
        found = {"tokens": worker.window.tokens, "found_at": worker.silent_found_at}
        with contextlib.suppress(Fatal, DatabaseError):
            await self.db.call(
                "store",
                lambda _c: self.store.record_trust("silent_window", found, run_id=run_id, model=self.client.model),
            )
            self._recorded = worker.silent_found_at

    # ------------------------------------------------------------ the pipeline
    async def _pipeline(self, report: RunReport) -> None:
        await self.db.open("claim", "write")
        tuning = self.client.tuning
        workers_n = tuning.max_workers  # self-tuning: at most total-depth of them hold a batch (client.turn)
        # Claimed batches waiting for a worker: enough that no server waits on a claim, few enough that this run
        # holds no more chunks than it is about to send (other runs on the same table claim the rest).
        prefetch = workers_n if not tuning.auto else tuning.servers + 1
        todo: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=prefetch)
        done: asyncio.Queue[Embedded | None] = asyncio.Queue(maxsize=workers_n * 2)
        try:
            producer = asyncio.create_task(self._produce(todo, workers_n))
            workers = [asyncio.create_task(self._work(todo, done, report)) for _ in range(workers_n)]
            writer = asyncio.create_task(self._write(done, report))
            await producer
            await asyncio.gather(*workers)
            await done.put(None)
            await writer
        finally:
            await self.db.close("claim", "write")  # a closed session releases every claim it held
            self.claimer.forget_all()

    async def _watch_stop(self) -> None:
        """Stop file and run window read twice a second, so that a stop reaches workers waiting for servers."""
        while not self.halt.halted and not self.halt.stopping():
            await self.halt.sleep(0.5)

    async def _should_stop(self) -> bool:
        return await self.halt.should_stop(lambda: self.db.call("run", self.store.run_signal, self.writer.run_id))

    async def _produce(self, todo: asyncio.Queue[Batch | None], workers_n: int) -> None:
        try:
            await self.claimer.produce(todo.put, self._should_stop)
        except Fatal as exc:
            self.halt.fail(exc)
        except Exception as exc:  # noqa: BLE001 - reported as the run's end state
            self._unexpected("claim loop", exc)
        finally:
            for _ in range(workers_n):
                await todo.put(None)

    async def _work(
        self, todo: asyncio.Queue[Batch | None], done: asyncio.Queue[Embedded | None], report: RunReport
    ) -> None:
        async def emit(outcome: Embedded | Isolated) -> None:
            if isinstance(outcome, Isolated):
                await self.recorder.record(outcome, report.run_id)
            else:
                await done.put(outcome)

        while True:
            async with self.client.turn():  # no more workers hold a batch than the servers' depths take
                batch = await todo.get()
                if batch is None:
                    return
                if self.halt.stopping():  # not sent: the claims go back untouched for the next run
                    await self._release_quietly(batch.ids)
                    continue
                try:
                    await self.worker.embed(batch, emit)
                except StopWhileWaiting:  # stopping while the servers are held or out: the batch goes back unsent
                    await self._release_quietly(batch.ids)
                except Fatal as exc:
                    self.halt.fail(exc)
                    await self._release_quietly(batch.ids)
                except Exception as exc:  # noqa: BLE001 - reported as the run's end state
                    self._unexpected("embedding worker", exc)
                    await self._release_quietly(batch.ids)

    async def _write(self, done: asyncio.Queue[Embedded | None], report: RunReport) -> None:
        claimer = self.claimer
        while (item := await done.get()) is not None:
            if self.halt.fatal is not None and self.halt.fatal.state == "database_unavailable":
                continue  # drain: nothing can be written, the claims die with the sessions
            keep = [k for k, cid in enumerate(item.ids) if cid in claimer.held]
            if len(keep) < len(item.ids):  # claims lost in a reconnect: another run owns those chunks now
                item = item.keep(keep)
            refresh = claimer.phase == "refresh"
            try:
                written = await self.writer.write(item, claimer.md5s(item.ids), refresh)
                for chunk in written.refused:
                    await self.recorder.record(chunk, report.run_id)
                claimer.release_soon(item.ids)
            except (ModelMismatch, RunReleased) as exc:  # the column changed model, or an operator released the run
                self.halt.fail(Fatal("released" if isinstance(exc, RunReleased) else "model_changed", str(exc)))
                continue
            except Fatal as exc:
                self.halt.fail(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - reported as the run's end state
                self._unexpected("writer", exc)
                continue
            if written.locked and not refresh:
                claimer.busy.update(written.locked)
            report.context_cut += written.cut
            report.pooled += written.pooled
            if refresh:
                report.refreshed += written.written
            else:
                report.embedded += written.written
            self._progress(report)
        await self._release_quietly(settle=True)  # the last writes' claims are given back before the sessions close

    async def _release_quietly(self, ids: list[int] | None = None, settle: bool = False) -> None:
        """Release on a failing run's way out (or settle the writes' releases), never hiding the first error."""
        try:
            await (self.claimer.settle() if settle else self.claimer.release(ids or []))
        except Fatal as exc:
            self.halt.fail(exc)

    def _unexpected(self, where: str, exc: BaseException) -> None:
        """A bug or an unforeseen error in one stage stops the run cleanly instead of hanging the others."""
        if self.halt.fatal is None:
            gone = self.store.vanished(exc)  # the table dropped or renamed under the run: state table_gone
            message = gone or f"unexpected error in the {where}: {type(exc).__name__}: {exc}"
            self.halt.fail(Fatal("table_gone" if gone else "error", self._clean(message)))

    # ------------------------------------------------------------ reporting
    def _progress(self, report: RunReport) -> None:
        failed, note = self.recorder.failed, servers_note(self.client.server_states())
        figures = progress_figures(report.embedded, failed, self.total, time.perf_counter() - self.started, note)
        self.reporter.progress(figures, self.writer.batches % self.s.report_every == 0)

    def _clean(self, message: str) -> str:
        return redact(message, self._secrets)


def counts_into(
    report: RunReport, client: Embedder, worker: EmbedWorker, claimer: Claimer, recorder: FailureRecorder
) -> None:
    """What the stages counted, into the run's report."""
    report.requests = client.stats.requests
    report.tuning = client.tuning.snapshot()
    report.servers = client.server_states()
    report.failed, report.failed_ids = recorder.failed, recorder.failed_ids
    report.skipped_busy = claimer.skipped_busy
    if worker.pooler is not None:
        report.pieces = worker.pooler.pieces
    report.server_truncated = worker.server_truncated
    report.fit_searches, report.fit_requests, report.fit_found = (
        worker.fit_searches,
        worker.fit_requests,
        worker.fit_found,
    )


def progress_figures(embedded: int, failed: int, total: int, elapsed: float, note: str) -> Progress:
    """Rate and ETA of a run so far (the total grows when more chunks came than were counted at the start)."""
    rate = embedded / max(elapsed, 1e-9)
    total = max(total, embedded + failed)
    left = max(total - embedded - failed, 0)
    return Progress(embedded, failed, total, rate, left / rate if rate > 0 else float("inf"), note)


def describe_tuning(tuning: Tuning) -> str:
    depth = "self-tuning depth per server (from 1)" if tuning.auto else f"{tuning.pinned_depth} in flight per server"
    if tuning.target_sec is not None:
        return f"polite: batch {tuning.max_batch} at most, sized to {tuning.target_sec:g} s per request, {depth}"
    return f"batch {tuning.max_batch} at most (halved on trouble, grown back on success), {depth}"
