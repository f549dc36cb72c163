"""Prototypes of suggested core changes, as subclasses, so the benchmark can measure them beside the real thing.

Nothing here is used by the project; these exist to put numbers on suggestions for `core/client.py` and
`core/store.py` (see RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import psycopg
from psycopg import sql

from wiki_embeddings.core.client import OllamaClient
from wiki_embeddings.core.store import Store


class FastParseClient(OllamaClient):
    """Validates the whole answer as one 2-D float32 array (one numpy call instead of one per vector).

    Falls back to the per-vector validation whenever anything is off, so the error reporting is unchanged.
    """

    def _validate(self, raw: list[object], expected: int) -> list[np.ndarray]:
        if len(raw) == expected and expected:
            try:
                arr = np.array(raw, dtype=np.float32)
            except (TypeError, ValueError):
                arr = None
            if (
                arr is not None
                and arr.ndim == 2
                and arr.shape[1] > 0
                and (self.dimensions is None or arr.shape[1] == self.dimensions)
                and np.isfinite(arr).all()
            ):
                return list(arr)
        return super()._validate(raw, expected)


class UnnestStore(Store):
    """write_vectors as one `UPDATE … FROM unnest(%b::bigint[], %b::vector[])` (binary arrays) per batch."""

    def write_vectors(self, conn: psycopg.Connection, ids: Sequence[int], vectors: Sequence[np.ndarray]) -> int:
        stmt = sql.SQL(
            "UPDATE {t} AS t SET {emb} = u.e FROM unnest(%b::bigint[], %b::vector[]) AS u(id, e)"
            " WHERE t.{id} = u.id AND t.{emb} IS NULL"
        ).format(t=self._t, emb=self._emb, id=self._id)
        with conn.transaction():
            written = conn.execute(stmt, (list(ids), list(vectors))).rowcount
            conn.execute(
                sql.SQL("DELETE FROM {s}.failures WHERE table_name = %s AND chunk_id = ANY(%s)").format(s=self._s),
                (self.table.qualified, list(ids)),
            )
        return int(written)
