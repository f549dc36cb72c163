"""Metadata the Dagster UI shows, built from the core's answers: the table's observation, what is missing per ID
range (as tables the UI renders and sorts), status figures as metadata of stable types, progress and ETA."""

from typing import Any

import dagster as dg

from wiki_embeddings.core.db import Store
from wiki_embeddings.defs.partitions import LAST_RANGE_ID, RANGE_WIDTH, id_ranges, key_for_id

MAX_TABLE_ROWS = 100


class TableObservation:
    """What `wiki_chunks` looks like now: metadata for the UI and a data version that changes with the table."""

    def __init__(self, total: int, low: int | None, high: int | None, missing: int):
        self.total, self.low, self.high, self.missing = total, low, high, missing
        self.data_version = dg.DataVersion(f"{total}:{high}:{missing}")
        self.description = f"{total} chunks, ids {low}..{high}, {missing} without an embedding"
        self.metadata: dict[str, Any] = {
            "dagster/row_count": dg.MetadataValue.int(total),
            "missing": dg.MetadataValue.int(missing),
            # Identifiers, not quantities: text, so the UI draws no plot of them.
            "min_id": dg.MetadataValue.text("" if low is None else str(low)),
            "max_id": dg.MetadataValue.text("" if high is None else str(high)),
            "ranges": dg.MetadataValue.text(
                f"{len(id_ranges.get_partition_keys())} ranges of {RANGE_WIDTH} ids up to {LAST_RANGE_ID}"
            ),
            "past_last_range": dg.MetadataValue.bool(high is not None and high > LAST_RANGE_ID),
        }


def observe_table(store: Store) -> TableObservation:
    """Two cheap queries: count and id bounds (primary key), missing (the partial index)."""
    low, high, total = store.id_bounds()
    return TableObservation(total, low, high, store.count_missing())


# ---------------------------------------------------------------------------- what is missing
def missing_summary(missing: list[tuple[int, int]], failed: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """One row per ID range with missing chunks (`range`, `missing`, `failed`); ids past the last range in one row."""
    failed_by_start = dict(failed)
    rows: dict[str, dict[str, Any]] = {}
    for start, count in missing:
        key = key_for_id(start) or f"past {LAST_RANGE_ID}"
        row = rows.setdefault(key, {"range": key, "missing": 0, "failed": 0})
        row["missing"] += count
        row["failed"] += failed_by_start.get(start, 0)
    return list(rows.values())


def worst_ranges(summary: list[dict[str, Any]], n: int = 5) -> list[dict[str, Any]]:
    return sorted(summary, key=lambda r: (-r["missing"], r["range"]))[:n]


RANGE_COLUMNS = {"range": "string", "chunks": "int", "missing": "int", "failed": "int"}


def range_table(rows: list[dict[str, Any]], limit: int = MAX_TABLE_ROWS) -> dg.MetadataValue:
    """Rows of {range, [chunks], missing, failed} as a table the UI renders (and sorts); at most `limit` rows."""
    columns = [c for c in RANGE_COLUMNS if any(c in r for r in rows)] or ["range", "missing", "failed"]
    schema = dg.TableSchema(columns=[dg.TableColumn(c, RANGE_COLUMNS[c]) for c in columns])
    records = [dg.TableRecord({c: r.get(c, 0) for c in columns}) for r in rows[:limit]]
    return dg.MetadataValue.table(records=records, schema=schema)


#: The former name of `range_table`.
markdown_table = range_table


#: Status keys that are identifiers or labels, not quantities: text, so the UI draws no meaningless plot.
_TEXT_KEYS = {"last_run_id", "dimensions"}
#: Status keys whose value is a formatted number.
_FLOAT_KEYS = {"coverage_pct", "migration_coverage_pct", "last_run_chunks_per_s"}


def status_metadata(status: dict[str, Any]) -> dict[str, Any]:
    """Every status key as metadata of one stable type: ints stay ints (plotted), percentages and rates become
    floats, identifiers and labels text, flags bools. A key whose value is empty (`unverified` before the first
    content scan, `migration_*` without a migration) is left out rather than switching type."""
    out: dict[str, Any] = {}
    for key, value in status.items():
        if value is None or value == "":
            continue
        if isinstance(value, list):  # runs_in_flight: a table (empty when nothing runs: the type stays)
            out[key] = runs_table(value)
        elif key in _FLOAT_KEYS:
            try:
                out[key] = dg.MetadataValue.float(float(value))
            except (TypeError, ValueError):
                out[key] = dg.MetadataValue.text(str(value))
        elif isinstance(value, bool):
            out[key] = dg.MetadataValue.bool(value)
        elif isinstance(value, int) and key not in _TEXT_KEYS:
            out[key] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            out[key] = dg.MetadataValue.float(value)
        else:
            out[key] = dg.MetadataValue.text(str(value))
    return out


RUN_COLUMNS = {
    "run_id": "int",
    "state": "string",
    "host": "string",
    "pid": "int",
    "heartbeat_age_s": "int",
    "embedded": "int",
    "servers": "string",
}


def runs_table(runs: list[dict[str, Any]]) -> dg.MetadataValue:
    """The runs running or stalled now (core/status.py `runs_in_flight`): where each runs (host, pid), how long
    since its heartbeat, what it embedded, its model servers; `wiki-embeddings runs release ID` frees a stalled one."""
    schema = dg.TableSchema(columns=[dg.TableColumn(c, t) for c, t in RUN_COLUMNS.items()])
    records = [dg.TableRecord({c: _cell(run.get(c), t) for c, t in RUN_COLUMNS.items()}) for run in runs]
    return dg.MetadataValue.table(records=records, schema=schema)


def _cell(value: Any, kind: str) -> Any:
    if kind == "int":
        return int(value) if value is not None else 0
    return "" if value is None else str(value)


def progress(missing: int, running: int, rate: float) -> dict[str, Any]:
    """chunks/s of the runs under way and the time left at that rate, as stable metadata."""
    if missing == 0:
        eta = "done"
    elif running == 0:
        eta = "nothing running"
    elif rate <= 0:
        eta = "starting"
    else:
        eta = _duration(missing / rate)
    metadata: dict[str, Any] = {
        "runs_under_way": dg.MetadataValue.int(running),
        "chunks_per_s": dg.MetadataValue.float(round(rate, 2)),
        "eta": dg.MetadataValue.text(eta),
    }
    if missing and running and rate > 0:
        metadata["eta_s"] = dg.MetadataValue.float(round(missing / rate, 1))
    return metadata


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def ranges_overview(store: Store) -> list[dict[str, Any]]:
    """Chunks, missing and failed per ID range that holds chunks (ids past the last range in one row)."""
    failed = dict(store.failed_by_range(RANGE_WIDTH))
    rows: dict[str, dict[str, Any]] = {}
    for start, chunks, missing in store.rows_by_range(RANGE_WIDTH):
        key = key_for_id(start) or f"past {LAST_RANGE_ID}"
        row = rows.setdefault(key, {"range": key, "chunks": 0, "missing": 0, "failed": 0})
        row["chunks"] += chunks
        row["missing"] += missing
        row["failed"] += failed.get(start, 0)
    return list(rows.values())
