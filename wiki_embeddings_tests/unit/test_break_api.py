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
