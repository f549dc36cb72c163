"""The fixed ID ranges the bootstrap backfill is cut into: one partition per range of chunk ids.

Keys look like `00000000-00099999` (inclusive bounds, zero-padded so they sort as numbers do). Width and
count are read once, when the definitions load, from `WIKI_EMBED_RANGE_WIDTH` (100000) and
`WIKI_EMBED_RANGE_COUNT` (100): ids 0..9,999,999. Keep the count in the low hundreds: Dagster backfills of
~2,000 partitions have crashed the daemon (dagster #16304); use wider ranges instead. Chunks past the
last range are still embedded by the maintenance job, which has no id bounds.

Most ranges of a young table hold no chunks: `embedding_state_sensor` (defs/state.py) reports those as done
("empty") and ranges the CLI filled as materialized, so the fill percentage is the database's. A backfill
puts up to `WIKI_EMBED_RANGES_PER_RUN` (25) contiguous ranges in one run (`BACKFILL_POLICY`): an empty range
costs one cheap query, not a run start.
"""

import os

import dagster as dg

from wiki_embeddings.checks import parse_number

RANGE_WIDTH_ENV = "WIKI_EMBED_RANGE_WIDTH"
RANGE_COUNT_ENV = "WIKI_EMBED_RANGE_COUNT"
RANGES_PER_RUN_ENV = "WIKI_EMBED_RANGES_PER_RUN"
DEFAULT_RANGES_PER_RUN = 25
DEFAULT_RANGE_WIDTH = 100_000
DEFAULT_RANGE_COUNT = 100
MAX_RANGE_COUNT = 1000
KEY_DIGITS = 8


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(parse_number(int, raw.replace("_", "")))
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


RANGE_WIDTH = _int_env(RANGE_WIDTH_ENV, DEFAULT_RANGE_WIDTH)
RANGE_COUNT = _int_env(RANGE_COUNT_ENV, DEFAULT_RANGE_COUNT)
if RANGE_WIDTH < 1:
    raise ValueError(f"{RANGE_WIDTH_ENV} must be at least 1, got {RANGE_WIDTH}")
if not 1 <= RANGE_COUNT <= MAX_RANGE_COUNT:
    raise ValueError(
        f"{RANGE_COUNT_ENV} must be 1..{MAX_RANGE_COUNT}, got {RANGE_COUNT}: large backfills crash the Dagster "
        "daemon (dagster #16304); widen the ranges instead"
    )

#: Ids above this belong to no range (maintenance embeds them).
LAST_RANGE_ID = RANGE_WIDTH * RANGE_COUNT - 1
_DIGITS = max(KEY_DIGITS, len(str(LAST_RANGE_ID)))


def range_key(start: int, width: int = RANGE_WIDTH) -> str:
    """`00100000-00199999` for the range that starts at 100000."""
    return f"{start:0{_DIGITS}d}-{start + width - 1:0{_DIGITS}d}"


def key_bounds(key: str) -> tuple[int, int]:
    """Inclusive (id_min, id_max) of a partition key."""
    low, sep, high = key.partition("-")
    if not sep or not low.isdigit() or not high.isdigit() or int(low) > int(high):
        raise ValueError(f"not an id-range partition key: {key!r}")
    return int(low), int(high)


def range_bounds(first_key: str, last_key: str) -> tuple[int, int]:
    """Inclusive id bounds covering a contiguous run of partitions (single-run backfills)."""
    return key_bounds(first_key)[0], key_bounds(last_key)[1]


def key_for_id(chunk_id: int) -> str | None:
    """The partition that holds `chunk_id`, or None when it lies past the last range (or below 0)."""
    if chunk_id < 0 or chunk_id > LAST_RANGE_ID:
        return None
    return range_key((chunk_id // RANGE_WIDTH) * RANGE_WIDTH)


id_ranges = dg.StaticPartitionsDefinition([range_key(i * RANGE_WIDTH) for i in range(RANGE_COUNT)])

RANGES_PER_RUN = _int_env(RANGES_PER_RUN_ENV, DEFAULT_RANGES_PER_RUN)
if RANGES_PER_RUN < 1:
    raise ValueError(f"{RANGES_PER_RUN_ENV} must be at least 1, got {RANGES_PER_RUN}")

#: A backfill over many ranges: runs of up to RANGES_PER_RUN contiguous ranges (each range still succeeds or fails
#: on its own inside the run); several runs may go at once up to the `ollama` pool's limit.
BACKFILL_POLICY = dg.BackfillPolicy.multi_run(max_partitions_per_run=RANGES_PER_RUN)
