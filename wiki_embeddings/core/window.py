"""Run windows: `--until HH:MM` and `--max-minutes N` end a run safely, the way the stop file does.

The engine checks the deadline between batches (`Backfill._should_stop`): no new request is sent after it, what
is in flight is written, and the run ends `stopped` with the reason "run window ends at ...". Nothing is marked
failed, so the next run (or `resume`) continues where this one stopped.

`--until` is the next occurrence of a wall-clock time: `06:00` in the local time zone of the process (so
`--until 06:00` started at 22:00 runs through the night; started at 07:00 it runs until 06:00 tomorrow), or
with an explicit offset, `06:00+09:00`, `06:00-0500`, `06:00Z`, which does not depend on the host's zone.

Local time is the zone's wall clock (`zoneinfo`: `TZ`, else `/etc/localtime`), looked up for the day the
time falls on, so daylight saving is honoured: `--until 06:00` ends at 06:00 on the clock even when the clocks
change during the night. On a transition day the rule is:

- a time that does not exist (the spring gap: in Europe/Berlin 02:00-02:59 on the last Sunday of March) means
  the first instant after the gap (`--until 02:30` ends at 03:00, when the clock jumps past 02:30);
- a time that occurs twice (the autumn fold: 02:00-02:59 on the last Sunday of October) means its first
  occurrence (`fold=0`, still on summer time).

Each day's wall time is resolved by that rule first; the first resolved instant strictly after now is the end.
A `TZ` that zoneinfo cannot read (a POSIX rule string such as `JST-9`) falls back to the C library's local time,
with the same rule.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from datetime import time as wall_time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_UNTIL = re.compile(
    r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*(Z|[+-]\d{2}:?\d{2})?\s*$", re.IGNORECASE | re.ASCII
)  # ASCII digits only

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
    if int(digits[2:]) > 59:
        raise ValueError(f"until {text!r}: offset {zone} has minutes past 59")
    delta = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    if delta > timedelta(hours=14):
        raise ValueError(f"until {text!r}: offset {zone} is beyond +-14:00")
    return hour, minute, second, timezone(-delta if zone[0] == "-" else delta)


def local_zone() -> tzinfo | None:
    """The process's time zone as a ZoneInfo (`TZ`, else `/etc/localtime`); None when zoneinfo cannot read it
    (the C library's local time is used then)."""
    key = os.environ.get("TZ")
    try:
        if key is not None:
            key = key.lstrip(":")
            if not key:
                return UTC  # TZ set but empty: the C library reads it as UTC
            if key.startswith("/"):
                with open(key, "rb") as fh:
                    return ZoneInfo.from_file(fh, key=key)
            return ZoneInfo(key)
        with open("/etc/localtime", "rb") as fh:
            return ZoneInfo.from_file(fh, key="localtime")
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def _offset_function(zone: tzinfo | None) -> Callable[[float], timedelta]:
    """UTC offset at an instant (epoch seconds) in `zone`, or in the C library's local time when None."""
    if zone is None:
        return lambda ts: datetime.fromtimestamp(ts).astimezone().utcoffset() or timedelta(0)
    return lambda ts: datetime.fromtimestamp(ts, zone).utcoffset() or timedelta(0)


def resolve_wall_time(day: date, at: wall_time, zone: tzinfo | None) -> float:
    """The instant (epoch seconds) at which the wall clock of `zone` reads `at` on `day`, by the module's rule:
    a time in a gap -> the first instant after the gap; a time that occurs twice -> its first occurrence."""
    offset_at = _offset_function(zone)
    naive = datetime.combine(day, at).replace(tzinfo=UTC).timestamp()  # the wall time's digits, read as UTC
    # The offsets in force around that day (a zone changes its offset at most once in two days, in practice).
    offsets = {offset_at(naive + shift).total_seconds() for shift in (-86400.0, 0.0, 86400.0)}
    candidates = sorted(naive - off for off in offsets)
    valid = [c for c in candidates if naive - offset_at(c).total_seconds() == c]
    if valid:
        return valid[0]  # one instant, or the first of the two in a fold
    # A gap: the clock jumped over this time. The transition lies between the candidates; find it to the second.
    low, high = candidates[0], candidates[-1]
    after = offset_at(high)
    while high - low > 1:
        middle = (low + high) // 2
        if offset_at(middle) == after:
            high = middle
        else:
            low = middle
    return high


def next_occurrence(text: str, now: float | None = None, zone: tzinfo | None = None) -> datetime:
    """The next moment (strictly after `now`) whose wall clock reads `text`, as an aware datetime.

    `zone` is the local zone for a time without an offset (default: `local_zone()`, the process's own);
    tests pass a ZoneInfo instead of changing the process's TZ."""
    hour, minute, second, fixed = parse_until(text)
    now = time.time() if now is None else now
    if fixed is not None:
        now_dt = datetime.fromtimestamp(now, tz=fixed)
        target = now_dt.replace(hour=hour, minute=minute, second=second, microsecond=0)
        return target if target > now_dt else target + timedelta(days=1)
    local = zone if zone is not None else local_zone()
    today = datetime.fromtimestamp(now, local).date() if local is not None else datetime.fromtimestamp(now).date()
    at = wall_time(hour, minute, second)
    for day in (today, today + timedelta(days=1), today + timedelta(days=2)):
        instant = resolve_wall_time(day, at, local)
        if instant > now:
            return datetime.fromtimestamp(instant, local) if local else datetime.fromtimestamp(instant).astimezone()
    raise AssertionError("unreachable: tomorrow's wall time is always after now")


def run_deadline(
    until: str | None, max_minutes: float | None, now: float | None = None, zone: tzinfo | None = None
) -> tuple[float, str] | None:
    """(epoch seconds, reason) of the earlier of the two limits, or None when neither is set."""
    now = time.time() if now is None else now
    limits: list[tuple[float, str]] = []
    if until:
        at = next_occurrence(until, now, zone)
        limits.append((at.timestamp(), f"{WINDOW_REASON} at {at.isoformat(timespec='minutes')} (--until {until})"))
    if max_minutes is not None:
        end = now + max_minutes * 60
        shown = datetime.fromtimestamp(end).astimezone().isoformat(timespec="seconds")
        limits.append((end, f"{WINDOW_REASON} at {shown} (--max-minutes {max_minutes:g})"))
    return min(limits) if limits else None
