"""Chunking and id scheme of the Wikipedia sample importer, on the real sample data.

A full pass over both files takes well under a second, so it is done once per module.
"""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import orjson
import pytest

from wiki_embeddings.core import importer
from wiki_embeddings.core.importer import EN_FIRST_ID, Chunk, iter_chunks, split_text

MAX = 1500


def _records(name: str) -> list[dict]:
    with gzip.open(importer.resolve_wiki_dir() / name, "rb") as fh:
        return [orjson.loads(line) for line in fh]


@pytest.fixture(scope="module")
def full() -> list[Chunk]:
    try:
        importer.resolve_wiki_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return list(iter_chunks(max_chars=MAX))


@pytest.fixture(scope="module")
def ko_records(full: list[Chunk]) -> list[dict]:
    return _records(importer.KO_FILE)


def test_full_sample_shape(full: list[Chunk]) -> None:
    ko = [c for c in full if c.id < EN_FIRST_ID]
    en = [c for c in full if c.id >= EN_FIRST_ID]
    assert [c.id for c in ko] == list(range(1, len(ko) + 1))
    assert [c.id for c in en] == list(range(EN_FIRST_ID, EN_FIRST_ID + len(en)))
    assert len(ko) >= 33_483  # at least one chunk per Korean paragraph record
    assert len(en) >= 1_886
    assert all(0 < len(c.content) <= MAX for c in full)
    assert all(c.content.strip() == c.content and c.content for c in full)
    assert all(c.title for c in full)


def test_limited_import_is_prefix_of_full_per_language(full: list[Chunk]) -> None:
    sub = list(iter_chunks(limit=2000, max_chars=MAX))
    assert len(sub) == 2000
    ko = [c for c in sub if c.id < EN_FIRST_ID]
    en = [c for c in sub if c.id >= EN_FIRST_ID]
    assert len(ko) == 1500 and len(en) == 500
    assert ko == full[:1500]
    full_en = [c for c in full if c.id >= EN_FIRST_ID]
    assert en == full_en[:500]
    assert en[0].title == "Anarchism" and en[0].content.startswith("Anarchism is an anti-authoritarian")


def test_limit_larger_than_english_fills_with_korean(full: list[Chunk]) -> None:
    n_en = sum(c.id >= EN_FIRST_ID for c in full)
    limit = n_en * 6  # English share (25%) exceeds the English file
    sub = list(iter_chunks(limit=limit))
    assert len(sub) == limit
    assert sum(c.id >= EN_FIRST_ID for c in sub) == n_en
    assert list(iter_chunks(limit=0)) == []
    assert [c.id for c in iter_chunks(limit=4)] == [1, 2, 3, EN_FIRST_ID]


def test_chunk_index_runs_per_title(full: list[Chunk]) -> None:
    seen: dict[tuple[int, str], int] = {}
    for c in full:
        key = (c.id >= EN_FIRST_ID, c.title)
        assert c.chunk_index == seen.get(key, 0)
        seen[key] = c.chunk_index + 1
    anarchism = [c for c in full if c.title == "Anarchism"]
    assert [c.chunk_index for c in anarchism] == list(range(len(anarchism)))
    assert len(anarchism) > 10


def test_korean_text_intact_and_from_source(full: list[Chunk], ko_records: list[dict]) -> None:
    by_title: dict[str, str] = {}
    for r in ko_records:
        by_title[r["title"]] = by_title.get(r["title"], "") + "\n\n" + r["text"]
    ko = [c for c in full if c.id < EN_FIRST_ID]
    for c in itertools.islice(ko, 0, None, 97):  # ~350 chunks spread over the file
        assert c.content in by_title[c.title]
        assert "\ufffd" not in c.content
        assert "Ã" not in c.content and "ì" not in c.content  # typical UTF-8-read-as-Latin-1 mojibake
    first = full[0]
    assert first.title == "카폰 마그로"
    assert first.content.startswith("카폰 마그로(Cappon magro 또는 capòn magro)는 해산물을 곁들인 샐러드로")
    hangul = sum("\uac00" <= ch <= "\ud7a3" for c in ko[:2000] for ch in c.content)
    assert hangul > 100_000


def test_longest_real_paragraph_splits_at_sentence_ends(ko_records: list[dict]) -> None:
    text = max((r["text"] for r in ko_records), key=len)
    assert len(text) > 11_000
    pieces = split_text(text, MAX)
    assert 8 <= len(pieces) <= 10
    assert all(len(p) <= MAX and p in text for p in pieces)
    assert all(p.endswith((".", "다", ")", '"', "”", "’")) for p in pieces[:-1])


def test_split_one_line_korean_paragraph_at_sentence_ends() -> None:
    sentence = "이 문장은 한국어 위키백과의 긴 문단을 흉내 내기 위해 만든 문장이며 조금씩 다르다{}번."
    text = " ".join(sentence.format(i) + (" 그래서 다음 문장으로 넘어간다." if i % 3 else "") for i in range(200))
    text = text.replace("번.", "번이다.")
    assert 11_000 < len(text) < 16_000 and "\n" not in text
    pieces = split_text(text, MAX)
    assert all(0 < len(p) <= MAX for p in pieces)
    assert all(p.endswith("다.") for p in pieces)
    assert " ".join(pieces) == text
    assert len(pieces) == -(-len(text) // MAX) or len(pieces) == -(-len(text) // MAX) + 1


def test_split_hard_cuts_a_single_long_word() -> None:
    word = "가" * 5000
    assert split_text(word, MAX) == ["가" * 1500, "가" * 1500, "가" * 1500, "가" * 500]
    assert split_text(f"앞 문장이다. {word}", MAX)[0] == "앞 문장이다."


def test_split_small_cases() -> None:
    assert split_text("", MAX) == []
    assert split_text(" \n\n \t", MAX) == []
    assert split_text("  짧은 문단이다.\n", MAX) == ["짧은 문단이다."]
    # paragraph boundary beats sentence boundary; small neighbours are joined back up to max_chars
    text = "A" * 30 + ". " + "b" * 30 + "\n\n" + "c" * 50
    assert split_text(text, 70) == ["A" * 30 + ". " + "b" * 30, "c" * 50]
    assert split_text("One. Two. Three. Four.", 10) == ["One. Two.", "Three.", "Four."]
    assert split_text("第一句。第二句。第三句。", 8) == ["第一句。第二句。", "第三句。"]
    with pytest.raises(ValueError):
        split_text("x", 0)


def test_missing_data_dir_names_path_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*WIKI_DATA_DIR"):
        iter_chunks(missing)
    monkeypatch.setenv("WIKI_DATA_DIR", str(missing))
    with pytest.raises(FileNotFoundError, match="WIKI_DATA_DIR"):
        iter_chunks()
