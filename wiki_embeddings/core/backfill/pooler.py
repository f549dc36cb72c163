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

from wiki_embeddings.core.backfill.outcomes import Embedded, Isolated
from wiki_embeddings.core.context import TokenEstimator
from wiki_embeddings.core.pooling import (
    DEFAULT_OVERLAP_TOKENS,
    DEFAULT_WEIGHTS,
    Piece,
    Pooling,
    WeightKind,
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
        chunk, _ = self._slots.pop(key)
        at = chunk.keys.index(key)
        piece = self._piece_of(chunk, key)
        halves = split_piece(chunk.text, piece)
        if len(halves) < 2:
            return []
        chunk.keys.pop(at)
        chunk.pieces.pop(at)
        rows = []
        for k, half in enumerate(halves):
            chunk.pieces.insert(at + k, half)
            rows.append(self._slot(chunk, half, at + k))
        return rows

    @staticmethod
    def _piece_of(chunk: _Chunk, key: int) -> Piece:
        return chunk.pieces[chunk.keys.index(key)]

    async def take(self, outcome: Embedded | Isolated, emit: Emit) -> list[tuple[int, str]]:
        """Route one outcome: a chunk's own goes on to `emit`; a piece's is kept until its chunk is whole (then
        the pooled vector goes on). Returns piece rows to embed again (pieces the server cut, split in two)."""
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
                await emit(self._pooled(chunk))
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

    def _pooled(self, chunk: _Chunk) -> Embedded:
        for key in chunk.keys:
            self._slots.pop(key, None)
        weights = weights_for(chunk.pieces, chunk.text, self.weights, self.estimator)
        plan = Pooling(tuple(chunk.pieces), tuple(weights))
        vector = plan.combine([chunk.vectors[k] for k in chunk.keys])
        self.pooled += 1
        self.pieces += len(chunk.keys)
        description = json.dumps(plan.to_json(), separators=(",", ":"))
        return Embedded([chunk.chunk_id], [vector], [len(chunk.text)], [False], [False], [description])
