"""Why a run ends early: a stop request (stop file, database request, signal, run window) or a fatal error.

One object owns that state; every stage asks it before new work. A stop lets the work in flight finish and be
written; a fatal error (errors.Fatal) is kept as the first one seen, the one the run's end state reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from wiki_embeddings.core.backfill.errors import Fatal

DB_STOP_CHECK_EVERY_SEC = 1.0  # how often the database's stop request is read (one cheap query)


class Halt:
    """The run's brake: stop requests and the first fatal error; time comes from injectable clocks."""

    def __init__(
        self,
        stop_file: Path | None = None,
        deadline: tuple[float, str] | None = None,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.event = asyncio.Event()  # set by any stop request
        self.reason = ""
        self.fatal: Fatal | None = None
        self.stop_file = stop_file
        self.deadline = deadline  # (epoch seconds, why): --until / --max-minutes (core/window.py)
        self._wall = wall
        self._monotonic = monotonic
        self._last_db_check = float("-inf")

    @property
    def stop_requested(self) -> bool:
        return self.event.is_set()

    @property
    def halted(self) -> bool:
        return self.event.is_set() or self.fatal is not None

    def request_stop(self, reason: str) -> None:
        """Stop after the work in flight: the first reason given is the one reported."""
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    def fail(self, fatal: Fatal) -> None:
        """Record a fatal error; the first one is the run's end state - unless an operator released the run, which
        explains whatever else it saw (a released run wakes to timeouts and lost sessions)."""
        if self.fatal is None or (fatal.state == "released" and self.fatal.state != "released"):
            self.fatal = fatal

    def stopping(self) -> bool:
        """Cheap check before each new request (no database round trip): stop file and run window included."""
        if self.halted:
            return True
        if self.stop_file is not None and os.path.lexists(self.stop_file):
            self.request_stop(f"stop file {self.stop_file}")
            return True
        if self.deadline is not None and self._wall() >= self.deadline[0]:
            self.request_stop(self.deadline[1])
            return True
        return False

    async def should_stop(self, stop_in_database: Callable[[], Awaitable[bool | str]]) -> bool:
        """`stopping()`, plus the database's word, read at most once a second (runs on other machines): a stop
        request (True or "stop"), or "released": an operator released this run (`wiki-embeddings runs release`)
        (a stalled run, or a running one with --force), so it ends at once without writing (`released`, a fatal end)."""
        if self.stopping():
            return True
        now = self._monotonic()
        if now - self._last_db_check >= DB_STOP_CHECK_EVERY_SEC:
            self._last_db_check = now
            heard = await stop_in_database()
            if heard == "released":
                self.fail(Fatal("released", "released by an operator (`wiki-embeddings runs release`)"))
                return True
            if heard:
                self.request_stop("stop request in the database")
                return True
        return False

    async def sleep(self, seconds: float) -> None:
        """Sleep, waking early on a stop request."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), seconds)
