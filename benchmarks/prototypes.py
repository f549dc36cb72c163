"""A write-path variant kept as a measured alternative beside the real `Store.write_vectors` (see RESULTS.md).

Nothing here is used by the project.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import psycopg
from psycopg import sql

from wiki_embeddings.core.db import Store


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
