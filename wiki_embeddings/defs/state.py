"""The picture rebuilt from the database, whoever did the work: `embedding_state_sensor`.

Every minute (WIKI_EMBED_SENSOR_INTERVAL_SEC), with a few cheap queries (count and id bounds by the primary key,
missing by the partial index, one primary-key probe per ID range), and without launching a run:

- observes `wiki_chunks` when the table changed (new chunks, chunks embedded, at most every few minutes while a
  run makes progress; at least hourly): its new data version is what makes the automation refresh
  `missing_wiki_chunks`, `embedding_coverage` and `missing_is_zero`;
- reports as materialized every ID range the database shows complete - embedded by the CLI, the runbook scripts,
  a cron or Dagster - and every empty range ("empty": nothing to embed), so the fill percentage is the table's;
- when a range that shows as done has missing chunks again (new chunks, an edit), it rebuilds the picture:
  Dagster's open-source storage cannot un-materialize one partition, so it wipes the asset's materialization
  index (the events themselves stay in the runs' logs) and re-reports every range that is done now. That range
  then shows as missing until a run (or the CLI) fills it.

The tick's skip message says what it reported.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import dagster as dg
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from wiki_embeddings.checks import Range, check_number, parse_number
from wiki_embeddings.defs.assets import wiki_chunk_embeddings
from wiki_embeddings.defs.metadata import observe_table
from wiki_embeddings.defs.partitions import RANGE_COUNT, RANGE_WIDTH, id_ranges, key_bounds
from wiki_embeddings.defs.resources import WikiDatabaseResource

#: Seconds between ticks of this project's sensors (default: their own, 30-60 s); read when the definitions load.
SENSOR_INTERVAL_ENV = "WIKI_EMBED_SENSOR_INTERVAL_SEC"


def sensor_interval(default: int) -> int:
    raw = os.environ.get(SENSOR_INTERVAL_ENV, "").strip()
    if not raw:
        return default
    try:
        seconds = parse_number(int, raw)
    except ValueError:
        raise ValueError(f"{SENSOR_INTERVAL_ENV}={raw!r} is not a whole number of seconds") from None
    check_number(SENSOR_INTERVAL_ENV, seconds, Range(1, 86_400))
    return seconds


STATE_INTERVAL_SEC = sensor_interval(60)
#: While only `missing` changes (a run making progress), observe at most this often; new chunks at once.
PROGRESS_EVERY_SEC = 180.0
#: Observe at least this often, even when nothing changed.
HEARTBEAT_SEC = 3600.0
SOURCE = "embedding_state_sensor"
EMBEDDINGS_KEY = wiki_chunk_embeddings.key
CHUNKS_KEY = dg.AssetKey("wiki_chunks")


def range_states(occupied: list[int], missing_by_start: dict[int, int]) -> dict[str, str]:
    """`embedded`, `empty` or `missing` for every partition key, from the database's figures."""
    taken = set(occupied)
    states = {}
    for key in id_ranges.get_partition_keys():
        start = key_bounds(key)[0]
        if missing_by_start.get(start, 0) > 0:
            states[key] = "missing"
        else:
            states[key] = "embedded" if start in taken else "empty"
    return states


def _should_observe(cursor: dict[str, Any], total: int, high: int | None, missing: int, now: float) -> str | None:
    """Why to observe `wiki_chunks` now, or None."""
    last = cursor.get("table")
    if not last:
        return "first look at the table"
    if last["total"] != total or last["high"] != high:
        return f"the table changed: {last['total']} -> {total} chunks"
    if last["missing"] != missing:
        if missing == 0 or missing > last["missing"]:
            return f"missing {last['missing']} -> {missing}"
        if now - last["at"] >= PROGRESS_EVERY_SEC:
            return f"progress: missing {last['missing']} -> {missing}"
        return None
    if now - last["at"] >= HEARTBEAT_SEC:
        return "hourly observation"
    return None


@dg.sensor(
    name="embedding_state_sensor",
    minimum_interval_seconds=STATE_INTERVAL_SEC,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Reads the database every minute (no run): observes wiki_chunks when the table changed, reports ID ranges "
        "the database shows complete or empty as materialized (whoever embedded them: CLI, scripts, Dagster), and "
        "rebuilds that picture when a done range has missing chunks again."
    ),
)
def embedding_state_sensor(context: dg.SensorEvaluationContext, database: WikiDatabaseResource) -> dg.SensorResult:
    cursor: dict[str, Any] = json.loads(context.cursor) if context.cursor else {}
    # Dagster's picture first, then the database: a range a run completes in between is seen complete (reported
    # twice at worst), never "shown done but missing".
    shown = set(context.instance.get_materialized_partitions(EMBEDDINGS_KEY))
    with database.store() as store:
        observed = observe_table(store)
        missing_by_start = dict(store.missing_by_range(RANGE_WIDTH))
        occupied = store.occupied_ranges(RANGE_WIDTH, RANGE_COUNT)
    states = range_states(occupied, missing_by_start)
    done = {k for k, state in states.items() if state != "missing"}
    regressed = sorted(k for k in shown if states.get(k) == "missing")
    said: list[str] = []
    events: list[dg.AssetMaterialization | dg.AssetObservation] = []
    if regressed:
        context.instance.wipe_assets([EMBEDDINGS_KEY])
        context.log.warning(
            f"{len(regressed)} ranges shown as done have missing chunks again ({', '.join(regressed[:10])}): "
            "rebuilding the picture of wiki_chunk_embeddings from the database"
        )
        more = "..." if len(regressed) > 3 else ""
        said.append(f"{len(regressed)} ranges no longer done ({', '.join(regressed[:3])}{more})")
        shown = set()
    missing_counts = {k: missing_by_start.get(key_bounds(k)[0], 0) for k in states}
    for key in sorted(done - shown):
        events.append(
            dg.AssetMaterialization(
                asset_key=EMBEDDINGS_KEY,
                partition=key,
                description=(
                    "every chunk of the range has its embedding (seen in the database)"
                    if states[key] == "embedded"
                    else "the range holds no chunks: nothing to embed"
                ),
                metadata={"state": dg.MetadataValue.text(states[key]), "source": dg.MetadataValue.text(SOURCE)},
                tags={"wiki_embeddings/source": SOURCE},
            )
        )
    reported = len(events)
    if reported:
        embedded = sum(1 for k in done - shown if states[k] == "embedded")
        said.append(f"reported {reported} ranges as done ({embedded} embedded, {reported - embedded} empty)")
    now = time.time()
    why = _should_observe(cursor, observed.total, observed.high, observed.missing, now)
    if why:
        events.append(
            dg.AssetObservation(
                asset_key=CHUNKS_KEY,
                metadata={**observed.metadata, "ranges_not_done": dg.MetadataValue.int(len(states) - len(done))},
                tags={DATA_VERSION_TAG: observed.data_version.value, "wiki_embeddings/source": SOURCE},
            )
        )
        cursor["table"] = {"total": observed.total, "high": observed.high, "missing": observed.missing, "at": now}
        said.append(f"observed wiki_chunks ({why}): {observed.description}")
    message = "; ".join(said) or (
        f"no change: {observed.total} chunks, {observed.missing} missing, "
        f"{len(done)}/{len(states)} ranges done, {sum(1 for v in missing_counts.values() if v)} with missing chunks"
    )
    context.log.info(message)
    return dg.SensorResult(asset_events=events, cursor=json.dumps(cursor), skip_reason=message)
