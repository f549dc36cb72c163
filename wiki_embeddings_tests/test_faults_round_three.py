"""Reliability, round three (issue 21): a frozen swap must not lock readers out, `--until` on daylight-saving days,
one readiness decision that sees drift, `verify` on another vector length or on nothing. Each test failed on the
code before its fix."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from wiki_embeddings.core.window import next_occurrence, run_deadline
from wiki_embeddings.defs.assets import RangeRunConfig
from wiki_embeddings.settings import Settings

BERLIN = ZoneInfo("Europe/Berlin")


def _at(zone: ZoneInfo, *fields: int) -> float:
    return datetime(*fields, tzinfo=zone).timestamp()  # type: ignore[misc]


# ------------------------------------------------------------------------------ 6. --until on transition days
@pytest.mark.parametrize(
    ("now", "until", "expected_utc"),
    [
        # 2026-03-29, spring forward at 02:00 CET -> 03:00 CEST (01:00 UTC)
        ((2026, 3, 29, 0, 30), "06:00", (2026, 3, 29, 4, 0)),  # 06:00 CEST, not 07:00 (today's offset kept)
        ((2026, 3, 29, 0, 30), "01:30", (2026, 3, 29, 0, 30)),  # before the gap: still CET
        ((2026, 3, 29, 0, 30), "02:30", (2026, 3, 29, 1, 0)),  # in the gap: the first instant after it, 03:00 CEST
        ((2026, 3, 29, 0, 30), "02:00", (2026, 3, 29, 1, 0)),  # the gap's first second too
        ((2026, 3, 29, 0, 30), "03:00", (2026, 3, 29, 1, 0)),  # 03:00 CEST exists: the same instant
        ((2026, 3, 28, 22, 0), "06:00", (2026, 3, 29, 4, 0)),  # started the evening before, across the change
        ((2026, 3, 29, 7, 0), "06:00", (2026, 3, 30, 4, 0)),  # after it: tomorrow, still summer time
        # 2026-10-25, fall back at 03:00 CEST -> 02:00 CET (01:00 UTC)
        ((2026, 10, 25, 0, 30), "06:00", (2026, 10, 25, 5, 0)),  # 06:00 CET, not 05:00 (today's offset kept)
        ((2026, 10, 25, 0, 30), "02:30", (2026, 10, 25, 0, 30)),  # occurs twice: the first time (CEST, fold=0)
        ((2026, 10, 25, 0, 30), "02:00", (2026, 10, 25, 0, 0)),
        ((2026, 10, 25, 0, 30), "03:00", (2026, 10, 25, 2, 0)),  # after the fold: CET
        ((2026, 10, 24, 23, 0), "06:00", (2026, 10, 25, 5, 0)),
    ],
)
def test_until_is_local_wall_time_on_both_2026_transition_days_in_berlin(now, until, expected_utc):
    started = _at(BERLIN, *now)
    end = next_occurrence(until, started, zone=BERLIN)
    assert end.astimezone(UTC) == datetime(*expected_utc, tzinfo=UTC)
    assert end > datetime.fromtimestamp(started, UTC)
    deadline, reason = run_deadline(until, None, started, zone=BERLIN)
    assert deadline == end.timestamp() and end.isoformat(timespec="minutes") in reason


def test_until_in_the_autumn_fold_after_its_first_occurrence_is_tomorrow():
    """02:45 CEST on 2026-10-25 with --until 02:30: today's 02:30 resolves to its first occurrence, already past, so
    the window ends tomorrow at 02:30 (the module's stated rule), never at the repeated 02:30 CET."""
    started = datetime(2026, 10, 25, 0, 45, tzinfo=UTC).timestamp()  # 02:45 CEST, the first pass
    end = next_occurrence("02:30", started, zone=BERLIN)
    assert end.astimezone(UTC) == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)  # 02:30 CET on the 26th


def test_dagster_until_and_the_cli_share_the_local_zone_rule(monkeypatch):
    """The range/maintenance config's `until` becomes Settings.until, whose deadline is window.run_deadline in the
    zone named by TZ (read through zoneinfo: the process's C-library zone is not changed)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    started = _at(BERLIN, 2026, 3, 29, 0, 30)
    settings = Settings().replace(**RangeRunConfig(until="06:00").engine_settings())
    deadline = settings.run_deadline(started)
    assert deadline is not None
    assert deadline[0] == datetime(2026, 3, 29, 4, 0, tzinfo=UTC).timestamp()
    assert "2026-03-29T06:00+02:00" in deadline[1]
