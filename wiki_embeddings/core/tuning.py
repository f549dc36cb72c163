"""Self-tuning of the pipeline: requests in flight per server (depth) and chunks per request (batch size).

Pure logic, no HTTP and no SQL: the client reports every request it sends (`Tuning.sent`) and how it ended
(`Tuning.done`); the engine reads `batch_size` before each claim and the client reads `depth(i)` before each
send. Time comes from an injectable clock, so every decision is testable with a fake clock and a scripted server.

Depth (per server, unless pinned by `--concurrency N`; `--sleep-ms > 0` and polite mode pin it at 1):
  A server idles between two of our requests while we parse an answer and send the next one, unless one
  more request waits in its queue. So depth starts at 1 and is sized like TCP Vegas: `base` is the latency of
  a request of n texts with nothing else of ours in flight (learned at depth 1), `R` the mean latency at
  the current depth, and `queued = depth * (1 - base / R)` estimates how many of our requests wait in the
  server's queue. queued < GROW_BELOW (nothing waits: a slot idles between requests) -> depth + 1;
  queued > SHRINK_ABOVE (latency grew with no slot to show for it) -> depth - 1. Against a one-slot server
  this settles at 2 (one running, one queued), against K slots at K + 1. The first added request (depth 1 -> 2)
  must raise the server's answered texts/s (goodput) by MIN_GAIN, else it is taken back and depth holds for
  NO_GAIN_HOLD_SEC: a CPU model sharing the client's cores can lose more to the overlap than the idle gap it
  fills. An overload answer (429/503: the server is there and says it is full) takes one request off the depth and
  holds it for OVERLOAD_HOLD clean answers: a full queue empties by one fewer in flight, and a steady rate of them
  (one in five) must not pin the depth at 1, as halving with a long hold did (issue 20). A 502/504, a transport
  error or a timeout halves the depth and holds it for TROUBLE_HOLD clean answers. Every RELEARN_SEC the base is
  measured again at depth 1 for BASE_SAMPLES requests (~0.2 % of the time at 4 slots), so a server that got faster
  is seen as it is now (one that got slower shows as latency growth and is re-measured anyway).

Batch size (per server, all modes): the configured `--batch-size` is the maximum. Only what a batch's size
explains shrinks it (a timeout, a refusal as too large: the cap halves); an overload answer (429/503) leaves it
alone and is met with backoff (core/health.py) and fewer in flight. It grows back by goodput: a doubled cap is a
trial, kept only when the server's answered texts per second rise. The claimer takes the largest batch a server
in the rotation takes; a server with a smaller one gets it in pieces. Polite mode adds a target request
duration: size = target / (measured seconds per chunk at depth 1), so a live query arriving at the server waits
behind at most about `target` seconds of ours.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wiki_embeddings.core.health import ServerHealth

MAX_DEPTH = 8  # requests in flight per server that auto-tuning may reach
GROW_BELOW = 0.5  # estimated requests of ours queued at the server below which depth grows
SHRINK_ABOVE = 1.5  # ... above which it shrinks
MIN_SAMPLES = 3  # answers at one depth (and batch size) before a decision (at least one per request in flight)
BASE_SAMPLES = 2  # answers at depth 1 that measure the base latency (their fastest counts)
TROUBLE_HOLD = 16  # clean answers after a trouble before depth may grow again
OVERLOAD_HOLD = 2  # clean answers after an overload answer (429/503) before depth may grow again
RELEARN_SEC = 60.0  # seconds between two re-measurements of the base latency at depth 1
GROW_AFTER = 8  # full answers at one batch size before it may double (a goodput trial)
MIN_GAIN = 0.02  # a request added to the queue must raise the server's answered texts/s by this share, else undone
NO_GAIN_HOLD_SEC = 300.0  # after an added request gained nothing: seconds before depth may grow again
POLITE_START = 1  # polite mode's first batch: nothing is known about the model's speed yet
PER_CHUNK_WEIGHT = 0.5  # weight of the newest measurement in the seconds-per-chunk average

OK, OVERLOAD, TROUBLE, SLOW, ERROR, IGNORE = "ok", "overload", "trouble", "slow", "error", "ignore"


@dataclass
class Ticket:
    """One request in flight: where it went, what it carried, what was in flight with it."""

    server: int
    texts: int
    depth: int  # the server's depth limit when it was sent
    active: int  # our requests in flight at that server, this one included
    epoch: int  # the server's decision epoch when it was sent (older ones do not count)
    sent_at: float


class ServerDepth:
    """The in-flight depth of one server."""

    def __init__(self, pinned: int | None, max_depth: int, clock: Callable[[], float]):
        self.pinned = pinned
        self.max_depth = max(1, max_depth if pinned is None else pinned)
        self.depth = pinned or 1
        self.clock = clock
        self.base: dict[int, float] = {}  # texts per request -> latency with nothing else of ours in flight
        self.window: list[float] = []
        self.window_texts = 0
        self.epoch = 0
        self.resume: int | None = None  # during a re-measurement at depth 1: the depth to go back to
        self.hold = 0  # clean answers still to see before growing (after a trouble)
        self.last_relearn = clock()
        self.troubles = 0
        self.changes: list[tuple[float, int, str]] = []  # (time, new depth, why): for reports and tests
        self.last_estimate: float | None = None
        self.answer_times: list[float] = []  # when each answer of the current window came (for its goodput)
        self.trial: tuple[int, float | None] | None = None  # just grown: (the depth before, its goodput)
        self.no_grow_until = float("-inf")

    def _set(self, depth: int, why: str) -> None:
        depth = max(1, min(self.max_depth, depth))
        self.epoch += 1
        self._new_window()
        if depth != self.depth:
            self.depth = depth
            self.changes.append((self.clock(), depth, why))

    def _new_window(self) -> None:
        self.window = []
        self.answer_times = []

    def goodput(self) -> float | None:
        """Texts per second this server answered over the current window: the last `depth` answers over the time
        since the answer before them. With `depth` requests kept in flight, an answer comes back exactly one cycle
        after the answer `depth` places earlier (its request went out again), so that span holds whole cycles
        however bunched the answers are within one (None before depth + 1 answers)."""
        times, depth = self.answer_times, self.depth
        if len(times) <= depth or times[-1] <= times[-1 - depth]:
            return None
        return self.window_texts * depth / (times[-1] - times[-1 - depth])

    def trouble(self) -> None:
        """A transport error, a gateway error or a timeout: half as many in flight, for a while."""
        self._back_off(self.depth // 2, TROUBLE_HOLD, "trouble")

    def overload(self) -> None:
        """A 429/503: one fewer in flight, briefly (a steady rate of them must not pin the depth at 1)."""
        self._back_off(self.depth - 1, OVERLOAD_HOLD, "overload")

    def _back_off(self, depth: int, hold: int, why: str) -> None:
        self.troubles += 1
        if self.pinned is not None:
            return
        self.resume = None
        self.trial = None
        self.hold = max(self.hold, hold)
        self._set(max(1, depth), why)

    def answered(self, ticket: Ticket, seconds: float, nominal: int) -> None:
        """A clean answer of `ticket.texts` texts after `seconds`; `nominal` is the batch size in use."""
        if self.pinned is not None:
            return
        n = ticket.texts
        if ticket.active == 1 and n in self.base and seconds < self.base[n]:
            self.base[n] = seconds  # a faster answer alone is evidence: the base is never above it
        self.hold = max(0, self.hold - 1)
        if ticket.epoch != self.epoch or n != nominal:
            return  # sent before the last change, or a partial / bisected batch: not this depth's evidence
        if n != self.window_texts:  # the batch size changed: a window holds answers of one size only
            self._new_window()
            self.window_texts = n
        self.window.append(seconds)
        self.answer_times.append(self.clock())
        if len(self.window) < (BASE_SAMPLES if self.depth == 1 else max(MIN_SAMPLES, self.depth)):
            return
        self._decide(n)

    def _decide(self, n: int) -> None:
        window = self.window
        if self.depth == 1:
            self.base[n] = min(window)  # measured now, at depth 1: replaces an older (possibly stale) value
            self.last_relearn = self.clock()
            if self.resume is not None:
                back, self.resume = self.resume, None
                self._set(back, "base re-measured")
                return
        base = self.base.get(n)
        if base is None:  # a new batch size: its base is measured at depth 1 first
            self.resume = self.depth
            self._set(1, "measure base")
            return
        rate = self.goodput()
        if self.trial is not None:
            # The request just added must pay: on a one-slot server that computes on the same cores as this client
            # (a CPU model) a queued request can slow the model more than the idle gap it fills.
            before, before_rate, self.trial = self.trial[0], self.trial[1], None
            if rate is not None and before_rate is not None and rate < before_rate * (1 + MIN_GAIN):
                self.no_grow_until = self.clock() + NO_GAIN_HOLD_SEC
                self._set(before, f"no gain ({rate:.1f} vs {before_rate:.1f} texts/s)")
                return
        latency = statistics.fmean(window)  # the average (Little's law): a median misses the one queued in N
        queued = self.depth * max(0.0, 1.0 - base / latency) if latency > 0 else 0.0
        self.last_estimate = queued
        growable = self.depth < self.max_depth and self.hold == 0 and self.clock() >= self.no_grow_until
        if queued < GROW_BELOW and growable:
            # The first queued request is a trial: one slot shared with the model's cores may not pay for it.
            # Deeper requests fill slots the latency shows idle (they are no trial: a few answers at depth > 2
            # come too bunched to compare goodputs reliably).
            self.trial = (self.depth, rate) if self.depth == 1 else None
            self._set(self.depth + 1, f"idle slot (queued {queued:.2f})")
        elif queued > SHRINK_ABOVE and self.depth > 1:
            self._set(self.depth - 1, f"latency grew (queued {queued:.2f})")
        elif self.depth > 1 and self.clock() - self.last_relearn >= RELEARN_SEC:
            self.resume = self.depth
            self._set(1, "re-measure base")
        else:
            self._new_window()


class BatchSizer:
    """Chunks per request to one server: at most `maximum`; polite mode sizes it to a target request duration.

    Only causes a batch's size explains shrink it: a timeout or a request refused as too large halves the cap.
    An overload answer (429/503) does not: a steady error rate would otherwise hold the batch at 1 (the cliff of
    issue 20). It grows back by measured goodput: after GROW_AFTER full answers the cap doubles as a trial, kept
    only when the answered texts per second rise by MIN_GAIN; else it goes back and holds NO_GAIN_HOLD_SEC.
    """

    def __init__(
        self,
        maximum: int,
        target_sec: float | None = None,
        minimum: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.maximum = max(1, maximum)
        self.minimum = max(1, min(minimum, self.maximum))
        self.target_sec = target_sec
        self.clock = clock
        self.cap = self.maximum
        self.per_chunk: float | None = None  # seconds per chunk at depth 1 (polite mode)
        self.troubles = 0
        self.rates: list[float] = []  # texts per second of full answers at the current cap and depth
        self.rates_depth = 0
        self.trial: tuple[int, float] | None = None  # just doubled: (the cap before, its rate)
        self.no_grow_until = float("-inf")
        self.changes: list[tuple[float, int, str]] = []

    @property
    def size(self) -> int:
        size = self.cap
        if self.target_sec is not None:
            fit = int(self.target_sec / self.per_chunk) if self.per_chunk else POLITE_START
            size = min(size, max(1, fit))
        return max(self.minimum, min(size, self.maximum))

    def shrink(self, why: str) -> None:
        """A timeout or a refusal as too large: the batch's size is the likely cause."""
        self.troubles += 1
        self.trial = None
        self._set(max(self.minimum, self.size // 2), why)

    def limit(self, maximum: int, why: str) -> None:
        """The server said how many inputs a request may hold at most (TEI's --max-client-batch-size): never more."""
        self.maximum = max(1, min(self.maximum, maximum))
        self.minimum = min(self.minimum, self.maximum)
        self._set(min(self.cap, self.maximum), why)

    def _set(self, cap: int, why: str) -> None:
        self.rates = []
        if cap != self.cap:
            self.cap = cap
            self.changes.append((self.clock(), cap, why))

    def answered(self, texts: int, seconds: float, alone: bool, depth: int) -> None:
        if self.target_sec is not None and alone and texts > 0 and seconds > 0:
            per = seconds / texts  # includes the request's fixed cost: errs on the short side of the target
            old = self.per_chunk
            self.per_chunk = per if old is None else old + PER_CHUNK_WEIGHT * (per - old)
        if texts != self.size or seconds <= 0:
            return  # a partial or bisected batch is no evidence about this size
        if depth != self.rates_depth:  # goodputs compare only at one depth
            self.rates, self.rates_depth, self.trial = [], depth, None
        self.rates.append(texts / seconds)
        if len(self.rates) < GROW_AFTER:
            return
        rate = statistics.median(self.rates)
        if self.trial is not None:
            before, before_rate = self.trial
            self.trial = None
            if rate < before_rate * (1 + MIN_GAIN):
                self.no_grow_until = self.clock() + NO_GAIN_HOLD_SEC
                self._set(before, f"no gain ({rate:.1f} vs {before_rate:.1f} texts/s)")
                return
        if self.cap < self.maximum and self.clock() >= self.no_grow_until:
            self.trial = (self.cap, rate)
            self._set(min(self.maximum, self.cap * 2), "trial")
        else:
            self.rates = []


@dataclass
class ServerControl:
    """Everything the client controls about one server: requests in flight, batch size, health."""

    depth: ServerDepth
    sizer: BatchSizer
    health: ServerHealth

    def snapshot(self) -> dict[str, Any]:
        return {"depth": self.depth.depth, "batch_size": self.sizer.size, **self.health.snapshot()}


@dataclass
class Tuning:
    """Depth, batch size and health per server for one run. `pinned_depth` None: self-tuning depth."""

    servers: int
    pinned_depth: int | None = None
    max_batch: int = 64
    target_sec: float | None = None  # polite mode's target request duration (None: throughput mode)
    max_depth: int = MAX_DEPTH
    clock: Callable[[], float] = time.monotonic
    backoff_base_sec: float = 0.5
    backoff_max_sec: float = 30.0
    controls: list[ServerControl] = field(init=False)

    def __post_init__(self) -> None:
        if self.target_sec is not None and self.pinned_depth is None:
            self.pinned_depth = 1  # polite: a live query waits behind one request of ours, never a queue of them
        self.controls = [
            ServerControl(
                ServerDepth(self.pinned_depth, self.max_depth, self.clock),
                BatchSizer(self.max_batch, self.target_sec, clock=self.clock),
                ServerHealth(self.backoff_base_sec, self.backoff_max_sec, clock=self.clock),
            )
            for _ in range(self.servers)
        ]

    @property
    def depths(self) -> list[ServerDepth]:
        return [c.depth for c in self.controls]

    @property
    def sizers(self) -> list[BatchSizer]:
        return [c.sizer for c in self.controls]

    @property
    def healths(self) -> list[ServerHealth]:
        return [c.health for c in self.controls]

    @property
    def auto(self) -> bool:
        return self.pinned_depth is None

    @property
    def batch_size(self) -> int:
        """What the claimer takes per batch: the largest batch a server in the rotation takes (a server with a
        smaller one gets the batch in pieces)."""
        sizes = [c.sizer.size for c in self.controls if c.health.in_rotation] or [c.sizer.size for c in self.controls]
        return max(sizes)

    def size_for(self, server: int) -> int:
        return self.controls[server].sizer.size

    def depth(self, server: int) -> int:
        return self.controls[server].depth.depth

    @property
    def total_depth(self) -> int:
        return sum(c.depth.depth for c in self.controls if c.health.in_rotation) or 1

    @property
    def max_workers(self) -> int:
        """Embed workers the engine runs: enough for every server at its largest depth."""
        return sum(c.depth.max_depth for c in self.controls)

    def sent(self, server: int, texts: int, active: int) -> Ticket:
        d = self.controls[server].depth
        return Ticket(server, texts, d.depth, active, d.epoch, self.clock())

    def done(self, ticket: Ticket, outcome: str) -> float:
        """Record how a request ended (OK, OVERLOAD, TROUBLE, SLOW, ERROR or IGNORE); returns its duration."""
        seconds = self.clock() - ticket.sent_at
        control = self.controls[ticket.server]
        if outcome == OVERLOAD:
            control.depth.overload()  # one fewer in flight, the same batch
        elif outcome in (TROUBLE, SLOW):
            control.depth.trouble()  # fewer in flight
            if outcome == SLOW:
                control.sizer.shrink("timeout or too large")
        elif outcome == OK:
            control.sizer.answered(ticket.texts, seconds, alone=ticket.active == 1, depth=ticket.depth)
            control.depth.answered(ticket, seconds, control.sizer.size)
        return seconds

    def snapshot(self) -> dict[str, Any]:
        """The tuning's state for the run report."""
        sizer = self.controls[0].sizer
        return {
            "mode": "polite" if self.target_sec is not None else "throughput",
            "depth": "auto" if self.auto else self.pinned_depth,
            "depths": [c.depth.depth for c in self.controls],
            "depth_changes": [len(c.depth.changes) for c in self.controls],
            "batch_size": self.batch_size,
            "batch_sizes": [c.sizer.size for c in self.controls],
            "max_batch": self.max_batch,
            "target_request_sec": self.target_sec,
            "seconds_per_chunk": round(sizer.per_chunk, 6) if sizer.per_chunk else None,
            "troubles": sum(c.depth.troubles for c in self.controls),
            "servers": [c.health.snapshot() for c in self.controls],
        }
