"""Outside tester's round 4, fast tier: what was just built (spread leases, the Retry-After "away" rule, the writer's
claims given back without waiting) tried as production would: HTTP dates in every form a server may send and the
machine's time zone, server names spelled differently or carrying credentials, the claim cap while releases are
under way. What held stays a test; what broke is fixed or marked xfail(strict) with its cause."""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from wiki_embeddings.core.backfill import claimer as claimer_module
from wiki_embeddings.core.backfill.outcomes import Batch
from wiki_embeddings.core.db.leases import lease_key
from wiki_embeddings.core.embedders.http import HttpAnswer
from wiki_embeddings.core.embedders.probe import probe_paths
from wiki_embeddings_tests.unit.fakes import FakeClaimStore, FakeClock, run, settings

pytestmark = pytest.mark.unit


@pytest.fixture
def zone() -> Iterator[Any]:
    """Set the process's local time zone (TZ + tzset) for one test; the old one back afterwards."""
    old = os.environ.get("TZ")

    def use(name: str) -> None:
        os.environ["TZ"] = name
        time.tzset()

    yield use
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


def _retry_after(raw: str) -> float | None:
    return HttpAnswer(429, httpx.Headers({"retry-after": raw}), b"").retry_after()


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe"])
@pytest.mark.parametrize("form", ["imf", "rfc850", "asctime", "minus-zero", "plus-two"])
def test_a_retry_after_http_date_means_the_same_seconds_in_every_time_zone(zone, tz, form):
    """README (Reliability): 429/503 are met with backoff, `Retry-After` honoured; RFC 9110 section 10.2.3 and 5.6.7:
    an HTTP date is GMT, and a recipient must accept all three forms (IMF-fixdate, the obsolete RFC 850 and asctime
    forms, the last without any zone). Read as local time, a date 20 s ahead was 18,000 s in New York (the server
    "away" for five hours: the run ends server_unavailable after WIKI_EMBED_SERVER_WAIT_SEC) and in the past in
    Berlin (no wait at all)."""
    zone(tz)
    when = time.time() + 20
    gmt = time.gmtime(when)
    raw = {
        "imf": email.utils.formatdate(when, usegmt=True),
        "rfc850": time.strftime("%A, %d-%b-%y %H:%M:%S GMT", gmt),
        "asctime": time.asctime(gmt),
        "minus-zero": email.utils.formatdate(when).replace("+0000", "-0000"),
        "plus-two": email.utils.format_datetime(datetime.fromtimestamp(when, timezone(timedelta(hours=2)))),
    }[form]
    seconds = _retry_after(raw)
    assert seconds is not None and 15 <= seconds <= 21, (raw, seconds)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("Thu, 01 Jan 1970 00:00:00 GMT", 0.0), ("Fri, 31 Dec 9999 23:59:59 GMT", None), ("-5", 0.0), ("1e400", None)],
    ids=["past", "far-future", "negative", "overflow"],
)
def test_a_retry_after_in_the_past_is_no_wait_and_an_absurd_one_is_a_number_or_nothing(raw, expected):
    """A past date asks for no quiet (0); the year 9999 is a number (the away rule takes it) or nothing, never an
    exception in the request path."""
    seconds = _retry_after(raw)
    if expected is None:
        assert seconds is None or seconds > 3600, seconds
    else:
        assert seconds == expected


@pytest.mark.parametrize(
    "spelling",
    [
        "http://ollama-1:11434/",
        "HTTP://Ollama-1:11434",
        "http://user:secret@ollama-1:11434",
        "http://ollama-1:11434//",
    ],
)
def test_one_server_spelled_differently_is_one_lease(spelling):
    """core/spread.py: 'never two on one' server. The lease is the server's: a trailing slash, the case of scheme
    and host (RFC 3986: case-insensitive) or credentials in the URL do not make another server, so two runs given
    the two spellings do not both tune against it."""
    assert lease_key(spelling) == lease_key("http://ollama-1:11434")


def test_a_lease_key_is_not_derived_from_the_password_in_the_url():
    """README (Security): a password in OLLAMA_URL is never stored or shown. The lease's key is visible to every
    role of the database (pg_locks.objid); a hash of the URL with its password is a 31-bit oracle for guessing it."""
    keys = {lease_key(f"http://u:{password}@ollama-1:11434") for password in ("a", "b", "hunter2", "x" * 40)}
    assert keys == {lease_key("http://ollama-1:11434")}


@pytest.mark.parametrize(
    ("url", "api", "first"),
    [
        ("http://h:11434", "ollama", "/api/version"),
        ("http://h:8080", "openai", "/v1/models"),
        ("http://h:8080/v1", "openai", "/models"),
        ("https://gw.example/tenant/v1/", "openai", "/models"),
    ],
)
def test_the_probe_asks_where_the_client_sends(url, api, first):
    """core/embedders/probe.py: an OpenAI-compatible base URL with a path (/v1, a gateway prefix) is probed under
    it, a bare host:port under /v1, as the client sends its requests."""
    assert probe_paths(url.rstrip("/"), api)[0] == first


class SerialLaneDb:
    """DbCalls.call as the real one runs it: one lane per role (a call waits for the one before it on that role's
    connection); `release` takes `release_sec` of (fake-loop) time, so releases are seen under way."""

    def __init__(self, release_sec: float) -> None:
        self.release_sec = release_sec
        self.lanes: dict[str, asyncio.Lock] = {}

    async def call(self, role: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        lane = self.lanes.setdefault(role, asyncio.Lock())
        async with lane:
            if getattr(fn, "__name__", "") == "release":
                await asyncio.sleep(self.release_sec)
            return fn(None, *args, **kwargs)


def test_claims_whose_release_is_under_way_count_toward_the_cap(monkeypatch):
    """README: 'A run now holds at most 2,048 claims (MAX_HELD_CLAIMS ...) and claims more as writes release them'.
    With releases given back without waiting (release_soon), the locks the database holds for this run - held,
    queued for release, or being released - never pass the cap plus one batch."""
    monkeypatch.setattr(claimer_module, "MAX_HELD_CLAIMS", 6)
    clock = FakeClock()
    store = FakeClaimStore({i: f"chunk {i}" for i in range(1, 61)}, clock)
    db = SerialLaneDb(release_sec=0.003)
    claimer = claimer_module.Claimer(store, db.call, settings(batch_size=2), lambda: 2)
    batches: list[Batch] = []
    most: list[int] = []

    async def put(batch: Batch) -> None:
        batches.append(batch)

    async def never() -> bool:
        return False

    async def scenario() -> None:
        producing = asyncio.ensure_future(claimer.produce(put, never))
        while not producing.done():
            most.append(len(store.held))
            if batches:
                claimer.release_soon(batches.pop(0).ids)  # the writer: written, given back without waiting
            await asyncio.sleep(0.001)
        while batches:
            claimer.release_soon(batches.pop(0).ids)
        await claimer.settle()

    run(scenario())
    assert claimer.claimed == 60 and not store.held, (claimer.claimed, store.held)
    assert max(most) <= 6 + 2, max(most)
