"""Secrets out of messages without mangling them (issue 23's outside tester: the API key `k` turned
`wiki-embeddings verify` into `wi***i-embeddings verify`; the key `ollama` hid `--api ollama`). The rule is
`wiki_embeddings/redaction.py`'s: a whole token only; a secret under 8 characters only where a credential is written.
"""

from __future__ import annotations

import pytest

from wiki_embeddings.redaction import MIN_FREE_TEXT, redact

ADVICE = "run `wiki-embeddings verify`, or keep --api ollama (WIKI_EMBED_API); EMPTY answers are refused"


@pytest.mark.parametrize("key", ["k", "ki", "ollama", "EMPTY", "verify", "api", "-"])
def test_a_short_key_never_mangles_ordinary_text(key):
    assert len(key) < MIN_FREE_TEXT
    assert redact(ADVICE, [key]) == ADVICE


LONG = "sk-live-0123456789abcdef"


@pytest.mark.parametrize("key", ["k", "ollama", "EMPTY", "hunter2", LONG, "S3cret-Pa55word", "p@ss:w/rd!"])
@pytest.mark.parametrize(
    "template",
    [
        "HTTP 401 from http://h:1: Authorization: Bearer {k} is not valid",
        "echo of the request: {{'authorization': 'Bearer {k}'}}",
        '{{"api_key": "{k}"}}',
        "upstream said: bearer {k}",
        "postgresql://user:{k}@db.internal:5432/wiki",
        "connection to server failed: host=/tmp password={k} dbname=wiki",
        "GET /v1/embeddings?key={k}&x=1",
        "token: {k}",
    ],
)
def test_a_key_of_any_length_is_redacted_where_a_credential_is_written(key, template):
    assert redact(template.format(k=key), [key]) == template.format(k="***")


@pytest.mark.parametrize("text", [f"leaked {LONG}", f"({LONG})", f'"{LONG}"', f"{LONG}.", f"key%3D{LONG}&a"])
def test_a_long_key_is_redacted_as_a_token_anywhere(text):
    assert LONG not in redact(text, [LONG]) and "***" in redact(text, [LONG])


def test_a_long_key_inside_a_longer_word_is_that_word_not_the_key():
    assert redact("the word embeddings-for-all", ["embeddings"]) == "the word ***-for-all", "a hyphen is a boundary"
    assert redact("wikiembeddingsx", ["embeddings"]) == "wikiembeddingsx"


def test_the_longest_secret_goes_first_and_none_is_skipped():
    assert redact("password=abcdefgh12 and abcdefgh", ["abcdefgh", "abcdefgh12", None, ""]) == ("password=*** and ***")
