"""The writer: embedded vectors into the column in one statement per batch, refused rows isolated.

A write only fills rows still missing (or, in a refresh, rows whose text is still the one claimed), checks in the
same statement that the column still takes the run's model, and records each vector's provenance. A row the
database refuses (a trigger, a constraint) is isolated like a chunk that cannot be embedded: the batch is split
until it stands alone, recorded `write_error`, the others written. Rows another transaction holds are not waited
for: they come back as `locked` and are retried at the end of the run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from wiki_embeddings.core.backfill.outcomes import Embedded, Isolated
from wiki_embeddings.core.db import DataRefused, Provenance, VectorNotes, WriteResult
from wiki_embeddings.core.errors import first_line

Call = Callable[..., Awaitable[Any]]


class WriteStore(Protocol):
    def write_vectors(
        self,
        conn: Any,
        ids: list[int],
        vectors: list[np.ndarray],
        md5s: list[str] | None,
        provenance: Provenance | None,
        replace: bool,
        notes: VectorNotes | None,
        run_id: int | None,
    ) -> WriteResult: ...


@dataclass
class Written:
    """What one batch's write did."""

    written: int = 0
    locked: set[int] = field(default_factory=set)  # rows another transaction held: retried later
    cut: int = 0  # written chunks that were cut to fit the context
    pooled: int = 0  # written chunks pooled from pieces
    refused: list[Isolated] = field(default_factory=list)  # rows the database refused

    def add(self, other: Written) -> None:
        self.written += other.written
        self.locked |= other.locked
        self.cut += other.cut
        self.pooled += other.pooled
        self.refused += other.refused


class Writer:
    """Writes batches of one run; `provenance` is what every vector it writes was made from."""

    def __init__(self, store: WriteStore, call: Call, provenance: Provenance | None):
        self.store = store
        self.call = call
        self.provenance = provenance
        self.run_id: int | None = None  # once recorded: a write of a run an operator released writes nothing
        self.batches = 0  # batches written (progress lines come every --report-every of them)

    async def write(self, item: Embedded, md5s: list[str] | None, replace: bool) -> Written:
        """Write one batch (ModelMismatch propagates: the column changed model under the run; RunReleased: an
        operator released the run)."""
        outcome = await self._write(item, md5s, replace)
        self.batches += 1
        return outcome

    async def _write(self, item: Embedded, md5s: list[str] | None, replace: bool) -> Written:
        try:
            result = await self.call(
                "write",
                self.store.write_vectors,
                item.ids,
                item.vectors,
                md5s,
                self.provenance,
                replace,
                VectorNotes(item.chars, item.cut, item.truncated, item.pooling),
                self.run_id,
            )
        except DataRefused as exc:  # not a lost connection (DbCalls handles those): this data is refused
            if len(item.ids) == 1:
                message = f"the database refused the write: {first_line(exc)}"
                return Written(refused=[Isolated(item.ids[0], "write_error", message, None, item.chars[0])])
            half = len(item.ids) // 2
            first = await self._write(item.keep(list(range(half))), _part(md5s, 0, half), replace)
            first.add(await self._write(item.keep(list(range(half, len(item.ids)))), _part(md5s, half, None), replace))
            return first
        locked = set(result.locked)
        cut = sum(c for cid, c in zip(item.ids, item.cut, strict=True) if cid not in locked)
        pooling = item.pooling or [None] * len(item.ids)
        pooled = sum(p is not None for cid, p in zip(item.ids, pooling, strict=True) if cid not in locked)
        return Written(int(result), locked, cut, pooled=min(pooled, int(result)))


def _part(md5s: list[str] | None, start: int, stop: int | None) -> list[str] | None:
    return None if md5s is None else md5s[start:stop]
