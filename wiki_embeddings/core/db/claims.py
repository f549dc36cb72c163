"""Claims: keyset reads of missing chunks locked with session advisory locks that die with their process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from wiki_embeddings.core.db.connection import StoreBase, _is_sql_ascii
from wiki_embeddings.core.db.records import Claim
from wiki_embeddings.core.text import UTF8_MAX_BYTES_PER_CHAR, InvalidText, decode_utf8_prefix

if TYPE_CHECKING:
    from wiki_embeddings.core.db import Store


def _lock_key_sql(namespace: str) -> sql.Composable:
    """Advisory-lock key of a chunk id: a 64-bit hash of the table's name and the id.

    No key scheme maps every (table, bigint id) to a distinct 64-bit key (the old `(ns << 40) | id` lost the table's
    bits for negative ids and ids >= 2^40), so a collision is made harmless instead: a chunk whose key is busy is
    not skipped for good but retried at the end of the run (`Backfill._retry_busy`), and a run never ends
    `completed` while chunks it was meant to cover are still held elsewhere.
    """
    return sql.SQL("hashtextextended({ns} || c.id::text, 0)").format(ns=sql.Literal(namespace))


# The claim keys some session of this database holds (claims are bigint advisory locks: objsubid 1), as a CTE.
_HELD_KEYS = (
    "held AS MATERIALIZED (SELECT (l.classid::bigint << 32) | l.objid::bigint AS key FROM pg_locks l"
    " WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
)


class ClaimsMixin(StoreBase):
    """Claims: keyset reads of missing chunks locked with session advisory locks that die with their process."""

    def _candidate_filter(self: Store, mode: str) -> sql.Composable:
        """Which missing chunks a run may take: normal runs skip quarantined chunks, retries take only failures."""
        failures = sql.SQL("{s}.failures f WHERE f.table_name = %(table)s AND f.chunk_id = t.{id}").format(
            s=self._s, id=self._id
        )
        quarantined = sql.SQL("f.attempts >= %(cap)s AND f.text_md5 IS NOT DISTINCT FROM md5(t.{text})").format(
            text=self._text
        )
        if mode == "normal":
            return sql.SQL("AND NOT EXISTS (SELECT 1 FROM {f} AND {q})").format(f=failures, q=quarantined)
        if mode == "retry_failed":
            return sql.SQL("AND EXISTS (SELECT 1 FROM {f})").format(f=failures)
        if mode == "all":
            return sql.SQL("")
        raise ValueError(f"unknown claim mode {mode!r}")

    def claim(
        self: Store,
        conn: psycopg.Connection,
        *,
        after_id: int | None,
        limit: int,
        max_chars: int,
        id_min: int | None = None,
        id_max: int | None = None,
        mode: str = "normal",
        max_attempts: int = 3,
    ) -> Claim:
        """Keyset-read the next missing chunks after `after_id` and lock them on `conn` (session advisory locks).

        The locks live as long as `conn`'s session, so they die with the process; no transaction stays open
        across the HTTP call. Text is read after locking, so a chunk another worker just wrote is not taken.
        """
        lower = after_id if after_id is not None else (id_min - 1 if id_min is not None else None)
        params = {
            "lower": lower,
            "upper": id_max,
            "limit": limit,
            "table": self.failure_key,
            "cap": max_attempts,
        }
        return self._lock_and_read(conn, self._claim_statement(conn, "range", mode), params, max_chars)

    def _claim_statement(self: Store, conn: psycopg.Connection, kind: str, mode: str) -> bytes:
        """The candidate query of a claim (`range`: keyset after an id; `ids`: given ids), composed once per store:
        composing on every batch costs client CPU, and an identical statement lets psycopg prepare it (bytes: see
        `_write_statement`)."""
        cached = self._claim_statements.get((kind, mode))
        if cached is not None:
            return cached
        key = _lock_key_sql(self.table.lock_namespace)
        if kind == "range":
            query = sql.SQL(
                "WITH cand AS MATERIALIZED ("
                " SELECT t.{id} AS id FROM {t} t WHERE t.{emb} IS NULL"
                " AND (%(lower)s::bigint IS NULL OR t.{id} > %(lower)s)"
                " AND (%(upper)s::bigint IS NULL OR t.{id} <= %(upper)s) {filter}"
                " ORDER BY t.{id} LIMIT %(limit)s)"
                " SELECT c.id, pg_try_advisory_lock({key}) AS locked FROM cand c ORDER BY c.id"
            ).format(id=self._id, t=self._t, emb=self._emb, filter=self._candidate_filter(mode), key=key)
        else:
            query = sql.SQL(
                "WITH cand AS MATERIALIZED (SELECT t.{id} AS id FROM {t} t WHERE t.{id} = ANY(%(ids)b::bigint[])"
                " AND t.{emb} IS NULL {filter} ORDER BY t.{id} LIMIT %(limit)s)"
                " SELECT c.id, pg_try_advisory_lock({key}) AS locked FROM cand c ORDER BY c.id"
            ).format(id=self._id, t=self._t, emb=self._emb, filter=self._candidate_filter(mode), key=key)
        self._claim_statements[(kind, mode)] = query.as_bytes(conn)
        return self._claim_statements[(kind, mode)]

    def claim_ids(
        self: Store,
        conn: psycopg.Connection,
        ids: Sequence[int],
        *,
        max_chars: int,
        mode: str = "normal",
        max_attempts: int = 3,
        limit: int | None = None,
    ) -> Claim:
        """Claim again the first `limit` of these ids that are still missing (chunks that were busy earlier in the
        run), in id order: every id up to `last_scanned_id` not returned is no longer missing."""
        params = {"ids": list(ids), "table": self.failure_key, "cap": max_attempts, "limit": limit}
        return self._lock_and_read(conn, self._claim_statement(conn, "ids", mode), params, max_chars)

    def _lock_and_read(
        self: Store, conn: psycopg.Connection, query: bytes, params: dict[str, Any], max_chars: int
    ) -> Claim:
        """Run a candidate query that tries each candidate's claim lock; read the text of those locked. A candidate
        whose key another session holds is `busy`: the run retries it at its end, it is never skipped for good."""
        cand = conn.execute(query, params).fetchall()
        if not cand:
            return Claim([], None, 0)
        locked = [int(cid) for cid, ok in cand if ok]
        rows, invalid, md5s = self._read_claimed(conn, locked, max_chars, True, {})
        busy = [int(cid) for cid, ok in cand if not ok]
        return Claim(rows, int(cand[-1][0]), len(busy), invalid, md5s, busy_ids=busy)

    def _read_claimed(
        self: Store,
        conn: psycopg.Connection,
        locked: list[int],
        max_chars: int,
        missing: bool,
        expected_md5: dict[int, str],
    ) -> tuple[list[tuple[int, str]], list[tuple[int, str, int]], dict[int, str]]:
        """Read the cut text and md5(whole text) of locked chunks still missing (`missing`), else still embedded;
        release the rest.

        With `expected_md5`, a chunk whose text changed again since it was found is released, not taken.
        """
        rows: list[tuple[int, str]] = []
        invalid: list[tuple[int, str, int]] = []
        md5s: dict[int, str] = {}
        if not locked:
            return rows, invalid, md5s
        if _is_sql_ascii(conn):
            condition = sql.SQL("AND {emb} IS NULL" if missing else "AND {emb} IS NOT NULL").format(emb=self._emb)
            rows, invalid, md5s = self._read_undeclared_bytes(conn, locked, max_chars, condition)
        else:
            query = self._read_statements.get(missing)
            if query is None:
                condition = sql.SQL("AND {emb} IS NULL" if missing else "AND {emb} IS NOT NULL").format(emb=self._emb)
                query = (
                    sql.SQL(
                        "SELECT {id}, left({text}, %s), md5({text}) FROM {t} WHERE {id} = ANY(%b::bigint[]) {cond}"
                        " ORDER BY {id}"
                    )
                    .format(id=self._id, text=self._text, t=self._t, cond=condition)
                    .as_bytes(conn)
                )
                self._read_statements[missing] = query
            for r in conn.execute(query, (max_chars, locked)).fetchall():
                rows.append((int(r[0]), r[1]))
                md5s[int(r[0])] = r[2]
        if expected_md5:
            moved = {cid for cid, m in md5s.items() if expected_md5.get(cid) != m}
            rows = [r for r in rows if r[0] not in moved]
            invalid = [r for r in invalid if r[0] not in moved]
        taken = {r[0] for r in rows} | {r[0] for r in invalid}
        stale = [cid for cid in locked if cid not in taken]
        if stale:
            self.release(conn, stale)
        return rows, invalid, {cid: m for cid, m in md5s.items() if cid in taken}

    def _read_undeclared_bytes(
        self: Store, conn: psycopg.Connection, ids: list[int], max_chars: int, condition: sql.Composable
    ) -> tuple[list[tuple[int, str]], list[tuple[int, str, int]], dict[int, str]]:
        """Claimed texts from a `SQL_ASCII` database: raw bytes, decoded as UTF-8 here, chunk by chunk.

        There `left()` counts bytes, so enough bytes for `max_chars` characters are read and cut after
        decoding; `convert_to(..., 'SQL_ASCII')` hands the stored bytes over unchecked.
        """
        limit = min(max_chars * UTF8_MAX_BYTES_PER_CHAR, 2**31 - 1)
        fetched = conn.execute(
            sql.SQL(
                "SELECT {id}, convert_to(left({text}, %s), 'SQL_ASCII'), octet_length({text}), md5({text}) FROM {t}"
                " WHERE {id} = ANY(%s) {cond} ORDER BY {id}"
            ).format(id=self._id, text=self._text, t=self._t, cond=condition),
            (limit, ids),
        ).fetchall()
        rows: list[tuple[int, str]] = []
        invalid: list[tuple[int, str, int]] = []
        md5s: dict[int, str] = {}
        for cid, raw, size, digest in fetched:
            md5s[int(cid)] = digest
            try:
                rows.append((int(cid), decode_utf8_prefix(bytes(raw), max_chars, complete=size <= limit)))
            except InvalidText as exc:
                invalid.append((int(cid), exc.reason, int(size)))
        return rows, invalid, md5s

    def held_claims(self: Store) -> list[int]:
        """Ids of this table whose claim lock some session holds (a full scan: for tests and diagnosis)."""
        query = sql.SQL("WITH {held} SELECT id FROM {claimed} x ORDER BY 1").format(
            held=sql.SQL(_HELD_KEYS), claimed=self._claimed(missing_only=False)
        )
        return [int(r[0]) for r in self.conn.execute(query).fetchall()]

    def claimed_now(self: Store) -> int:
        """Missing chunks of this table whose claim some session holds right now (`status` `locked`): the held claim
        keys (pg_locks: as many rows as claims are held) joined with the keys of the missing chunks (the partial
        index); nothing is scanned when no claim is held at all."""
        query = sql.SQL(
            "WITH {held} SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM held) THEN 0"
            " ELSE (SELECT count(*) FROM {claimed} x) END"
        ).format(held=sql.SQL(_HELD_KEYS), claimed=self._claimed(missing_only=True))
        row = self.conn.execute(query).fetchone()
        return int(row[0]) if row else 0

    def _claimed(self: Store, missing_only: bool) -> sql.Composable:
        """The ids (of missing chunks only, or of all) whose claim key is among the `held` keys."""
        where = sql.SQL(" WHERE {emb} IS NULL").format(emb=self._emb) if missing_only else sql.SQL("")
        return sql.SQL("(SELECT c.id FROM (SELECT {id} AS id FROM {t}{where}) c JOIN held ON held.key = {key})").format(
            id=self._id, t=self._t, where=where, key=_lock_key_sql(self.table.lock_namespace)
        )

    def release(self: Store, conn: psycopg.Connection, ids: Sequence[int]) -> None:
        """Give back claims (after their vectors are committed, or when they are skipped)."""
        if not ids:
            return
        if self._release_statement is None:
            key = _lock_key_sql(self.table.lock_namespace)
            self._release_statement = (
                sql.SQL("SELECT count(pg_advisory_unlock({key})) FROM unnest(%b::bigint[]) AS c(id)")
                .format(key=key)
                .as_bytes(conn)
            )
        conn.execute(self._release_statement, (list(ids),))

    def relock(self: Store, conn: psycopg.Connection, ids: Sequence[int]) -> list[int]:
        """Take the claim locks of these ids (again after a reconnect, or for changed chunks a scan found); returns
        the ids this session now holds."""
        if not ids:
            return []
        key = _lock_key_sql(self.table.lock_namespace)
        rows = conn.execute(
            sql.SQL("SELECT c.id FROM unnest(%s::bigint[]) AS c(id) WHERE pg_try_advisory_lock({key})").format(key=key),
            (list(ids),),
        ).fetchall()
        return [int(r[0]) for r in rows]
