"""The window probe at a run's start: does each model server take the whole window it describes, and what does it
do past it? One known text repeated to 95 % of the window: a server that counts fewer tokens than it was sent cuts
silently (Ollama before 0.13.5 past num_ctx; 0.30+ past its physical batch, 2,048 tokens, whatever num_ctx says).
Then 115 %: a refusal (current Ollama) means nothing can be cut silently at all; a count at the window means a
silent cut there. A server that reports no counts is probed by its vectors instead (silent.py). Each server is
asked itself (pinned): one server of a fleet may run another Ollama than the rest.

A server whose runner crashes on the 95 % text (Ollama 0.31 past its physical batch: an error naming EOF, then a
model reload) has its physical window searched by the same repeated text, by token counts (`learn_by_crashes`):
each crash costs a reload, so the search narrows the bracket by ratios and stops once it is within a tenth."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from wiki_embeddings.core.backfill import cuts, silent
from wiki_embeddings.core.backfill.cuts import Bracket
from wiki_embeddings.core.context import TokenEstimator
from wiki_embeddings.core.embedders import Answer, ContextExceeded, EmbedFailure, RunnerCrashed

CANARY_TEXT = "The quick brown fox jumps over the lazy dog."
PinnedCall = Callable[[list[str], int | None], Awaitable[Answer]]
OneServer = Callable[[list[str]], Awaitable[Answer]]
CRASH_TRIES = 8  # crash probes of one search at most (each crash costs a model reload)


@dataclass
class ProbeResult:
    twin_check: bool = False  # a silent cutter without token counts: texts near the window are checked by twins
    refuses_over_window: bool = False  # every server refused past its window: nothing can be cut silently
    silent_at: tuple[int, int] | None = None  # (tokens sent, tokens counted) of the server that cut the most
    crash_at: int | None = None  # the smallest physical window a server's crashes showed (tokens it answered)
    counts: dict[int, tuple[int, int]] = field(default_factory=dict)  # server -> the canary's counts, once and twice
    brackets: dict[int, Bracket] = field(default_factory=dict)  # server -> what its crashes showed (kept for later)
    # server -> its vector of the canary (the model's answer), None when that request timed out
    vectors: dict[int, np.ndarray | None] = field(default_factory=dict)

    def notes(self, window: int | None) -> list[str]:
        """What the probe found, for the run's log (`window`: the window in tokens as learned from it)."""
        lines = []
        if self.crash_at is not None:
            lines.append(f"the runner crashed on a window probe: it takes about {self.crash_at} tokens")
        if self.twin_check:
            lines.append(f"the server cuts silently and counts no tokens: texts near {window} are checked")
        if self.silent_at is not None:
            expected, got = self.silent_at
            lines.append(
                f"the server evaluated {got} of the {expected} tokens of a window probe: it cuts silently; texts are "
                f"cut to {window} tokens from now on"
            )
        return lines


async def probe_window(
    call: PinnedCall, servers: int, believed: int | None, estimator: TokenEstimator, longest: int, where: str
) -> ProbeResult:
    result = ProbeResult(refuses_over_window=believed is not None)
    for server in range(servers):

        async def pinned(texts: list[str], server: int = server) -> Answer:
            return await call(texts, server)

        result.vectors[server] = None
        try:
            first = await pinned([CANARY_TEXT])
            result.vectors[server], one = first.vectors[0], first.tokens
            if one is None:
                result.refuses_over_window = False
                result.twin_check = result.twin_check or await silent.probe(pinned, estimator, longest, believed, where)
                continue
            two = (await pinned([CANARY_TEXT + " " + CANARY_TEXT])).tokens
            if not believed or two is None or two <= one:
                result.refuses_over_window = False  # no usable counts: truncation is judged batch by batch
                continue
            result.counts[server] = (one, two)
            try:
                found = await cuts.probe_counts(pinned, CANARY_TEXT, one, two, believed)
            except RunnerCrashed:  # its runner crashes below the window it describes: search its physical window
                bracket = result.brackets.setdefault(server, Bracket(answered=two))
                bracket.crash(cuts.repeats_for(believed * cuts.PROBE_SHARE, one, two)[1])
                await learn_by_crashes(pinned, bracket, one, two)
                if bracket.answered >= cuts.MIN_CUT_TOKENS and (
                    result.crash_at is None or bracket.answered < result.crash_at
                ):
                    result.crash_at = bracket.answered
                continue
            if found is None:  # the window is taken whole: past it, a refusal (loud) or a silent cut?
                over = await cuts.probe_over(pinned, CANARY_TEXT, one, two, believed)
                if over is not None:
                    result.refuses_over_window = False
                    if over <= believed + cuts.PROBE_SLACK:
                        found = (believed, over)
        except ContextExceeded:
            continue  # refused rather than cut: the prefix search learns the real window when it matters
        except EmbedFailure as exc:
            result.refuses_over_window = False  # unknown for this server: batches are checked
            if exc.kind != "timeout" and result.vectors[server] is None:
                del result.vectors[server]  # a sporadic error: the run's server check asks it again (a hung one not)
            continue
        if found is not None and (result.silent_at is None or found[1] < result.silent_at[1]):
            result.refuses_over_window = False
            result.silent_at = found
    return result


async def canary_counts(call: OneServer) -> tuple[int, int] | None:
    """The canary's counts once and twice on one server (what repeats of it cost), or None without usable counts."""
    one = (await call([CANARY_TEXT])).tokens
    two = (await call([CANARY_TEXT + " " + CANARY_TEXT])).tokens
    return (one, two) if one is not None and two is not None and two > one else None


async def learn_by_crashes(call: OneServer, bracket: Bracket, one: int, two: int, tries: int = CRASH_TRIES) -> None:
    """Narrow `bracket` (one server's physical window) with the canary repeated to the bracket's geometric middle:
    an answer raises its floor to the count answered, a crash (or a refusal of length) lowers its ceiling. What a
    repeat costs is taken from the longest answer so far (tokens add up only about linearly). Stops once settled,
    after `tries` probes, or when the canary's step cannot split the bracket any further. Failures other than
    length escape (the server's state is the caller's question)."""
    fixed, per = 2 * one - two, float(two - one)
    for _ in range(tries):
        target = bracket.next_try()
        if target is None:
            return
        repeats = max(1, int((target - fixed) / per))
        expected = int(fixed + repeats * per)
        if expected <= bracket.answered or (bracket.crashed is not None and expected >= bracket.crashed):
            return  # the canary's step is coarser than what is left of the bracket
        try:
            got = (await call([" ".join([CANARY_TEXT] * repeats)])).tokens
        except ContextExceeded:  # a crash (its reload is the embedder's to wait out) or a refusal: over the window
            bracket.crash(expected)
            continue
        bracket.answer(got if got is not None else expected)
        if got is not None and repeats > 2 and got > fixed:
            per = (got - fixed) / repeats


class CrashProbes:
    """What a run knows of its servers' runner crashes: each server's bracket and canary counts (from the window
    probe, then from crashes as they come), and the one search in progress: batches wait for it (`settled`) instead
    of crashing the runner again meanwhile, each crash a model reload."""

    def __init__(self) -> None:
        self.brackets: dict[int, Bracket] = {}
        self.counts: dict[int, tuple[int, int]] = {}
        self.seen = False  # a runner crashed this run: its window is hard (texts are planned well below it)
        self._search: asyncio.Future[None] | None = None

    def adopt(self, found: ProbeResult) -> None:
        """The window probe's findings (a crash at the start is a crash like any)."""
        self.brackets.update(found.brackets)
        self.counts.update(found.counts)
        self.seen = self.seen or bool(found.brackets)

    async def settled(self) -> None:
        """Returns once no search is in progress."""
        while self._search is not None:
            await asyncio.shield(self._search)

    async def learn(self, call: OneServer, server: int | None, upper: int | None) -> int | None:
        """A crash on `server` (its longest input at most `upper` tokens, as estimated): its physical window
        searched by crash probes unless its bracket is settled. The window learned (a count it answered, never a
        few words'), or None (nothing new, no counts, server unknown, or another search was on: waited for)."""
        self.seen = True
        if server is None:
            return None
        if self._search is not None:
            await self.settled()
            return None
        bracket = self.brackets.setdefault(server, Bracket())
        if upper is not None:
            bracket.crash(upper)
        if bracket.settled:
            return None
        self._search = asyncio.get_running_loop().create_future()
        try:
            counts = self.counts.get(server) or await canary_counts(call)
            if counts is None:
                return None
            self.counts[server] = counts
            bracket.answer(counts[1])
            await learn_by_crashes(call, bracket, *counts)
        finally:
            self._search.set_result(None)
            self._search = None
        return bracket.answered if bracket.answered >= cuts.MIN_CUT_TOKENS else None
