"""Defects found by the outside try of issue 22 that need no database nor server: what the settings make of an
operator's OLLAMA_URL (credentials masked everywhere, README) and of the OpenAI-compatible client's answers."""

from __future__ import annotations

import io

import pytest

from wiki_embeddings.cli import main
from wiki_embeddings.settings import from_env, mask_url, url_secrets

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("char", ["/", "?", "#"])
def test_a_password_with_a_slash_in_ollama_url_is_refused_and_never_shown(char, capsys):
    """README: 'credentials in OLLAMA_URL (`http://user:pass@host`) are masked wherever a URL is printed'; a URL
    that cannot be is a one-line configuration error (exit 2). A password holding `/`, `?` or `#` unencoded ends
    the URL's authority for a parser: the error line quoted the URL whole (`'http://op:Zq8/k3@host:8080' is not a
    valid URL: Port could not be cast to integer value as 'Zq8'`), and with a numeric start (`op:1234/x@host`) the
    URL was taken as host `op`, port 1234, and printed as it was everywhere."""
    secret = f"Zq8{char}k3x"
    url = f"http://operator:{secret}@emb.internal:8080"
    with pytest.raises(ValueError, match="not a valid URL") as refused:
        from_env({}, ollama_url=url).validate()
    assert secret not in str(refused.value) and "Zq8" not in str(refused.value)
    assert "Zq8" not in mask_url(url) and secret in url_secrets(url)
    code = main(["config", "--ollama-url", f"http://op:1234{char}x@emb.internal"], out=io.StringIO())
    err = capsys.readouterr().err
    assert code == 2 and "1234" not in err and "OLLAMA_URL" in err, err


def test_an_encoded_password_still_works_and_is_masked():
    url = "http://operator:Zq8%2Fk3%3Fx@emb.internal:8080/v1,http://emb-2:8080,"
    settings = from_env({}, ollama_url=url).validate()
    assert settings.ollama_urls == ["http://operator:Zq8%2Fk3%3Fx@emb.internal:8080/v1", "http://emb-2:8080"]
    assert settings.masked()["ollama_url"] == "http://operator:***@emb.internal:8080/v1,http://emb-2:8080"


def test_a_twin_that_keeps_failing_leaves_its_text_out_of_the_batch_unwritten():
    """README: only a vector proven to be of the whole shorter text is stored. A twin request that fails is sent
    again; one that keeps failing leaves its text unproven, taken out of the batch (the worker records it as a
    failure a later run retries) - never kept with chars_sent = the whole text."""
    import asyncio

    import numpy as np

    from wiki_embeddings.core.backfill import silent
    from wiki_embeddings.core.backfill.outcomes import Embedded
    from wiki_embeddings.core.embedders import AmbiguousFailure, Answer

    calls: list[list[str]] = []

    def vec(text: str) -> np.ndarray:
        return np.array([len(text), 1.0 + len(text) % 7, 3.0], dtype=np.float32)

    async def call(texts: list[str]) -> Answer:
        calls.append(texts)
        if any(t.startswith("stubborn") for t in texts):
            raise AmbiguousFailure("500 Internal Server Error")
        if len(calls) == 1:  # a sporadic 500 on the first twin request: sent again
            raise AmbiguousFailure("500 Internal Server Error")
        return Answer([vec(t) for t in texts], None, 0)

    sent = ["stubborn text of several words here", "a fine text of several words here"]
    batch = Embedded([1, 2], [vec(t) for t in sent], [len(t) for t in sent], [False, False], [False, False])
    unproven = asyncio.run(silent.check_twins(call, batch, sent, [0]))
    assert unproven == [0] and batch.ids == [2] and len(batch.vectors) == 1
    assert len(calls) == silent.FAILED_TRIES
    unproven = asyncio.run(silent.check_twins(call, batch, sent[1:], [0]))
    assert unproven == [] and batch.ids == [2] and batch.chars == [len("a fine text of several words")]


def test_the_probe_texts_are_one_text():
    """A server's answer to the window probe's first text (at the start) and to the health probe's (when it comes
    back) are compared with the column's recorded answers: all three must be the same text."""
    from wiki_embeddings.core import fingerprint
    from wiki_embeddings.core.backfill import probe
    from wiki_embeddings.core.embedders.pooled import PROBE_TEXT

    assert fingerprint.TEXT == PROBE_TEXT == probe.CANARY_TEXT
