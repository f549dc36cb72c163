"""Counts for status, Dagster's picture of the table and the pre-flight sample."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import sql

from wiki_embeddings.core.db.connection import StoreBase, _is_sql_ascii
from wiki_embeddings.core.db.modelnames import canonical_sql
from wiki_embeddings.core.db.records import coverage_pct
from wiki_embeddings.core.modelname import canonical
from wiki_embeddings.core.text import UTF8_MAX_BYTES_PER_CHAR

if TYPE_CHECKING:
    from wiki_embeddings.core.db import Store


class StatsMixin(StoreBase):
    """Counts for status, Dagster's picture of the table and the pre-flight sample."""

    def status(self: Store, max_attempts: int = 3) -> dict[str, Any]:
        """Exact counts: total from the primary key, missing from the partial index, failures from bookkeeping."""
        cur = self.conn.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM {t}),"
                " (SELECT count(*) FROM {t} WHERE {emb} IS NULL),"
                " (SELECT count(*) FROM {s}.failures f JOIN {t} t ON t.{id} = f.chunk_id"
                "   WHERE f.table_name = %(table)s AND t.{emb} IS NULL),"
                " (SELECT count(*) FROM {s}.failures f JOIN {t} t ON t.{id} = f.chunk_id"
                "   WHERE f.table_name = %(table)s AND t.{emb} IS NULL AND f.attempts >= %(cap)s"
                "   AND f.text_md5 IS NOT DISTINCT FROM md5(t.{text}))"
            ).format(t=self._t, emb=self._emb, s=self._s, id=self._id, text=self._text),
            {"table": self.failure_key, "cap": max_attempts},
        ).fetchone()
        assert cur is not None
        total, missing, failed, quarantined = (int(x) for x in cur)
        embedded = total - missing
        return {
            "total": total,
            "embedded": embedded,
            "missing": missing,
            "coverage_pct": coverage_pct(embedded, total),
            "failed": failed,
            "quarantined": quarantined,
            "stop_requested": self.stop_requested(),
        }

    def made_by(self: Store) -> tuple[int, int]:
        """(vectors of a cut text, pooled vectors) of the column: how its long texts were embedded so far (both
        counts use a partial index)."""
        row = self.conn.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM {s}.embedding_provenance WHERE table_name = %(t)s"
                " AND column_attnum = %(a)s AND context_cut AND (context_cut OR server_truncated)),"
                " (SELECT count(*) FROM {s}.embedding_provenance WHERE table_name = %(t)s AND column_attnum = %(a)s"
                " AND pooling IS NOT NULL)"
            ).format(s=self._s),
            {"t": self.table.qualified, "a": self._current_attnum()},
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def model_status(self: Store) -> dict[str, Any]:
        """Beside `status`: embedded vectors of another model than the live one (from provenance, an index-only
        count) and the result of the last content-change scan (never scanned here, so status stays fast)."""
        state = self.table_state()
        stale_model = 0
        if state.get("model"):
            row = self.conn.execute(
                sql.SQL(
                    "SELECT count(*) FROM {s}.embedding_provenance WHERE table_name = %s AND column_attnum = %s"
                    " AND {model} <> %s"
                ).format(s=self._s, model=canonical_sql(sql.Identifier("model"))),
                (self.table.qualified, self._current_attnum(), canonical(state["model"])),
            ).fetchone()
            stale_model = int(row[0]) if row else 0
        scanned = state.get("stale_text_scanned_at")
        unverified = state.get("unverified")
        cut = self.conn.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE context_cut), count(*) FILTER (WHERE server_truncated)"
                " FROM {s}.embedding_provenance WHERE table_name = %s AND column_attnum = %s"
                " AND (context_cut OR server_truncated)"
            ).format(s=self._s),
            (self.table.qualified, self._current_attnum()),
        ).fetchone()
        pooled = self.conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {s}.embedding_provenance WHERE table_name = %s AND column_attnum = %s"
                " AND pooling IS NOT NULL"
            ).format(s=self._s),
            (self.table.qualified, self._current_attnum()),
        ).fetchone()
        return {
            "pooled": int(pooled[0]) if pooled else 0,
            "cut_for_context": int(cut[0]) if cut else 0,
            "server_truncated": int(cut[1]) if cut else 0,
            "stale_model": stale_model,
            "stale_text": int(state.get("stale_text") or 0),
            "unverified": "" if unverified is None else int(unverified),
            "stale_text_scanned_at": scanned.isoformat(timespec="seconds") if scanned else "",
            "migration_model": state.get("migration_model") or "",
            "migration_column": state.get("migration_column") or "",
            "previous_model": state.get("previous_model") or "",
        }

    def sample_texts(self: Store, size: int, max_chars: int, missing_only: bool = True) -> list[str]:
        """About `size` chunk texts (cut to `max_chars`) spread over the table, for the pre-flight estimate:
        a Bernoulli sample sized from the planner's row estimate, so it costs one pass over few pages."""
        row = self.conn.execute(
            "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass(%s)",
            (sql.Identifier(self.table.schema, self.table.name).as_string(self.conn),),
        ).fetchone()
        estimate = int(row[0]) if row and row[0] else 0
        percent = 100.0 if estimate <= size * 4 else max(100.0 * size * 4 / estimate, 0.01)
        where = sql.SQL("WHERE {emb} IS NULL").format(emb=self._emb) if missing_only else sql.SQL("")
        if _is_sql_ascii(self.conn):  # undeclared bytes: decoded here, a bad byte replaced (an estimate only)
            raw = self.conn.execute(
                sql.SQL(
                    "SELECT convert_to(left({text}, %s), 'SQL_ASCII') FROM {t} TABLESAMPLE BERNOULLI (%s) {where}"
                    " LIMIT %s"
                ).format(text=self._text, t=self._t, where=where),
                (max_chars * UTF8_MAX_BYTES_PER_CHAR, percent, size),
            ).fetchall()
            return [bytes(r[0]).decode("utf-8", errors="replace")[:max_chars] for r in raw if r[0]]
        rows = self.conn.execute(
            sql.SQL("SELECT left({text}, %s) FROM {t} TABLESAMPLE BERNOULLI (%s) {where} LIMIT %s").format(
                text=self._text, t=self._t, where=where
            ),
            (max_chars, percent, size),
        ).fetchall()
        return [r[0] for r in rows if r[0]]

    def missing_id_bounds(
        self: Store, id_min: int | None = None, id_max: int | None = None
    ) -> tuple[int | None, int | None]:
        """The smallest and largest missing id (in the range): two probes of the partial index."""
        row = self.conn.execute(
            sql.SQL(
                "SELECT min({id}), max({id}) FROM {t} WHERE {emb} IS NULL"
                " AND (%(lo)s::bigint IS NULL OR {id} >= %(lo)s) AND (%(hi)s::bigint IS NULL OR {id} <= %(hi)s)"
            ).format(id=self._id, t=self._t, emb=self._emb),
            {"lo": id_min, "hi": id_max},
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def count_missing(self: Store, id_min: int | None = None, id_max: int | None = None) -> int:
        row = self.conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {t} WHERE {emb} IS NULL AND (%s::bigint IS NULL OR {id} >= %s)"
                " AND (%s::bigint IS NULL OR {id} <= %s)"
            ).format(t=self._t, emb=self._emb, id=self._id),
            (id_min, id_min, id_max, id_max),
        ).fetchone()
        return int(row[0]) if row else 0

    def missing_by_range(self: Store, width: int) -> list[tuple[int, int]]:
        """(range start, missing count) for every ID range of `width` that has missing chunks."""
        rows = self.conn.execute(
            sql.SQL(
                "SELECT ({id} / %s) * %s AS start, count(*) FROM {t} WHERE {emb} IS NULL GROUP BY 1 ORDER BY 1"
            ).format(id=self._id, t=self._t, emb=self._emb),
            (width, width),
        ).fetchall()
        return [(int(r[0]), int(r[1])) for r in rows]

    def failed_by_range(self: Store, width: int) -> list[tuple[int, int]]:
        rows = self.conn.execute(
            sql.SQL(
                "SELECT (f.chunk_id / %s) * %s, count(*) FROM {s}.failures f JOIN {t} t ON t.{id} = f.chunk_id"
                " WHERE f.table_name = %s AND t.{emb} IS NULL GROUP BY 1 ORDER BY 1"
            ).format(s=self._s, t=self._t, id=self._id, emb=self._emb),
            (width, width, self.failure_key),
        ).fetchall()
        return [(int(r[0]), int(r[1])) for r in rows]

    def id_bounds(self: Store) -> tuple[int | None, int | None, int]:
        row = self.conn.execute(
            sql.SQL("SELECT min({id}), max({id}), count(*) FROM {t}").format(id=self._id, t=self._t)
        ).fetchone()
        assert row is not None
        return row[0], row[1], int(row[2])

    # Read-only queries behind the Dagster state sensor and the coverage asset: which ID ranges hold chunks, the
    # per-range counts, and the rate of the runs under way. Kept cheap: the sensor calls them every minute.
    def occupied_ranges(self: Store, width: int, count: int) -> list[int]:
        """Starts of the first `count` ID ranges of `width` holding at least one chunk (a primary-key probe each)."""
        rows = self.conn.execute(
            sql.SQL(
                "SELECT s * %(w)s FROM generate_series(0, %(n)s - 1) AS s"
                " WHERE EXISTS (SELECT 1 FROM {t} WHERE {id} >= s * %(w)s AND {id} < (s + 1) * %(w)s)"
                " ORDER BY 1"
            ).format(t=self._t, id=self._id),
            {"w": width, "n": count},
        ).fetchall()
        return [int(r[0]) for r in rows]

    def rows_by_range(self: Store, width: int) -> list[tuple[int, int, int]]:
        """(range start, chunks, missing) for every ID range of `width` that holds chunks."""
        rows = self.conn.execute(
            sql.SQL(
                "SELECT ({id} / %s) * %s, count(*), count(*) FILTER (WHERE {emb} IS NULL) FROM {t}"
                " GROUP BY 1 ORDER BY 1"
            ).format(id=self._id, emb=self._emb, t=self._t),
            (width, width),
        ).fetchall()
        return [(int(r[0]), int(r[1]), int(r[2])) for r in rows]

    def running_rate(self: Store) -> tuple[int, float]:
        """(runs of this table under way, their summed chunks/s from the last heartbeats); dead runs abandoned first."""
        self.abandon_dead_runs()
        row = self.conn.execute(
            sql.SQL(
                "SELECT count(*), coalesce(sum(chunks_per_s), 0) FROM {s}.runs"
                " WHERE table_name = %s AND state = 'running'"
            ).format(s=self._s),
            (self.table.qualified,),
        ).fetchone()
        return (int(row[0]), float(row[1])) if row else (0, 0.0)
