"""Whether a model server is in the rotation, and when it may be asked again. Pure logic: no HTTP, no SQL.

The client reports every request's end (`success`, `failure`, `no_model`); the pool reads `available` before
sending. A failure earns a backoff that starts near one request's time and doubles with each failure in a row
(`Retry-After` when the server sends one). A lone overload answer among good ones (one 503 in five) delays only the
request that got it: the others keep the server busy (blocking the whole server for every such answer idled it, the
cliff of issue 20). The whole server waits out the backoff when it asked to (`Retry-After`), did not answer at all
(a refused or reset connection, a timeout), or fails BLOCK_AFTER_FAILURES times in a row (it may be failing
everything; at one 503 in five, three in a row come once in ~125 answers); other servers take the work meanwhile.
A server that fails every request for OUT_AFTER_SEC (or one request's every retry), refuses connections, or lacks
the model leaves the rotation: it is probed every PROBE_SEC while others carry the work, every PROBE_ALONE_SEC
while none is left, and comes back on its first good answer.

A server that asks (`Retry-After`) for longer than the backoff ceiling is *away* from then until its next good
answer: it keeps its place (one such answer among good ones is weather, not an outage, and costs one hold of the
ceiling), but the run's wait for a server (WIKI_EMBED_SERVER_WAIT_SEC, the pool's) counts from that first answer
(`gone_since`), not from a take-out that the ceiling-long holds delay by two holds (a minute by default).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

IN, OUT, NO_MODEL = "in", "out", "no_model"
OUT_AFTER_FAILURES = 3  # failures in a row ...
OUT_AFTER_SEC = 1.0  # ... with no good answer for this long take a server out of the rotation
PROBE_SEC = 30.0  # an out server is probed this often while others carry the work
PROBE_ALONE_SEC = 5.0  # ... and this often while no server is left
BLOCK_AFTER_FAILURES = 3  # answered failures in a row after which the whole server waits out the backoff
FIRST_BACKOFF_MIN_SEC = 0.02  # the shortest pause after a failure (a server that failed once is not hammered)


@dataclass
class ServerHealth:
    """One server's standing; `clock` is injectable so every decision is tested with a fake clock."""

    backoff_base_sec: float = 0.5
    backoff_max_sec: float = 30.0
    clock: Callable[[], float] = time.monotonic
    jitter: Callable[[], float] = random.random
    state: str = IN
    reason: str = ""
    failures_in_a_row: int = 0
    failures: int = 0
    successes: int = 0
    responded: int = 0  # overload answers (429/503...): the server is there, only busy
    last_success: float | None = None
    streak_since: float = 0.0  # when the current streak of failures began
    blocked_until: float = float("-inf")
    # Until when the server itself asked for quiet (`Retry-After`): an answer to a request sent before it (several in
    # flight) ends our own backoff, never the server's request.
    asked_until: float = float("-inf")
    out_since: float | None = None
    # Since when the server has asked (Retry-After) for longer than the backoff ceiling, with no good answer since.
    away_since: float | None = None
    away_reason: str = ""
    last_probe: float = float("-inf")
    latency: float | None = None  # a recent good answer's seconds (sizes the first backoff)
    history: list[tuple[float, str, str]] = field(default_factory=list)  # (time, new state, why)

    @property
    def in_rotation(self) -> bool:
        return self.state == IN

    def available(self) -> bool:
        """In the rotation and past its backoff."""
        return self.state == IN and self.clock() >= max(self.blocked_until, self.asked_until)

    def wait(self) -> float:
        """Seconds until the backoff ends (0 when free)."""
        return max(0.0, max(self.blocked_until, self.asked_until) - self.clock())

    def asked_wait(self) -> float:
        """Seconds until the quiet the server asked for (`Retry-After`) is over (0 when none)."""
        return max(0.0, self.asked_until - self.clock())

    def success(self, seconds: float | None = None) -> None:
        now = self.clock()
        self.successes += 1
        self.failures_in_a_row = 0
        self.last_success = now
        self.blocked_until = float("-inf")
        self.away_since, self.away_reason = None, ""
        if seconds is not None and seconds > 0:
            self.latency = seconds if self.latency is None else 0.7 * self.latency + 0.3 * seconds
        if self.state != IN:
            self._move(IN, "answered again")

    def failure(self, why: str, retry_after: float | None = None, *, answered: bool = False, attempt: int = 1) -> float:
        """A transport error, an overload answer (`answered`: the server is there, busy) or a timeout: back off;
        out when it keeps failing. Returns the seconds the failed request (this was its `attempt`-th failure) waits
        before it goes to this server again (the whole server waits them too unless this was a lone answered
        failure without Retry-After). The pause doubles with the server's failures in a row or the request's own,
        whichever are more: a request that keeps meeting 503s between others' good answers backs off as well."""
        now = self.clock()
        self.failures += 1
        self.responded += int(answered)
        self.failures_in_a_row += 1
        # Near one request's time after a good answer (one 503 in five must not cost seconds); the configured
        # base before any (a server starting up).
        first = (
            self.backoff_base_sec
            if self.latency is None
            else min(self.backoff_base_sec, max(FIRST_BACKOFF_MIN_SEC, 2 * self.latency))
        )
        ceiling = min(self.backoff_max_sec, first * 2 ** (max(self.failures_in_a_row, attempt) - 1))
        pause = ceiling * (0.5 + self.jitter() / 2)  # jitter: many workers do not retry in lockstep
        if retry_after is not None and retry_after >= 0:
            # Honoured as a floor: `Retry-After: 0` must not make every retry go at once (a zero-pause storm).
            pause = min(max(retry_after, pause), self.backoff_max_sec)
            self.asked_until = max(self.asked_until, now + pause)
            if retry_after > self.backoff_max_sec and self.away_since is None:
                self.away_since = now
                self.away_reason = (
                    f"asked for {retry_after:g} s of quiet (Retry-After), over the {self.backoff_max_sec:g} s backoff "
                    f"ceiling: {why}"
                )
        if retry_after is not None or not answered or self.failures_in_a_row >= BLOCK_AFTER_FAILURES:
            self.blocked_until = max(self.blocked_until, now + pause)
        if self.failures_in_a_row == 1:
            self.streak_since = now
        failing_for = now - self.streak_since
        # Out after a few failures in a row if it never answered, else once they have lasted OUT_AFTER_SEC (a steady
        # error rate makes short streaks that must not cost a server its place).
        lasting = failing_for >= OUT_AFTER_SEC or not self.successes
        if self.state == IN and self.failures_in_a_row >= OUT_AFTER_FAILURES and lasting:
            self.take_out(f"{self.failures_in_a_row} failures in a row over {failing_for:.1f} s: {why}")
        return pause

    def take_out(self, why: str, state: str = OUT) -> None:
        if self.state == IN or state != self.state:
            self._move(state, why)
        self.reason = why
        if self.out_since is None:
            self.out_since = self.clock()
        self.last_probe = self.clock()  # it just failed: the first probe waits one interval

    def no_model(self, why: str) -> None:
        self.take_out(why, NO_MODEL)

    def gone_since(self) -> float | None:
        """Since when the server has been out of the rotation or away (see the module), whichever began first; None
        while it serves. The pool ends the run once every server has been gone WIKI_EMBED_SERVER_WAIT_SEC."""
        times = [t for t in (None if self.state == IN else self.out_since, self.away_since) if t is not None]
        return min(times) if times else None

    def why_gone(self) -> str:
        """Why the server is out of the rotation and/or away, for the message that ends the run."""
        return "; ".join(r for r in ("" if self.state == IN else self.reason, self.away_reason) if r)

    def probe_in(self, others_in_rotation: bool) -> float:
        """Seconds until this out server's next probe is due (0: now; inf: it is in the rotation)."""
        if self.state == IN:
            return float("inf")
        interval = PROBE_SEC if others_in_rotation else PROBE_ALONE_SEC
        return max(0.0, self.last_probe + interval - self.clock())

    def probing(self) -> None:
        """A probe goes now: the next one waits its interval."""
        self.last_probe = self.clock()

    def _move(self, state: str, why: str) -> None:
        self.state = state
        self.reason = why if state != IN else ""
        if state == IN:
            self.out_since = None
        self.history.append((self.clock(), state, why))

    def snapshot(self) -> dict[str, object]:
        return {
            "state": self.state,
            "reason": self.reason or self.away_reason,
            "failures": self.failures,
            "successes": self.successes,
            "out_for_sec": round(self.clock() - self.out_since, 1) if self.out_since is not None else None,
        }
