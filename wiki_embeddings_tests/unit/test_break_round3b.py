"""Outside tester, round 3b: `--until` across daylight-saving changes (Berlin, New York, Lord Howe's 30-minute
shift) and odd inputs. Each test states the promise of core/window.py's rule."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from wiki_embeddings.core.window import next_occurrence, parse_until

pytestmark = pytest.mark.unit


def _at(zone: str, wall: str) -> float:
    return datetime.fromisoformat(wall).replace(tzinfo=ZoneInfo(zone)).timestamp()


@pytest.mark.parametrize(
    ("zone", "start", "until", "ends"),
    [
        ("Europe/Berlin", "2026-03-29T00:30", "06:00", "2026-03-29T06:00:00+02:00"),  # spring: on the clock
        ("Europe/Berlin", "2026-03-29T00:30", "02:30", "2026-03-29T03:00:00+02:00"),  # the gap: first instant after
        ("Europe/Berlin", "2026-10-25T00:30", "06:00", "2026-10-25T06:00:00+01:00"),  # autumn: on the clock
        ("Europe/Berlin", "2026-10-25T00:30", "02:30", "2026-10-25T02:30:00+02:00"),  # the fold: first occurrence
        ("America/New_York", "2026-03-07T23:00", "06:00", "2026-03-08T06:00:00-04:00"),
        ("America/New_York", "2026-03-08T00:30", "02:30", "2026-03-08T03:00:00-04:00"),
        ("America/New_York", "2026-11-01T00:30", "01:30", "2026-11-01T01:30:00-04:00"),
        ("Australia/Lord_Howe", "2026-04-04T23:00", "06:00", "2026-04-05T06:00:00+10:30"),  # a 30-minute shift
        ("Australia/Lord_Howe", "2026-04-05T00:30", "01:45", "2026-04-05T01:45:00+11:00"),  # its fold
        ("Australia/Lord_Howe", "2026-10-04T00:30", "02:15", "2026-10-04T02:30:00+11:00"),  # its 30-minute gap
        ("Australia/Lord_Howe", "2026-10-04T00:30", "06:00", "2026-10-04T06:00:00+11:00"),
    ],
)
def test_until_is_wall_time_across_daylight_saving(zone: str, start: str, until: str, ends: str) -> None:
    got = next_occurrence(until, _at(zone, start), ZoneInfo(zone))
    assert got.isoformat() == ends


@pytest.mark.parametrize(
    "text",
    ["24:00", "25:00", "6", "06:00:60", "06:60", "٠٦:٠٠", "０６:００", "\u200b06:00", "06:00+00:60", "06:00+0075"],
)
def test_until_refuses_what_is_not_a_time_of_day(text: str) -> None:
    with pytest.raises(ValueError, match="until"):
        parse_until(text)
