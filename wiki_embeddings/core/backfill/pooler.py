"""Long chunks embedded whole (issue 23, `--long-text pool`): a chunk longer than the model's window goes out as
window-sized pieces (core/pooling.py), which share requests with other texts like any text (`--batch-size` counts
pieces); its vector is the weighted mean of its pieces' vectors, written only when every piece is in. A piece the
server refuses, or cuts, is split further, never cut; a piece that fails for another reason fails its chunk.

The pieces travel through the worker as rows of their own, under keys no chunk id can have (past the bigint range),
and come back here as outcomes: the pooler owns the pieces in flight, the worker nothing of them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from wiki_embeddings.core.backfill import cuts
from wiki_embeddings.core.backfill.outcomes import Embedded, Isolated
from wiki_embeddings.core.context import TokenEstimator, Window, fit_text
from wiki_embeddings.core.pooling import (
    DEFAULT_OVERLAP_TOKENS,
    DEFAULT_WEIGHTS,
    Piece,
    Pooling,
    WeightKind,
    split_for_window,
    split_piece,
    weights_for,
)

PIECE_KEYS = 1 << 70  # a piece's key: beyond any bigint chunk id, so the two never meet
Emit = Callable[[Embedded | Isolated], Awaitable[None]]


@dataclass
class _Chunk:
    """One long chunk whose pieces are in flight: each slot's piece and, once embedded, its vector."""

    chunk_id: int
    text: str
    pieces: list[Piece]
    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # slot key -> vector
    keys: list[int] = field(default_factory=list)  # slot keys, in text order
    failed: bool = False

    @property
    def complete(self) -> bool:
        return not self.failed and all(k in self.vectors for k in self.keys)


class Pooler:
    """Turns long rows into piece rows, and piece outcomes back into one outcome per chunk."""

    def __init__(
        self,
        estimator: TokenEstimator,
        *,
        overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
        weights: WeightKind = DEFAULT_WEIGHTS,
    ):
        self.estimator = estimator
        self.overlap_tokens = overlap_tokens
        self.weights: WeightKind = weights
        self._next = PIECE_KEYS
        self._slots: dict[int, tuple[_Chunk, int]] = {}  # piece key -> (its chunk, position in chunk.keys)
        self.pooled = 0  # chunks combined from pieces (the run report counts those written)
        self.pieces = 0  # pieces embedded for them

    @staticmethod
    def is_piece(key: int) -> bool:
        return key >= PIECE_KEYS

    def plan(self, row: tuple[int, str], prefix: str, window: Window, hard: bool) -> list[tuple[int, str]]:
        """A chunk or piece that does not fit the window as its pieces, else itself. On a `hard` window (a silent
        cutter's, a crashing runner's) also one that may reach it, and the pieces are planned well below it
        (cuts.plan_window): none needs a count of its own, none costs a crash."""
        if self.is_piece(row[0]) and row[0] not in self._slots:
            return []  # a piece of a chunk that already failed: nothing to send
        text, tokens = row[1], window.tokens
        if not tokens or not text.strip():
            return [row]
        if fit_text(text, prefix, tokens, self.estimator) == text and not (
            hard and cuts.may_reach(window, self.estimator, prefix, text)
        ):
            return [row]
        size = cuts.plan_window(tokens) if hard else tokens
        return self.resplit(row[0], prefix, size) if self.is_piece(row[0]) else self.expand(row, prefix, size)

    def expand(self, row: tuple[int, str], prefix: str, window: int) -> list[tuple[int, str]]:
        """A long row as its piece rows (a row that fits in one piece stays as it is)."""
        cid, text = row
        plan = Pooling.make(
            text, prefix, window, self.estimator, overlap_tokens=self.overlap_tokens, weights=self.weights
        )
        if not plan.pooled:
            return [row]
        chunk = _Chunk(cid, text, list(plan.pieces))
        return [self._slot(chunk, piece) for piece in chunk.pieces]

    def halves(self, row: tuple[int, str]) -> list[tuple[int, str]]:
        """A chunk estimated to fit but refused as too long: pooled from its two halves ([] if it cannot split)."""
        cid, text = row
        halves = split_piece(text, Piece(0, len(text)))
        if len(halves) < 2:
            return []
        chunk = _Chunk(cid, text, halves)
        return [self._slot(chunk, piece) for piece in chunk.pieces]

    def _slot(self, chunk: _Chunk, piece: Piece, at: int | None = None) -> tuple[int, str]:
        key = self._next
        self._next += 1
        if at is None:
            chunk.keys.append(key)
        else:
            chunk.keys.insert(at, key)
        self._slots[key] = (chunk, chunk.keys.index(key))
        return key, piece.of(chunk.text)

    def split(self, key: int) -> list[tuple[int, str]]:
        """A piece refused (or cut) by the server: its two halves as new piece rows; [] when it cannot be split."""
        if key not in self._slots:
            return []  # its chunk already failed
        chunk, _ = self._slots[key]
        halves = split_piece(chunk.text, self._piece_of(chunk, key))
        if len(halves) < 2:
            self._slots.pop(key)
            return []
        return self._replace(chunk, key, halves)

    def resplit(self, key: int, prefix: str, window: int) -> list[tuple[int, str]]:
        """A piece planned before the server's window was known (or for a larger one) as its pieces for `window`:
        re-planned at once rather than halved one refusal (or runner crash) at a time; itself when it fits."""
        chunk, _ = self._slots[key]
        piece = self._piece_of(chunk, key)
        try:
            parts = split_for_window(piece.of(chunk.text), prefix, window, self.estimator, self.overlap_tokens)
        except ValueError:  # an overlap wider than a piece of this window can hold: halves will do
            parts = [Piece(p.start - piece.start, p.end - piece.start) for p in split_piece(chunk.text, piece)]
        if len(parts) < 2:
            return [(key, piece.of(chunk.text))]
        return self._replace(chunk, key, [Piece(piece.start + p.start, piece.start + p.end) for p in parts])

    def _replace(self, chunk: _Chunk, key: int, pieces: list[Piece]) -> list[tuple[int, str]]:
        """The piece under `key` replaced, in place, by `pieces` (that cover it): their new piece rows."""
        self._slots.pop(key)
        at = chunk.keys.index(key)
        chunk.keys.pop(at)
        chunk.pieces.pop(at)
        rows = []
        for k, piece in enumerate(pieces):
            chunk.pieces.insert(at + k, piece)
            rows.append(self._slot(chunk, piece, at + k))
        return rows

    @staticmethod
    def _piece_of(chunk: _Chunk, key: int) -> Piece:
        return chunk.pieces[chunk.keys.index(key)]

    async def take(self, outcome: Embedded | Isolated, emit: Emit) -> list[tuple[int, str]]:
        """Route one outcome: a chunk's own goes on to `emit`; a piece's is kept until its chunk is whole (then
        the pooled vector goes on: the chunks one answer completes, as one outcome, so one write). Returns piece
        rows to embed again (pieces the server cut, split in two)."""
        if isinstance(outcome, Isolated):
            if not self.is_piece(outcome.chunk_id):
                await emit(outcome)
            else:
                await self._fail(outcome)(emit)
            return []
        own = [k for k, cid in enumerate(outcome.ids) if not self.is_piece(cid)]
        if own:
            await emit(outcome.keep(own) if len(own) < len(outcome.ids) else outcome)
        again: list[tuple[int, str]] = []
        complete: list[_Chunk] = []
        for k, key in enumerate(outcome.ids):
            if not self.is_piece(key) or key not in self._slots:
                continue
            chunk, _ = self._slots[key]
            if outcome.cut[k] or outcome.truncated[k]:  # never stored cut: split further
                halves = self.split(key)
                if halves:
                    again += halves
                    continue
                message = "a piece of one character does not fit the model's context"
                await self._fail(Isolated(key, "context_exceeded", message, 400, 1))(emit)
                continue
            chunk.vectors[key] = outcome.vectors[k]
            if chunk.complete:
                complete.append(chunk)
        if complete:
            await emit(self._pooled(complete))
        return again

    def _fail(self, piece: Isolated) -> Callable[[Emit], Awaitable[None]]:
        """The chunk of a failed piece fails once, with the piece's error; its other pieces are dropped."""
        found = self._slots.get(piece.chunk_id)

        async def go(emit: Emit) -> None:
            if found is None:
                return
            chunk, _ = found
            for key in chunk.keys:
                self._slots.pop(key, None)
            if not chunk.failed:
                chunk.failed = True
                message = f"a piece of this chunk failed: {piece.message}"
                await emit(Isolated(chunk.chunk_id, piece.error, message, piece.http_status, len(chunk.text)))

        return go

    def _pooled(self, chunks: list[_Chunk]) -> Embedded:
        """The complete chunks' pooled vectors, each with the description it is rebuilt from."""
        vectors: list[np.ndarray] = []
        descriptions: list[str | None] = []
        for chunk in chunks:
            for key in chunk.keys:
                self._slots.pop(key, None)
            weights = weights_for(chunk.pieces, chunk.text, self.weights, self.estimator)
            plan = Pooling(tuple(chunk.pieces), tuple(weights))
            vectors.append(plan.combine([chunk.vectors[k] for k in chunk.keys]))
            descriptions.append(json.dumps(plan.to_json(), separators=(",", ":")))
            self.pooled += 1
            self.pieces += len(chunk.keys)
        n = len(chunks)
        ids, chars = [c.chunk_id for c in chunks], [len(c.text) for c in chunks]
        return Embedded(ids, vectors, chars, [False] * n, [False] * n, descriptions)
