"""The self-tuning of depth and batch size (core/tuning.py): its decisions, driven by a fake clock and a scripted
server (a discrete-event model of a FIFO server with K slots and a client that spends a fixed time per answer).

Speed is not tested here (benchmarks/ measure it); these tests pin what the tuning decides and when.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from wiki_embeddings.core import tuning as tune
from wiki_embeddings.core.factories import build_tuning, polite_mode
from wiki_embeddings.settings import DEFAULT_TARGET_REQUEST_SEC, Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ScriptedServer:
    """A FIFO server with `slots` slots; a request of n texts takes fixed + per_text * n seconds of one slot.

    `script(i)` may answer "503" for the i-th request (it is then refused at once, as Ollama's full queue does).
    """

    slots: int
    fixed: float = 0.008
    per_text: float = 0.0005
    script: Callable[[int], str | None] = lambda _i: None
    busy: int = 0
    queue: deque = field(default_factory=deque)

    def service(self, texts: int) -> float:
        return self.fixed + self.per_text * texts


@dataclass
class Sim:
    """The client side: a pipeline that always has work, `gap` seconds of client CPU per answer (parse, validate,
    hand to the writer, send the next), every request at the tuning's batch size, one server or several."""

    tuning: tune.Tuning
    servers: list[ScriptedServer]
    clock: FakeClock
    gap: float = 0.004
    events: list = field(default_factory=list)
    seq: itertools.count = field(default_factory=itertools.count)
    active: list[int] = field(default_factory=list)
    cpu_free: float = 0.0
    sent: int = 0
    texts_done: int = 0
    depth_log: list[tuple[int, ...]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.active = [0] * len(self.servers)

    def at(self, t: float, kind: str, data: object = None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, data))

    def try_send(self) -> None:
        for i, server in enumerate(self.servers):
            while self.active[i] < self.tuning.depth(i):
                self.active[i] += 1
                n = self.tuning.batch_size
                ticket = self.tuning.sent(i, n, self.active[i])
                self.depth_log.append(tuple(self.tuning.depth(k) for k in range(len(self.servers))))
                self.sent += 1
                if server.script(self.sent) == "503":
                    self.at(self.clock.now + 0.001, "answer", (i, ticket, "503"))
                elif server.busy < server.slots:
                    server.busy += 1
                    self.at(self.clock.now + server.service(n), "finish", (i, ticket))
                else:
                    server.queue.append(ticket)

    def run(self, requests: int) -> float:
        """Run until `requests` more were answered; returns texts per second over them."""
        start_t, start_texts, target = self.clock.now, self.texts_done, self.sent + requests
        self.try_send()
        while self.sent < target:
            t, _, kind, data = heapq.heappop(self.events)
            self.clock.now = t
            if kind == "finish":
                i, ticket = data
                server = self.servers[i]
                if server.queue:
                    nxt = server.queue.popleft()
                    self.at(t + server.service(nxt.texts), "finish", (i, nxt))
                else:
                    server.busy -= 1
                self.at(t, "answer", (i, ticket, "ok"))
            elif kind == "answer":
                i, ticket, how = data
                self.active[i] -= 1
                seconds = self.tuning.done(ticket, tune.OVERLOAD if how == "503" else tune.OK)
                if how == "ok":
                    self.latencies.append(seconds)
                    self.texts_done += ticket.texts
                self.cpu_free = max(self.cpu_free, t) + self.gap
                self.at(self.cpu_free, "send")
            else:
                self.try_send()
        return (self.texts_done - start_texts) / (self.clock.now - start_t)

    def usual_depth(self, last: int) -> tuple[int, ...]:
        return Counter(self.depth_log[-last:]).most_common(1)[0][0]


def make(slots: int | list[int] = 1, gap: float = 0.004, **kw: object) -> Sim:
    clock = FakeClock()
    servers = [ScriptedServer(s) for s in ([slots] if isinstance(slots, int) else slots)]
    tuning = tune.Tuning(len(servers), clock=clock, **kw)  # type: ignore[arg-type]
    return Sim(tuning, servers, clock, gap=gap)


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_depth_settles_at_one_request_queued_behind_every_slot(slots):
    sim = make(slots)
    assert sim.tuning.depth(0) == 1, "it starts at one request in flight"
    sim.run(300)
    rate = sim.run(1000)
    # One request queued behind the running ones; with several slots the client's own time per answer hides
    # part of a request, so the estimate may settle one higher (still within GROW_BELOW..SHRINK_ABOVE queued).
    assert sim.usual_depth(1000) == (slots + 1,) if slots == 1 else sim.usual_depth(1000)[0] in (slots + 1, slots + 2)
    ceiling = slots * 64 / sim.servers[0].service(64)  # every slot always busy
    assert rate >= 0.97 * ceiling, (rate, ceiling)
    assert max(d for (d,) in sim.depth_log) <= slots + 2, "never far past the knee"


def test_depth_one_leaves_the_server_idle_between_requests_which_is_why_it_grows():
    pinned = make(1, pinned_depth=1)
    rate_one = pinned.run(500)
    auto = make(1)
    auto.run(300)
    rate_auto = auto.run(500)
    service = 0.008 + 0.0005 * 64
    assert rate_one == pytest.approx(64 / (service + 0.004), rel=0.01)  # the slot idles one gap per request
    assert rate_auto >= 0.99 * 64 / service


@dataclass
class SharedCoresServer(ScriptedServer):
    """A CPU model on the client's own cores: while a second request of ours overlaps the one it computes (parsed,
    queued, sent), it runs `penalty` slower."""

    penalty: float = 0.15
    sim: Sim | None = None

    def service(self, texts: int) -> float:
        overlap = self.sim is not None and self.sim.active[0] > 1
        return super().service(texts) * (1 + self.penalty if overlap else 1.0)


def test_a_queued_request_that_slows_a_cpu_model_is_taken_back_and_tried_again_only_much_later():
    clock = FakeClock()
    server = SharedCoresServer(1, fixed=0.005, per_text=0.042)  # ~2.7 s for 64 texts
    sim = Sim(tune.Tuning(1, clock=clock), [server], clock)
    server.sim = sim
    sim.run(12)
    depth = sim.tuning.depths[0]
    undone = [c for c in depth.changes if c[2].startswith("no gain")]
    assert [d for _, d, _ in undone] == [1], depth.changes
    held_from = undone[0][0]
    rate = sim.run(40)  # ~110 s, within the hold: one request in flight all along
    assert set(sim.depth_log[-40:]) == {(1,)}
    assert rate == pytest.approx(64 / (server.service(64) + sim.gap), rel=0.01), "the model runs at its full speed"
    sim.run(int(tune.NO_GAIN_HOLD_SEC / 2.7) + 20)  # past the hold: tried once more, undone once more
    again = [c for c in depth.changes if c[2].startswith("no gain")]
    assert len(again) == 2 and again[1][0] - held_from >= tune.NO_GAIN_HOLD_SEC, depth.changes


def test_each_server_of_a_list_gets_its_own_depth():
    sim = make([1, 3])
    sim.run(400)
    sim.run(1000)
    assert sim.usual_depth(1000) == (2, 4)


def test_each_503_takes_one_request_off_the_depth_leaves_the_batch_and_the_depth_climbs_back():
    """Issue 20: a 503 used to halve the depth and hold it for 16 clean answers; now one fewer in flight, briefly."""
    refuse = {401, 402}
    clock = FakeClock()
    server = ScriptedServer(4, script=lambda i: "503" if i in refuse else None)
    sim = Sim(tune.Tuning(1, clock=clock), [server], clock)
    sim.run(400)
    assert sim.tuning.depth(0) == 5
    sim.run(3)
    assert sim.tuning.depth(0) == 3, "two 503s: two fewer in flight, not a halving each"
    assert sim.tuning.batch_size == 64, "an overload answer says nothing about the batch's size"
    assert [why for _, _, why in sim.tuning.depths[0].changes[-2:]] == ["overload", "overload"]
    assert sim.tuning.depths[0].hold <= tune.OVERLOAD_HOLD < tune.TROUBLE_HOLD
    sim.run(600)
    assert sim.usual_depth(300) == (5,), "and the depth climbs back once the trouble is past"


def test_a_steady_503_rate_does_not_pin_the_depth_at_one():
    """One 503 in five against a one-slot server: the depth keeps going back to 2 (one running, one queued), the
    rate that halving with a 16-answer hold pinned at 1."""
    clock = FakeClock()
    server = ScriptedServer(1, script=lambda i: "503" if i % 5 == 0 else None)
    sim = Sim(tune.Tuning(1, clock=clock), [server], clock)
    sim.run(1000)
    sent_at_two = sum(1 for (d,) in sim.depth_log[-500:] if d >= 2)
    assert sent_at_two > 250, f"{sent_at_two} of the last 500 requests went out with depth 2 or more"


def test_a_steady_503_rate_never_shrinks_the_batch():
    """Issue 20's cliff: one 503 in five used to hold the batch at 1 (every 503 halved it, 8 clean answers were
    needed to double it back)."""
    clock = FakeClock()
    server = ScriptedServer(1, script=lambda i: "503" if i % 5 == 0 else None)
    sim = Sim(tune.Tuning(1, clock=clock), [server], clock)
    sim.run(500)
    assert sim.tuning.batch_size == 64
    assert sim.tuning.sizers[0].changes == []


def test_a_shrunk_batch_grows_back_only_while_goodput_rises():
    clock = FakeClock()
    sizer = tune.BatchSizer(64, clock=clock)
    sizer.shrink("timeout")
    sizer.shrink("timeout")
    assert sizer.size == 16
    for _ in range(tune.GROW_AFTER):  # 16 texts in 0.1 s: 160 texts/s
        sizer.answered(16, 0.1, alone=True, depth=1)
    assert sizer.size == 32 and sizer.trial == (16, 160.0), "a doubled batch is a trial"
    for _ in range(tune.GROW_AFTER):  # 32 texts in 0.1 s: twice the goodput, kept, and the next trial starts
        sizer.answered(32, 0.1, alone=True, depth=1)
    assert sizer.size == 64 and sizer.trial is not None
    for _ in range(tune.GROW_AFTER):  # 64 texts in 0.2 s: no more texts per second than at 32
        sizer.answered(64, 0.2, alone=True, depth=1)
    assert sizer.size == 32 and sizer.changes[-1][2].startswith("no gain"), "a trial that gains nothing is undone"
    for _ in range(tune.GROW_AFTER * 3):
        sizer.answered(32, 0.1, alone=True, depth=1)
    assert sizer.size == 32, "and not tried again before NO_GAIN_HOLD_SEC"
    clock.now += tune.NO_GAIN_HOLD_SEC
    for _ in range(tune.GROW_AFTER):
        sizer.answered(32, 0.1, alone=True, depth=1)
    assert sizer.size == 64


def test_a_timeout_halves_depth_and_batch_an_overload_only_depth_and_an_input_error_neither():
    clock = FakeClock()
    tuning = tune.Tuning(1, clock=clock)
    tuning.depths[0].depth = 8
    ticket = tuning.sent(0, 64, 1)
    clock.now = 120.0
    tuning.done(ticket, tune.ERROR)  # a 400 / 500: the input's business, not the server's load
    assert tuning.depth(0) == 8 and tuning.batch_size == 64
    tuning.done(tuning.sent(0, 64, 1), tune.OVERLOAD)  # a 429/503: one fewer in flight, the same batch
    assert tuning.depth(0) == 7 and tuning.batch_size == 64
    tuning.done(tuning.sent(0, 64, 1), tune.TROUBLE)  # a transport or gateway error: half as many, the same batch
    assert tuning.depth(0) == 3 and tuning.batch_size == 64
    tuning.done(tuning.sent(0, 64, 1), tune.SLOW)  # a timeout: the batch's size may be the cause
    assert tuning.depth(0) == 1 and tuning.batch_size == 32


def test_latency_growth_without_throughput_backs_the_depth_off_and_the_base_is_measured_again():
    sim = make(1)
    sim.run(300)
    assert sim.usual_depth(100) == (2,)
    sim.servers[0].fixed, sim.servers[0].per_text = 0.03, 0.0015  # the server got three times slower
    changes = len(sim.tuning.depths[0].changes)
    sim.run(40)
    new = sim.tuning.depths[0].changes[changes:]
    assert any(depth == 1 and why.startswith("latency grew") for _, depth, why in new), new
    sim.run(400)
    assert sim.usual_depth(300) == (2,)
    assert sim.tuning.depths[0].base[64] == pytest.approx(0.03 + 0.0015 * 64, rel=0.01)


def test_a_server_that_got_faster_is_noticed_by_the_periodic_re_measurement():
    sim = make(1)
    sim.run(300)
    sim.servers[0].fixed, sim.servers[0].per_text = 0.004, 0.00025  # twice as fast: the old base is too high
    sim.run(int(tune.RELEARN_SEC / 0.02) + 300)  # past the next re-measurement
    assert sim.tuning.depths[0].base[64] == pytest.approx(0.004 + 0.00025 * 64, rel=0.01)
    assert sim.usual_depth(200) == (2,)


def test_the_base_is_learned_at_depth_one_after_the_batch_size_changed():
    sim = make(2)
    sim.run(300)
    assert sim.tuning.depth(0) == 3
    depth = sim.tuning.depths[0]
    depth.trouble()  # batch halves (64 -> 32 via the sizer below) and depth halves
    sim.tuning.sizers[0].shrink("timeout")
    sim.run(12)
    assert 32 in depth.base, "the base of the new size was measured (at depth 1)"
    assert any(why == "measure base" for _, _, why in depth.changes) or depth.depth == 1


def test_answers_sent_before_a_change_or_of_another_size_are_not_evidence():
    clock = FakeClock()
    tuning = tune.Tuning(1, clock=clock)
    old = tuning.sent(0, 64, 1)
    tuning.depths[0]._set(2, "test")
    for _ in range(10):
        clock.now += 1.0
        tuning.done(old, tune.OK)  # slow, but sent at the old depth
        tuning.done(tuning.sent(0, 3, 1), tune.OK)  # a bisected / tail batch
    assert tuning.depths[0].window == [] and tuning.depth(0) == 2


def test_a_pinned_depth_never_moves():
    sim = make(1, pinned_depth=3)
    sim.run(300)
    sim.tuning.done(sim.tuning.sent(0, 64, 1), tune.TROUBLE)
    sim.tuning.done(sim.tuning.sent(0, 64, 1), tune.OVERLOAD)
    assert set(sim.depth_log) == {(3,)} and sim.tuning.depth(0) == 3


def test_polite_mode_sizes_batches_to_the_target_duration_at_depth_one():
    clock = FakeClock()
    server = ScriptedServer(1, fixed=0.005, per_text=0.042)  # a CPU model: ~2.7 s for 64 texts
    sim = Sim(tune.Tuning(1, max_batch=64, target_sec=0.5, clock=clock), [server], clock)
    assert sim.tuning.batch_size == tune.POLITE_START and sim.tuning.depth(0) == 1
    sim.run(20)
    size = sim.tuning.batch_size
    assert size == 11  # the largest batch whose request stays within 0.5 s: 0.005 + 0.042 * 11 = 0.467 s
    assert max(sim.latencies[5:]) <= 0.5
    assert set(sim.depth_log) == {(1,)}, "a live query waits behind one request of ours, never a queue"


def test_polite_mode_never_exceeds_the_maximum_batch_and_shrinks_on_a_timeout():
    clock = FakeClock()
    server = ScriptedServer(1, fixed=0.001, per_text=0.0001)  # fast: the target would allow thousands
    sim = Sim(tune.Tuning(1, max_batch=64, target_sec=0.5, clock=clock), [server], clock)
    sim.run(20)
    assert sim.tuning.batch_size == 64
    sim.tuning.done(sim.tuning.sent(0, 64, 1), tune.SLOW)
    assert sim.tuning.batch_size == 32


def test_settings_decide_the_mode(tmp_path, monkeypatch):
    flag = tmp_path / ".env.beta"
    monkeypatch.setenv("WIKI_EMBEDDINGS_ENV_FILE", str(flag))
    auto = build_tuning(Settings(), 2)
    assert auto.auto and auto.target_sec is None and auto.batch_size == 64 and auto.max_workers == 2 * tune.MAX_DEPTH
    assert build_tuning(Settings(concurrency=3), 1).pinned_depth == 3
    assert build_tuning(Settings(sleep_ms=150), 1).pinned_depth == 1, "asked-for idle time means one in flight"
    explicit = build_tuning(Settings(batch_size=16), 1)
    assert explicit.batch_size == 16 and explicit.sizers[0].maximum == 16, "--batch-size is the maximum"
    maintenance = Settings(max_chunks=20000)
    assert not polite_mode(maintenance), "no readiness flag: maintenance runs for throughput"
    flag.write_text("WIKI_EMBEDDINGS_READY=true\n")
    assert polite_mode(maintenance), "after readiness, maintenance is polite by default"
    polite = build_tuning(maintenance, 1)
    assert polite.target_sec == DEFAULT_TARGET_REQUEST_SEC and polite.pinned_depth == 1
    assert not polite_mode(Settings(max_chunks=20000, polite=False))
    assert not polite_mode(Settings()), "a bootstrap is never polite unless asked"
    assert build_tuning(Settings(target_request_sec=0.2), 1).target_sec == 0.2, "a target turns polite mode on"


def test_the_concurrency_setting_reads_auto():
    from wiki_embeddings.cli import build_parser, settings_from_args
    from wiki_embeddings.settings import from_env

    assert from_env({"WIKI_EMBED_CONCURRENCY": "auto"}).concurrency == 0
    assert from_env({"WIKI_EMBED_CONCURRENCY": "2"}).concurrency == 2
    args = build_parser().parse_args(["backfill", "--concurrency", "auto", "--target-request-sec", "0.3"])
    s = settings_from_args(args)
    assert s.concurrency == 0 and s.target_request_sec == 0.3
    with pytest.raises(ValueError):
        Settings(concurrency=-1).validate()
