"""Database calls that survive (core/backfill/dbcalls.py): a lost connection reconnected and its claims re-taken, a
call past its deadline abandoned, a database gone too long, a stop during a call that hangs. Real threads and
tiny real timeouts, fake connections. On real PostgreSQL: integration/test_faults_database.py (restarts, a database
gone too long), test_faults_round_two.py (a black-holed network, SIGTERM while the database does not answer)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from wiki_embeddings.core.backfill import dbcalls
from wiki_embeddings.core.backfill.claimer import Claimer
from wiki_embeddings.core.backfill.dbcalls import DbCalls
from wiki_embeddings.core.backfill.errors import Fatal
from wiki_embeddings.core.backfill.halt import Halt
from wiki_embeddings.core.db import DatabaseUnavailable
from wiki_embeddings_tests.unit.fakes import FakeClaimStore, FakeClock, run, settings


class Conn:
    """A pipeline connection as DbCalls sees one."""

    def __init__(self, name: str):
        self.name = name
        self.closed = False
        self.broken = False

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return self.name


class ConnStore:
    """What DbCalls asks of the store: fresh pipeline connections (`down`: none can be opened)."""

    def __init__(self) -> None:
        self.opened: list[Conn] = []
        self.down = False

    def connect(self, *, statement_timeout_sec: float, application_name: str | None = None) -> Conn:
        if self.down:
            raise DatabaseUnavailable("connection refused")
        conn = Conn(f"conn{len(self.opened)}")
        self.opened.append(conn)
        return conn

    def forget_connection(self) -> None:
        pass


def calls(store: ConnStore, halt: Halt, reconnect_sec: float = 5.0, **kwargs: Any) -> tuple[DbCalls, list[str]]:
    lines: list[str] = []
    db = DbCalls(
        store,  # type: ignore[arg-type]
        halt,
        statement_timeout_sec=1.0,
        reconnect_sec=reconnect_sec,
        backoff_base_sec=0.001,
        log=lines.append,
        **kwargs,
    )
    return db, lines


def lost_once(conn: Conn) -> str:
    """A statement that finds the first session gone (a server restart) and works on any later one."""
    if conn.name == "conn0":
        conn.broken = True
        raise DatabaseUnavailable("server closed the connection unexpectedly")
    return f"answered on {conn.name}"


def test_a_lost_connection_is_reconnected_and_the_claims_it_held_are_taken_again():
    claims = FakeClaimStore({i: f"chunk {i}" for i in range(1, 5)})
    store = ConnStore()

    async def scenario() -> tuple[str, set[int]]:
        db, lines = calls(store, Halt())
        claimer = Claimer(claims, db.call, settings(batch_size=8), lambda: 8)
        db.on_reconnect["claim"] = functools.partial(claimer.retake, db.thread)
        await db.open("claim")

        async def put(_batch: object) -> None:
            pass

        async def never() -> bool:
            return False

        await claimer.produce(put, never)  # holds 1-4 on conn0
        claims.taken_while_away = {4}  # another run took chunk 4 while this one was away
        answer = await db.call("claim", lost_once)
        assert lines == ["database connection lost (DatabaseUnavailable); reconnecting in 0.0 s"]
        await db.close("claim")
        db.shut()
        return answer, claimer.held

    answer, held = run(scenario())
    assert answer == "answered on conn1"
    relocks = [kw for name, kw in claims.calls if name == "relock"]
    assert [(kw["ids"], kw["conn"].name) for kw in relocks] == [([1, 2, 3, 4], "conn1")]  # on the fresh session
    assert held == {1, 2, 3}
    assert store.opened[0].closed  # the lost one is closed once no stage can be inside it


def test_a_call_past_its_deadline_abandons_its_connection_and_goes_on_with_a_fresh_one():
    store = ConnStore()
    released = threading.Event()

    def black_holed_once(conn: Conn) -> str:
        if conn.name == "conn0":
            released.wait(10)  # a network that went silent: no answer, no error
        return f"answered on {conn.name}"

    async def scenario() -> tuple[str, float]:
        db, _ = calls(store, Halt())
        db.deadline_sec = 0.1  # statement_timeout + margin, shortened for the test
        await db.open("claim")
        began = time.monotonic()
        answer = await db.call("claim", black_holed_once)
        took = time.monotonic() - began
        await db.close("claim")
        db.shut()
        return answer, took

    try:
        answer, took = run(scenario())
    finally:
        released.set()
    assert answer == "answered on conn1" and took < 2.0
    assert not store.opened[0].closed  # abandoned, never touched again: its thread may still be inside it
    assert store.opened[1].closed


def test_a_database_gone_longer_than_reconnect_sec_ends_the_run_database_unavailable():
    store = ConnStore()
    clock = FakeClock()
    attempts: list[float] = []

    def gone(conn: Conn) -> None:
        attempts.append(clock.now)
        clock.advance(1.0)  # each try takes a second of the run's clock
        store.down = True
        conn.broken = True
        raise DatabaseUnavailable("could not connect to server: Connection refused\nIs the server running?")

    async def scenario() -> None:
        db, _ = calls(store, Halt(), reconnect_sec=2.5, monotonic=clock.monotonic)
        await db.open("write")
        try:
            await db.call("write", gone)
        finally:
            db.shut()

    with pytest.raises(Fatal) as ended:
        run(scenario())
    assert ended.value.state == "database_unavailable"
    assert str(ended.value) == (
        "lost the database connection and could not reconnect within 2.5 s: could not connect to server: "
        "Connection refused"
    )
    assert len(attempts) == 3  # at 0, 1 and 2 s into the window; the third failure is past it


def hanging(release: threading.Event) -> Callable[[Conn], str]:
    def call(_conn: Conn) -> str:
        release.wait(10)
        return "late"

    return call


def test_a_stop_request_cuts_a_hanging_call_to_the_grace_and_ends_the_run_stopped(monkeypatch):
    monkeypatch.setattr(dbcalls, "DB_STOP_GRACE_SEC", 0.05)
    release = threading.Event()

    async def scenario() -> float:
        halt = Halt()
        db, _ = calls(ConnStore(), halt)
        await db.open("write")
        began = time.monotonic()
        call = asyncio.ensure_future(db.call("write", hanging(release)))
        await asyncio.sleep(0.02)
        halt.request_stop("SIGTERM")
        try:
            await call
        finally:
            db.shut()
        return time.monotonic() - began

    try:
        with pytest.raises(Fatal) as ended:
            run(scenario())
    finally:
        release.set()
    assert ended.value.state == "stopped"
    assert "stopped on request (SIGTERM) while the database did not answer" in str(ended.value)


def test_a_call_that_answers_within_the_grace_after_a_stop_keeps_its_answer():
    async def scenario() -> str:
        halt = Halt()
        db, _ = calls(ConnStore(), halt)
        await db.open("write")

        def slow(_conn: Conn) -> str:
            time.sleep(0.1)
            return "written"

        call = asyncio.ensure_future(db.call("write", slow))
        await asyncio.sleep(0.02)
        halt.request_stop("stop file")  # the batch in flight is still written
        try:
            return await call
        finally:
            db.shut()

    assert run(scenario()) == "written"
