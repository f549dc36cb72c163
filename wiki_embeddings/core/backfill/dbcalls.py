"""Database calls that survive a lost connection, a black-holed network and a stop request.

Each pipeline role (run, claim, write; "store" is the store's own connection) has its connection and one daemon
thread that runs its calls in order. Every call has a client-side deadline (the server's statement_timeout plus a
margin): a black-holed network never answers, and no kernel keepalive fires through a user-space proxy. A call
past its deadline is abandoned with its connection (its thread is a daemon: it can never hold the process) and
handled as a lost connection: reconnected with backoff for up to `reconnect_sec`, after which the run ends
`database_unavailable`. A stop request cuts any wait to a short grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from wiki_embeddings.core.backfill.errors import Fatal, NoAnswer
from wiki_embeddings.core.backfill.halt import Halt
from wiki_embeddings.core.db import DatabaseUnavailable, Store
from wiki_embeddings.core.errors import first_line

DB_RECONNECT_MAX_DELAY_SEC = 5.0
DB_CLIENT_MARGIN_SEC = 5.0  # the client-side deadline of a database call: statement_timeout + this
DB_STOP_GRACE_SEC = 3.0  # after a stop request, how long a database call may still take before it is abandoned


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


class Lane:
    """One daemon thread that runs the calls on one connection in order, as futures of the running loop.

    A thread per call costs a thread start on every database call of every batch; a lane is started once per
    connection. A call that never answers leaves its lane stuck inside it: the lane is abandoned with its
    connection and the reconnected role gets a new one.
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


Retake = Callable[[Any], Awaitable[None]]


class DbCalls:
    """The run's database sessions by role, and every call made on them."""

    def __init__(
        self,
        store: Store,
        halt: Halt,
        *,
        statement_timeout_sec: float,
        reconnect_sec: float,
        backoff_base_sec: float,
        log: Callable[[str], None],
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.halt = halt
        self.statement_timeout_sec = statement_timeout_sec
        self.reconnect_sec = reconnect_sec
        self.backoff_base_sec = backoff_base_sec
        self.deadline_sec = statement_timeout_sec + DB_CLIENT_MARGIN_SEC
        self._log = log
        self._monotonic = monotonic
        self.conns: dict[str, Any] = {}
        # What a role's session held that a fresh session must take again (the run lock, the claims).
        self.on_reconnect: dict[str, Retake] = {}
        self._retired: list[Any] = []  # lost connections, closed when no stage can be using them any more
        self._abandoned: set[Any] = set()  # connections whose call never answered: never touched again
        self._lanes: dict[Any, Lane] = {}  # each connection's worker thread (the store's: "store")
        self._stop_waiter: tuple[asyncio.Event, asyncio.Future] | None = None
        self._silent = False  # a call went unanswered after a stop request: later calls get no grace
        self._reconnecting: dict[str, asyncio.Lock] = {}
        self.application_name: str | None = None  # once the run is recorded: its sessions carry its name

    def connect(self) -> Any:
        """A pipeline connection: statement_timeout and lock_timeout set, keepalives on (core/db/connection.py),
        named after the run once it is recorded (`runs release` ends the run's sessions by that name)."""
        return self.store.connect(
            statement_timeout_sec=self.statement_timeout_sec, application_name=self.application_name
        )

    async def open(self, *roles: str) -> None:
        """Open the roles' connections at once (each takes a few ms that the first batch would otherwise wait)."""
        opened = await asyncio.gather(*(asyncio.to_thread(self.connect) for _ in roles), return_exceptions=True)
        for role, conn in zip(roles, opened, strict=True):
            if not isinstance(conn, BaseException):
                self.conns[role] = conn  # closed with the run's other connections if another failed
        for conn in opened:
            if isinstance(conn, BaseException):
                raise conn

    async def call(self, role: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn(conn, ...)` on the role's connection in its thread; on a lost connection, reconnect with backoff.

        A write is repeat-safe (it only fills rows still missing), so it is simply tried again; a claim session's
        locks die with it, so after reconnecting they are re-taken (`on_reconnect`).
        """
        delay = self.backoff_base_sec
        deadline = self._monotonic() + self.reconnect_sec
        while True:
            conn = self.conns.get(role) if role != "store" else None
            try:
                return await self.answer(self._lane(conn).submit(fn, conn, *args, **kwargs))
            except (DatabaseUnavailable, NoAnswer) as exc:  # (the store's own connection reopens itself)
                if isinstance(exc, NoAnswer):
                    self._abandon(conn)
                if self._monotonic() >= deadline:
                    raise Fatal(
                        "database_unavailable",
                        f"lost the database connection and could not reconnect within {self.reconnect_sec:g} s: "
                        f"{first_line(exc)}",
                    ) from exc
                self._log(f"database connection lost ({type(exc).__name__}); reconnecting in {delay:.1f} s")
                await self.halt.sleep(delay)
                delay = min(delay * 2, DB_RECONNECT_MAX_DELAY_SEC)
                if conn is not None and (conn.closed or conn.broken or conn in self._abandoned):
                    await self._reconnect(role, conn)

    async def thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on a fresh daemon thread under the call deadline (calls that belong to no role)."""
        return await self.answer(in_daemon_thread(fn, *args))

    async def answer(self, call: asyncio.Future) -> Any:
        """The call's result within its deadline; a stop request cuts the wait to a short grace."""
        stop = self._waiter()
        done, _ = await asyncio.wait({call, stop}, timeout=self.deadline_sec, return_when="FIRST_COMPLETED")
        if call not in done and stop in done:
            # Once one call went unanswered after a stop, the database is taken as silent: no more graces.
            grace = 0.2 if self._silent else DB_STOP_GRACE_SEC
            done, _ = await asyncio.wait({call}, timeout=grace)
            if call not in done:
                call.cancel()
                self._silent = True
                raise Fatal(
                    "stopped",
                    f"stopped on request ({self.halt.reason}) while the database did not answer for "
                    f"{DB_STOP_GRACE_SEC:g} s; the chunks in flight stay missing and a re-run takes them",
                )
        if call not in done:
            call.cancel()
            raise NoAnswer(f"no answer from the database within {self.deadline_sec:g} s (client deadline)")
        return call.result()

    def forget_store_connection(self) -> None:
        """The store's own connection did not answer: its lane is dropped and the store reconnects next time."""
        self._abandon(None)

    async def close(self, *roles: str) -> None:
        """Close the roles' connections and every retired one (closing a session releases its claims).
        Abandoned ones (a call never answered) are left to the process's exit."""
        conns = [self.conns.pop(role) for role in roles if role in self.conns] + self._retired
        self._retired = []
        for conn in conns:
            lane = self._lanes.pop(conn, None)
            if lane is not None:
                lane.close()
            if conn in self._abandoned:
                continue
            with contextlib.suppress(Exception):
                await self.answer(in_daemon_thread(conn.close))

    def shut(self) -> None:
        """At the run's very end: every lane's thread ends, the shared stop waiter is cancelled."""
        for lane in self._lanes.values():
            lane.close()
        self._lanes.clear()
        if self._stop_waiter is not None:
            self._stop_waiter[1].cancel()
            self._stop_waiter = None

    def _waiter(self) -> asyncio.Future:
        """One task waiting on the stop event, shared by every call's wait (a task per call costs CPU per batch)."""
        event, loop = self.halt.event, asyncio.get_running_loop()
        if self._stop_waiter is not None:
            waited, waiter = self._stop_waiter
            if waited is event and waiter.get_loop() is loop:
                return waiter
            waiter.cancel()
        waiter = asyncio.ensure_future(event.wait())
        self._stop_waiter = (event, waiter)
        return waiter

    def _abandon(self, conn: Any) -> None:
        """A connection whose call never answered is dropped, never closed (its thread may be inside it)."""
        lane = self._lanes.pop(conn if conn is not None else "store", None)
        if lane is not None:
            lane.close()  # the thread ends if that call ever returns
        if conn is not None:
            self._abandoned.add(conn)
        else:
            self.store.forget_connection()

    def _lane(self, conn: Any) -> Lane:
        """The worker thread of a pipeline connection (None: the store's own connection)."""
        key = conn if conn is not None else "store"
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane("wiki-embeddings-db")
        return lane

    async def _reconnect(self, role: str, lost: Any) -> None:
        """Replace the role's lost connection once, however many stages noticed; re-take what its session held.

        The lost connection is retired, not closed: another stage's thread may still be inside a call on it,
        and closing a socket under a thread that polls it can block that thread for good.
        """
        async with self._reconnecting.setdefault(role, asyncio.Lock()):
            if self.conns.get(role) is not lost:
                return  # another stage reconnected this role already
            try:
                fresh = await self.answer(in_daemon_thread(self.connect))
            except (DatabaseUnavailable, NoAnswer):
                return  # still down: the caller's loop waits and tries again
            if lost not in self._abandoned:
                self._retired.append(lost)
            self.conns[role] = fresh
            retake = self.on_reconnect.get(role)
            if retake is not None:
                with contextlib.suppress(DatabaseUnavailable, NoAnswer):
                    # lost again at once: the next call sees a broken connection and comes back here
                    await retake(fresh)
