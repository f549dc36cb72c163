"""Spreading concurrent runs over the model servers: each run its own share of `OLLAMA_URL`, never two on one.

The client already spreads one run's requests over every server it is given, tuning each server's depth from
that server's answers (core/tuning.py). Two processes given the same servers would each tune against load the
other makes, so when several runs go at once (Dagster's pool `ollama` above 1) each takes `share` servers of the
list for itself and leaves the others alone: `share = servers // runs at once` (at least 1). A run takes its
servers' leases (core/db/leases.py: session advisory locks in the chunk database, freed when the run's session
ends, also when its process is killed; the session is named after the process, so `runs release` of a run of a
frozen process ends it too) and waits while every server is leased by other runs.

Which free servers: those that answer (core/embedders/probe.py: one quick GET on each server whose lease the run
could take), tried in an order of the run's own (its pid, so that runs starting together do not all try the first
server). A server that does not answer is leased only when no answering one is free (it may come back; meanwhile
the run's pool waits WIKI_EMBED_SERVER_WAIT_SEC for it). A run whose servers all die ends `server_unavailable`, which
Dagster's RetryPolicy retries: the retry leases afresh, answering servers first. So a run moves off a dead server at
its retry, never mid-run (its client is built for its servers once).

The lease session is watched (every WATCH_EVERY_SEC, by a thread of the run's process): a session that ended (a
database restart, a failover, an idle-session timeout, a terminated backend) is reopened and the same leases are
taken again, logged. A lease that another run took meanwhile is not fought over: `lease_lost()` says why, the run's
heartbeat path reads it every second (core/backfill/liveness.py) and the run ends `server_unavailable` after
writing what it has in flight; its retry leases a free server. Leases belong to the process (their session is named
after it), so that word is kept per process.

One URL, or one run at a time: the share is the whole list, nothing is leased, nothing changes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

from wiki_embeddings.core.db import DatabaseError, Store
from wiki_embeddings.core.db.leases import lease_session_name
from wiki_embeddings.core.embedders.probe import answers
from wiki_embeddings.core.errors import first_line
from wiki_embeddings.settings import mask_url

WATCH_EVERY_SEC = 2.0  # how often a run's lease session is checked (one `SELECT 1`)

_lost: dict[str, str] = {}  # url -> why this process must stop using it: another run holds its lease now
_lost_lock = threading.Lock()


def servers_per_run(servers: int, runs_at_once: int | None) -> int:
    """How many of `servers` one run takes when `runs_at_once` runs may embed together (None: unknown, all)."""
    if runs_at_once is None or runs_at_once <= 1:
        return servers
    return max(1, servers // runs_at_once)


def lease_lost() -> str | None:
    """Why this process's run must stop embedding (a server's lease went to another run while the lease session was
    away), or None. Read by the run's heartbeat path."""
    with _lost_lock:
        return next(iter(_lost.values()), None)


class _Leases:
    """A run's server leases on one session of their own, taken answering servers first, and kept: a watcher thread
    re-takes them on a new session when the old one ends."""

    def __init__(self, store: Store, urls: list[str], log: Callable[[str], None], answers_at: Callable[[str], bool]):
        self.store, self.urls, self.log, self.answers_at = store, urls, log, answers_at
        self.conn = store.connect(register=False, application_name=lease_session_name())
        self.held: list[int] = []  # answering servers first, then (only when too few answer) the others
        self._silent: list[int] = []  # leased, but did not answer when probed
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self, order: list[int], share: int) -> bool:
        """One pass over the free servers; True when the share is complete (the silent ones fill it only when no
        answering one is free)."""
        live = [i for i in self.held if i not in self._silent]
        for index in order:
            if len(live) >= share:
                break
            if index in self.held or not self.store.try_lease(self.conn, self.urls[index]):
                continue
            self.held.append(index)
            if self.answers_at(self.urls[index]):
                live.append(index)
            else:
                self._silent.append(index)
        chosen = (live + [i for i in self.held if i in self._silent])[:share]
        if len(chosen) < share:
            return False
        for index in [i for i in self.held if i not in chosen]:  # a silent one an answering one replaced
            self.store.release_lease(self.conn, self.urls[index])
        self.held = sorted(chosen)
        silent = [mask_url(self.urls[i]) for i in self.held if i in self._silent]
        if silent:
            self.log(f"model server(s) {', '.join(silent)} do not answer, and no answering one is free: leased anyway")
        return True

    def watch(self, every_sec: float) -> None:
        self._thread = threading.Thread(target=self._watch, args=(every_sec,), name="lease-watch", daemon=True)
        self._thread.start()

    def _watch(self, every_sec: float) -> None:
        while not self._done.wait(every_sec):
            with self._lock:
                if self._done.is_set():
                    return
                try:
                    self._check()
                except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one bad check
                    self.log(f"checking this run's server leases failed ({first_line(exc)}); again in {every_sec:g} s")

    def _check(self) -> None:
        """The session gone: a new one, the same leases again; one another run took meanwhile is reported."""
        if self.store.lease_session_alive(self.conn) or self._done.is_set():
            return
        shown = ", ".join(mask_url(self.urls[i]) for i in self.held)
        self.log(
            f"the session holding this run's lease of model server(s) {shown} ended (a database restart, a failover "
            "or a terminated session): taking the lease(s) again"
        )
        with contextlib.suppress(Exception):  # already broken
            self.conn.close()
        try:
            self.conn = self.store.connect(register=False, application_name=lease_session_name())
            taken = [i for i in self.held if not self.store.try_lease(self.conn, self.urls[i])]
        except DatabaseError as exc:
            self.log(f"could not take the lease(s) again yet ({exc.first_line}); trying in {WATCH_EVERY_SEC:g} s")
            return
        if not taken:
            self.log(f"this run holds model server(s) {shown} again")
            return
        for index in taken:
            url = self.urls[index]
            why = (
                f"another run took model server {mask_url(url)} while this run's lease session was away; this run "
                "stops using it so that two runs' self-tuning do not fight over one server (a retry leases a free one)"
            )
            self.log(why)
            with _lost_lock:
                _lost[url] = why
        self.held = [i for i in self.held if i not in taken]

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(WATCH_EVERY_SEC)
            if self._thread.is_alive():  # its check waits on a session that stopped answering: cut it off
                self._cut_off()
                self._thread.join(WATCH_EVERY_SEC + 5)
        with self._lock:  # a re-take under way ends first
            with _lost_lock:
                for url in self.urls:
                    _lost.pop(url, None)
            with contextlib.suppress(Exception):  # the database gone: the leases went with its session
                self.store.release_leases(self.conn)
            self.conn.close()

    def _cut_off(self) -> None:
        """Shut the lease session's socket under a call that waits on it (a frozen backend, a stuck pooler: the
        kernel still acknowledges, so no TCP timeout ends the wait): the call fails and the run's end goes on. The
        leases go when that backend notices its client gone."""
        # (already closed, or no socket: nothing waits on it)
        with contextlib.suppress(Exception), socket.socket(fileno=os.dup(self.conn.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        self.log("this run's lease session stopped answering: cut off at the run's end")


@contextlib.contextmanager
def server_share(
    store: Store,
    urls: list[str],
    share: int,
    *,
    log: Callable[[str], None],
    stop_requested: Callable[[], bool],
    poll_sec: float = 0.5,
    api: str = "ollama",
    model: str | None = None,
    api_key: str | None = None,
    watch_sec: float = WATCH_EVERY_SEC,
) -> Iterator[list[int]]:
    """The indexes (into `urls`) of the servers this run may use, held (and watched) until the block ends.

    `share >= len(urls)`: all of them, no lease taken. Otherwise the run leases `share` free servers, answering ones
    first (`api` says how to ask; given `model`, a server must also embed a short text), starting at a place of its
    own (its pid); while fewer are free it keeps what it has and waits, polling. A stop request ends the wait:
    yields [] then.
    """
    if share >= len(urls):
        yield list(range(len(urls)))
        return
    leases = _Leases(store, urls, log, lambda url: answers(url, api, model=model, api_key=api_key))
    try:
        start = os.getpid() % len(urls)
        order = [(start + k) % len(urls) for k in range(len(urls))]
        waited = False
        while not leases.take(order, share):
            if stop_requested():
                leases.held = []
                break
            if not waited:
                log(f"waiting for a free model server: all {len(urls)} are in use by other runs")
                waited = True
            time.sleep(poll_sec)
        if leases.held:
            log(f"this run uses model server(s) {', '.join(mask_url(urls[i]) for i in leases.held)}")
            leases.watch(watch_sec)
        yield list(leases.held)
    finally:
        leases.close()
