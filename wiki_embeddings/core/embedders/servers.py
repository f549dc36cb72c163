"""The model servers of one client, one object each: requests in flight, its endpoint generation, its counts.

`ServerPool` hands out a server for each request: round-robin among those with a free slot under their depth
(core/tuning.py decides the depths), or one named server (the canary goes back to the server that failed). It
also holds the turns: how many embed workers may hold a claimed batch at once (the servers' total depth, plus one
for each request waiting out a retry pause), so the run holds no more chunks than the servers are about to take.
No HTTP here: the embedder sends, the pool counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from wiki_embeddings.core import tuning as tune
from wiki_embeddings.core.embedders.base import ModelNotFound, ServerUnavailable, StopWhileWaiting
from wiki_embeddings.core.health import NO_MODEL, ServerHealth
from wiki_embeddings.settings import mask_url


@dataclass
class Server:
    """One model server as the client knows it."""

    url: str
    index: int
    active: int = 0  # our requests in flight there; at most its depth
    legacy: bool = False  # /api/embed answered 404: an older Ollama, use /api/embeddings
    reloading: bool = False  # its runner crashed: the model reloads, the next request has the load allowance
    crashes: int = 0  # runner crashes seen: a request in flight across one waited for a reload, not for an answer
    requests: int = 0
    _reload_lock: asyncio.Lock | None = field(default=None, repr=False)

    @property
    def reload_lock(self) -> asyncio.Lock:
        """Held by the one request that waits out a reload (with the load allowance); the others wait for it."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        return self._reload_lock

    @property
    def masked(self) -> str:
        return mask_url(self.url)


class Turns:
    """A semaphore whose limit can change: the embed workers that may hold a batch at once (the total depth, plus
    one for each request waiting out a retry pause)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self._waiters: list[asyncio.Future[None]] = []

    async def __aenter__(self) -> None:
        while self.active >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.active += 1

    async def __aexit__(self, *exc: object) -> None:
        self.active -= 1
        self.wake()

    def set_limit(self, limit: int) -> None:
        if limit != self.limit:
            self.limit = limit
            self.wake()

    def wake(self) -> None:
        for waiter in self._waiters[: max(self.limit - self.active, 0)]:
            if not waiter.done():
                waiter.set_result(None)


class ServerPool:
    """Which server takes the next request; created inside the running event loop (its futures bind to it).

    Round-robin among the servers in the rotation, past their backoff, with a free slot under their depth, and not
    one this request must still avoid (a retry waits out its own pause there: `avoid`); or one named server (a
    canary or a probe: asked whatever its standing, once the quiet it asked for with `Retry-After` is over). A
    request waiting out its pause is not at the server: while it waits, one more worker may hold a batch (the
    turns), so the server's slots do not idle behind it. While no server is in the rotation, the out ones are probed
    (core/health.py says when) and requests wait, for at most `server_wait_sec` (counted from the first Retry-After
    over the backoff ceiling where a server asked for one: core/health.py, away); a run whose servers never answered
    at all does not wait (a wrong URL fails at once).
    """

    def __init__(
        self,
        urls: list[str],
        tuning: tune.Tuning,
        probe: Callable[[Server], Awaitable[None]],
        *,
        server_wait_sec: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.servers = [Server(u, i) for i, u in enumerate(urls)]
        self.tuning = tuning
        self.turns = Turns(tuning.total_depth)
        self.server_wait_sec = server_wait_sec
        self._probe = probe
        self._clock = clock
        self._next = 0  # where the round-robin starts looking for a server with a free slot
        self._waiters: list[asyncio.Future[None]] = []
        self._probes: dict[int, asyncio.Task[None]] = {}
        self.pausing = 0  # requests waiting out a retry pause (each frees a turn meanwhile)
        self.stop_event: asyncio.Event | None = None  # set: a long wait for a server gives up (StopWhileWaiting)

    def health(self, server: Server) -> ServerHealth:
        return self.tuning.controls[server.index].health

    def pause(self, avoid: dict[int, float], server: Server, seconds: float) -> None:
        """This request waits `seconds` before it goes to `server` again (entered in its `avoid`)."""
        if seconds > 0:
            avoid[server.index] = self._clock() + seconds

    async def acquire(self, only: int | None = None, avoid: dict[int, float] | None = None) -> Server:
        """The next server for a request (server `only` when given; none of `avoid`, server -> until when, before
        its time); waits while none can take it."""
        pausing = False
        try:
            while True:
                if only is not None:
                    server = self.servers[only]
                    quiet = self.health(server).asked_wait()  # the server's own Retry-After binds a canary too
                    if not quiet and server.active < self.tuning.depth(only):
                        server.active += 1
                        return server
                    await self._wait(self._unless_stopping(quiet or None))
                    continue
                chosen = self._pick(avoid or {})
                if chosen is not None:
                    return chosen
                if pausing != self._paused(avoid or {}):  # a worker holds a batch in its stead only while it pauses
                    pausing = not pausing
                    self._set_pausing(1 if pausing else -1)
                self._start_due_probes()
                await self._wait(self._unless_stopping(self._next_change(avoid or {})))
        finally:
            if pausing:
                self._set_pausing(-1)

    def _paused(self, avoid: dict[int, float]) -> bool:
        now = self._clock()
        return any(until > now for until in avoid.values())

    def _set_pausing(self, step: int) -> None:
        self.pausing += step
        self.turns.set_limit(self.tuning.total_depth + self.pausing)

    def _pick(self, avoid: dict[int, float]) -> Server | None:
        servers = self.servers
        now = self._clock()
        for k in range(len(servers)):
            server = servers[(self._next + k) % len(servers)]
            health = self.health(server)
            if avoid.get(server.index, now) > now:
                continue
            if health.available() and server.active < self.tuning.depth(server.index):
                server.active += 1
                self._next = (server.index + 1) % len(servers)
                return server
        self._check_gone()
        return None

    def _check_gone(self) -> None:
        """No server in the rotation: the model is nowhere or the servers never answered; or every server has been
        gone (out of the rotation, or away: asking with Retry-After for longer than the backoff ceiling) longer than
        the wait. Each ends the run; otherwise the caller waits for a probe or a hold to end."""
        healths = [self.health(s) for s in self.servers]
        reasons = "; ".join(f"{s.masked}: {self.health(s).why_gone()}" for s in self.servers)
        if not any(h.in_rotation for h in healths):
            if all(h.state == NO_MODEL for h in healths):
                raise ModelNotFound(f"no server has the model ({reasons})", http_status=404)
            if not any(h.successes or h.responded for h in healths):  # nobody there at all (a wrong URL): at once
                raise ServerUnavailable(
                    f"the model server(s) at {self.where} (OLLAMA_URL) are unreachable or overloaded (none answered): "
                    f"{reasons}"
                )
        since = self._gone_since(healths)
        if since is not None and self._clock() - since >= self.server_wait_sec:
            away = " or asked for longer quiet (Retry-After)" if any(h.away_since is not None for h in healths) else ""
            raise ServerUnavailable(
                f"the model server(s) at {self.where} (OLLAMA_URL) are unreachable or overloaded: every one has been "
                f"out of the rotation{away} for {self.server_wait_sec:g} s (WIKI_EMBED_SERVER_WAIT_SEC): {reasons}"
            )

    @staticmethod
    def _gone_since(healths: list[ServerHealth]) -> float | None:
        """Since when every server has been gone (the last to go); None while one serves."""
        times = [h.gone_since() for h in healths]
        return None if any(t is None for t in times) else max(t for t in times if t is not None)

    def _next_change(self, avoid: dict[int, float]) -> float | None:
        """Seconds until something may change without a request ending: a backoff or this request's pause over, a
        probe due, the wait up."""
        healths = [self.health(s) for s in self.servers]
        others = any(h.in_rotation for h in healths)
        now = self._clock()
        times = [h.wait() for h in healths if h.in_rotation] + [h.probe_in(others) for h in healths]
        times += [until - now for until in avoid.values() if until > now]
        since = self._gone_since(healths)
        if since is not None:
            times.append(max(0.0, since + self.server_wait_sec - now))
        finite = [t for t in times if t != float("inf")]
        return max(min(finite), 0.005) if finite else None

    def _start_due_probes(self) -> None:
        others = any(self.health(s).in_rotation for s in self.servers)
        for server in self.servers:
            health = self.health(server)
            if server.index not in self._probes and health.probe_in(others) == 0.0:
                health.probing()
                task = asyncio.ensure_future(self._probe_and_wake(server))
                self._probes[server.index] = task

    async def _probe_and_wake(self, server: Server) -> None:
        try:
            await self._probe(server)
        except Exception:  # noqa: BLE001, S110 - a failed probe leaves the server out; its health says why
            pass
        finally:
            self._probes.pop(server.index, None)
            self._wake()

    def _unless_stopping(self, wait: float | None) -> float | None:
        """`wait`, unless the run is stopping (StopWhileWaiting): a batch not yet sent goes back rather than wait
        for a server held by Retry-After, out of the rotation or busy (the runbook's stop ends what is in flight)."""
        if self.stop_event is not None and self.stop_event.is_set():
            raise StopWhileWaiting("stop requested while waiting for a model server: the batch goes back unsent")
        return wait

    async def _wait(self, timeout: float | None) -> None:
        """Until the pool changes, `timeout` passes, or a stop request comes (then the caller looks again)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        stop = self.stop_event
        stopped = asyncio.ensure_future(stop.wait()) if stop is not None and not stop.is_set() else None
        try:
            await asyncio.wait(
                [waiter, *([stopped] if stopped else [])], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if stopped is not None:
                stopped.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self, server: Server) -> None:
        """The request on `server` ended: its slot is free; whoever waits for one looks again."""
        server.active -= 1
        self.turns.set_limit(self.tuning.total_depth + self.pausing)
        self._wake()

    def take_out(self, server: Server, why: str) -> None:
        self.health(server).take_out(why)
        self.turns.set_limit(self.tuning.total_depth + self.pausing)
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    @property
    def where(self) -> str:
        return ", ".join(s.masked for s in self.servers)

    def close(self) -> None:
        for task in list(self._probes.values()):
            task.cancel()
        self._probes.clear()
