"""The runbook's status: one dict of exact figures, printed as `key=value` lines or JSON."""

from __future__ import annotations

import os
from typing import Any

from wiki_embeddings.checks import one_line
from wiki_embeddings.core.db import Store
from wiki_embeddings.core.migration import shadow_status
from wiki_embeddings.core.progress import describe_servers
from wiki_embeddings.core.readiness import Readiness, assess
from wiki_embeddings.core.runs import RUN_LEASE_SEC as RUN_LEASE_SEC  # where status used to define it
from wiki_embeddings.core.runs import run_state, runs_in_flight
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
    "pooled",
    "server_truncated",
    "suspect_truncated",
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
    "running_runs",  # runs of the table running or stalled now (alive sessions), and each of them:
    "runs_in_flight",  # id, state, host, pid, heartbeat age, embedded, servers (text: a `running_run_<id>=` line each)
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
    # Vectors written before a run found the server cutting silently, from texts long enough to have been cut:
    # `backfill --reembed-cut` re-embeds them.
    status["suspect_truncated"] = store.count_suspect_truncated()
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
    # Missing chunks whose claim a session holds right now: runs under way, or a stalled one (`runs release`).
    status["locked"] = store.claimed_now()
    rate = last["chunks_per_s"] if last else None
    status["last_run_chunks_per_s"] = f"{rate:.1f}" if rate is not None else ""
    status["last_run_heartbeat"] = last["heartbeat_at"].isoformat(timespec="seconds") if last else ""
    # The model servers as the last run's heartbeat saw them (in the rotation or out, and why): no HTTP here.
    status["last_run_servers"] = describe_servers(last.get("servers")) if last else ""
    status["runs_in_flight"] = runs_in_flight(store)
    status["running_runs"] = len(status["runs_in_flight"])
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


def format_status(status: dict[str, Any]) -> str:
    """`key=value` lines, one per key: every value is shown as one line (`checks.one_line`), so a value recorded by
    an old version (a model name holding a newline) can never print a second `missing=0`."""

    def show(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else one_line(str(v))

    lines = []
    for key, value in status.items():
        if key == "runs_in_flight":  # one line per run: `running_run_<id>=state=... host=... pid=...`
            lines += [f"running_run_{run['run_id']}={format_run(run)}" for run in value]
        else:
            lines.append(f"{key}={show(value)}")
    return "\n".join(lines)


def format_run(run: dict[str, Any]) -> str:
    """A run's summary (`run_summary`) as `name=value` words on one line; the servers last, as they may hold blanks."""
    return " ".join(f"{k}={one_line('' if v is None else str(v))}" for k, v in run.items() if k != "run_id")
