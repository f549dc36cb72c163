"""Run windows: `--until HH:MM` and `--max-minutes N` end a run safely, the way the stop file does.

The engine checks the deadline between batches (`Backfill._should_stop`): no new request is sent after it, what
is in flight is written, and the run ends `stopped` with the reason "run window ends at ...". Nothing is marked
failed, so the next run (or `resume`) continues where this one stopped.

`--until` is the next occurrence of a wall-clock time: `06:00` in the local time zone of the process (so
`--until 06:00` started at 22:00 runs through the night; started at 07:00 it runs until 06:00 tomorrow), or
with an explicit offset, `06:00+09:00`, `06:00-0500`, `06:00Z`, which does not depend on the host's zone.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone

_UNTIL = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*(Z|[+-]\d{2}:?\d{2})?\s*$", re.IGNORECASE)

#: How a window's end is named in the stop reason (the Dagster layer recognises a window end by it).
WINDOW_REASON = "run window ends"


def parse_until(text: str) -> tuple[int, int, int, timezone | None]:
    """(hour, minute, second, offset or None for local time) of an `--until` value; ValueError when malformed."""
    m = _UNTIL.match(text or "")
    if not m:
        raise ValueError(
            f"until {text!r} is not a time: write HH:MM in local time (e.g. 06:00) or with an offset "
            "(06:00+09:00, 06:00Z)"
        )
    hour, minute, second = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError(f"until {text!r} is not a time of day (00:00 to 23:59)")
    zone = m.group(4)
    if zone is None:
        return hour, minute, second, None
    if zone.upper() == "Z":
        return hour, minute, second, UTC
    digits = zone[1:].replace(":", "")
    delta = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    if delta > timedelta(hours=14):
        raise ValueError(f"until {text!r}: offset {zone} is beyond +-14:00")
    return hour, minute, second, timezone(-delta if zone[0] == "-" else delta)


def next_occurrence(text: str, now: float | None = None) -> datetime:
    """The next moment (strictly after `now`) whose wall clock reads `text`, as an aware datetime."""
    hour, minute, second, zone = parse_until(text)
    now_dt = datetime.fromtimestamp(time.time() if now is None else now, tz=zone) if zone else None
    if now_dt is None:  # local time: the host's zone, daylight saving included
        now_dt = datetime.fromtimestamp(time.time() if now is None else now).astimezone()
    target = now_dt.replace(hour=hour, minute=minute, second=second, microsecond=0)
    if target <= now_dt:
        target = target + timedelta(days=1)
        if zone is None:  # the next day may have another UTC offset (daylight saving): take the wall clock again
            target = target.replace(tzinfo=None).astimezone()
    return target


def run_deadline(until: str | None, max_minutes: float | None, now: float | None = None) -> tuple[float, str] | None:
    """(epoch seconds, reason) of the earlier of the two limits, or None when neither is set."""
    now = time.time() if now is None else now
    limits: list[tuple[float, str]] = []
    if until:
        at = next_occurrence(until, now)
        limits.append((at.timestamp(), f"{WINDOW_REASON} at {at.isoformat(timespec='minutes')} (--until {until})"))
    if max_minutes is not None:
        end = now + max_minutes * 60
        shown = datetime.fromtimestamp(end).astimezone().isoformat(timespec="seconds")
        limits.append((end, f"{WINDOW_REASON} at {shown} (--max-minutes {max_minutes:g})"))
    return min(limits) if limits else None
