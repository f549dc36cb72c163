"""Outside tester's weather round, fast tier: Retry-After values a server may really send, and the clocks the
decisions read (monotonic, so an NTP step or a daylight-saving change moves nothing)."""

from __future__ import annotations

import asyncio
import inspect
import time

import pytest

from wiki_embeddings.core import health as h
from wiki_embeddings.core import tuning as tune
from wiki_embeddings.core.embedders.base import ServerUnavailable
from wiki_embeddings.core.embedders.servers import Server, ServerPool
from wiki_embeddings_tests.unit.test_server_health import Clock

pytestmark = pytest.mark.unit


def test_retry_after_zero_never_makes_a_request_retry_with_no_pause():
    """429 `Retry-After: 0` on every try: the request's pause still doubles (before: 0 s each time, six tries in a
    few milliseconds)."""
    clock = Clock()
    server = h.ServerHealth(backoff_base_sec=0.5, backoff_max_sec=2.0, clock=clock, jitter=lambda: 1.0)
    server.success(0.02)
    pauses = [server.failure("HTTP 429", retry_after=0.0, answered=True, attempt=k) for k in (1, 2, 3)]
    assert all(p >= h.FIRST_BACKOFF_MIN_SEC for p in pauses), pauses
    assert pauses[0] < pauses[1] < pauses[2], pauses


def test_a_retry_after_longer_than_the_ceiling_starts_the_run_s_server_wait_at_once():
    """`Retry-After: 3600`: the server said it is away for longer than we ever back off. It keeps its place (one
    such answer among good ones is weather), but it counts as gone from now, so the run's wait
    (WIKI_EMBED_SERVER_WAIT_SEC) counts from this answer, not from a take-out after two 30 s holds; its next good
    answer ends that."""
    clock = Clock()
    server = h.ServerHealth(backoff_max_sec=30.0, clock=clock)
    server.success(0.02)
    server.failure("HTTP 429", retry_after=3600.0, answered=True)
    assert server.in_rotation and not server.available()
    assert server.gone_since() == clock.now and "Retry-After" in server.why_gone()
    assert "Retry-After" in str(server.snapshot()["reason"]), "the heartbeat says why the run is waiting"
    clock.now += 30.0
    server.failure("HTTP 429", retry_after=3600.0, answered=True)
    assert server.gone_since() == clock.now - 30.0, "counted from the first such answer"
    server.success(0.02)
    assert server.gone_since() is None and server.why_gone() == "" and server.in_rotation


async def _no_probe(_server: Server) -> None:
    return None


def _lone_pool(clock: Clock, wait: float) -> ServerPool:
    tuning = tune.Tuning(1, pinned_depth=1, clock=clock)
    tuning.controls[0].health = h.ServerHealth(backoff_max_sec=30.0, clock=clock, jitter=lambda: 1.0)
    return ServerPool(["http://s0:11434"], tuning, _no_probe, server_wait_sec=wait, clock=clock)


def test_the_only_server_asking_for_an_hour_ends_the_run_one_server_wait_after_its_first_such_answer():
    """WIKI_EMBED_SERVER_WAIT_SEC 10 under a 30 s ceiling: the pool gives up 10 s after the first `Retry-After: 3600`
    (before: after two 30 s holds and a take-out, then the wait), naming Retry-After and the setting."""
    clock = Clock()

    async def scenario() -> None:
        p = _lone_pool(clock, wait=10.0)
        p.health(p.servers[0]).success(0.02)
        p.health(p.servers[0]).failure("HTTP 429", retry_after=3600.0, answered=True)
        clock.now += 9.9
        with pytest.raises(asyncio.TimeoutError):  # still within the wait: held, not given up
            await asyncio.wait_for(p.acquire(), 0.05)
        clock.now += 0.1
        await p.acquire()

    with pytest.raises(
        ServerUnavailable, match=r"Retry-After.*WIKI_EMBED_SERVER_WAIT_SEC|WIKI_EMBED_SERVER_WAIT_SEC.*Retry"
    ):
        asyncio.run(scenario())


def test_a_steady_share_of_hour_long_retry_afters_between_good_answers_never_ends_the_run():
    """One answer in five `Retry-After: 3600`, the others good: each good answer ends the away time, so however long
    the run, the pool never gives up and the server never leaves the rotation."""
    clock = Clock()

    async def scenario() -> None:
        p = _lone_pool(clock, wait=10.0)
        health = p.health(p.servers[0])
        for k in range(100):  # 100 answers, 20 of them holds of the 30 s ceiling: far past the 10 s wait
            server = await asyncio.wait_for(p.acquire(), 1)
            if k % 5 == 2:
                health.failure("HTTP 429", retry_after=3600.0, answered=True)
                clock.now += health.wait()  # the hold (the ceiling) passes
            else:
                health.success(0.02)
                clock.now += 0.02
            p.release(server)
        assert health.in_rotation and health.gone_since() is None

    asyncio.run(scenario())


def test_a_retry_after_within_the_ceiling_keeps_the_server_in():
    clock = Clock()
    server = h.ServerHealth(backoff_max_sec=30.0, clock=clock)
    server.success(0.02)
    assert server.failure("HTTP 503", retry_after=5.0, answered=True) == pytest.approx(5.0)
    assert server.in_rotation and not server.available()


def test_every_decision_reads_the_monotonic_clock_by_default():
    """Wall-clock steps (NTP, an operator's `date -s`) must not shorten a backoff or an out-of-rotation wait."""
    assert h.ServerHealth().clock is time.monotonic
    assert tune.Tuning(1).clock is time.monotonic
    assert inspect.signature(ServerPool.__init__).parameters["clock"].default is time.monotonic


def test_a_clock_that_steps_back_does_not_release_a_held_server_early_or_take_it_out():
    """A fake clock stepping back (what a non-monotonic clock would do): the server stays held, never goes out
    on a negative streak length, and the hold ends when the time comes again."""
    clock = Clock()
    server = h.ServerHealth(backoff_base_sec=0.5, backoff_max_sec=30.0, clock=clock)
    server.success(0.02)
    server.failure("HTTP 503", retry_after=10.0, answered=True)
    clock.now -= 3600.0
    assert not server.available() and server.wait() > 10.0
    clock.now += 3600.0 + 10.0
    assert server.available() and server.in_rotation
