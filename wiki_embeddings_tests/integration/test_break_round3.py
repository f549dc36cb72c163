"""Outside tester, round three (issues 21 and 23), the parts that need the real PostgreSQL."""

from __future__ import annotations

import pytest

from wiki_embeddings.core.db.connection import StoreBase
from wiki_embeddings.core.db.records import TableRef


@pytest.mark.parametrize("seconds", [1e-4, 1e-300, 0.0004])
def test_a_tiny_statement_timeout_never_turns_the_timeout_off(pg_url, seconds):
    """Issue 21 item 5: WIKI_EMBED_DB_STATEMENT_TIMEOUT_SEC must be > 0 (0 would disable it). Fixed: a value under
    a millisecond was truncated to `statement_timeout=0`, which PostgreSQL reads as no timeout at all
    (core/db/connection.py `int(statement_timeout_sec * 1000)`)."""
    store = StoreBase(pg_url, TableRef("public", "chunks"))
    conn = store.connect(register=False, statement_timeout_sec=seconds)
    try:
        shown = conn.execute("show statement_timeout").fetchone()
    finally:
        conn.close()
    assert shown is not None and shown[0] != "0", shown
