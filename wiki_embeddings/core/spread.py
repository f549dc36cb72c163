"""Spreading concurrent runs over the model servers: each run its own share of `OLLAMA_URL`, never two on one.

The client already spreads one run's requests over every server it is given, tuning each server's depth from
that server's answers (core/tuning.py). Two processes given the same servers would each tune against load the
other makes, so when several runs go at once (Dagster's pool `ollama` above 1) each takes `share` servers of the
list for itself and leaves the others alone: `share = servers // runs at once` (at least 1). A run takes its
servers' leases (core/db/leases.py: session advisory locks in the chunk database, freed when the run's session
ends, also when its process is killed; the session is named after the process, so `runs release` of a run of a
frozen process ends it too) and waits while every server is leased by other runs.

One URL, or one run at a time: the share is the whole list, nothing is leased, nothing changes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from wiki_embeddings.core.db import Store
from wiki_embeddings.core.db.leases import lease_session_name
from wiki_embeddings.settings import mask_url


def servers_per_run(servers: int, runs_at_once: int | None) -> int:
    """How many of `servers` one run takes when `runs_at_once` runs may embed together (None: unknown, all)."""
    if runs_at_once is None or runs_at_once <= 1:
        return servers
    return max(1, servers // runs_at_once)


@contextlib.contextmanager
def server_share(
    store: Store,
    urls: list[str],
    share: int,
    *,
    log: Callable[[str], None],
    stop_requested: Callable[[], bool],
    poll_sec: float = 0.5,
) -> Iterator[list[int]]:
    """The indexes (into `urls`) of the servers this run may use, held until the block ends.

    `share >= len(urls)`: all of them, no lease taken. Otherwise the run leases `share` free servers, starting
    at a place of its own (its pid) so that runs starting together do not all try the first server; while
    fewer are free it keeps what it has and waits, polling. A stop request ends the wait: yields [] then.
    """
    if share >= len(urls):
        yield list(range(len(urls)))
        return
    conn = store.connect(register=False, application_name=lease_session_name())
    try:
        held: list[int] = []
        start = os.getpid() % len(urls)
        order = [(start + k) % len(urls) for k in range(len(urls))]
        waited = False
        while True:
            for index in order:
                if len(held) < share and index not in held and store.try_lease(conn, urls[index]):
                    held.append(index)
            if len(held) >= share:
                break
            if stop_requested():
                held = []
                break
            if not waited:
                log(f"waiting for a free model server: all {len(urls)} are in use by other runs")
                waited = True
            time.sleep(poll_sec)
        if held:
            log(f"this run uses model server(s) {', '.join(mask_url(urls[i]) for i in sorted(held))}")
        yield sorted(held)
    finally:
        with contextlib.suppress(Exception):  # the database gone: the leases went with its session
            store.release_leases(conn)
        conn.close()
