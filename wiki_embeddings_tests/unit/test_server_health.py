"""Per-server health and control (issue 20), decided with a fake clock: backoff, leaving and rejoining the
rotation, probes, the wait before giving up, and the pool that hands requests to servers."""

from __future__ import annotations

import asyncio

import pytest

from wiki_embeddings.core import health as h
from wiki_embeddings.core import tuning as tune
from wiki_embeddings.core.embedders import ModelNotFound, ServerUnavailable
from wiki_embeddings.core.embedders.servers import Server, ServerPool

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def health(clock: Clock, **kw: object) -> h.ServerHealth:
    return h.ServerHealth(clock=clock, jitter=lambda: 1.0, **kw)  # type: ignore[arg-type]


def test_one_failure_after_good_answers_costs_about_one_request_not_the_configured_base():
    clock = Clock()
    server = health(clock, backoff_base_sec=0.5)
    server.success(0.02)
    server.failure("connection reset")  # no answer at all: the whole server waits
    assert server.wait() == pytest.approx(0.04), "twice a recent answer's time"
    assert server.in_rotation and not server.available()
    clock.now += 0.05
    assert server.available()


def test_a_lone_503_among_good_answers_delays_its_request_not_the_server():
    """Issue 20: blocking the whole server for the backoff after each of one 503 in five idled it."""
    clock = Clock()
    server = health(clock, backoff_base_sec=0.5)
    server.success(0.02)
    pause = server.failure("HTTP 503", answered=True)
    assert pause == pytest.approx(0.04), "the failed request waits about one request's time"
    assert server.available() and server.wait() == 0.0, "the other requests go on"


def test_failures_in_a_row_double_the_backoff_up_to_its_ceiling():
    clock = Clock()
    server = health(clock, backoff_base_sec=0.5, backoff_max_sec=2.0)
    waits = []
    for _ in range(5):
        server.failure("connect error")
        waits.append(round(server.wait(), 3))
        clock.now += server.wait()
    assert waits[:3] == [0.5, 1.0, 2.0] and waits[3:] == [2.0, 2.0]


def test_a_request_refused_again_and_again_waits_longer_each_time_though_the_server_answers_others():
    clock = Clock()
    server = health(clock, backoff_base_sec=0.5, backoff_max_sec=0.1)
    pauses = []
    for attempt in (1, 2, 3, 4):
        server.success(0.02)  # others' good answers between this request's tries
        pauses.append(round(server.failure("HTTP 503", answered=True, attempt=attempt), 3))
    assert pauses == [0.04, 0.08, 0.1, 0.1], "doubling with the request's own failures, up to the ceiling"
    assert server.available()


def test_retry_after_is_honoured_within_the_ceiling():
    clock = Clock()
    server = health(clock, backoff_max_sec=30.0)
    server.failure("HTTP 429", retry_after=7.0)
    assert server.wait() == pytest.approx(7.0)
    server.failure("HTTP 429", retry_after=3600.0)
    assert server.wait() == pytest.approx(30.0)


def test_retry_after_holds_the_whole_server_even_after_a_lone_overload_answer():
    clock = Clock()
    server = health(clock)
    server.success(0.02)
    assert server.failure("HTTP 503", retry_after=2.0, answered=True) == pytest.approx(2.0)
    assert not server.available() and server.wait() == pytest.approx(2.0), "the server said when to come back"
    clock.now += 2.0
    assert server.available()


def test_a_steady_error_rate_keeps_a_server_in_the_rotation():
    clock = Clock()
    server = health(clock)
    for i in range(1000):  # one answer in five is a 503, 20 ms apart
        clock.now += 0.02
        if i % 5 == 0:
            server.failure("HTTP 503")
        else:
            server.success(0.02)
    assert server.in_rotation and server.failures == 200


def test_a_steady_503_rate_never_blocks_the_server():
    clock = Clock()
    server = health(clock)
    blocked = 0
    for i in range(1000):  # one answer in five is a 503, 20 ms apart
        clock.now += 0.02
        if i % 5 == 0:
            server.failure("HTTP 503", answered=True)
            blocked += not server.available()
        else:
            server.success(0.02)
    assert server.in_rotation and server.failures == 200 and blocked == 0


def test_a_server_answering_503_to_everything_is_held_then_leaves_the_rotation():
    clock = Clock()
    server = health(clock)
    server.success(0.02)
    for i in range(h.BLOCK_AFTER_FAILURES):
        clock.now += 0.01
        server.failure("HTTP 503", answered=True)
        assert server.available() == (i + 1 < h.BLOCK_AFTER_FAILURES), "a streak holds the whole server"
    clock.now += h.OUT_AFTER_SEC
    server.failure("HTTP 503", answered=True)
    assert server.state == h.OUT and "HTTP 503" in server.reason


def test_a_server_that_fails_every_request_for_a_while_leaves_the_rotation():
    clock = Clock()
    server = health(clock)
    server.success(0.02)
    for _ in range(3):
        clock.now += 0.1
        server.failure("HTTP 503")
    assert server.in_rotation, "three quick failures are not yet a sick server"
    clock.now += h.OUT_AFTER_SEC
    server.failure("HTTP 503")
    assert server.state == h.OUT and "HTTP 503" in server.reason


def test_a_server_that_never_answered_leaves_after_three_failures():
    clock = Clock()
    server = health(clock)
    for _ in range(h.OUT_AFTER_FAILURES):
        server.failure("connection refused")
    assert server.state == h.OUT


def test_an_out_server_is_probed_every_30_s_while_others_work_and_every_5_s_alone():
    clock = Clock()
    server = health(clock)
    server.take_out("test")
    assert server.probe_in(others_in_rotation=True) == pytest.approx(h.PROBE_SEC)
    assert server.probe_in(others_in_rotation=False) == pytest.approx(h.PROBE_ALONE_SEC)
    clock.now += h.PROBE_ALONE_SEC
    assert server.probe_in(False) == 0.0 and server.probe_in(True) > 0
    server.probing()
    assert server.probe_in(False) == pytest.approx(h.PROBE_ALONE_SEC)


def test_a_good_answer_brings_a_server_back_and_clears_its_backoff():
    clock = Clock()
    server = health(clock)
    server.take_out("test")
    server.success(0.01)
    assert server.available() and server.out_since is None
    assert [state for _, state, _ in server.history] == [h.OUT, h.IN]


def test_a_missing_model_takes_a_server_out_as_no_model():
    server = health(Clock())
    server.no_model("model 'x' not found")
    assert server.state == h.NO_MODEL and not server.in_rotation


def test_the_claimer_takes_the_largest_batch_a_server_in_the_rotation_takes():
    tuning = tune.Tuning(2, max_batch=64)
    tuning.controls[0].sizer.shrink("timeout")
    assert tuning.size_for(0) == 32 and tuning.batch_size == 64
    tuning.controls[1].health.take_out("dead")
    assert tuning.batch_size == 32, "an out server's batch size does not count"


def _answer(tuning: tune.Tuning, clock: Clock, outcome: str = tune.OK) -> None:
    """One request of 64 texts, alone at a one-slot server that takes 20 ms (a 503 comes back at once)."""
    ticket = tuning.sent(0, 64, 1)
    clock.now += 0.02 if outcome == tune.OK else 0.001
    tuning.done(ticket, outcome)


def test_one_503_in_five_lowers_the_depth_by_one_and_the_clean_answers_between_bring_it_back():
    clock = Clock()
    tuning = tune.Tuning(1, clock=clock)
    for _ in range(tune.BASE_SAMPLES):  # the base is measured at depth 1; nothing waits: a slot idles
        _answer(tuning, clock)
    assert tuning.depth(0) == 2
    for _ in range(50):
        _answer(tuning, clock, tune.OVERLOAD)
        assert tuning.depth(0) == 1, "one fewer in flight"
        for _ in range(4):
            _answer(tuning, clock)
        assert tuning.depth(0) == 2, "four clean answers are enough to go back: the rate does not pin it at 1"
    assert tuning.batch_size == 64


def test_a_transport_error_still_halves_the_depth_and_holds_it_longer_than_an_overload_answer():
    clock = Clock()
    tuning = tune.Tuning(1, clock=clock)
    tuning.depths[0].depth = 8
    _answer(tuning, clock, tune.OVERLOAD)
    assert (tuning.depth(0), tuning.depths[0].hold) == (7, tune.OVERLOAD_HOLD)
    _answer(tuning, clock, tune.TROUBLE)
    assert (tuning.depth(0), tuning.depths[0].hold) == (3, tune.TROUBLE_HOLD)
    _answer(tuning, clock, tune.OVERLOAD)
    assert (tuning.depth(0), tuning.depths[0].hold) == (2, tune.TROUBLE_HOLD), "an overload never shortens a hold"


async def _no_probe(_server: Server) -> None:
    return None


def pool(servers: int, clock: Clock, wait: float = 300.0, probe=_no_probe) -> ServerPool:
    tuning = tune.Tuning(servers, pinned_depth=1, clock=clock)
    for control in tuning.controls:
        control.health.clock = clock
    return ServerPool([f"http://s{i}:11434" for i in range(servers)], tuning, probe, server_wait_sec=wait, clock=clock)


def test_the_pool_skips_a_server_out_of_the_rotation():
    async def scenario() -> list[int]:
        p = pool(2, Clock())
        p.take_out(p.servers[0], "sick")
        got = []
        for _ in range(3):
            s = await p.acquire()
            got.append(s.index)
            p.release(s)
        return got

    assert asyncio.run(scenario()) == [1, 1, 1]


def test_a_pinned_request_goes_to_its_server_even_when_it_is_out():
    async def scenario() -> int:
        p = pool(2, Clock())
        p.take_out(p.servers[0], "sick")
        s = await p.acquire(only=0)
        p.release(s)
        return s.index

    assert asyncio.run(scenario()) == 0


def test_with_every_server_out_past_the_wait_the_pool_gives_up_and_names_the_setting():
    clock = Clock()

    async def scenario() -> None:
        p = pool(2, clock, wait=10.0)
        for s in p.servers:
            p.health(s).success(0.01)
            p.take_out(s, "HTTP 503")
        clock.now += 10.0
        await p.acquire()

    with pytest.raises(ServerUnavailable, match="WIKI_EMBED_SERVER_WAIT_SEC"):
        asyncio.run(scenario())


def test_servers_that_never_answered_fail_at_once():
    async def scenario() -> None:
        p = pool(1, Clock())
        p.take_out(p.servers[0], "connection refused")
        await p.acquire()

    with pytest.raises(ServerUnavailable, match="none answered"):
        asyncio.run(scenario())


def test_the_model_missing_on_every_server_is_model_not_found():
    async def scenario() -> None:
        p = pool(2, Clock())
        for s in p.servers:
            p.health(s).no_model("model 'x' not found, try pulling it first")
        await p.acquire()

    with pytest.raises(ModelNotFound, match="pulling"):
        asyncio.run(scenario())


def test_a_request_waits_out_its_pause_while_the_others_use_the_server_and_a_worker_holds_a_batch_instead():
    clock = Clock()

    async def scenario() -> None:
        p = pool(1, clock)
        avoid: dict[int, float] = {}
        p.pause(avoid, p.servers[0], 0.04)  # this request got a 503
        other = await asyncio.wait_for(p.acquire(), 1)  # another request goes at once
        p.release(other)
        waiting = asyncio.ensure_future(p.acquire(avoid=avoid))
        await asyncio.sleep(0.01)
        assert not waiting.done(), "its pause is not over"
        assert p.turns.limit == 2, "while it pauses, one more worker may hold a batch: the server does not idle"
        clock.now += 0.04
        s = await asyncio.wait_for(waiting, 5)
        assert s.index == 0 and p.turns.limit == 1
        p.release(s)

    asyncio.run(scenario())


def test_a_request_pausing_for_one_server_goes_to_another_at_once():
    async def scenario() -> int:
        p = pool(2, Clock())
        avoid: dict[int, float] = {}
        p.pause(avoid, p.servers[0], 10.0)
        s = await asyncio.wait_for(p.acquire(avoid=avoid), 1)
        p.release(s)
        return s.index

    assert asyncio.run(scenario()) == 1


def test_while_every_server_is_out_a_probe_brings_one_back_and_the_waiting_request_goes():
    clock = Clock()
    probed: list[int] = []

    async def scenario() -> int:
        async def probe(server: Server) -> None:
            probed.append(server.index)
            p.health(server).success(0.01)

        p = pool(1, clock, probe=probe)
        p.health(p.servers[0]).success(0.01)
        p.take_out(p.servers[0], "HTTP 503")
        clock.now += h.PROBE_ALONE_SEC  # the probe is due
        s = await asyncio.wait_for(p.acquire(), 5)
        p.release(s)
        return s.index

    assert asyncio.run(scenario()) == 0 and probed == [0]
