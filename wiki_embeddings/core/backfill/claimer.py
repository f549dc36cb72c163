"""The claimer: which chunks this run takes next, and which it holds.

It walks the table by keyset (`id > last`) over the chunks still missing (phase "missing"), then retries the
chunks another session held (phase "busy"), then, for maintenance, the chunks whose text changed (phase
"refresh"). Each claim is a session-level lock in the database that dies with the session: `held` is what this
run holds now, re-taken after a reconnect. Chunks held elsewhere are never skipped for good: they are retried
until free or `busy_wait_sec` has passed (then the run ends `locked`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from wiki_embeddings.core.backfill.outcomes import Batch
from wiki_embeddings.core.db import Claim
from wiki_embeddings.core.text import clean_text
from wiki_embeddings.settings import Settings

#: Each claim is a session-level advisory lock, and PostgreSQL's lock table (max_locks_per_transaction x
#: max_connections: 6,400 by default) is shared by every session of the server: a run holds at most this many claims
#: (more wait for writes), so that fast servers cannot fill it ("out of shared memory") and three runs fit beside it.
MAX_HELD_CLAIMS = 2048
BUSY_RETRY_SEC = 0.05  # pause before chunks held elsewhere are claimed again, for the first BUSY_RETRY_FAST_SEC
BUSY_RETRY_FAST_SEC = 2.0
BUSY_RETRY_MAX_SEC = 1.0  # the longest pause after that


class ClaimStore(Protocol):
    """The store's claim statements (core/db/claims.py); each takes the claim session's connection first."""

    @property
    def claim(self) -> Callable[..., Claim]: ...
    @property
    def claim_changed(self) -> Callable[..., Claim]: ...
    @property
    def claim_ids(self) -> Callable[..., Claim]: ...
    @property
    def release(self) -> Callable[..., None]: ...
    @property
    def relock(self) -> Callable[..., list[int]]: ...


Call = Callable[..., Awaitable[Any]]  # DbCalls.call: (role, fn, *args, **kwargs) -> fn's result
Put = Callable[[Batch], Awaitable[None]]


def busy_pause(waited: float) -> float:
    """Most busy chunks are another run's batch in flight, free within a request's time: asked again soon at
    first; chunks held longer (a colliding claim key, a long transaction) are asked about less and less often."""
    return BUSY_RETRY_SEC if waited < BUSY_RETRY_FAST_SEC else min(waited / 2, BUSY_RETRY_MAX_SEC)


class Claimer:
    """Claims batches for one run; owns what the run holds, what was busy, and how far each pass got."""

    def __init__(
        self,
        store: ClaimStore,
        call: Call,
        settings: Settings,
        batch_limit: Callable[[], int],
        *,
        log: Callable[[str], None] = lambda _line: None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.store = store
        self.call = call
        self.s = settings
        self.run_id: int | None = None  # the run claiming (set once started): its own cut rows are not redone
        self.batch_limit = batch_limit  # the tuning's current batch size (trouble and polite mode shrink it)
        self._log = log
        self._monotonic = monotonic
        self._sleep = sleep
        self.phase = "missing"  # then "busy" (chunks held elsewhere, retried), "refresh" (text changed)
        self.held: set[int] = set()  # chunk ids this run has claimed and not yet released
        self._released = asyncio.Event()  # set when claims are released: a producer waiting for room looks again
        self.md5: dict[int, str] = {}  # md5 of the whole text of each held chunk, as claimed
        self.busy: set[int] = set()  # chunks another session held (claim key or row lock): retried at the end
        self._unlocking: list[int] = []  # written chunks whose claims the claim lane has yet to give back
        self._unlocker: asyncio.Task[None] | None = None
        self._unlock_error: BaseException | None = None  # a failed release_soon, raised by the next one or settle
        self.claimed = 0
        self.skipped_busy = 0
        self.changed_found = 0  # refresh pass: changed chunks the content scan found
        self.scan_complete = False

    # ------------------------------------------------------------ passes
    def begin(self, phase: str) -> None:
        self.phase = phase
        self.scan_complete = False
        if phase == "refresh":
            self.changed_found = 0

    @property
    def capped(self) -> bool:
        """--max-chunks reached: a capped run (maintenance) took its share."""
        return self.s.max_chunks is not None and self.claimed >= self.s.max_chunks

    async def produce(self, put: Put, should_stop: Callable[[], Awaitable[bool]]) -> None:
        """Claim batches of the current pass and `put` each, until the pass is done, capped or stopped."""
        if self.phase == "busy":
            await self._produce_busy(put, should_stop)
            return
        after_id: int | None = None
        refresh = self.phase == "refresh"
        while not await should_stop():
            if not await self._room(should_stop):
                return
            limit = min(self.s.batch_size, self.batch_limit())
            if self.s.max_chunks is not None:
                limit = min(limit, self.s.max_chunks - self.claimed)
                if limit <= 0:
                    return
            claim: Claim = await self.call(
                "claim",
                self.store.claim_changed if refresh else self.store.claim,
                after_id=after_id,
                limit=limit,
                max_chars=self.s.max_chars,
                id_min=self.s.id_min,
                id_max=self.s.id_max,
                mode=self.mode,
                max_attempts=self.s.max_attempts,
                **(
                    {"include_cut": True, "include_pooled": self.s.long_text == "cut", "run_id": self.run_id}
                    if refresh and self.s.reembed_cut
                    else {}
                ),
            )
            if claim.last_scanned_id is None:
                self.scan_complete = True
                return
            after_id = claim.last_scanned_id
            self.skipped_busy += claim.busy
            if self.phase == "missing":
                self.busy.update(claim.busy_ids)
            if refresh:
                self.changed_found += claim.found
            await self._take(claim, put)

    async def _produce_busy(self, put: Put, should_stop: Callable[[], Awaitable[bool]]) -> None:
        """Claim again the chunks that were busy; those still held stay in `busy` for the next round.

        Each claim looks at every pending id and takes the first batch of those still missing, so ids that other
        runs embedded meanwhile (most of them, at the end of a shared bootstrap) cost no round trip of their own.
        """
        pending = sorted(self.busy)
        self.busy.clear()
        if self.s.max_chunks is not None:
            pending = pending[: max(self.s.max_chunks - self.claimed, 0)]
        while pending:
            if await should_stop() or not await self._room(should_stop):
                self.busy.update(pending)
                return
            claim: Claim = await self.call(
                "claim",
                self.store.claim_ids,
                pending,
                max_chars=self.s.max_chars,
                mode=self.mode,
                max_attempts=self.s.max_attempts,
                limit=self.s.batch_size,
            )
            if claim.last_scanned_id is None:
                return  # none of them is missing any more
            self.busy.update(claim.busy_ids)
            await self._take(claim, put)
            last = claim.last_scanned_id
            pending = [cid for cid in pending if cid > last]

    async def _room(self, should_stop: Callable[[], Awaitable[bool]]) -> bool:
        """Wait while this run holds MAX_HELD_CLAIMS claims (writes release them); False if the run stops meanwhile."""
        while len(self.held) + len(self._unlocking) >= MAX_HELD_CLAIMS:
            if await should_stop():
                return False
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), 0.5)
        return True

    async def _take(self, claim: Claim, put: Put) -> None:
        if claim.rows or claim.invalid:
            batch = Batch([(cid, clean_text(text)) for cid, text in claim.rows], claim.invalid)
            self.claimed += len(batch.ids)
            self.held.update(batch.ids)
            self.md5.update(claim.text_md5)
            await put(batch)

    async def wait_busy(self, run_pass: Callable[[], Awaitable[None]], halted: Callable[[], bool]) -> None:
        """Run busy passes (`run_pass`) until no chunk is busy, the run halts or `busy_wait_sec` has passed."""
        if self.capped:
            self.busy.clear()  # a capped run (maintenance) took its share: the rest is another run's business
            return
        began = self._monotonic()
        deadline = began + self.s.busy_wait_sec
        while self.busy and not halted():
            self.begin("busy")
            await run_pass()
            now = self._monotonic()
            if not self.busy or now >= deadline:
                break
            await self._sleep(min(busy_pause(now - began), max(deadline - now, 0)))
        self.phase = "missing"

    # ------------------------------------------------------------ what the run holds
    @property
    def mode(self) -> str:
        if self.s.retry_failed:
            return "retry_failed"
        return "all" if self.s.include_quarantined else "normal"

    def md5s(self, ids: list[int]) -> list[str] | None:
        """The claimed texts' md5s (a write only lands if the text is still the one claimed); None if any is unknown."""
        found = [self.md5.get(i) for i in ids]
        return None if any(m is None for m in found) else [m for m in found if m is not None]

    async def release(self, ids: list[int]) -> None:
        if mine := self._forget(ids):
            await self.call("claim", self.store.release, mine)

    def release_soon(self, ids: list[int]) -> None:
        """Give back a written batch's claims without waiting: the writer goes on to the next write while the claim
        lane unlocks (releases that queue up go as one call). Its chunks hold their vectors, so no other run claims
        them meanwhile. A failure is raised by the next call here or by `settle`."""
        self._raise_unlock_error()
        if mine := self._forget(ids):
            self._unlocking.extend(mine)
            if self._unlocker is None or self._unlocker.done():
                self._unlocker = asyncio.create_task(self._unlock())

    async def settle(self) -> None:
        """Wait for the releases `release_soon` queued (the run's end); raises what one of them met."""
        if self._unlocker is not None:
            await self._unlocker
        self._raise_unlock_error()

    async def _unlock(self) -> None:
        while self._unlocking:
            ids, self._unlocking = self._unlocking, []
            try:
                await self.call("claim", self.store.release, ids)
            except Exception as exc:  # noqa: BLE001 - handed to the writer (Fatal included), never lost in a task
                self._unlock_error, self._unlocking = exc, []
            self._released.set()

    def _raise_unlock_error(self) -> None:
        if (error := self._unlock_error) is not None:
            self._unlock_error = None
            raise error

    def _forget(self, ids: list[int]) -> list[int]:
        """Drop `ids` from what this run holds; returns those it held."""
        mine = [i for i in ids if i in self.held]
        self.held.difference_update(mine)
        self._released.set()
        for i in mine:
            self.md5.pop(i, None)
        return mine

    async def retake(self, call_on_fresh: Callable[..., Awaitable[Any]], fresh: Any) -> None:
        """After a reconnect the claims died with the old session: take them again; chunks another run took
        meanwhile are dropped from this run."""
        if not self.held:
            return
        wanted = sorted(self.held)
        held = await call_on_fresh(self.store.relock, fresh, wanted)
        gone = set(wanted) - set(held)
        if gone:
            self._log(f"{len(gone)} claimed chunks were taken by another run while reconnecting; skipping them")
        self.held -= gone

    def forget_all(self) -> None:
        """The claim session was closed (which releases every claim it held)."""
        self.held.clear()
        self._released.set()
        self.md5.clear()
