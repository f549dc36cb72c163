"""What text is sent for a chunk: the cleaning policy, and decoding raw bytes from a `SQL_ASCII` database.

The policy, in order:
1. Cut to `--max-chars` characters (Unicode code points; PostgreSQL's `left()` counts the same way in a
   UTF-8 database, and the store cuts decoded text itself where the database has no encoding).
2. `clean_text`: every control character (Unicode category Cc: U+0000-U+001F, U+007F-U+009F) other than
   tab, line feed and carriage return becomes one space. Nothing else changes: no Unicode normalisation
   (combining marks, decomposed Hangul, right-to-left marks and emoji are sent as stored) and no whitespace
   folding, so the vector belongs to the text the operator sees.
3. A text that is empty or whitespace only after cleaning is not sent: it is recorded as failed
   (`empty_text`), never silently skipped.

A chunk whose bytes are not valid UTF-8 (only possible in a `SQL_ASCII` database, which stores bytes
unchecked) is not guessed at: it is recorded as failed (`invalid_utf8`, with the offending byte's offset),
so a mis-encoded import is seen and fixed at its source instead of being embedded as mojibake.
"""

from __future__ import annotations

import codecs
import re

# Cc except \t (09), \n (0a), \r (0d).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

# The most bytes one character takes in UTF-8: the store reads this many bytes per wanted character.
UTF8_MAX_BYTES_PER_CHAR = 4


class InvalidText(ValueError):
    """The stored bytes are not text in the expected encoding; `reason` says where."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def clean_text(text: str) -> str:
    """The text actually sent for a (cut) chunk: control characters other than tab/newline/CR become spaces."""
    return _CONTROL.sub(" ", text)


def decode_utf8_prefix(raw: bytes, max_chars: int, complete: bool) -> str:
    """The first `max_chars` characters of UTF-8 `raw`; InvalidText when a byte sequence is not UTF-8.

    `complete` is False when `raw` is itself a byte cut of a longer text: a multi-byte character split by
    that cut at the very end is dropped (it lies past the characters kept). A bad byte within the kept
    characters is refused; one past them is not looked at, like the rest of an over-long text.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        text = decoder.decode(raw, final=complete)
    except UnicodeDecodeError as exc:
        good = raw[: exc.start].decode("utf-8")
        if len(good) >= max_chars:  # the bad byte lies past the cut: it is never sent
            return good[:max_chars]
        bad = raw[exc.start : exc.start + 1].hex()
        raise InvalidText(f"text is not valid UTF-8: byte 0x{bad} at offset {exc.start} ({exc.reason})") from exc
    return text[:max_chars]
