"""Failure records of chunks that could not be embedded (or written), with attempts for quarantine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg.rows import dict_row

from wiki_embeddings.core.db.connection import StoreBase

if TYPE_CHECKING:
    from wiki_embeddings.core.db import Store


class FailuresMixin(StoreBase):
    """Failure records of chunks that could not be embedded (or written), with attempts for quarantine."""

    def record_failure(
        self: Store,
        chunk_id: int,
        *,
        error: str,
        message: str,
        http_status: int | None,
        run_id: int | None,
    ) -> int:
        """Upsert a failure record; attempts count up for the same text and restart at 1 when the text changed.
        A run an operator released records nothing (0 attempts returned)."""
        row = self.conn.execute(
            sql.SQL(
                "INSERT INTO {s}.failures AS f (table_name, chunk_id, error, message, http_status, attempts,"
                " text_md5, text_length, run_id)"
                " SELECT %(table)s, t.{id}, %(error)s, %(message)s, %(status)s, 1, md5(t.{text}),"
                " length(t.{text}), %(run)s FROM {t} t WHERE t.{id} = %(cid)s"
                " AND NOT EXISTS (SELECT 1 FROM {s}.runs r WHERE r.run_id = %(run)s AND r.state = 'released')"
                " ON CONFLICT (table_name, chunk_id) DO UPDATE SET error = EXCLUDED.error,"
                " message = EXCLUDED.message, http_status = EXCLUDED.http_status, run_id = EXCLUDED.run_id,"
                " text_length = EXCLUDED.text_length, last_seen = now(),"
                " attempts = CASE WHEN f.text_md5 IS NOT DISTINCT FROM EXCLUDED.text_md5"
                " THEN f.attempts + 1 ELSE 1 END,"
                " text_md5 = EXCLUDED.text_md5"
                " RETURNING attempts"
            ).format(s=self._s, id=self._id, text=self._text, t=self._t),
            {
                "table": self.failure_key,
                "error": error,
                "message": message[:2000],
                "status": http_status,
                "run": run_id,
                "cid": chunk_id,
            },
        ).fetchone()
        return int(row[0]) if row else 0

    def list_failures(self: Store, max_attempts: int = 3, limit: int | None = None) -> list[dict[str, Any]]:
        rows = self.conn.cursor(row_factory=dict_row).execute(
            sql.SQL(
                "SELECT f.chunk_id, f.error, f.message, f.http_status, f.attempts, f.text_length, f.first_seen,"
                " f.last_seen, (f.attempts >= %s AND f.text_md5 IS NOT DISTINCT FROM md5(t.{text})) AS quarantined,"
                " (t.{emb} IS NULL) AS still_missing"
                " FROM {s}.failures f LEFT JOIN {t} t ON t.{id} = f.chunk_id"
                " WHERE f.table_name = %s ORDER BY f.chunk_id LIMIT %s"
            ).format(s=self._s, t=self._t, id=self._id, text=self._text, emb=self._emb),
            (max_attempts, self.failure_key, limit),
        )
        return list(rows.fetchall())

    def clear_failures(self: Store, ids: Sequence[int] | None = None) -> int:
        if ids:
            cur = self.conn.execute(
                sql.SQL("DELETE FROM {s}.failures WHERE table_name = %s AND chunk_id = ANY(%s)").format(s=self._s),
                (self.failure_key, list(ids)),
            )
        else:
            cur = self.conn.execute(
                sql.SQL("DELETE FROM {s}.failures WHERE table_name = %s").format(s=self._s),
                (self.failure_key,),
            )
        return cur.rowcount
