"""Runs an operator can see and release: the state of a recorded run (running, stalled, abandoned), what `status` and
`wiki-embeddings runs` show of each, and the release of a stalled run.

A run whose process froze (SIGSTOP, a paused VM, a network gone silent) keeps its database sessions, and with them
its run lock and its chunk claims: other runs end `locked` on those chunks. `release_run` frees them: it marks the
run `released` first (from then on its writes, failure records and heartbeats are refused in the statements
themselves, so a process that wakes ends without writing: state `released`, exit code 9), then ends its sessions with
`pg_terminate_backend` - the holder of its run lock and every session named after it (`run_session_name`: its claim
and write sessions). Ending another role's session takes superuser, membership in that role, or `pg_signal_backend`
(a superuser's sessions: superuser only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from wiki_embeddings.core.db import Store
from wiki_embeddings.core.progress import describe_servers

RUN_LEASE_SEC = 90.0  # a running run touches its row every 10 s (core/backfill/liveness.py: HEARTBEAT_EVERY_SEC)


def runs_in_flight(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    """The table's runs that are running or stalled now (recorded `running`, their session alive), newest first:
    what an operator needs to find one (host, pid) and to judge it (heartbeat age, servers). Reads only."""
    return [
        run_summary(run)
        for run in store.recent_runs(limit, running_only=True)
        if run_state(run) in ("running", "stalled")
    ]


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """One run as `status` and `runs` show it."""
    age = run.get("heartbeat_age_s")
    return {
        "run_id": run["run_id"],
        "state": run_state(run),
        "mode": run.get("mode") or "",
        "host": run.get("host") or "",
        "pid": run.get("pid"),
        "heartbeat_age_s": None if age is None else round(float(age)),
        "embedded": run.get("embedded") or 0,
        "started": run["started_at"].isoformat(timespec="seconds") if run.get("started_at") else "",
        "servers": describe_servers(run.get("servers")),
    }


def run_state(run: dict[str, Any]) -> str:
    """A run recorded as `running` whose database session is gone (its liveness lock is free) is `abandoned`:
    its process was killed or lost. Its claims died with that session, so a new run may start at once.

    One whose session still looks alive but whose heartbeat is older than its lease is `stalled`: its process
    froze, or the network to it went silent (the server keeps such a session until its own TCP keepalive ends
    it). Status never shows `running` with a frozen heartbeat."""
    if run["state"] == "running" and not run.get("alive", True):
        return "abandoned"
    beat, age = run.get("heartbeat_at"), run.get("heartbeat_age_s")  # the age by the database's clock, when read
    if age is None and beat is not None:
        age = (datetime.now(UTC) - beat).total_seconds()
    if run["state"] == "running" and age is not None and float(age) > RUN_LEASE_SEC:
        return "stalled"
    return str(run["state"])


class ReleaseRefused(RuntimeError):
    """The run named is not one to release (unknown, or running with a fresh heartbeat)."""


@dataclass(frozen=True)
class Release:
    """What `release_run` did: `released` False when there was nothing to release (`why` says so)."""

    run_id: int
    released: bool
    why: str = ""
    ended: list[int] = field(default_factory=list)  # backend pids ended
    refused: dict[int, str] = field(default_factory=dict)  # pid -> why it could not be ended


def release_run(store: Store, run_id: int, *, force: bool = False) -> Release:
    """Release a stalled run of the table (or, with `force`, a running one): mark it released, then end its
    sessions. ReleaseRefused for a run the table never had, or one whose heartbeat is fresh (without `force`)."""
    store.migrate()
    run = store.find_run(run_id)
    if run is None:
        raise ReleaseRefused(f"no run {run_id} of {store.table.qualified} (`wiki-embeddings runs` lists them)")
    state = run_state(run)
    if state not in ("running", "stalled"):
        return Release(run_id, False, f"run {run_id} is {state}: nothing to release (its sessions are gone)")
    if state == "running" and not force:
        summary = run_summary(run)
        raise ReleaseRefused(
            f"run {run_id} is running (heartbeat {summary['heartbeat_age_s']} s ago, host {summary['host']} pid "
            f"{summary['pid']}): release only a stalled run (no heartbeat for {RUN_LEASE_SEC:g} s), stop a live one "
            "with `wiki-embeddings stop`, or pass --force"
        )
    how = "stalled" if state == "stalled" else "running, with --force"
    if not store.mark_released(run_id, f"released by an operator while {how}; its sessions were ended"):
        return Release(run_id, False, f"run {run_id} ended meanwhile: nothing to release")
    pids = store.run_sessions(run_id)
    refused = store.end_sessions(pids)
    return Release(run_id, True, ended=[p for p in pids if p not in refused], refused=refused)
