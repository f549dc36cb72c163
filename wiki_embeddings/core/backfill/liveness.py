"""How a run shows it is alive and hears a signal: the heartbeat on its row, SIGINT/SIGTERM as a stop request."""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from collections.abc import Callable

from wiki_embeddings.core import spread
from wiki_embeddings.core.backfill.dbcalls import DbCalls, in_daemon_thread
from wiki_embeddings.core.backfill.errors import Fatal, NoAnswer
from wiki_embeddings.core.backfill.halt import Halt
from wiki_embeddings.core.backfill.report import RunReport
from wiki_embeddings.core.db import DatabaseError, Store
from wiki_embeddings.core.embedders import Embedder

HEARTBEAT_EVERY_SEC = 10.0  # the run's row is touched this often; `status` calls a run stalled past its lease
LEASE_CHECK_EVERY_SEC = 1.0  # how often the run asks whether its process lost a server's lease (core/spread.py)


async def heartbeats_of(
    report: RunReport,
    store: Store,
    db: DbCalls,
    client: Embedder,
    failed: Callable[[], int],
    started: float,
    halt: Halt,
) -> None:
    """Touch the run's row every HEARTBEAT_EVERY_SEC whatever the pipeline waits on: `status` tells a run that
    stopped doing so (a frozen process, a black-holed database) by its heartbeat, not by hope. Each beat also records
    the run's model servers (in the rotation or out, and why). A beat that finds the run released by an operator
    (`wiki-embeddings runs release`, while the process was frozen) ends the run: it writes nothing more. Between
    beats, every second: a server's lease lost to another run (core/spread.py) ends the run `server_unavailable`
    after what is in flight (a retry leases a free server)."""
    while True:
        await _sleep_watching_leases(HEARTBEAT_EVERY_SEC, halt)
        if report.run_id is None:
            continue
        elapsed = max(time.perf_counter() - started, 1e-9)
        beat = (report.run_id, report.embedded, failed(), report.embedded / elapsed, client.server_states())
        try:  # off the event loop: the embed workers keep the server busy meanwhile
            if not await db.answer(in_daemon_thread(store.heartbeat_run, *beat)):
                halt.fail(Fatal("released", released_message(report.run_id)))
        except NoAnswer:
            store.forget_connection()
        except (DatabaseError, Fatal):
            store.close()  # the next bookkeeping call reconnects


async def _sleep_watching_leases(seconds: float, halt: Halt) -> None:
    """Sleep `seconds`, asking every LEASE_CHECK_EVERY_SEC whether this process lost one of its servers' leases."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(LEASE_CHECK_EVERY_SEC, left))
        lost = spread.lease_lost()
        if lost is not None and halt.fatal is None:
            halt.fail(Fatal("server_unavailable", lost))


def install_signal_handlers(request_stop: Callable[[str], None]) -> list[Callable[[], object]]:
    """SIGINT and SIGTERM become stop requests (what is in flight is written); returns their removers."""
    loop = asyncio.get_running_loop()
    removers: list[Callable[[], object]] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, request_stop, signal.Signals(sig).name)
            removers.append(functools.partial(loop.remove_signal_handler, sig))
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    return removers


def released_message(run_id: int | None) -> str:
    return (
        f"run {run_id} was released by an operator (`wiki-embeddings runs release`): it ended without writing "
        "anything more; a new run takes its chunks"
    )


async def record_end(
    report: RunReport, store: Store, db: DbCalls, servers: list[dict[str, object]], log: Callable[[str], None]
) -> None:
    """Close the run's row with its end state. A run an operator released meanwhile keeps the row the release wrote
    and ends `released` (whatever else it saw on waking)."""
    run_id = report.run_id
    assert run_id is not None  # recorded before the pipeline started
    end = (report.state, report.embedded, report.failed, report.chunks_per_s, report.message, report.locked, servers)
    try:
        recorded = await db.call("store", lambda _c: store.finish_run(run_id, *end))
    except Fatal:
        log(
            "could not record the end of the run (database gone); status will show it as abandoned, or as "
            "stalled while the server keeps its session"
        )
        return
    if not recorded:
        report.state, report.message = "released", released_message(run_id)
