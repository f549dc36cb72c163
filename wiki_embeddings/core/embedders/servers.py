"""The model servers of one client, one object each: requests in flight, its endpoint generation, its counts.

`ServerPool` hands out a server for each request: round-robin among those with a free slot under their depth
(core/tuning.py decides the depths), or one named server (the canary goes back to the server that failed). It
also holds the turns: how many embed workers may hold a claimed batch at once (the servers' total depth), so the
run holds no more chunks than the servers are about to take. No HTTP here: the embedder sends, the pool counts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from wiki_embeddings.core import tuning as tune
from wiki_embeddings.settings import mask_url


@dataclass
class Server:
    """One model server as the client knows it."""

    url: str
    index: int
    active: int = 0  # our requests in flight there; at most its depth
    legacy: bool = False  # /api/embed answered 404: an older Ollama, use /api/embeddings
    requests: int = 0

    @property
    def masked(self) -> str:
        return mask_url(self.url)


class Turns:
    """A semaphore whose limit can change: the embed workers that may hold a batch at once (= total depth)."""

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
    """Which server takes the next request; created inside the running event loop (its futures bind to it)."""

    def __init__(self, urls: list[str], tuning: tune.Tuning):
        self.servers = [Server(u, i) for i, u in enumerate(urls)]
        self.tuning = tuning
        self.turns = Turns(tuning.total_depth)
        self._next = 0  # where the round-robin starts looking for a server with a free slot
        self._waiters: list[asyncio.Future[None]] = []

    async def acquire(self, only: int | None = None) -> Server:
        """The next server (round-robin) with a free slot under its depth, or server `only`; waits while full."""
        servers = self.servers
        while True:
            order = (
                [servers[only]]
                if only is not None
                else [servers[(self._next + k) % len(servers)] for k in range(len(servers))]
            )
            for server in order:
                if server.active < self.tuning.depth(server.index):
                    server.active += 1
                    if only is None:
                        self._next = (server.index + 1) % len(servers)
                    return server
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def release(self, server: Server, ticket: tune.Ticket, outcome: str) -> float:
        """The request ended with `outcome` (core/tuning.py); returns its seconds. Wakes whoever waits for a slot."""
        server.active -= 1
        seconds = self.tuning.done(ticket, outcome)
        self.turns.set_limit(self.tuning.total_depth)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        return seconds
