"""The batch write (one statement: vectors, provenance, failures cleared, column and model guards), reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from wiki_embeddings.core.db.connection import StoreBase
from wiki_embeddings.core.db.errors import ModelMismatch, RunReleased, StoreError
from wiki_embeddings.core.db.modelnames import canonical_sql
from wiki_embeddings.core.db.records import Provenance, VectorNotes, WriteResult
from wiki_embeddings.core.modelname import canonical, same_model

if TYPE_CHECKING:
    from wiki_embeddings.core.db import Store


class WritesMixin(StoreBase):
    """The batch write (one statement: vectors, provenance, failures cleared, column and model guards), reads."""

    def write_vectors(
        self: Store,
        conn: psycopg.Connection,
        ids: Sequence[int],
        vectors: Sequence[np.ndarray],
        md5s: Sequence[str] | None = None,
        provenance: Provenance | None = None,
        replace: bool = False,
        notes: VectorNotes | None = None,
        run_id: int | None = None,
    ) -> WriteResult:
        """Write one batch of vectors in one short transaction, with their provenance.

        Default: only rows still missing are touched. `replace=True` (content refresh) overwrites a vector in
        place (never a NULL in between). With `md5s`, a row is written only if its text is still the one
        claimed (`md5(text) = claimed md5`). One statement does it all: an `UPDATE … FROM unnest(…)` over
        binary arrays (ids, vectors, md5s) joined on the primary key, whose RETURNING feeds the provenance
        insert and the clearing of failure records - one round trip per batch, the least client CPU measured
        (benchmarks/RESULTS.md). With `run_id`, nothing is written once an operator released that run: the
        statement itself checks, and RunReleased is raised.
        """
        if not ids:
            return WriteResult(0)
        params: dict[str, Any] = {
            "ids": list(ids),
            "vectors": list(vectors),
            "md5s": list(md5s) if md5s is not None else [None] * len(ids),
            "chars": notes.chars_sent if notes is not None else [None] * len(ids),
            "cut": notes.context_cut if notes is not None else [False] * len(ids),
            "trunc": notes.server_truncated if notes is not None else [False] * len(ids),
            "pooling": notes.pooling if notes is not None and notes.pooling is not None else [None] * len(ids),
            "failure_key": self.failure_key,
            "rel": self._rel,
            "column": self.table.embedding_column,
            "run_id": run_id,
        }
        if provenance is not None:
            params.update(
                expected=self._attnum,
                table=self.table.qualified,
                model=provenance.model,
                model_key=canonical(provenance.model),
                dim=provenance.dimensions,
                max_chars=provenance.max_chars,
                prefix=provenance.text_prefix,
            )
        stmt = self._write_statement(conn, replace, md5s is not None, provenance is not None)
        # One statement on an autocommit connection is its own transaction: no BEGIN/COMMIT round trips.
        row = conn.execute(stmt, params, binary=True).fetchone()
        if row is not None and row[3]:
            raise RunReleased(
                f"run {run_id} was released by an operator (`wiki-embeddings runs release`); nothing of it is "
                "written any more"
            )
        if provenance is not None:
            attnum = row[1] if row else None
            if attnum is None:
                raise StoreError(f"column {self.table.embedding_column!r} not found in {self.table.qualified}")
            if self._attnum is not None and attnum != self._attnum:
                raise StoreError(
                    f"column {self.table.embedding_column!r} was swapped during this run; nothing written "
                    "in this batch (start the run again)"
                )
            self._attnum = int(attnum)
            column_model = row[2] if row else None
            if column_model is not None and not same_model(column_model, provenance.model):
                raise ModelMismatch(
                    f"{self.table.qualified}.{self.table.embedding_column} now takes model {column_model!r} "
                    f"(a swap or another run changed it); nothing of model {provenance.model!r} was written in "
                    "this batch: start the run again"
                )
        return WriteResult(int(row[0]) if row else 0, tuple(row[-1] or ()) if row else ())

    @property
    def _rel(self: Store) -> str:
        """The table's quoted name for `to_regclass` (quoting needs no connection for plain identifiers)."""
        return sql.Identifier(self.table.schema, self.table.name).as_string(None)

    def _write_statement(
        self: Store, conn: psycopg.Connection, replace: bool, with_md5: bool, with_provenance: bool
    ) -> bytes:
        """The batch write statement for these options, composed into bytes once per store: composing (and even
        turning a composed statement into bytes) costs client CPU on every batch otherwise, and an identical
        statement lets psycopg prepare it. Every connection of a store speaks UTF-8 (connect), so the bytes fit
        them all."""
        key = (replace, with_md5, with_provenance)
        cached = self._write_statements.get(key)
        if cached is not None:
            return cached
        guard = sql.SQL("") if replace else sql.SQL(" AND t.{emb} IS NULL").format(emb=self._emb)
        # The run's `embedded` counts its writes as they commit (heartbeats only every 10 s): a run frozen and then
        # released (`runs release`) shows what it really wrote, not its last heartbeat's figure (or 0 before one).
        run_count = (
            sql.SQL("")
            if replace
            else sql.SQL(
                ", rc AS (UPDATE {s}.runs SET embedded = embedded + (SELECT count(*) FROM w)"
                " WHERE run_id = %(run_id)s::bigint AND state <> 'released')"
            ).format(s=self._s)
        )
        if with_md5:
            guard = sql.Composed([guard, sql.SQL(" AND md5(t.{text}) = u.md5").format(text=self._text)])
        record: sql.Composable = sql.SQL("")
        column_check: sql.Composable = sql.SQL("")
        attnum_out: sql.Composable = sql.SQL("NULL::smallint, NULL::text")
        model_cte: sql.Composable = sql.SQL("")
        if with_provenance:
            # The column's attnum is read in the same statement, after the UPDATE has locked the table: a swap
            # (ACCESS EXCLUSIVE) cannot commit in between. A batch whose column was swapped since this run's
            # first batch writes nothing (old-model vectors never land in the new column) and is refused by
            # write_vectors. The model the column takes now (the live model, or a migration's target for its
            # shadow column) is read in the same statement too: a run started before a swap never writes its
            # model's vectors into a column that now belongs to another model.
            column_check = sql.SQL(
                " AND (%(expected)s::smallint IS NULL OR (SELECT attnum FROM a) = %(expected)s)"
                " AND ((SELECT m FROM cm) IS NULL OR {column_model} = %(model_key)s)"
            ).format(column_model=canonical_sql(sql.SQL("(SELECT m FROM cm)")))
            attnum_out = sql.SQL("(SELECT attnum FROM a), (SELECT m FROM cm)")
            model_cte = sql.SQL(
                " cm AS (SELECT CASE WHEN ts.migration_column = %(column)s THEN ts.migration_model ELSE ts.model END"
                " AS m FROM {s}.table_state ts WHERE ts.table_name = %(table)s),"
            ).format(s=self._s)
            record = sql.SQL(
                ", p AS (INSERT INTO {s}.embedding_provenance AS p (table_name, column_attnum, chunk_id, model,"
                " dimensions, text_md5, max_chars, text_prefix, embedded_at, chars_sent, context_cut,"
                " server_truncated, pooling)"
                " SELECT %(table)s, (SELECT attnum FROM a), w.id, %(model)s, %(dim)s, w.md5, %(max_chars)s, %(prefix)s,"
                " now(), w.chars, w.cut, w.trunc, w.pooling::jsonb FROM w"
                " ON CONFLICT (table_name, column_attnum, chunk_id) DO UPDATE SET model = EXCLUDED.model,"
                " dimensions = EXCLUDED.dimensions, text_md5 = EXCLUDED.text_md5,"
                " max_chars = EXCLUDED.max_chars, text_prefix = EXCLUDED.text_prefix,"
                " embedded_at = EXCLUDED.embedded_at, chars_sent = EXCLUDED.chars_sent,"
                " context_cut = EXCLUDED.context_cut, server_truncated = EXCLUDED.server_truncated,"
                " pooling = EXCLUDED.pooling)"
            ).format(s=self._s)
        # Every array travels in binary (text-format array dumping is the costliest client work of a batch).
        stmt = sql.SQL(
            "WITH a AS (SELECT attnum FROM pg_attribute WHERE attrelid = to_regclass(%(rel)s) AND attname = %(column)s"
            " AND NOT attisdropped),{model_cte}"
            " rr AS (SELECT EXISTS (SELECT 1 FROM {s}.runs WHERE run_id = %(run_id)s::bigint AND state = 'released')"
            " AS released),"
            " lk AS (SELECT t.{id} AS id FROM {t} AS t WHERE t.{id} = ANY(%(ids)b::bigint[]) FOR UPDATE SKIP LOCKED),"
            " w AS (UPDATE {t} AS t SET {emb} = u.e"
            " FROM unnest(%(ids)b::bigint[], %(vectors)b::vector[], %(md5s)b::text[], %(chars)b::int[],"
            " %(cut)b::bool[], %(trunc)b::bool[], %(pooling)b::text[]) AS u(id, e, md5, chars, cut, trunc, pooling)"
            " WHERE t.{id} = u.id AND t.{id} IN (SELECT id FROM lk){guard}{column_check}"
            " AND NOT (SELECT released FROM rr)"
            " RETURNING t.{id} AS id, coalesce(u.md5, md5(t.{text})) AS md5, u.chars, u.cut, u.trunc, u.pooling)"
            "{record},"
            " d AS (DELETE FROM {s}.failures f USING w WHERE f.table_name = %(failure_key)s AND f.chunk_id = w.id)"
            "{run_count}"
            " SELECT (SELECT count(*) FROM w), {attnum_out}, (SELECT released FROM rr),"
            " (SELECT array_agg(x) FROM unnest(%(ids)b::bigint[]) AS x WHERE x NOT IN (SELECT id FROM lk))"
        ).format(
            t=self._t,
            emb=self._emb,
            id=self._id,
            text=self._text,
            guard=guard,
            column_check=column_check,
            record=record,
            s=self._s,
            attnum_out=attnum_out,
            model_cte=model_cte,
            run_count=run_count,
        )
        self._write_statements[key] = stmt.as_bytes(conn)
        return self._write_statements[key]

    def _current_attnum(self: Store, conn: psycopg.Connection | None = None) -> int:
        c = conn or self.conn
        row = c.execute(
            "SELECT attnum FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s AND NOT attisdropped",
            (sql.Identifier(self.table.schema, self.table.name).as_string(c), self.table.embedding_column),
        ).fetchone()
        if row is None:
            raise StoreError(f"column {self.table.embedding_column!r} not found in {self.table.qualified}")
        return int(row[0])

    @property
    def failure_key(self: Store) -> str:
        """Failure records of the live column are keyed by the table; those of a migration's shadow column by
        table#column, so a shadow fill never mixes its failures with the live column's."""
        if self._failure_key is None:
            _, column = self.migration_target()
            shadow = column is not None and column == self.table.embedding_column
            self._failure_key = f"{self.table.qualified}#{column}" if shadow else self.table.qualified
        return self._failure_key

    def provenance(self: Store, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Provenance rows of this column for `ids`."""
        rows = self.conn.cursor(row_factory=dict_row).execute(
            sql.SQL(
                "SELECT chunk_id, model, dimensions, text_md5, max_chars, text_prefix, embedded_at, chars_sent,"
                " context_cut, server_truncated"
                " FROM {s}.embedding_provenance WHERE table_name = %s AND column_attnum = %s AND chunk_id = ANY(%s)"
            ).format(s=self._s),
            (self.table.qualified, self._current_attnum(), list(ids)),
        )
        return {int(r["chunk_id"]): dict(r) for r in rows.fetchall()}

    def read_vectors(self: Store, ids: Sequence[int]) -> dict[int, np.ndarray | None]:
        rows = self.conn.execute(
            sql.SQL("SELECT {id}, {emb} FROM {t} WHERE {id} = ANY(%s)").format(id=self._id, emb=self._emb, t=self._t),
            (list(ids),),
        ).fetchall()
        return {int(r[0]): (None if r[1] is None else np.asarray(r[1].to_numpy(), dtype=np.float32)) for r in rows}

    def read_texts(self: Store, ids: Sequence[int], max_chars: int | None = None) -> dict[int, str]:
        expr = sql.SQL("left({}, %s)").format(self._text) if max_chars else self._text
        params: tuple[Any, ...] = (max_chars, list(ids)) if max_chars else (list(ids),)
        rows = self.conn.execute(
            sql.SQL("SELECT {id}, {e} FROM {t} WHERE {id} = ANY(%s)").format(id=self._id, e=expr, t=self._t),
            params,
        ).fetchall()
        return {int(r[0]): r[1] for r in rows}
