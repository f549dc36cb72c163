"""The worker's rules about cuts, as functions of what they need (window, estimator, one call to the server):
which texts may reach a silent cutter's window, whether a count is at the window, whether the server cut a text,
a text re-embedded from our own cut until it is whole, and how a batch refused for length is split."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from wiki_embeddings.core.context import (
    MAX_TOKENS_PER_CHAR,
    SAFETY,
    ContextRefused,
    FitResult,
    TokenEstimator,
    Window,
    fit_prefix,
)
from wiki_embeddings.core.embedders import Answer, ContextExceeded, EmbedFailure

# A text whose own count is below this share of its estimate is checked with a shorter prefix of it.
TEXT_TRUST_SHARE = 0.9
PROBE_SLACK = 2  # tokens of slack when comparing counts (special tokens, a word split differently)
REFIT_TRIES = 4
REFIT_SHRINK = 0.85  # a refit that still reaches the window is cut by this much more
ESTIMATE_MARGIN = 1.5  # a text's estimate times this bounds its real count (for a silent cutter's window)
RISKY_SHARE = 0.6  # after a refusal of length, texts estimated over this share of the window go alone
PROBE_SHARE = 0.95  # the window probe's text: this share of the window the server describes
OVER_SHARE = 1.15  # ... and the second one, this much past it
MIN_CUT_TOKENS = 32  # a count this small is never taken for a window (a few words' prefix has as many tokens)
BRACKET_SHARE = 0.9  # crash probes stop once the largest count answered is this share of the smallest that crashed

Call = Callable[[list[str]], Awaitable[Answer]]


def may_reach(window: Window, estimator: TokenEstimator, prefix: str, text: str) -> bool:
    """Could the server's window cut this text? (its estimate errs by up to ~30 %: taken with a margin)"""
    tokens = window.tokens
    if not tokens:
        return False
    full = prefix + text
    if len(full) * MAX_TOKENS_PER_CHAR < tokens - PROBE_SLACK:
        return False
    return estimate_may_reach(window, estimator.estimate(full))


def estimate_may_reach(window: Window, estimate: float) -> bool:
    """`may_reach` for a text whose estimate (with the prefix) is known."""
    return window.tokens is not None and estimate * ESTIMATE_MARGIN >= window.tokens - PROBE_SLACK


def plan_window(tokens: int) -> int:
    """The window to plan texts and pieces for on a server whose window is hard (it cuts silently past it, or its
    runner crashes and reloads): a text planned for it is estimated at most SAFETY × this, which × ESTIMATE_MARGIN
    stays below the window, so `may_reach` says no: it needs no count of its own and costs no crash (unless the
    estimate is off by more than the margin)."""
    return max(1, int((tokens - PROBE_SLACK - 1) / (SAFETY * ESTIMATE_MARGIN)))


def crash_bound(window: Window, estimator: TokenEstimator, prefix: str, sent: list[str]) -> int | None:
    """At most how many tokens the longest text of a batch that crashed the runner has (its estimate with the
    margin, within the window the server describes): the ceiling a crash search starts from."""
    if not sent:
        return None
    bound = int(max(estimator.estimate(prefix + t) for t in sent) * ESTIMATE_MARGIN) + 1
    return min(bound, window.tokens + 1) if window.tokens else bound


@dataclass
class Bracket:
    """One server's physical window as its answers and crashes showed it, in tokens: the largest count it answered
    and the smallest that crashed it (or was refused). Kept across probes, so each search starts where the last one
    left off; a window learned from it is `answered`, a count the server was seen to take whole."""

    answered: int = 0
    crashed: int | None = None

    def answer(self, tokens: int) -> None:
        self.answered = max(self.answered, tokens)
        if self.crashed is not None and self.crashed <= self.answered:
            self.crashed = None  # an estimated bound that was too low: the answer is the fact

    def crash(self, tokens: int) -> None:
        if tokens > self.answered and (self.crashed is None or tokens < self.crashed):
            self.crashed = tokens

    @property
    def settled(self) -> bool:
        """Nothing left to learn: no crash seen, or the two counts within BRACKET_SHARE of each other."""
        return self.crashed is None or self.answered >= BRACKET_SHARE * self.crashed

    def next_try(self) -> int | None:
        """The count to try next: the geometric middle of the bracket (a crash costs a model reload, so the bracket
        narrows by ratios: from 22 and 7,800 tokens to within a tenth of 2,048 in six tries, three of them crashes);
        None once settled."""
        if self.settled or self.crashed is None:
            return None
        return int(math.sqrt(max(self.answered, 1) * self.crashed))


def at_window(window: Window, tokens: int) -> bool:
    """A count at the window: the text may have been cut there (a count below it was evaluated whole)."""
    return window.tokens is not None and tokens >= window.tokens - PROBE_SLACK


async def cut_by_server(call: Call, estimator: TokenEstimator, prefix: str, text: str, estimate: float) -> int | None:
    """The count at which the server cut `text`, or None when it took it whole (the estimator learns)."""
    try:
        own = (await call([text])).tokens
        if own is None or own >= TEXT_TRUST_SHARE * estimate:
            if own:
                estimator.observe([prefix + text], own)
            return None
        shorter = text[: max(1, int(len(text) * 0.8))]
        again = (await call([shorter])).tokens
    except EmbedFailure:
        return None
    if again is not None and again >= own - PROBE_SLACK and own >= MIN_CUT_TOKENS:
        return own  # a fifth less text, as many tokens: both stopped at the server's window
    estimator.observe([prefix + text], own)  # the estimate was long for this text; it is whole
    return None


async def refit(
    call: Call,
    fit: Callable[[str], str],
    window: Window,
    estimator: TokenEstimator,
    prefix: str,
    text: str,
) -> tuple[np.ndarray, int] | None:
    """`text` cut by us to the learned window and embedded; (vector, characters sent) once its count is below the
    window (a cut that still reaches it is cut further); None when the server fails it."""
    cut = fit(text)
    if cut == text:  # the estimate says it fits, the count said it reached the window: cut a little
        cut = text[: max(1, int(len(text) * REFIT_SHRINK))]
    for _ in range(REFIT_TRIES):
        try:
            answer = await call([cut])
        except EmbedFailure:
            return None
        if answer.tokens is None or not at_window(window, answer.tokens):
            if answer.tokens:
                estimator.observe([prefix + cut], answer.tokens)
            return answer.vectors[0], len(cut)
        cut = cut[: max(1, int(len(cut) * REFIT_SHRINK))]
    return None


def split_after_refusal(window: Window, estimator: TokenEstimator, sent: list[str]) -> list[list[int]]:
    """A batch refused as too long: the estimate was short for some text. The texts nearest the window go alone,
    the rest together; with none (or all) of them near it, the batch is halved."""
    budget = (window.tokens or 0) * SAFETY
    risky = [k for k, t in enumerate(sent) if budget and estimator.estimate(t) >= RISKY_SHARE * budget]
    if not risky or len(risky) == len(sent):
        half = len(sent) // 2
        return [list(range(half)), list(range(half, len(sent)))]
    alone = set(risky)
    return [[k] for k in risky] + [[k for k in range(len(sent)) if k not in alone]]


def repeats_for(tokens: float, one: int, two: int, least: int = 1) -> tuple[int, int]:
    """How many times to repeat a text (whose count alone is `one`, twice `two`) for about `tokens` tokens, and the
    count that many repeats make (at most `tokens`, but at least `least` repeats)."""
    per, fixed = two - one, 2 * one - two
    repeats = max(least, int((tokens - fixed) / per))
    return repeats, fixed + repeats * per


async def probe_counts(call: Call, text: str, one: int, two: int, believed: int) -> tuple[int, int] | None:
    """The window probe by counts: `text` (whose count alone is `one`, twice `two`) repeated to PROBE_SHARE of the
    window the server describes. (expected, counted) when the server counted fewer tokens than it was sent (it cuts
    silently at `counted`), else None."""
    repeats, expected = repeats_for(believed * PROBE_SHARE, one, two)
    got = (await call([" ".join([text] * repeats)])).tokens
    return (expected, got) if got is not None and got < expected - PROBE_SLACK else None


async def probe_over(call: Call, text: str, one: int, two: int, believed: int) -> int | None:
    """Past the window the server describes, does it refuse (None: a refusal of length is loud, nothing can be cut
    silently) or cut (the count it took: its window)?"""
    repeats, _ = repeats_for(believed * OVER_SHARE, one, two, least=2)
    try:
        return (await call([" ".join([text] * repeats)])).tokens
    except ContextExceeded:
        return None


async def fit_search(
    call: Call, window: Window, estimator: TokenEstimator, text: str, refused_at: int | None = None
) -> FitResult | None:
    """The longest prefix of `text` the server takes (core/context.py's search), embedded; None if none does."""

    async def embed_one(prefix: str) -> tuple[np.ndarray, int | None]:
        try:
            answer = await call([prefix])
        except ContextExceeded as refused:
            raise ContextRefused(refused.message) from refused
        return answer.vectors[0], answer.tokens

    return await fit_prefix(text, embed_one, window_tokens=window.tokens, estimator=estimator, refused_at=refused_at)


async def longest_fit_tokens(call: Call, window: Window, estimator: TokenEstimator, text: str) -> int | None:
    """The server's count for the longest prefix of `text` it takes (a refused text: its real window)."""
    found = await fit_search(call, window, estimator, text)
    return found.tokens if found is not None else None


def shows_smaller_window(found: FitResult, believed: int | None) -> bool:
    """Does a refused text's longest fitting prefix show the server takes less than it said (or said nothing)? Its
    window is then about what that prefix used (never a few words' count)."""
    return bool(
        found.tokens
        and found.tokens >= MIN_CUT_TOKENS
        and (not believed or found.tokens < 0.9 * believed)
        and found.chars >= 0.9 * found.refused_at
    )
