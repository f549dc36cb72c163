"""The claimer (core/backfill/claimer.py): which chunks a run takes, in what order, how many, and what it does
about chunks another session holds. Real PostgreSQL claims: integration/test_faults_concurrency.py,
test_faults_round_two.py (busy keys, row locks), test_backfill_runbook.py (max-chunks, retry-failed)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from wiki_embeddings.core.backfill.claimer import BUSY_RETRY_MAX_SEC, BUSY_RETRY_SEC, Claimer, busy_pause
from wiki_embeddings.core.backfill.endstate import RunCounts, end_state
from wiki_embeddings.core.backfill.outcomes import Batch
from wiki_embeddings_tests.unit.fakes import FakeClaimStore, FakeClock, InlineDb, md5_of, run, settings


async def never() -> bool:
    return False


class Run:
    """A claimer over a fake table, its batches collected as a worker would take them."""

    def __init__(self, texts: dict[int, str], batch_limit: int = 64, **overrides: Any):
        self.clock = FakeClock()
        self.store = FakeClaimStore(texts, self.clock)
        self.db = InlineDb()
        self.lines: list[str] = []
        self.claimer = Claimer(
            self.store,
            self.db.call,
            settings(**overrides),
            lambda: batch_limit,
            log=self.lines.append,
            monotonic=self.clock.monotonic,
            sleep=self.clock.sleep,
        )
        self.batches: list[Batch] = []

    async def put(self, batch: Batch) -> None:
        self.batches.append(batch)

    def produce(self, should_stop: Callable[[], Awaitable[bool]] = never) -> list[list[int]]:
        run(self.claimer.produce(self.put, should_stop))
        return [b.ids for b in self.batches]

    def whole_run(self) -> list[list[int]]:
        """The missing pass, then busy passes until none is busy or busy_wait_sec has passed (run.py's order)."""

        async def both() -> None:
            await self.claimer.produce(self.put, never)
            await self.claimer.wait_busy(lambda: self.claimer.produce(self.put, never), lambda: False)

        run(both())
        return [b.ids for b in self.batches]

    def busy_passes(self) -> None:
        run(self.claimer.wait_busy(lambda: self.claimer.produce(self.put, never), lambda: False))


def table(n: int) -> dict[int, str]:
    return {i: f"chunk {i}" for i in range(1, n + 1)}


def test_chunks_are_claimed_in_id_order_in_batches_of_the_tunings_size():
    r = Run(table(10), batch_limit=3, batch_size=4)
    assert r.produce() == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]
    claims = [kw for name, kw in r.store.calls if name == "claim"]
    assert [c["after_id"] for c in claims] == [None, 3, 6, 9, 10]  # keyset: each claim continues after the last
    assert {c["limit"] for c in claims} == {3}
    assert r.claimer.scan_complete and r.claimer.claimed == 10


def test_the_batch_size_setting_caps_what_the_tuning_asks_for():
    r = Run(table(10), batch_limit=64, batch_size=4)
    assert r.produce() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def test_a_shrunk_batch_size_applies_from_the_next_claim():
    limits = iter([4, 1, 1, 1, 1, 1, 1])
    r = Run(table(6), batch_size=4)
    r.claimer.batch_limit = lambda: next(limits)  # trouble halved the tuning's batch size after the first claim
    assert r.produce() == [[1, 2, 3, 4], [5], [6]]


def test_max_chunks_caps_the_claims_exactly():
    r = Run(table(20), batch_size=4, max_chunks=6)
    assert r.produce() == [[1, 2, 3, 4], [5, 6]]
    assert r.claimer.claimed == 6 and r.claimer.capped
    assert [kw["limit"] for name, kw in r.store.calls if name == "claim"] == [4, 2]  # never claimed beyond the cap


def test_an_id_range_starts_the_keyset_at_its_lower_end():
    r = Run(table(10), batch_size=4, id_min=5, id_max=8)
    assert r.produce() == [[5, 6, 7, 8]]


def test_busy_chunks_are_recorded_not_claimed():
    r = Run(table(6), batch_size=4)
    r.store.busy_until = {2: float("inf"), 3: float("inf")}
    assert r.produce() == [[1, 4], [5, 6]]
    assert r.claimer.busy == {2, 3} and r.claimer.skipped_busy == 2
    assert 2 not in r.claimer.held and 3 not in r.claimer.held


def test_busy_chunks_are_retried_in_the_busy_pass_once_free():
    r = Run(table(6), batch_size=4, busy_wait_sec=30.0)
    r.store.busy_until = {3: r.clock.now + 0.2}  # another run's batch in flight: free in 0.2 s
    batches = r.whole_run()
    assert batches[-1] == [3] and sorted(i for b in batches for i in b) == [1, 2, 3, 4, 5, 6]
    assert r.claimer.busy == set() and r.claimer.phase == "missing"
    assert set(r.clock.sleeps) == {BUSY_RETRY_SEC}  # asked again soon: it was only another run's batch


def test_busy_chunks_are_retried_until_busy_wait_then_locked():
    r = Run(table(4), batch_size=4, busy_wait_sec=5.0)
    began = r.clock.now
    r.store.busy_until = {2: float("inf")}  # a long transaction, or a colliding claim key
    r.whole_run()
    assert r.claimer.busy == {2}
    assert r.clock.now - began == pytest.approx(5.0)  # retried for busy_wait_sec, the last pause cut to the deadline
    retries = [kw for name, kw in r.store.calls if name == "claim_ids"]
    assert len(retries) == len(r.clock.sleeps) + 1 and all(c["ids"] == [2] for c in retries)
    claimed, busy = r.claimer.claimed, len(r.claimer.busy)
    counts = RunCounts(remaining=1, failed=0, claimed=claimed, busy=busy, max_chunks=None, busy_wait_sec=5.0)
    end = end_state(counts)
    assert end.state == "locked" and end.locked == 1


def test_the_busy_pause_is_short_at_first_then_at_most_a_second():
    assert busy_pause(0.0) == BUSY_RETRY_SEC
    assert busy_pause(1.99) == BUSY_RETRY_SEC
    assert busy_pause(2.0) == BUSY_RETRY_MAX_SEC
    assert busy_pause(600.0) == BUSY_RETRY_MAX_SEC


def test_a_busy_pass_skips_chunks_other_runs_embedded_meanwhile():
    r = Run(table(8), batch_size=4)
    r.store.busy_until = {2: r.clock.now + 0.1, 3: r.clock.now + 0.1, 7: r.clock.now + 0.1}
    r.produce()
    r.store.embedded_elsewhere([2, 3])  # the other run wrote them
    r.busy_passes()
    retries = [kw["ids"] for name, kw in r.store.calls if name == "claim_ids"]
    assert retries[0] == [2, 3, 7] and set(map(tuple, retries[1:])) == {(7,)}  # one claim looked at all three
    assert r.batches[-1].ids == [7] and not {2, 3} & {i for b in r.batches for i in b.ids}
    assert r.claimer.busy == set()


def test_a_capped_run_does_not_retry_busy_chunks():
    r = Run(table(10), batch_size=4, max_chunks=4)
    r.store.busy_until = {2: float("inf")}
    r.whole_run()
    assert r.claimer.capped and r.claimer.busy == set()  # the rest is another run's business
    assert not [name for name, _ in r.store.calls if name == "claim_ids"] and r.clock.sleeps == []


def test_a_busy_pass_never_claims_past_max_chunks():
    r = Run(table(4), batch_size=2, max_chunks=3)
    r.store.busy_until = {1: r.clock.now + 0.1, 2: r.clock.now + 0.1}
    r.whole_run()  # claims 3 and 4; one claim left under the cap for the two busy chunks
    assert {tuple(kw["ids"]) for name, kw in r.store.calls if name == "claim_ids"} == {(1,)}
    assert r.batches[-1].ids == [1] and r.claimer.claimed == 3


def test_release_gives_back_only_what_the_run_holds():
    r = Run(table(4), batch_size=4)
    r.produce()
    run(r.claimer.release([1, 99]))
    run(r.claimer.release([98]))
    assert r.store.released == [[1]]  # 99 and 98 were never ours: no round trip for them
    assert r.claimer.held == {2, 3, 4} and 1 not in r.claimer.md5


def test_md5s_are_none_when_one_is_unknown():
    r = Run(table(3), batch_size=4)
    r.produce()
    assert r.claimer.md5s([1, 2]) == [md5_of("chunk 1"), md5_of("chunk 2")]
    assert r.claimer.md5s([1, 42]) is None  # a write then fills only rows still missing, whatever their text


def test_retake_after_a_reconnect_drops_chunks_another_run_took():
    r = Run(table(4), batch_size=4)
    r.produce()
    r.store.taken_while_away = {2}
    run(r.claimer.retake(r.db.thread, "fresh session"))
    assert r.claimer.held == {1, 3, 4}
    assert ("relock", {"ids": [1, 2, 3, 4], "conn": "fresh session"}) in r.store.calls  # on the new session
    assert r.lines == ["1 claimed chunks were taken by another run while reconnecting; skipping them"]


def test_retake_with_nothing_held_asks_nothing():
    r = Run(table(4))
    run(r.claimer.retake(r.db.thread, "fresh session"))
    assert r.store.calls == []


def test_a_stop_mid_scan_stops_claiming():
    r = Run(table(12), batch_size=4)
    asked = 0

    async def stop_after_two() -> bool:
        nonlocal asked
        asked += 1
        return asked > 2

    assert r.produce(stop_after_two) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert not r.claimer.scan_complete


def test_a_stop_during_the_busy_pass_keeps_the_busy_chunks_for_the_end_state():
    r = Run(table(4), batch_size=4)
    r.store.busy_until = {2: float("inf"), 3: float("inf")}
    r.produce()
    r.claimer.begin("busy")

    async def stop() -> bool:
        return True

    r.produce(stop)
    assert r.claimer.busy == {2, 3}


def test_the_refresh_pass_counts_changed_chunks_and_asks_include_cut_with_reembed_cut():
    r = Run({}, batch_size=2, reembed_cut=True)
    r.store.changed = {3: "new text 3", 5: "new text 5", 9: "new text 9"}
    r.claimer.begin("refresh")
    assert r.produce() == [[3, 5], [9]]
    calls = [kw for name, kw in r.store.calls if name == "claim_changed"]
    assert calls and all(c["include_cut"] for c in calls)
    assert r.claimer.changed_found == 3 and r.claimer.scan_complete
    assert r.claimer.md5s([3, 5, 9]) is not None  # a refresh write lands only if the text is still the one claimed


def test_the_refresh_pass_without_reembed_cut_does_not_ask_for_cut_chunks():
    r = Run({}, batch_size=2)
    r.store.changed = {3: "new"}
    r.claimer.begin("refresh")
    r.produce()
    assert [kw["include_cut"] for name, kw in r.store.calls if name == "claim_changed"] == [False, False]


@pytest.mark.parametrize(
    ("flags", "mode", "claimed"),
    [
        ({}, "normal", [1, 2, 4]),
        ({"include_quarantined": True}, "all", [1, 2, 3, 4]),
        ({"retry_failed": True}, "retry_failed", [2, 3]),
    ],
)
def test_the_claim_mode_follows_retry_failed_and_include_quarantined(flags, mode, claimed):
    r = Run(table(4), batch_size=8, **flags)
    r.store.failed = {2, 3}
    r.store.quarantined = {3}  # failed max-attempts times with this text
    assert r.produce() == [claimed]
    assert {kw["mode"] for name, kw in r.store.calls if name == "claim"} == {mode}


def test_rows_whose_bytes_are_not_text_are_carried_in_the_batch():
    r = Run({1: "one", 3: "three"}, batch_size=8)
    r.store.invalid = {2: ("invalid UTF-8 byte 0xff at offset 4", 12)}
    r.produce()
    [batch] = r.batches
    assert batch.rows == [(1, "one"), (3, "three")]
    assert batch.invalid == [(2, "invalid UTF-8 byte 0xff at offset 4", 12)]
    assert r.claimer.claimed == 3 and r.claimer.held == {1, 2, 3}  # held until recorded as failed


def test_claimed_texts_are_cut_to_max_chars_and_cleaned_of_control_characters():
    r = Run({1: "a\x00b\x07c" + "d" * 50}, max_chars=10)
    r.produce()
    assert r.batches[0].rows == [(1, "a b cddddd")]


def test_a_run_holds_at_most_max_held_claims_and_claims_more_as_writes_release_them(monkeypatch):
    """Each claim is an advisory lock in PostgreSQL's shared lock table: fast servers must not fill it."""
    import asyncio

    from wiki_embeddings.core.backfill import claimer as claimer_module

    monkeypatch.setattr(claimer_module, "MAX_HELD_CLAIMS", 4)
    r = Run(table(10), batch_limit=2, batch_size=2)
    most: list[int] = []

    async def scenario() -> None:
        producing = asyncio.ensure_future(r.claimer.produce(r.put, never))
        for _ in range(20):
            await asyncio.sleep(0)
        most.append(len(r.claimer.held))
        assert [b.ids for b in r.batches] == [[1, 2], [3, 4]], "claimed past the cap before a write"
        while not producing.done():  # the writer: each batch written releases its claims
            if r.batches:
                await r.claimer.release(r.batches.pop(0).ids)
            most.append(len(r.claimer.held))
            await asyncio.sleep(0.01)

    run(scenario())
    assert max(most) <= 4 and r.claimer.scan_complete and r.claimer.claimed == 10


def test_a_stop_reaches_a_run_waiting_for_room_to_claim(monkeypatch):
    from wiki_embeddings.core.backfill import claimer as claimer_module

    monkeypatch.setattr(claimer_module, "MAX_HELD_CLAIMS", 2)
    r = Run(table(10), batch_limit=2, batch_size=2)
    asked: list[int] = []

    async def stop_on_second_ask() -> bool:
        asked.append(1)
        return len(asked) > 2

    assert r.produce(stop_on_second_ask) == [[1, 2]]  # nothing written: the producer waits for room, then stops
    assert not r.claimer.scan_complete
