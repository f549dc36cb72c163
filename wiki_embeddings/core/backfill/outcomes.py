"""What the stages hand each other: a claimed batch, embedded vectors, a chunk isolated as unembeddable."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Batch:
    """Claimed chunks: (id, text) rows to embed, and rows whose text could not even be read (invalid UTF-8)."""

    rows: list[tuple[int, str]]
    invalid: list[tuple[int, str, int]] = field(default_factory=list)  # (id, reason, byte length)

    @property
    def ids(self) -> list[int]:
        return [r[0] for r in self.rows] + [r[0] for r in self.invalid]


@dataclass
class Embedded:
    """Vectors ready to write, with what was actually sent for each (its provenance)."""

    ids: list[int]
    vectors: list[np.ndarray]
    chars: list[int]  # characters sent (after any cut)
    cut: list[bool]  # cut below the text to fit the model's context
    truncated: list[bool]  # the server was caught cutting it further, silently
    pooling: list[str | None] | None = None  # how a pooled vector was made (core/pooling.py JSON); None: one piece

    def keep(self, positions: list[int]) -> Embedded:
        return Embedded(
            [self.ids[k] for k in positions],
            [self.vectors[k] for k in positions],
            [self.chars[k] for k in positions],
            [self.cut[k] for k in positions],
            [self.truncated[k] for k in positions],
            None if self.pooling is None else [self.pooling[k] for k in positions],
        )

    def drop(self, positions: list[int]) -> None:
        """Take the rows at `positions` out, in place (vectors that must not be written)."""
        for k in sorted(set(positions), reverse=True):
            for column in (self.ids, self.vectors, self.chars, self.cut, self.truncated, self.pooling):
                if column is not None:
                    del column[k]


@dataclass(frozen=True)
class Isolated:
    """A chunk that cannot be embedded (or written): recorded as a failure, skipped, retried by a later run.

    The worker hands one out only after proving the server well (a known-good text still embeds), unless the
    error is the text's alone (empty, invalid UTF-8, refused by the database)."""

    chunk_id: int
    error: str
    message: str
    http_status: int | None
    text_length: int
