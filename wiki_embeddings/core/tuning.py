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
  fills. A 429/503/502/504, a transport error or a timeout halves the depth and holds it for TROUBLE_HOLD clean
  answers. Every RELEARN_SEC the base is measured again at depth 1 for BASE_SAMPLES requests (~0.2 % of the
  time at 4 slots), so a server that got faster is seen as it is now (one that got slower shows as latency growth
  and is re-measured anyway).

Batch size (all modes): the configured `--batch-size` is the maximum. Trouble (429/503/timeouts) halves a cap;
GROW_AFTER clean answers in a row double it back (what the runbook asked operators to do by hand).
Polite mode adds a target request duration: size = target / (measured seconds per chunk at depth 1), so a
live query arriving at the server waits behind at most about `target` seconds of ours.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_DEPTH = 8  # requests in flight per server that auto-tuning may reach
GROW_BELOW = 0.5  # estimated requests of ours queued at the server below which depth grows
SHRINK_ABOVE = 1.5  # ... above which it shrinks
MIN_SAMPLES = 3  # answers at one depth (and batch size) before a decision (at least one per request in flight)
BASE_SAMPLES = 2  # answers at depth 1 that measure the base latency (their fastest counts)
TROUBLE_HOLD = 16  # clean answers after a trouble before depth may grow again
RELEARN_SEC = 60.0  # seconds between two re-measurements of the base latency at depth 1
GROW_AFTER = 8  # clean answers in a row before a batch cap lowered by trouble doubles again
MIN_GAIN = 0.02  # a request added to the queue must raise the server's answered texts/s by this share, else undone
NO_GAIN_HOLD_SEC = 300.0  # after an added request gained nothing: seconds before depth may grow again
POLITE_START = 1  # polite mode's first batch: nothing is known about the model's speed yet
PER_CHUNK_WEIGHT = 0.5  # weight of the newest measurement in the seconds-per-chunk average

OK, TROUBLE, ERROR, IGNORE = "ok", "trouble", "error", "ignore"


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
        self.troubles += 1
        if self.pinned is not None:
            return
        self.resume = None
        self.trial = None
        self.hold = TROUBLE_HOLD
        self._set(max(1, self.depth // 2), "trouble")

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
    """Chunks per request: at most `maximum`; halved by trouble, grown back by success; polite: sized to a target."""

    def __init__(self, maximum: int, target_sec: float | None = None, minimum: int = 1):
        self.maximum = max(1, maximum)
        self.minimum = max(1, min(minimum, self.maximum))
        self.target_sec = target_sec
        self.cap = self.maximum
        self.per_chunk: float | None = None  # seconds per chunk at depth 1 (polite mode)
        self.successes = 0
        self.troubles = 0

    @property
    def size(self) -> int:
        size = self.cap
        if self.target_sec is not None:
            fit = int(self.target_sec / self.per_chunk) if self.per_chunk else POLITE_START
            size = min(size, max(1, fit))
        return max(self.minimum, min(size, self.maximum))

    def trouble(self) -> None:
        self.troubles += 1
        self.successes = 0
        self.cap = max(self.minimum, self.size // 2)

    def answered(self, texts: int, seconds: float, alone: bool) -> None:
        if self.target_sec is not None and alone and texts > 0 and seconds > 0:
            per = seconds / texts  # includes the request's fixed cost: errs on the short side of the target
            old = self.per_chunk
            self.per_chunk = per if old is None else old + PER_CHUNK_WEIGHT * (per - old)
        self.successes += 1
        if self.cap < self.maximum and self.successes >= GROW_AFTER:
            self.cap = min(self.maximum, self.cap * 2)
            self.successes = 0


@dataclass
class Tuning:
    """Depth per server and the batch size of one run. `pinned_depth` None: self-tuning depth."""

    servers: int
    pinned_depth: int | None = None
    max_batch: int = 64
    target_sec: float | None = None  # polite mode's target request duration (None: throughput mode)
    max_depth: int = MAX_DEPTH
    clock: Callable[[], float] = time.monotonic
    depths: list[ServerDepth] = field(init=False)
    sizer: BatchSizer = field(init=False)

    def __post_init__(self) -> None:
        if self.target_sec is not None and self.pinned_depth is None:
            self.pinned_depth = 1  # polite: a live query waits behind one request of ours, never a queue of them
        self.depths = [ServerDepth(self.pinned_depth, self.max_depth, self.clock) for _ in range(self.servers)]
        self.sizer = BatchSizer(self.max_batch, self.target_sec)

    @property
    def auto(self) -> bool:
        return self.pinned_depth is None

    @property
    def batch_size(self) -> int:
        return self.sizer.size

    def depth(self, server: int) -> int:
        return self.depths[server].depth

    @property
    def total_depth(self) -> int:
        return sum(d.depth for d in self.depths)

    @property
    def max_workers(self) -> int:
        """Embed workers the engine runs: enough for every server at its largest depth."""
        return sum(d.max_depth for d in self.depths)

    def sent(self, server: int, texts: int, active: int) -> Ticket:
        d = self.depths[server]
        return Ticket(server, texts, d.depth, active, d.epoch, self.clock())

    def done(self, ticket: Ticket, outcome: str) -> float:
        """Record how a request ended (OK, TROUBLE, ERROR or IGNORE); returns its duration."""
        seconds = self.clock() - ticket.sent_at
        d = self.depths[ticket.server]
        if outcome == TROUBLE:
            d.trouble()
            self.sizer.trouble()
        elif outcome == OK:
            self.sizer.answered(ticket.texts, seconds, alone=ticket.active == 1)
            d.answered(ticket, seconds, self.sizer.size)
        return seconds

    def snapshot(self) -> dict[str, Any]:
        """The tuning's state for the run report."""
        return {
            "mode": "polite" if self.target_sec is not None else "throughput",
            "depth": "auto" if self.auto else self.pinned_depth,
            "depths": [d.depth for d in self.depths],
            "depth_changes": [len(d.changes) for d in self.depths],
            "batch_size": self.batch_size,
            "max_batch": self.max_batch,
            "target_request_sec": self.target_sec,
            "seconds_per_chunk": round(self.sizer.per_chunk, 6) if self.sizer.per_chunk else None,
            "troubles": sum(d.troubles for d in self.depths),
        }
