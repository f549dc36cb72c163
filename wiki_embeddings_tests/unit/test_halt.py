"""Halt (core/backfill/halt.py): stop requests (stop file, run window, the database's request) and the first fatal
error. Real runs: integration/test_backfill_runbook.py (stop file), test_faults_process.py (SIGTERM),
test_trust.py and test_dagster_trust.py (run windows), test_cli.py (`stop` in the database)."""

from __future__ import annotations

import asyncio
import time

from wiki_embeddings.core.backfill.errors import Fatal
from wiki_embeddings.core.backfill.halt import Halt
from wiki_embeddings_tests.unit.fakes import FakeClock, run


def test_a_stop_file_stops_the_run_and_the_reason_names_it(tmp_path):
    stop_file = tmp_path / "wiki-embed.stop"
    halt = Halt(stop_file)
    assert not halt.stopping()
    stop_file.touch()
    assert halt.stopping() and halt.stop_requested
    assert halt.reason == f"stop file {stop_file}"


def test_a_dangling_symlink_at_the_stop_file_still_stops(tmp_path):
    stop_file = tmp_path / "wiki-embed.stop"
    stop_file.symlink_to(tmp_path / "nowhere")
    assert Halt(stop_file).stopping()


def test_the_run_window_ends_the_run_at_its_deadline():
    clock = FakeClock(start=10_000.0)
    halt = Halt(deadline=(10_060.0, "run window ended (--max-minutes 1)"), wall=clock.time)
    clock.advance(59.9)
    assert not halt.stopping()
    clock.advance(0.1)
    assert halt.stopping() and halt.reason == "run window ended (--max-minutes 1)"


def test_the_database_stop_request_is_read_at_most_once_a_second():
    clock = FakeClock()
    halt = Halt(monotonic=clock.monotonic)
    asked: list[float] = []
    requested = False

    async def stop_in_database() -> bool:
        asked.append(clock.now)
        return requested

    async def many_checks() -> None:
        for _ in range(10):  # ten batches within 0.9 s
            assert not await halt.should_stop(stop_in_database)
            clock.advance(0.1)

    began = clock.now
    run(many_checks())
    assert asked == [began]
    clock.advance(0.2)
    requested = True
    assert run(halt.should_stop(stop_in_database))
    assert len(asked) == 2 and halt.reason == "stop request in the database"


def test_a_stop_file_is_seen_without_asking_the_database(tmp_path):
    (tmp_path / "stop").touch()
    halt = Halt(tmp_path / "stop")

    async def stop_in_database() -> bool:
        raise AssertionError("no database round trip when the stop file says it already")

    assert run(halt.should_stop(stop_in_database))


def test_the_first_fatal_error_is_kept():
    halt = Halt()
    halt.fail(Fatal("database_unavailable", "lost the database"))
    halt.fail(Fatal("error", "a consequence of the first"))
    assert halt.fatal is not None and halt.fatal.state == "database_unavailable"
    assert halt.halted and not halt.stop_requested


def test_the_first_stop_reason_is_kept():
    halt = Halt()
    halt.request_stop("SIGTERM")
    halt.request_stop("stop file /tmp/wiki-embed.stop")
    assert halt.reason == "SIGTERM" and halt.stopping()


def test_a_sleep_wakes_early_on_a_stop():
    async def scenario() -> float:
        halt = Halt()
        began = time.monotonic()
        sleeper = asyncio.create_task(halt.sleep(30.0))
        await asyncio.sleep(0.01)
        halt.request_stop("signal")
        await sleeper
        return time.monotonic() - began

    assert run(scenario()) < 1.0


def test_a_sleep_without_a_stop_lasts_its_time():
    async def scenario() -> float:
        began = time.monotonic()
        await Halt().sleep(0.05)
        return time.monotonic() - began

    assert run(scenario()) >= 0.04  # (the loop may wake a timer up to its clock resolution early)


def test_a_run_released_by_an_operator_ends_fatally_and_that_explains_any_other_error():
    """`runs release` while the run was frozen: its stop check hears "released" (core/db runs.run_signal); the end
    is `released` whatever else it met on waking (timeouts, lost sessions)."""
    halt = Halt()

    async def released() -> str:
        return "released"

    assert run(halt.should_stop(released)) and halt.halted and not halt.stop_requested
    assert halt.fatal is not None and halt.fatal.state == "released"
    halt.fail(Fatal("database_unavailable", "later"))
    assert halt.fatal.state == "released", "the release stays the run's end"

    woke = Halt()  # a write or a heartbeat learns of the release after waking met a timeout first
    woke.fail(Fatal("server_unavailable", "timed out while frozen"))
    woke.fail(Fatal("released", "released by an operator"))
    assert woke.fatal is not None and woke.fatal.state == "released"

    stop_only = Halt()

    async def stop() -> str:
        return "stop"

    assert run(stop_only.should_stop(stop)) and stop_only.reason == "stop request in the database"
    assert stop_only.fatal is None
