"""Turns the Wikipedia sample (Korean + English paragraph JSONL) into rows for ``wiki_chunks``.

Pure Python on purpose (no SQL, no Dagster) so the chunking and the id scheme can be tested alone.

Id scheme: chunks of the Korean file get ids 1, 2, 3, ... in file order and chunks of the English
file start at 1_000_001. Each file's chunk stream depends only on the file and ``max_chars``, so a
limited import is a per-language prefix of the full one and re-importing more data keeps old ids.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

__all__ = [
    "DEFAULT_MAX_CHARS",
    "DEFAULT_WIKI_DIR",
    "EN_FILE",
    "EN_FIRST_ID",
    "KO_FILE",
    "KO_FIRST_ID",
    "KO_SHARE",
    "WIKI_DIR_ENV",
    "Chunk",
    "iter_chunks",
    "iter_file_chunks",
    "resolve_wiki_dir",
    "split_text",
]

WIKI_DIR_ENV = "WIKI_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]

#: Sample location; ``$WIKI_DATA_DIR`` (read at import) overrides ``<repo>/../shared/data/wiki``.
DEFAULT_WIKI_DIR: Path = Path(os.environ.get(WIKI_DIR_ENV) or _REPO_ROOT.parent / "shared" / "data" / "wiki")

KO_FILE = "kowiki_sample.jsonl.gz"
EN_FILE = "enwiki_sample.jsonl.gz"
KO_FIRST_ID = 1
EN_FIRST_ID = 1_000_001
#: Share of a limited import taken from the Korean file; the rest comes from the English file.
KO_SHARE = 0.75
DEFAULT_MAX_CHARS = 1500


@dataclass(frozen=True)
class Chunk:
    """One row of ``wiki_chunks`` (without its embedding)."""

    id: int
    title: str
    chunk_index: int
    content: str


# Split points, strongest first. A match's end is where one piece stops and the next starts; the
# separator stays with the earlier piece and is stripped, so every piece is a substring of the input.
_SPLIT_LEVELS: tuple[re.Pattern[str], ...] = (
    re.compile(r"\n[ \t\r\f\v]*\n\s*"),  # blank line: paragraph boundary
    re.compile(r"\n\s*"),  # line break (the Korean sample has one sentence per line)
    # Sentence end: . ! ? (with closing quotes/brackets) before whitespace, e.g. Korean "...했다. ";
    # CJK full stops need no space after them.
    re.compile(r"[.!?][\"'”’)\]」』]*\s+|[。！？][\"'”’)\]」』]*\s*"),
    re.compile(r"\s+"),  # any whitespace
)


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """Shrink [start, end) so it neither starts nor ends with whitespace."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _split_span(text: str, start: int, end: int, max_chars: int, level: int) -> list[tuple[int, int]]:
    """Split text[start:end] into trimmed spans of at most max_chars, preferring strong boundaries.

    At each level, the pieces between boundaries are packed greedily up to max_chars; a piece that is
    still too long is split at the next, weaker level; after the last level it is hard-cut.
    """
    start, end = _trim(text, start, end)
    if end <= start:
        return []
    if end - start <= max_chars:
        return [(start, end)]
    if level == len(_SPLIT_LEVELS):
        cuts = [_trim(text, s, min(s + max_chars, end)) for s in range(start, end, max_chars)]
        return [(s, e) for s, e in cuts if e > s]

    bounds = [m.end() for m in _SPLIT_LEVELS[level].finditer(text, start, end) if start < m.end() < end]
    if not bounds:
        return _split_span(text, start, end, max_chars, level + 1)

    out: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None
    for seg_start, seg_end in zip([start, *bounds], [*bounds, end], strict=True):
        seg_start, seg_end = _trim(text, seg_start, seg_end)
        if seg_end <= seg_start:
            continue
        if seg_end - seg_start > max_chars:
            if cur is not None:
                out.append(cur)
                cur = None
            out.extend(_split_span(text, seg_start, seg_end, max_chars, level + 1))
        elif cur is None:
            cur = (seg_start, seg_end)
        elif seg_end - cur[0] <= max_chars:
            cur = (cur[0], seg_end)
        else:
            out.append(cur)
            cur = (seg_start, seg_end)
    if cur is not None:
        out.append(cur)
    return out


def split_text(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """Split one paragraph into non-blank pieces of at most ``max_chars`` characters.

    Cuts at blank lines, then line breaks, then sentence ends, then whitespace, and hard-cuts only a run
    without any of those. Neighbouring small pieces are joined back (with their original separators)
    up to ``max_chars``, so chunks are not tiny. Each piece is an exact substring of ``text``.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    spans = _split_span(text, 0, len(text), max_chars, 0)
    # A piece cut from an oversized segment can end up small next to its neighbour: join them when
    # the original span covering both still fits.
    merged: list[tuple[int, int]] = []
    for span in spans:
        if merged and span[1] - merged[-1][0] <= max_chars:
            merged[-1] = (merged[-1][0], span[1])
        else:
            merged.append(span)
    return [text[s:e] for s, e in merged]


def resolve_wiki_dir(wiki_dir: Path | str | None = None) -> Path:
    """The argument, else ``$WIKI_DATA_DIR`` (read now), else ``<repo>/../shared/data/wiki``; must exist."""
    if wiki_dir is None:
        wiki_dir = os.environ.get(WIKI_DIR_ENV) or _REPO_ROOT.parent / "shared" / "data" / "wiki"
    path = Path(wiki_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Wikipedia sample directory not found: {path} (set ${WIKI_DIR_ENV} to the folder holding "
            f"{KO_FILE} and {EN_FILE})"
        )
    return path


def iter_file_chunks(
    path: Path | str, first_id: int, limit: int | None = None, max_chars: int = DEFAULT_MAX_CHARS
) -> Iterator[Chunk]:
    """Stream one gzip JSONL sample file as chunks with ids ``first_id, first_id + 1, ...``.

    ``chunk_index`` counts chunks per title across the article's paragraphs; a title that comes back
    later in the file (3 Korean articles do) continues its count, so (title, chunk_index) stays unique.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Wikipedia sample file not found: {path} (set ${WIKI_DIR_ENV} to its folder)")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    # Validate eagerly (above), stream lazily (below).
    return _stream_file(path, first_id, limit, max_chars)


def _stream_file(path: Path, first_id: int, limit: int | None, max_chars: int) -> Iterator[Chunk]:
    if limit is not None and limit <= 0:
        return
    next_index: dict[str, int] = {}
    next_id = first_id
    with gzip.open(path, "rb") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
                title = str(record.get("title") or "")
                text = record["text"]
            except (orjson.JSONDecodeError, KeyError, AttributeError) as exc:
                raise ValueError(f"{path}:{line_no}: not a paragraph record ({exc})") from exc
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: 'text' is {type(text).__name__}, expected str")
            for piece in split_text(text, max_chars):
                index = next_index.get(title, 0)
                next_index[title] = index + 1
                yield Chunk(id=next_id, title=title, chunk_index=index, content=piece)
                next_id += 1
                if limit is not None and next_id - first_id >= limit:
                    return


def _count(it: Iterator[Chunk]) -> int:
    return sum(1 for _ in it)


def iter_chunks(
    wiki_dir: Path | str | None = None, limit: int | None = None, max_chars: int = DEFAULT_MAX_CHARS
) -> Iterator[Chunk]:
    """All chunks of the sample: the Korean file (ids from 1), then the English file (ids from 1_000_001).

    With ``limit``, yields ``limit`` chunks (fewer only if the sample is smaller): the first
    ``round(limit * 0.75)`` Korean chunks and the first rest English ones; when one language runs
    out the other fills the gap. Both are prefixes of the full import's per-language id ranges.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    root = resolve_wiki_dir(wiki_dir)
    ko_path, en_path = root / KO_FILE, root / EN_FILE
    for path in (ko_path, en_path):
        if not path.is_file():
            raise FileNotFoundError(f"Wikipedia sample file not found: {path} (set ${WIKI_DIR_ENV})")

    return _stream_all(ko_path, en_path, limit, max_chars)


def _stream_all(ko_path: Path, en_path: Path, limit: int | None, max_chars: int) -> Iterator[Chunk]:
    if limit is None:
        ko_limit: int | None = None
    else:
        # Count the (small) English file first so a short English sample hands its share to Korean.
        en_share = limit - round(limit * KO_SHARE)
        ko_limit = limit - _count(iter_file_chunks(en_path, EN_FIRST_ID, en_share, max_chars))

    ko_count = 0
    for chunk in iter_file_chunks(ko_path, KO_FIRST_ID, ko_limit, max_chars):
        if chunk.id >= EN_FIRST_ID:
            raise ValueError(f"{ko_path} yields over {EN_FIRST_ID - KO_FIRST_ID} chunks: ids would collide")
        ko_count += 1
        yield chunk
    en_limit = None if limit is None else limit - ko_count
    yield from iter_file_chunks(en_path, EN_FIRST_ID, en_limit, max_chars)
