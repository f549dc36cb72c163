"""Long texts embedded whole: split into window-sized pieces, embed each, pool (issue 23). No HTTP, no SQL.

Why: a chunk longer than the model's window loses its tail when it is cut to fit (all-MiniLM-L6-v2's 256 tokens
hold ~200 Korean characters; about 28 % of the runbook's 2,000-character wiki chunks are longer), so a question
about that tail cannot find it. Here the text is split into pieces that each fit the window *with* the text prefix
(every piece is sent as prefix + piece), cut at a sentence end or whitespace where one is near, consecutive pieces
overlapping by about `overlap_tokens`; the chunk's vector is the mean of the pieces' vectors weighted by each
piece's length, normalized (what LangChain's OpenAI embeddings do for OpenAI models).

The choice of overlap and weights is measured by `benchmarks/bench_long_text.py` (retrieval of head and tail
sentences with the real all-MiniLM-L6-v2 on the wiki sample); `DEFAULT_OVERLAP_TOKENS` and `DEFAULT_WEIGHTS`
hold the winner, and benchmarks/RESULTS.md the table.

A pooled vector is reproducible from its `Pooling` description (piece offsets into the text as embedded, i.e.
after cleaning and `--max-chars`, and the weights used), so verify, the drift check and a swap's quality gate
rebuild it exactly as made (`rebuild`), at the cost of one embedding per piece.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from wiki_embeddings.core.context import MAX_TOKENS_PER_CHAR, SAFETY, TokenEstimator

WeightKind = Literal["chars", "tokens"]

#: Chosen by benchmarks/bench_long_text.py (see benchmarks/RESULTS.md, "Long texts").
DEFAULT_OVERLAP_TOKENS = 0
DEFAULT_WEIGHTS: WeightKind = "chars"
#: A cut looks for a sentence end in the last quarter of the room a piece has, else for whitespace in its
#: second half, else cuts at a character (a 50,000-character "word"): pieces stay at least half the room.
SENTENCE_SHARE = 0.75
WORD_SHARE = 0.5
_SENTENCE_END = re.compile(r"(?:[.!?。！？][\"'”’)\]」』]*\s+|\n\s*)")
_FORMAT = 1  # version of the description's layout

EmbedFn = Callable[[list[str]], "Sequence[np.ndarray] | np.ndarray"]
AsyncEmbedFn = Callable[[list[str]], Awaitable["Sequence[np.ndarray] | np.ndarray"]]


@dataclass(frozen=True, order=True)
class Piece:
    """Characters [start, end) of the text; sent to the model as prefix + text[start:end]."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start

    def of(self, text: str) -> str:
        return text[self.start : self.end]


# ------------------------------------------------------------------------------------------------ splitting


def split_for_window(
    text: str,
    prefix: str,
    window_tokens: int | None,
    estimator: TokenEstimator,
    overlap_tokens: int = 0,
) -> list[Piece]:
    """Pieces of `text` that each fit `window_tokens * SAFETY` (estimated) with `prefix` before them.

    The pieces cover the text from its first to its last character (piece i+1 starts at or before piece i's end),
    none is empty, and consecutive ones share about `overlap_tokens` estimated tokens (starting at a word).
    One piece when the text fits, or when the window is unknown (None: the server's refusal decides). The same
    text, prefix, window and estimator coefficients give the same pieces.
    """
    if not text:
        raise ValueError("nothing to split: the text is empty")
    if not window_tokens:
        return [Piece(0, len(text))]
    budget = window_tokens * SAFETY
    if (len(prefix) + len(text)) * MAX_TOKENS_PER_CHAR <= budget or estimator.estimate(prefix + text) <= budget:
        return [Piece(0, len(text))]
    room = budget - estimator.estimate(prefix)  # tokens left for the piece itself
    if room <= 1:
        raise ValueError(f"the text prefix {prefix!r} alone fills the window of {window_tokens} tokens")
    if overlap_tokens < 0 or overlap_tokens > room / 2:
        raise ValueError(f"overlap_tokens must be between 0 and half the room a piece has ({room / 2:.0f})")
    pieces: list[Piece] = []
    start, prev_end = 0, 0
    while True:
        end = start + _fit(text, start, prefix, budget, estimator)
        if end < len(text):
            end = _cut(text, start, end, min_end=prev_end + 1)
        if end >= len(text):
            pieces.append(Piece(start, len(text)))
            return pieces
        pieces.append(Piece(start, end))
        start, prev_end = _overlap_start(text, start, end, overlap_tokens, estimator), end


def piece_counter(
    prefix: str, window_tokens: int | None, estimator: TokenEstimator, overlap_tokens: int = DEFAULT_OVERLAP_TOKENS
) -> Callable[[str], int]:
    """How many pieces a text is embedded as under `--long-text pool` (the pre-flight's cost estimate); 1 where it
    cannot be split (a prefix that fills the window is refused before a run: settings/the start probe)."""

    def count(text: str) -> int:
        try:
            return len(split_for_window(text, prefix, window_tokens, estimator, overlap_tokens)) if text else 1
        except ValueError:
            return 1

    return count


def _fit(text: str, start: int, prefix: str, budget: float, estimator: TokenEstimator) -> int:
    """How many characters from `start` fit the budget with the prefix (at least 1). Looks at a window of text that
    grows only when all of it fits, so a 50,000-character text costs about what its pieces do."""
    span = int(budget * 8) + 64
    while True:
        candidate = text[start : start + span]
        keep = estimator.fit_chars(prefix + candidate, budget) - len(prefix)
        if keep < len(candidate) or start + span >= len(text):
            return max(keep, 1)
        span *= 4


def _cut(text: str, start: int, end: int, min_end: int) -> int:
    """Where a piece that may run to `end` stops: after a sentence end near `end`, else at the start of a word in
    its second half, else at `end` (no whitespace in range). Never before `min_end` (pieces must advance)."""
    room = end - start
    floor = max(start + int(room * SENTENCE_SHARE), min_end)
    best = None
    for match in _SENTENCE_END.finditer(text, max(start, floor - 8), end):
        if match.end() >= floor:
            best = match.end()
    if best is not None:
        return best
    floor = max(start + int(room * WORD_SHARE), min_end)
    for c in range(end, floor - 1, -1):
        if c > start and text[c - 1].isspace() and not text[c].isspace():
            return c
    return max(end, min_end)


def _overlap_start(text: str, start: int, end: int, overlap_tokens: int, estimator: TokenEstimator) -> int:
    """Where the next piece starts: `end`, or about `overlap_tokens` back from it, at the start of a word."""
    if overlap_tokens <= 0:
        return end
    base = estimator.estimate("")  # the per-input tokens ([CLS], [SEP]) are not part of the overlap
    lo, hi = start + 1, end  # find the smallest p whose text[p:end] is within the overlap (monotone in p)
    while lo < hi:
        mid = (lo + hi) // 2
        if estimator.estimate(text[mid:end]) - base <= overlap_tokens:
            hi = mid
        else:
            lo = mid + 1
    for c in range(lo, end):  # forward to a word's start, if there is one before `end`
        if text[c - 1].isspace() and not text[c].isspace():
            return c
    return lo


def split_piece(text: str, piece: Piece) -> list[Piece]:
    """A piece the server refused (its window is smaller than estimated) as two halves, cut at the whitespace
    nearest its middle (else at the middle); a one-character piece cannot be split and is returned alone."""
    if len(piece) < 2:
        return [piece]
    middle = piece.start + len(piece) // 2
    for delta in range(len(piece) // 2):
        for c in (middle - delta, middle + delta):
            if piece.start < c < piece.end and text[c - 1].isspace() and not text[c].isspace():
                return [Piece(piece.start, c), Piece(c, piece.end)]
    return [Piece(piece.start, middle), Piece(middle, piece.end)]


# ------------------------------------------------------------------------------------------------ pooling


def weights_for(
    pieces: Sequence[Piece], text: str, kind: WeightKind = DEFAULT_WEIGHTS, estimator: TokenEstimator | None = None
) -> list[float]:
    """Each piece's weight in the mean: its characters, or its estimated tokens (without the per-input tokens,
    at least 1). Overlapping characters count in both pieces, as each piece's vector stands for all of it."""
    if kind == "chars":
        return [float(len(p)) for p in pieces]
    if kind == "tokens":
        if estimator is None:
            raise ValueError("token weights need the token estimator")
        base = estimator.estimate("")
        return [max(estimator.estimate(p.of(text)) - base, 1.0) for p in pieces]
    raise ValueError(f"unknown weight kind {kind!r} (chars or tokens)")


def pool(vectors: Sequence[np.ndarray] | np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The weighted mean of the pieces' vectors, normalized to unit length, as float32 (computed in float64)."""
    matrix = np.asarray(vectors, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(f"pool needs a non-empty list of vectors of one length, got shape {matrix.shape}")
    if w.shape != (matrix.shape[0],):
        raise ValueError(f"{matrix.shape[0]} vectors but {w.size} weights")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("a piece's vector is not finite")
    mean = (w @ matrix) / w.sum()
    norm = float(np.linalg.norm(mean))
    if not norm > 1e-12:
        raise ValueError("the pieces' vectors cancel out: their weighted mean has norm 0")
    return (mean / norm).astype(np.float32)


# ------------------------------------------------------------------------------------------------ provenance


@dataclass(frozen=True)
class Pooling:
    """How a vector was made from a text: the pieces embedded (offsets into the text as embedded) and their weights.
    `to_json()` is compact (`{"v": 1, "pieces": [[0, 812], [790, 1603]], "weights": [812, 813]}`)."""

    pieces: tuple[Piece, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.pieces or len(self.pieces) != len(self.weights):
            raise ValueError(f"{len(self.pieces)} pieces but {len(self.weights)} weights")
        if any(p.start < 0 or p.end <= p.start for p in self.pieces):
            raise ValueError(f"a piece is empty or negative: {self.pieces}")

    @classmethod
    def make(
        cls,
        text: str,
        prefix: str,
        window_tokens: int | None,
        estimator: TokenEstimator,
        *,
        overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
        weights: WeightKind = DEFAULT_WEIGHTS,
    ) -> Pooling:
        """Split `text` for the window and weigh the pieces: the plan for embedding one text."""
        pieces = split_for_window(text, prefix, window_tokens, estimator, overlap_tokens)
        return cls(tuple(pieces), tuple(weights_for(pieces, text, weights, estimator)))

    @property
    def pooled(self) -> bool:
        return len(self.pieces) > 1

    def texts(self, text: str, prefix: str = "") -> list[str]:
        """What is sent to the model, one input per piece."""
        if self.pieces[-1].end > len(text):
            raise ValueError(f"the description reaches character {self.pieces[-1].end}; the text has {len(text)}")
        return [prefix + p.of(text) for p in self.pieces]

    def combine(self, vectors: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        return pool(vectors, self.weights)

    def to_json(self) -> dict[str, Any]:
        return {
            "v": _FORMAT,
            "pieces": [[p.start, p.end] for p in self.pieces],
            "weights": [int(w) if float(w).is_integer() else w for w in self.weights],
        }

    @classmethod
    def from_json(cls, description: dict[str, Any] | str) -> Pooling:
        data = json.loads(description) if isinstance(description, str) else description
        if not isinstance(data, dict) or data.get("v") != _FORMAT:
            raise ValueError(f"not a pooling description of format {_FORMAT}: {description!r}")
        try:
            pieces = tuple(Piece(int(s), int(e)) for s, e in data["pieces"])
            weights = tuple(float(w) for w in data["weights"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed pooling description {description!r}: {exc}") from exc
        return cls(pieces, weights)


def rebuild(description: Pooling | dict[str, Any] | str, text: str, embed_fn: EmbedFn, prefix: str = "") -> np.ndarray:
    """The vector recomputed from `text` exactly as it was made: the recorded pieces, embedded by `embed_fn`
    (texts -> one vector each), pooled with the recorded weights."""
    plan = description if isinstance(description, Pooling) else Pooling.from_json(description)
    return plan.combine(_checked(embed_fn(plan.texts(text, prefix)), plan))


async def rebuild_async(
    description: Pooling | dict[str, Any] | str, text: str, embed_fn: AsyncEmbedFn, prefix: str = ""
) -> np.ndarray:
    """`rebuild` with an async embedder (the engine's clients)."""
    plan = description if isinstance(description, Pooling) else Pooling.from_json(description)
    return plan.combine(_checked(await embed_fn(plan.texts(text, prefix)), plan))


def _checked(vectors: Sequence[np.ndarray] | np.ndarray, plan: Pooling) -> Sequence[np.ndarray] | np.ndarray:
    if len(vectors) != len(plan.pieces):
        raise ValueError(f"the embedder answered {len(vectors)} vectors for {len(plan.pieces)} pieces")
    return vectors
