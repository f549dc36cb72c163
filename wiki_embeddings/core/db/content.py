"""Content changes: embedded chunks whose text changed since (or that were cut), found by keyset windows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from wiki_embeddings.core.context import MAX_TOKENS_PER_CHAR
from wiki_embeddings.core.db.connection import StoreBase
from wiki_embeddings.core.db.records import Claim

if TYPE_CHECKING:
    from wiki_embeddings.core.db import Store


# Written before the server was found cutting silently at `silent_tokens`, from a text long enough to reach them
# (no text under tokens / MAX_TOKENS_PER_CHAR characters can): its vector may be of less text than recorded.
SUSPECT_CONDITION = sql.SQL(" OR (p.embedded_at < %(silent_at)s AND p.chars_sent >= %(silent_chars)s)")


class ContentMixin(StoreBase):
    """Content changes: embedded chunks whose text changed since (or that were cut), found by keyset windows."""

    def _changed_window(self: Store, include_cut: bool = False, include_pooled: bool = False) -> sql.Composed:
        """Embedded rows of one keyset window whose stored text no longer matches their provenance hash (and, with
        `include_cut`, those embedded from a text cut to fit the context or truncated by the server; with
        `include_pooled`, pooled ones). Cut and pooled rows count only when embedded before the run `%(run_id)s`
        started: a `--reembed-cut` run never re-embeds what it has just written itself (a changed text still does).
        """
        redo: list[sql.Composable] = []
        if include_cut:
            redo.append(sql.SQL("p.context_cut OR p.server_truncated"))
            if self.silent_window() is not None:
                redo.append(sql.SQL("false") + SUSPECT_CONDITION)
        if include_pooled:  # back from pooled to cut (--long-text cut --reembed-cut)
            redo.append(sql.SQL("p.pooling IS NOT NULL"))
        also: sql.Composable = sql.SQL("")
        if redo:
            also = sql.SQL(
                " OR (({redo}) AND p.embedded_at < coalesce((SELECT r.started_at FROM {s}.runs r"
                " WHERE r.run_id = %(run_id)s::bigint), 'infinity'))"
            ).format(redo=sql.SQL(" OR ").join(redo), s=self._s)
        return sql.SQL(
            "WITH win AS MATERIALIZED ("
            " SELECT t.{id} AS id, md5(t.{text}) AS md5 FROM {t} t WHERE t.{emb} IS NOT NULL"
            " AND (%(lower)s::bigint IS NULL OR t.{id} > %(lower)s)"
            " AND (%(upper)s::bigint IS NULL OR t.{id} <= %(upper)s) ORDER BY t.{id} LIMIT %(window)s)"
            " SELECT w.id, w.md5, (SELECT max(id) FROM win) AS last FROM win w"
            " JOIN {s}.embedding_provenance p ON p.table_name = %(ptable)s AND p.column_attnum = %(attnum)s"
            " AND p.chunk_id = w.id WHERE p.text_md5 <> w.md5{also} ORDER BY w.id"
        ).format(id=self._id, text=self._text, t=self._t, emb=self._emb, s=self._s, also=also)

    def suspect_params(self: Store) -> dict[str, Any]:
        """The parameters of SUSPECT_CONDITION (a far-future bound when no silent window was ever found)."""
        found = self.silent_window()
        if found is None:
            return {"silent_at": None, "silent_chars": None}
        tokens, at = found
        return {"silent_at": at, "silent_chars": int(tokens / MAX_TOKENS_PER_CHAR)}

    def count_suspect_truncated(self: Store) -> int:
        """Vectors that may be of less text than their provenance records (see SUSPECT_CONDITION)."""
        params = self.suspect_params()
        if params["silent_at"] is None:
            return 0
        row = self.conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {s}.embedding_provenance p WHERE p.table_name = %(ptable)s"
                " AND p.column_attnum = %(attnum)s AND NOT p.context_cut AND (false{suspect})"
            ).format(s=self._s, suspect=SUSPECT_CONDITION),
            {"ptable": self.table.qualified, "attnum": self._current_attnum(), **params},
        ).fetchone()
        return int(row[0]) if row else 0

    def claim_changed(
        self: Store,
        conn: psycopg.Connection,
        *,
        after_id: int | None,
        limit: int,
        max_chars: int,
        id_min: int | None = None,
        id_max: int | None = None,
        scan_window: int = 5000,
        include_cut: bool = False,
        include_pooled: bool = False,
        run_id: int | None = None,
        **_: Any,
    ) -> Claim:
        """Keyset scan (one window of ids per call) for embedded chunks whose text changed since it was embedded;
        lock the first `limit` found. `last_scanned_id` is where the next call continues. `run_id`: the claiming
        run, whose own cut or pooled rows are not taken again (`_changed_window`)."""
        lower = after_id if after_id is not None else (id_min - 1 if id_min is not None else None)
        found = conn.execute(
            self._changed_window(include_cut, include_pooled),
            {
                "lower": lower,
                "upper": id_max,
                "window": scan_window,
                "ptable": self.table.qualified,
                "attnum": self._current_attnum(conn),
                "run_id": run_id,
                **self.suspect_params(),
            },
        ).fetchall()
        if not found:
            # Nothing changed in this window: continue after its end (or stop when the window was empty).
            row = conn.execute(
                sql.SQL(
                    "SELECT max(id) FROM (SELECT t.{id} AS id FROM {t} t WHERE t.{emb} IS NOT NULL"
                    " AND (%(lower)s::bigint IS NULL OR t.{id} > %(lower)s)"
                    " AND (%(upper)s::bigint IS NULL OR t.{id} <= %(upper)s) ORDER BY t.{id} LIMIT %(window)s) w"
                ).format(id=self._id, t=self._t, emb=self._emb),
                {"lower": lower, "upper": id_max, "window": scan_window},
            ).fetchone()
            last = row[0] if row else None
            return Claim([], None if last is None else int(last), 0)
        found = found[:limit]
        last = int(found[-1][0]) if len(found) == limit else int(found[0][2])
        locked = self.relock(conn, [int(r[0]) for r in found])
        expected = {int(r[0]): r[1] for r in found}
        rows, invalid, md5s = self._read_claimed(conn, locked, max_chars, False, {c: expected[c] for c in locked})
        return Claim(rows, last, len(found) - len(locked), invalid, md5s, len(found))

    def scan_changed(self: Store, record: bool = True) -> int:
        """Count embedded chunks whose text changed since it was embedded, and vectors without provenance, in
        one set-based scan of the table; recorded in table_state with its time for `status` (which never scans)."""
        row = self.conn.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE p.text_md5 <> md5(t.{text})), count(*) FILTER (WHERE p.chunk_id IS NULL)"
                " FROM {t} t LEFT JOIN {s}.embedding_provenance p ON p.table_name = %s"
                " AND p.column_attnum = %s AND p.chunk_id = t.{id} WHERE t.{emb} IS NOT NULL"
            ).format(t=self._t, s=self._s, id=self._id, emb=self._emb, text=self._text),
            (self.table.qualified, self._current_attnum()),
        ).fetchone()
        changed, unverified = (int(row[0]), int(row[1])) if row else (0, 0)
        if record:
            self.record_stale_text(changed, unverified)
        return changed

    def count_unverified(self: Store) -> int:
        """Vectors with no provenance row: written before this tool (e.g. by the shell scripts) or by another
        writer, so their model and text are unknown. One anti-join pass over the embedded rows."""
        row = self.conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {t} t WHERE t.{emb} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM"
                " {s}.embedding_provenance p WHERE p.table_name = %s AND p.column_attnum = %s AND p.chunk_id = t.{id})"
            ).format(t=self._t, s=self._s, id=self._id, emb=self._emb),
            (self.table.qualified, self._current_attnum()),
        ).fetchone()
        return int(row[0]) if row else 0

    def record_stale_text(self: Store, count: int, unverified: int | None = None) -> None:
        """Record a content scan's result; `unverified` None keeps the last recorded count."""
        self._ensure_state_row()
        self.conn.execute(
            sql.SQL(
                "UPDATE {s}.table_state SET stale_text = %s, stale_text_scanned_at = now(),"
                " unverified = coalesce(%s, unverified), updated_at = now() WHERE table_name = %s"
            ).format(s=self._s),
            (count, unverified, self.table.qualified),
        )
