"""Bad input text: every chunk is embedded after cutting and cleaning, or recorded as failed with its reason.

Never a crash, never a silent skip. The policy (`wiki_embeddings/core/text.py`): cut to --max-chars
characters, turn control characters other than tab/newline/CR into spaces, send nothing else changed; a
text blank after that is `empty_text`; bytes that are not UTF-8 (a `SQL_ASCII` database) are `invalid_utf8`.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import psycopg
import pytest

from wiki_embeddings.core.factories import build_store
from wiki_embeddings.core.failure_log import read_entries
from wiki_embeddings.core.text import InvalidText, clean_text, decode_utf8_prefix
from wiki_embeddings.devtools.ollama_server import hash_vector
from wiki_embeddings.settings import from_env
from wiki_embeddings_tests.integration.conftest import TEST_DIM, TEST_MODEL, ChunkTable
from wiki_embeddings_tests.integration.test_faults_support import wrong_vectors

MAX_CHARS = 2000
FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"  # one grapheme, seven code points

TEXTS: dict[int, str] = {
    1: "",
    2: "   \n\t  \u3000\xa0 ",  # whitespace only, ideographic and no-break spaces included
    3: "\x01\x02\x1b\x7f\x85",  # control characters only
    4: "line one\x0bline two\x1b[31m red\x1b[0m\x7f tab\tnewline\ncr\r",  # (NUL: PostgreSQL text refuses it)
    5: "a" * 1_000_000,  # 1 MB
    6: "한국어 문장입니다. " * 90_000,  # ~1 MB of Korean characters (2.4 MB of UTF-8)
    7: "emoji \U0001f600\U0001f44d\U0001f3fd \U0001f1f0\U0001f1f7 " + FAMILY,
    8: "x" * (MAX_CHARS - 3) + FAMILY,  # the cut falls inside a zero-width-joiner sequence
    9: "서울특별시는 대한민국의 수도이며 최대 도시이다.",
    10: unicodedata.normalize("NFD", "한국어 위키백과"),  # decomposed Hangul: combining jamo, sent as stored
    11: "مرحبا بالعالم \u200fשלום עולם\u202e reversed\u202c",  # right-to-left scripts and bidi controls
    12: "Ze\u0301\u0301\u0301 z\u0336a\u0337l\u0338g\u0334o\u0335 \u0e01\u0e34\u0e4a",  # stacked combining marks
    13: "\u200b\u200b\u200b",  # zero-width spaces: not whitespace, sent as they are
    14: "noncharacters \uffff\ufffe and a private use \ue000",
    15: "AAAAA\U0010fffd",  # the last plane's last character
}
BLANK = {1, 2, 3}


def test_the_cleaning_policy_is_exactly_this():
    assert clean_text("a\x00b\x01c\x1fd\x7fe\x80f\x9fg") == "a b c d e f g"
    assert clean_text("keep\ttab\nnewline\rcr") == "keep\ttab\nnewline\rcr"
    assert clean_text("\x0bvertical\x0cform\x85nel") == " vertical form nel"
    for kept in ("\u200f", "\u202e", "\u200b", "e\u0301", "\uffff", "\U0001f468\u200d\U0001f469", "\u3000"):
        assert clean_text(kept) == kept, "format characters, marks and emoji are sent as stored"
    assert clean_text(unicodedata.normalize("NFD", "한")) == unicodedata.normalize("NFD", "한"), "no normalisation"


def test_undeclared_bytes_are_decoded_strictly_and_cut_by_characters():
    assert decode_utf8_prefix("가나다".encode(), 2, complete=True) == "가나"
    # A byte cut that splits the character after the kept ones is not an error.
    assert decode_utf8_prefix("가나다".encode()[:8], 2, complete=False) == "가나"
    assert decode_utf8_prefix(b"a" * 5 + b"\xff", 5, complete=True) == "aaaaa", "a bad byte past the cut is never sent"
    with pytest.raises(InvalidText, match="byte 0xe9 at offset 3"):
        decode_utf8_prefix(b"caf\xe9", 10, complete=True)
    with pytest.raises(InvalidText, match="byte 0xe0 at offset 2"):  # a character cut at the text's real end
        decode_utf8_prefix(b"ab\xe0", 10, complete=True)


def test_hostile_texts_are_each_embedded_after_cleaning_or_recorded_with_a_reason(make_table, ollama):
    table = make_table(batch_size=8, max_chars=MAX_CHARS)
    table.load(sorted(TEXTS.items()))
    report = table.backfill()
    assert report.state == "completed", report.message
    assert sorted(report.failed_ids) == sorted(BLANK)
    assert report.embedded == len(TEXTS) - len(BLANK), "no silent skip: embedded + failed = all"
    assert wrong_vectors(table, MAX_CHARS) == [], "each vector is the server's for the cut, cleaned text"
    stored = table.store.read_vectors(list(TEXTS))
    for cid in set(TEXTS) - BLANK:
        assert stored[cid] is not None, cid
    # Spot checks against hand-written expectations (not through clean_text).
    assert np.allclose(stored[8], hash_vector(TEST_MODEL, "x" * (MAX_CHARS - 3) + FAMILY[:3], TEST_DIM), atol=1e-6)
    expected_4 = "line one line two [31m red [0m  tab\tnewline\ncr\r"
    assert np.allclose(stored[4], hash_vector(TEST_MODEL, expected_4, TEST_DIM), atol=1e-6)
    assert np.allclose(stored[5], hash_vector(TEST_MODEL, "a" * MAX_CHARS, TEST_DIM), atol=1e-6)
    entries = read_entries(table.settings.failure_log)
    assert {(e["chunk_id"], e["error"]) for e in entries} == {(cid, "empty_text") for cid in BLANK}
    status = table.status()
    assert status["failed"] == len(BLANK) and status["missing"] == len(BLANK)


# ------------------------------------------------------------------------------------------ SQL_ASCII


@pytest.fixture(scope="module")
def ascii_url(pg_url: str) -> str:
    """A database that stores bytes without an encoding (`SQL_ASCII`) in the session server."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS ascii_db")
        conn.execute("CREATE DATABASE ascii_db ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    head, _, query = pg_url.partition("?")
    return head.rsplit("/", 1)[0] + "/ascii_db?" + query


RAW: dict[int, bytes] = {
    1: "서울은 한강을 끼고 있다.".encode(),  # valid UTF-8
    2: b"\xff\xfe bad bytes",  # not UTF-8 at all
    3: "café".encode("latin-1"),  # Latin-1 imported into a database that never checked
    4: ("가" * 100).encode(),  # longer than max-chars: the byte read splits a character
    5: b"a" * 60 + b"\xff",  # the bad byte lies past the cut
    6: b"tab\tand\x01control",
    7: b"plain ascii",
    8: "ok \xe9".encode()[:-1],  # a truncated 2-byte character at the real end
}
ASCII_MAX_CHARS = 50


def test_a_sql_ascii_database_embeds_utf8_text_and_records_undecodable_bytes(ascii_url, ollama, tmp_path: Path):
    settings = from_env(
        {},
        database_url=ascii_url,
        ollama_url=ollama.url,
        ollama_model=TEST_MODEL,
        table="ascii.wiki_chunks",
        stop_file=str(tmp_path / "stop"),
        failure_log=str(tmp_path / "failures.jsonl"),
        batch_size=3,
        max_chars=ASCII_MAX_CHARS,
        retries=2,
        backoff_base_sec=0.01,
    )
    with psycopg.connect(ascii_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS ascii CASCADE")
        conn.execute("CREATE SCHEMA ascii")
    store = build_store(settings, ascii_url)
    store.migrate()
    store.ensure_table(TEST_DIM)
    with psycopg.connect(ascii_url, autocommit=True) as conn:
        for cid, raw in RAW.items():
            conn.execute(
                "INSERT INTO ascii.wiki_chunks (id, content) VALUES (%s, convert_from(%s::bytea, 'SQL_ASCII'))",
                (cid, raw),
            )
    table = ChunkTable(settings, store, tmp_path)
    try:
        first = table.backfill()
        assert first.state == "completed", first.message
        assert sorted(first.failed_ids) == [2, 3, 8] and first.embedded == 5
        want = {
            1: RAW[1].decode(),
            4: "가" * ASCII_MAX_CHARS,
            5: "a" * ASCII_MAX_CHARS,
            6: "tab\tand control",
            7: "plain ascii",
        }
        stored = store.read_vectors(list(RAW))
        for cid, text in want.items():
            assert np.allclose(stored[cid], hash_vector(TEST_MODEL, text, TEST_DIM), atol=1e-6), cid
        failures = {r["chunk_id"]: r for r in store.list_failures()}
        assert set(failures) == {2, 3, 8} and {r["error"] for r in failures.values()} == {"invalid_utf8"}
        assert "byte 0xff at offset 0" in failures[2]["message"]
        assert "byte 0xe9 at offset 3" in failures[3]["message"]
        entries = read_entries(settings.failure_log)
        assert {(e["chunk_id"], e["error"]) for e in entries} == {(2, "invalid_utf8"), (3, "invalid_utf8"),
                                                                  (8, "invalid_utf8")}  # fmt: skip
        assert next(e for e in entries if e["chunk_id"] == 2)["text_length"] == len(RAW[2]), "bytes, not chars"
        status = store.status()
        assert status["missing"] == 3 and status["failed"] == 3
        # A second run meets the same bytes: counted again, still no crash, nothing else touched.
        second = table.backfill()
        assert second.state == "completed" and second.embedded == 0 and sorted(second.failed_ids) == [2, 3, 8]
        assert {r["attempts"] for r in store.list_failures()} == {2}
    finally:
        store.close()
