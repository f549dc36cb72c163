"""Trust in the vectors: column identity, the verification/quality log and verification samples."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from psycopg import sql
from psycopg.rows import dict_row

from wiki_embeddings.core.db.connection import StoreBase
from wiki_embeddings.core.db.modelnames import canonical_sql
from wiki_embeddings.core.modelname import canonical

if TYPE_CHECKING:
    from wiki_embeddings.core.db import Store


#: `Store.sample_ids` reads every id of a table up to this many rows (cheap) instead of probing strata.
_SMALL_TABLE = 50_000


class TrustMixin(StoreBase):
    """Trust in the vectors: column identity, the verification/quality log and verification samples."""

    _trust_ready: bool = False

    def ensure_trust_schema(self: Store) -> None:
        """The trust tables are migration 6: a writer brings an older bookkeeping schema up to date first (no DDL
        when they exist, so a role without CREATE works once the schema is current)."""
        if self._trust_ready:
            return
        if not (self._trust_table("column_identity") and self._trust_table("trust_log")):
            self.migrate()
        self._trust_ready = True

    def _trust_table(self: Store, name: str) -> bool:
        """Readers never create (a monitoring role with SELECT only runs `status`): absent tables read as empty."""
        if self._trust_ready:
            return True
        qualified = sql.Identifier(self.state_schema, name).as_string(self.conn)
        row = self.conn.execute("SELECT to_regclass(%s)", (qualified,)).fetchone()
        return bool(row and row[0])

    def column_identity(self: Store) -> dict[str, Any] | None:
        """The recorded identity of this store's vector column (model, dimensions, text_prefix, query_prefix)."""
        if not self._trust_table("column_identity"):
            return None
        row = (
            self.conn.cursor(row_factory=dict_row)
            .execute(
                sql.SQL(
                    "SELECT model, dimensions, text_prefix, query_prefix, api, recorded_at FROM {s}.column_identity"
                    " WHERE table_name = %s AND column_attnum = %s"
                ).format(s=self._s),
                (self.table.qualified, self._current_attnum()),
            )
            .fetchone()
        )
        return dict(row) if row else None

    def record_column_identity(
        self: Store, model: str, dimensions: int, text_prefix: str, query_prefix: str = "", api: str | None = None
    ) -> None:
        """Upsert the column's identity; an empty query prefix keeps the one recorded (it is not in the vectors),
        and so does an unnamed API."""
        self.ensure_trust_schema()
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {s}.column_identity AS c (table_name, column_attnum, model, dimensions, text_prefix,"
                " query_prefix, api) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (table_name, column_attnum)"
                " DO UPDATE SET model = EXCLUDED.model, dimensions = EXCLUDED.dimensions,"
                " text_prefix = EXCLUDED.text_prefix,"
                " query_prefix = coalesce(nullif(EXCLUDED.query_prefix, ''), c.query_prefix),"
                " api = coalesce(EXCLUDED.api, c.api), recorded_at = now(),"
                # another model, length or prefix: the probe's recorded answers are of the column's old identity
                " fingerprint = CASE WHEN {m} = {em} AND c.dimensions = EXCLUDED.dimensions"
                " AND c.text_prefix = EXCLUDED.text_prefix THEN c.fingerprint END"
            ).format(
                s=self._s,
                m=canonical_sql(sql.SQL("c.model")),
                em=canonical_sql(sql.SQL("EXCLUDED.model")),
            ),
            (self.table.qualified, self._current_attnum(), model, dimensions, text_prefix, query_prefix, api),
        )

    def record_column_api(self: Store, api: str) -> bool:
        """`verify` found the column's vectors reproduced through `api`: it is accepted for the column."""
        self.ensure_trust_schema()
        cur = self.conn.execute(
            sql.SQL("UPDATE {s}.column_identity SET api = %s WHERE table_name = %s AND column_attnum = %s").format(
                s=self._s
            ),
            (api, self.table.qualified, self._current_attnum()),
        )
        return cur.rowcount > 0

    def column_fingerprint(self: Store) -> dict[str, Any] | None:
        """The column's recorded answers to the probe text (core/fingerprint.py), or None."""
        if not self._trust_table("column_identity"):
            return None
        row = self.conn.execute(
            sql.SQL("SELECT fingerprint FROM {s}.column_identity WHERE table_name = %s AND column_attnum = %s").format(
                s=self._s
            ),
            (self.table.qualified, self._current_attnum()),
        ).fetchone()
        return dict(row[0]) if row and row[0] else None

    def record_column_fingerprint(self: Store, fingerprint: dict[str, Any], was: dict[str, Any] | None) -> bool:
        """Replace the column's recorded answers to the probe text, only if they are still `was` (as read before:
        two runs starting at once must not both record their own). False: changed meanwhile, or no identity
        recorded to hold them."""
        self.ensure_trust_schema()
        cur = self.conn.execute(
            sql.SQL(
                "UPDATE {s}.column_identity SET fingerprint = %s WHERE table_name = %s AND column_attnum = %s"
                " AND fingerprint IS NOT DISTINCT FROM %s::jsonb"
            ).format(s=self._s),
            (
                json.dumps(fingerprint),
                self.table.qualified,
                self._current_attnum(),
                None if was is None else json.dumps(was),
            ),
        )
        return cur.rowcount > 0

    def forget_column_identity(self: Store) -> None:
        self.ensure_trust_schema()
        self.conn.execute(
            sql.SQL("DELETE FROM {s}.column_identity WHERE table_name = %s AND column_attnum = %s").format(s=self._s),
            (self.table.qualified, self._current_attnum()),
        )

    def provenance_prefix(self: Store) -> tuple[str, str] | None:
        """(model, text_prefix) of one provenance row of this column (the first by id: an index probe), or None."""
        row = self.conn.execute(
            sql.SQL(
                "SELECT model, text_prefix FROM {s}.embedding_provenance WHERE table_name = %s AND column_attnum = %s"
                " ORDER BY chunk_id LIMIT 1"
            ).format(s=self._s),
            (self.table.qualified, self._current_attnum()),
        ).fetchone()
        return (str(row[0]), str(row[1])) if row else None

    def record_trust(
        self: Store, kind: str, result: dict[str, Any], *, run_id: int | None = None, model: str | None = None
    ) -> None:
        self.ensure_trust_schema()
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {s}.trust_log (table_name, kind, run_id, model, result) VALUES (%s, %s, %s, %s, %s)"
            ).format(s=self._s),
            (self.table.qualified, kind, run_id, model, json.dumps(result, default=str)),
        )

    def silent_window(self: Store) -> tuple[int, Any] | None:
        """The latest window (tokens) a run found the server cutting silently at, and when it was found: vectors
        written before then from texts long enough to reach it may be of less text than recorded (`--reembed-cut`
        re-embeds them)."""
        found = self.latest_trust("silent_window")
        if not found or not isinstance(found.get("tokens"), int):
            return None
        at = found.get("found_at")
        when = datetime.fromtimestamp(at, tz=UTC) if isinstance(at, int | float) else found["recorded_at"]
        return int(found["tokens"]), when

    def latest_trust(
        self: Store, kind: str, model: str | None = None, verdicts: Sequence[str] | None = None
    ) -> dict[str, Any] | None:
        """The latest trust_log row of `kind` for the table (and `model`; and with a `verdict` among `verdicts`):
        result keys plus recorded_at, run_id."""
        if not self._trust_table("trust_log"):
            return None
        row = (
            self.conn.cursor(row_factory=dict_row)
            .execute(
                sql.SQL(
                    "SELECT run_id, model, recorded_at, result FROM {s}.trust_log WHERE table_name = %(t)s"
                    " AND kind = %(k)s AND (%(m)s::text IS NULL OR {model} = %(m)s)"
                    " AND (%(v)s::text[] IS NULL OR result->>'verdict' = ANY(%(v)s::text[])) ORDER BY id DESC LIMIT 1"
                ).format(s=self._s, model=canonical_sql(sql.Identifier("model"))),
                {
                    "t": self.table.qualified,
                    "k": kind,
                    "m": None if model is None else canonical(model),
                    "v": list(verdicts) if verdicts else None,
                },
            )
            .fetchone()
        )
        if not row:
            return None
        extra = {"run_id": row["run_id"], "model": row["model"], "recorded_at": row["recorded_at"]}
        return {**(row["result"] or {}), **extra}

    def sample_ids(self: Store, size: int, columns: Sequence[str] = (), seed: int | None = None) -> list[int]:
        """About `size` distinct random ids of chunks whose vector columns (`columns`, default this store's) are all
        set, spread over the whole id range, never by a table scan of a large table. A table of up to
        `_SMALL_TABLE` rows: its ids read and sampled. A larger one: strata of equal row counts from PostgreSQL's
        statistics of the id column (`pg_stats.histogram_bounds`, else [min, max]), one random point per wanted id
        in its stratum, then the first such chunk at or after it within the stratum (a primary-key probe each)."""
        if size <= 0:
            return []
        cols = list(columns) or [self.table.embedding_column]
        present = sql.SQL(" AND ").join(sql.SQL("t.{} IS NOT NULL").format(sql.Identifier(c)) for c in cols)
        rng = np.random.default_rng(seed)
        row = self.conn.execute(
            sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {t} LIMIT %s) x").format(t=self._t), (_SMALL_TABLE + 1,)
        ).fetchone()
        if row and int(row[0]) <= _SMALL_TABLE:
            ids = [
                int(r[0])
                for r in self.conn.execute(
                    sql.SQL("SELECT t.{id} FROM {t} t WHERE {present}").format(id=self._id, t=self._t, present=present)
                ).fetchall()
            ]
            return sorted(int(x) for x in rng.choice(ids, min(size, len(ids)), replace=False)) if ids else []
        bounds_row = self.conn.execute(
            "SELECT histogram_bounds::text::bigint[] FROM pg_stats WHERE schemaname = %s AND tablename = %s"
            " AND attname = %s",
            (self.table.schema, self.table.name, self.table.id_column),
        ).fetchone()
        edges = [int(x) for x in (bounds_row[0] if bounds_row and bounds_row[0] else [])]
        if len(edges) < 2:
            mm = self.conn.execute(sql.SQL("SELECT min({id}), max({id}) FROM {t}").format(id=self._id, t=self._t))
            low_high = mm.fetchone()
            if not low_high or low_high[0] is None:
                return []
            edges = [int(low_high[0]), int(low_high[1])]
        edges[-1] += 1  # the last stratum includes the largest id
        found: set[int] = set()
        for _round in range(3):
            want = size - len(found)
            if want <= 0:
                break
            strata = rng.integers(0, len(edges) - 1, size=want)
            lows = np.asarray(edges[:-1])[strata]
            highs = np.asarray(edges[1:])[strata]
            points = (lows + rng.random(want) * (highs - lows)).astype(np.int64)
            rows = self.conn.execute(
                sql.SQL(
                    "SELECT DISTINCT x.id FROM unnest(%s::bigint[], %s::bigint[]) AS p(start, stop) CROSS JOIN LATERAL"
                    " (SELECT t.{id} AS id FROM {t} t WHERE t.{id} >= p.start AND t.{id} < p.stop AND {present}"
                    " ORDER BY t.{id} LIMIT 1) x"
                ).format(id=self._id, t=self._t, present=present),
                (points.tolist(), highs.tolist()),
            ).fetchall()
            before = len(found)
            found.update(int(r[0]) for r in rows)
            if len(found) == before:
                break
        return sorted(found)[:size] if len(found) <= size else sorted(rng.choice(sorted(found), size, replace=False))

    def embedded_ids_after(self: Store, after: int | None, limit: int) -> list[int]:
        """The next `limit` ids with a vector in this column after `after` (keyset pages for `verify --full`)."""
        rows = self.conn.execute(
            sql.SQL(
                "SELECT {id} FROM {t} WHERE {emb} IS NOT NULL AND (%(a)s::bigint IS NULL OR {id} > %(a)s)"
                " ORDER BY {id} LIMIT %(n)s"
            ).format(id=self._id, t=self._t, emb=self._emb),
            {"a": after, "n": limit},
        ).fetchall()
        return [int(r[0]) for r in rows]

    def read_for_verify(self: Store, ids: Sequence[int], default_chars: int) -> list[dict[str, Any]]:
        """For each id with a vector: the stored vector, its provenance, md5 of the current text, and the text cut
        as it was embedded (`chars_sent` characters when recorded, else the recorded --max-chars)."""
        rows = (
            self.conn.cursor(row_factory=dict_row)
            .execute(
                sql.SQL(
                    "SELECT t.{id} AS id, t.{emb} AS vector, md5(t.{text}) AS current_md5, p.model, p.text_md5,"
                    " p.text_prefix, p.chars_sent, p.max_chars, p.pooling,"
                    " left(t.{text}, coalesce(p.chars_sent, p.max_chars, %(chars)s)) AS text FROM {t} t"
                    " LEFT JOIN {s}.embedding_provenance p ON p.table_name = %(tn)s"
                    " AND p.column_attnum = %(att)s AND p.chunk_id = t.{id}"
                    " WHERE t.{id} = ANY(%(ids)s) AND t.{emb} IS NOT NULL ORDER BY t.{id}"
                ).format(id=self._id, emb=self._emb, text=self._text, t=self._t, s=self._s),
                {"chars": default_chars, "tn": self.table.qualified, "att": self._current_attnum(), "ids": list(ids)},
            )
            .fetchall()
        )
        for r in rows:
            r["vector"] = np.asarray(r["vector"].to_numpy(), dtype=np.float32)
        return list(rows)

    def read_pairs(
        self: Store, ids: Sequence[int], other: str, max_chars: int
    ) -> list[tuple[int, str, np.ndarray, np.ndarray]]:
        """(id, text cut to `max_chars`, this column's vector, column `other`'s vector) for ids with both set."""
        rows = self.conn.execute(
            sql.SQL(
                "SELECT {id}, left({text}, %s), {emb}, {other} FROM {t} WHERE {id} = ANY(%s)"
                " AND {emb} IS NOT NULL AND {other} IS NOT NULL ORDER BY {id}"
            ).format(id=self._id, text=self._text, emb=self._emb, other=sql.Identifier(other), t=self._t),
            (max_chars, list(ids)),
        ).fetchall()
        return [
            (int(r[0]), r[1] or "", np.asarray(r[2].to_numpy(), np.float32), np.asarray(r[3].to_numpy(), np.float32))
            for r in rows
        ]
