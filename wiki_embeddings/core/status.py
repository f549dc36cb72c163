"""The runbook's status: one dict of exact figures, printed as `key=value` lines or JSON."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from wiki_embeddings.checks import one_line
from wiki_embeddings.core.db import Store
from wiki_embeddings.core.migration import shadow_status
from wiki_embeddings.core.progress import describe_servers
from wiki_embeddings.core.readiness import Readiness, assess
from wiki_embeddings.core.verify import STATUS_KEYS as VERIFY_STATUS_KEYS
from wiki_embeddings.core.verify import drift_figures
from wiki_embeddings.core.verify import status_figures as verify_figures
from wiki_embeddings.settings import Settings

STATUS_KEYS = [
    "total",
    "embedded",
    "missing",
    "coverage_pct",
    "failed",
    "quarantined",
    "stale_model",
    "stale_text",
    "stale_text_scanned_at",
    "unverified",
    "cut_for_context",
    "server_truncated",
    "locked",
    "stop_requested",
    "model",
    "dimensions",
    "last_run_id",
    "last_run_state",
    "last_run_started",
    "last_run_finished",
    "last_run_embedded",
    "last_run_chunks_per_s",
    "last_run_heartbeat",
    "last_run_servers",
    "migration_model",
    "migration_embedded",
    "migration_missing",
    "migration_coverage_pct",
    "invalid_indexes",
    "invalid_index_names",
    # The last `verify` / drift check and the model digest recorded by the runs (core/verify.py): never re-embeds.
    *VERIFY_STATUS_KEYS,
]


def collect_status(store: Store, settings: Settings) -> dict[str, Any]:
    """Counts from the database, the stop file, the recorded model and the last run, in one place.

    Read-only once the bookkeeping schema is at its version, so a monitoring role with SELECT only can run it
    (the one write it tries, clearing the provenance a dead swap left, is skipped without the privilege).
    """
    store.migrate(record=False)
    dimensions = store.column_dimensions()  # first: a missing table or a non-integer id column is one clear line
    status = store.status(settings.max_attempts)
    status.update(store.model_status())
    status["dimensions"] = dimensions
    status["stop_requested"] = bool(status["stop_requested"]) or os.path.lexists(settings.stop_file)
    model, _ = store.recorded_model()
    status["model"] = model or ""
    last = store.last_run()
    status["last_run_id"] = last["run_id"] if last else ""
    status["last_run_state"] = run_state(last) if last else "none"
    status["last_run_started"] = last["started_at"].isoformat(timespec="seconds") if last else ""
    finished = last["finished_at"] if last else None
    status["last_run_finished"] = finished.isoformat(timespec="seconds") if finished else ""
    status["last_run_embedded"] = last["embedded"] if last else 0
    # Chunks another session held when the last run ended (state `locked`): a re-run takes them.
    status["locked"] = int(last.get("locked") or 0) if last and last["state"] == "locked" else 0
    rate = last["chunks_per_s"] if last else None
    status["last_run_chunks_per_s"] = f"{rate:.1f}" if rate is not None else ""
    status["last_run_heartbeat"] = last["heartbeat_at"].isoformat(timespec="seconds") if last else ""
    # The model servers as the last run's heartbeat saw them (in the rotation or out, and why): no HTTP here.
    status["last_run_servers"] = describe_servers(last.get("servers")) if last else ""
    status.update(migration_figures(store))
    invalid = store.invalid_indexes()  # left by an interrupted CREATE INDEX CONCURRENTLY; dropped by the next swap
    status["invalid_indexes"] = len(invalid)
    status["invalid_index_names"] = ",".join(ix["name"] for ix in invalid)
    status.update(verify_figures(store))
    return {k: status[k] for k in STATUS_KEYS}


def readiness_of(store: Store, status: dict[str, Any]) -> Readiness:
    """The readiness decision (core/readiness.py `assess`) for a table whose `status` figures were just read: those
    figures plus the standing drift verdict (core/verify.py `drift_figures`). Reads only."""
    figures = {k: status[k] for k in ("total", "missing", "coverage_pct", "stale_model")}
    return assess({**figures, **drift_figures(store)})


def migration_figures(store: Store) -> dict[str, Any]:
    """The coverage of the model being migrated to (its shadow column), or empty values when none is."""
    info = shadow_status(store)
    in_progress = bool(info["target_model"]) and "coverage_pct" in info
    return {
        "migration_model": info["target_model"] if in_progress else "",
        "migration_embedded": info["embedded"] if in_progress else "",
        "migration_missing": info["missing"] if in_progress else "",
        "migration_coverage_pct": info["coverage_pct"] if in_progress else "",
    }


RUN_LEASE_SEC = 90.0  # a running run touches its row every 10 s (core/backfill/liveness.py: HEARTBEAT_EVERY_SEC)


def run_state(run: dict[str, Any]) -> str:
    """A run recorded as `running` whose database session is gone (its liveness lock is free) is `abandoned`:
    its process was killed or lost. Its claims died with that session, so a new run may start at once.

    One whose session still looks alive but whose heartbeat is older than its lease is `stalled`: its process
    froze, or the network to it went silent (the server keeps such a session until its own TCP keepalive ends
    it). Status never shows `running` with a frozen heartbeat."""
    if run["state"] == "running" and not run.get("alive", True):
        return "abandoned"
    beat = run.get("heartbeat_at")
    if run["state"] == "running" and beat is not None and (datetime.now(UTC) - beat).total_seconds() > RUN_LEASE_SEC:
        return "stalled"
    return str(run["state"])


def format_status(status: dict[str, Any]) -> str:
    """`key=value` lines, one per key: every value is shown as one line (`checks.one_line`), so a value recorded by
    an old version (a model name holding a newline) can never print a second `missing=0`."""

    def show(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else one_line(str(v))

    return "\n".join(f"{k}={show(v)}" for k, v in status.items())
