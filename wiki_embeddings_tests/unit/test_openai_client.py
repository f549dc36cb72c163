"""The OpenAI-compatible client against scripted answers (httpx.MockTransport): what it sends, how it reads base64
and floats, how each error is classed, the key never shown, Retry-After honoured, the window the server publishes."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from wiki_embeddings.core import tuning as tune
from wiki_embeddings.core.embedders import (
    AmbiguousFailure,
    ContextExceeded,
    InputRejected,
    ModelNotFound,
    OpenAIClient,
    RunnerCrashed,
    ServerUnavailable,
)

pytestmark = pytest.mark.unit

URL = "http://emb.test:8080"
KEY = "sk-secret-key-123"
Handler = Callable[[httpx.Request], httpx.Response]


def b64(vector: list[float]) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def answer(vectors: list[Any], tokens: int | None = 7) -> httpx.Response:
    body: dict[str, Any] = {
        "object": "list",
        "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
        "model": "m",
    }
    if tokens is not None:
        body["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return httpx.Response(200, json=body)


class Server:
    """Records every request; answers with `handler`."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.method == "POST"]


def client(server: Server, *, retries: int = 2, **options: Any) -> OpenAIClient:
    tuning = tune.Tuning(1, pinned_depth=1, max_batch=64, backoff_base_sec=0.01, backoff_max_sec=0.2)
    return OpenAIClient(
        [URL], "m", retries=retries, tuning=tuning, transport=httpx.MockTransport(server), server_wait_sec=1, **options
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def embed(c: OpenAIClient, texts: list[str]) -> Any:
    try:
        return await c.embed_texts(texts)
    finally:
        await c.aclose()


async def embed_each(c: OpenAIClient, *batches: list[str]) -> list[Any]:
    """One request per batch, in order, on one client."""
    try:
        return [await c.embed_texts(texts) for texts in batches]
    finally:
        await c.aclose()


def test_sends_a_list_with_base64_and_decodes_it() -> None:
    server = Server(lambda r: answer([b64([1.0, 2.0, 3.0]), b64([0.5, -0.5, 0.25])], tokens=9))
    got = run(embed(client(server), ["alpha", "beta"]))
    body = server.bodies()[0]
    assert str(server.requests[0].url) == f"{URL}/v1/embeddings"
    assert body == {"model": "m", "input": ["alpha", "beta"], "encoding_format": "base64"}
    np.testing.assert_array_equal(got.vectors[0], np.array([1, 2, 3], np.float32))
    np.testing.assert_array_equal(got.vectors[1], np.array([0.5, -0.5, 0.25], np.float32))
    assert got.tokens == 9 and got.vectors[0].dtype == np.float32


def test_answers_out_of_order_are_put_back_in_order() -> None:
    def handler(_r: httpx.Request) -> httpx.Response:
        data = [{"embedding": [2.0, 2.0], "index": 1}, {"embedding": [1.0, 1.0], "index": 0}]
        return httpx.Response(200, json={"data": data})

    got = run(embed(client(Server(handler)), ["a", "b"]))
    assert [v[0] for v in got.vectors] == [1.0, 2.0] and got.tokens is None


def test_a_server_answering_floats_is_asked_for_floats_from_then_on() -> None:
    server = Server(lambda r: answer([[0.1, 0.2]]))
    run(embed_each(client(server), ["one"], ["two"]))
    first, second = server.bodies()
    assert first["encoding_format"] == "base64" and "encoding_format" not in second


def test_a_server_refusing_base64_gets_floats_at_once() -> None:
    def handler(r: httpx.Request) -> httpx.Response:
        if "encoding_format" in json.loads(r.content):
            return httpx.Response(400, json={"error": {"message": "unsupported encoding_format: base64"}})
        return answer([[0.3, 0.4]])

    server = Server(handler)
    got = run(embed(client(server), ["x"]))
    assert len(server.requests) == 2 and "encoding_format" not in server.bodies()[1]
    np.testing.assert_allclose(got.vectors[0], [0.3, 0.4])


def test_dimensions_are_sent_when_asked() -> None:
    server = Server(lambda r: answer([[0.1, 0.2]]))
    c = client(server)
    c.ask_dimensions(2)
    run(embed(c, ["x"]))
    assert server.bodies()[0]["dimensions"] == 2


def test_counts_of_characters_are_not_taken_for_tokens() -> None:
    """infinity-emb reports len(text) as prompt_tokens: a first English text's count equal to its characters."""
    text = "The quick brown fox jumps over the lazy dog."
    server = Server(lambda r: answer([[0.1, 0.2]], tokens=sum(len(t) for t in json.loads(r.content)["input"])))
    answers = run(embed_each(client(server), [text], ["short text here, really"]))
    assert [a.tokens for a in answers] == [None, None]
    real = Server(lambda r: answer([[0.1, 0.2]], tokens=12))
    assert run(embed(client(real), [text])).tokens == 12


def test_a_base64_embedding_that_is_not_float32_is_a_bad_answer() -> None:
    server = Server(lambda r: answer([base64.b64encode(b"abc").decode()]))
    with pytest.raises(AmbiguousFailure, match="not float32"):
        run(embed(client(server), ["x"]))


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "This model's maximum context length is 512 tokens. However, you requested 900 tokens"),
        (413, "Input validation error: `inputs` must have less than 512 tokens. Given: 700"),
        (400, "input is too long"),
    ],
)
def test_refusals_of_length_are_cut_to_fit(status: int, message: str) -> None:
    server = Server(lambda r: httpx.Response(status, json={"error": {"message": message}}))
    with pytest.raises(ContextExceeded) as caught:
        run(embed(client(server), ["long text"]))
    assert caught.value.http_status == status and len(server.requests) == 1


@pytest.mark.parametrize("status", [400, 500])
def test_ollamas_runner_crash_through_v1_is_a_length_problem(status: int) -> None:
    """Ollama 0.31 through /v1: `do embedding request: Post "…/embedding": EOF` (a 400 from its /v1 handler)."""
    message = 'do embedding request: Post "http://127.0.0.1:39227/embedding": EOF'
    server = Server(lambda r: httpx.Response(status, json={"error": {"message": message, "type": "api_error"}}))
    with pytest.raises(RunnerCrashed):
        run(embed(client(server), ["long text"]))


def test_413_without_length_words_shrinks_the_batch_and_is_retried() -> None:
    calls = []

    def handler(r: httpx.Request) -> httpx.Response:
        calls.append(r)
        if len(calls) == 1:
            return httpx.Response(413, text="Payload Too Large")
        return answer([[1.0, 0.0]] * len(json.loads(r.content)["input"]))

    c = client(Server(handler))
    before = c.tuning.size_for(0)
    got = run(embed(c, ["a", "b"]))
    assert len(got.vectors) == 2 and c.tuning.size_for(0) < before


def test_429_with_retry_after_waits_then_succeeds() -> None:
    times: list[float] = []

    def handler(_r: httpx.Request) -> httpx.Response:
        times.append(time.monotonic())
        if len(times) == 1:
            return httpx.Response(429, headers={"retry-after": "0.15"}, json={"error": "rate limited"})
        return answer([[1.0, 0.0]])

    c = client(Server(handler))
    got = run(embed(c, ["a"]))
    assert len(got.vectors) == 1 and times[1] - times[0] >= 0.14
    assert c.stats.retries == 1


def test_503s_that_persist_end_as_server_unavailable() -> None:
    server = Server(lambda r: httpx.Response(503, json={"error": "overloaded"}))
    with pytest.raises(ServerUnavailable, match="503"):
        run(embed(client(server, retries=1), ["a"]))


def test_a_500_is_ambiguous_and_a_422_is_the_input() -> None:
    with pytest.raises(AmbiguousFailure, match="HTTP 500"):
        run(embed(client(Server(lambda r: httpx.Response(500, json={"message": "boom"}))), ["a"]))
    with pytest.raises(InputRejected, match="422"):
        run(embed(client(Server(lambda r: httpx.Response(422, json={"detail": "bad input"}))), ["a"]))


def test_404_for_the_model_is_model_not_found() -> None:
    server = Server(lambda r: httpx.Response(404, json={"error": {"message": "The model `m` does not exist."}}))
    with pytest.raises(ModelNotFound, match="not served"):
        run(embed(client(server), ["a"]))


def test_a_server_without_v1_is_asked_at_its_root() -> None:
    def handler(r: httpx.Request) -> httpx.Response:
        if r.url.path.startswith("/v1/"):
            return httpx.Response(404, json={"detail": "Not Found"})
        return answer([[1.0, 2.0]])

    server = Server(handler)
    run(embed_each(client(server), ["a"], ["b"]))
    assert [r.url.path for r in server.requests] == ["/v1/embeddings", "/embeddings", "/embeddings"]


def test_a_url_with_a_path_is_the_base() -> None:
    server = Server(lambda r: answer([[1.0, 2.0]]))
    c = OpenAIClient(["http://gw.test/openai/v1/"], "m", transport=httpx.MockTransport(server))
    run(embed(c, ["a"]))
    assert str(server.requests[0].url) == "http://gw.test/openai/v1/embeddings"


def test_the_key_goes_in_the_header_only_and_is_never_shown() -> None:
    def handler(r: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": f"invalid key {r.headers['authorization']}"}})

    server = Server(handler)
    c = client(server, api_key=KEY)
    with pytest.raises(ServerUnavailable) as caught:
        run(embed(c, ["a"]))
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in caught.value.message and "WIKI_EMBED_API_KEY" in caught.value.message
    assert KEY not in repr(c.__dict__.get("_http")) and KEY not in c.where
    assert KEY not in json.dumps(c.server_states())


def test_without_a_key_no_authorization_header() -> None:
    server = Server(lambda r: answer([[1.0]]))
    run(embed(client(server), ["a"]))
    assert "authorization" not in server.requests[0].headers


@pytest.mark.parametrize(
    ("routes", "num_ctx", "tokens"),
    [
        ({"/info": {"max_input_length": 512}}, None, 512),  # TEI
        ({"/v1/models": {"data": [{"id": "m", "max_model_len": 8192}]}}, None, 8192),  # vLLM
        ({"/v1/models": {"data": [{"id": "m", "max_model_len": 8192}]}}, 2048, 2048),  # --num-ctx caps it
        ({}, 300, 300),  # publishes nothing: --num-ctx is the window
        ({}, None, None),  # unknown: learned from refusals
    ],
)
def test_the_window_is_what_the_server_publishes(routes: dict[str, Any], num_ctx: int | None, tokens: Any) -> None:
    def handler(r: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=routes[r.url.path]) if r.url.path in routes else httpx.Response(404)

    c = client(Server(handler))

    async def ask() -> Any:
        try:
            return await c.context_window(num_ctx), await c.model_digest()
        finally:
            await c.aclose()

    window, digest = run(ask())
    assert window.tokens == tokens and digest is None


def test_health_lists_the_served_models() -> None:
    server = Server(lambda r: httpx.Response(200, json={"data": [{"id": "all-minilm"}]}))
    c = client(server)

    async def ask() -> str:
        try:
            return await c.health()
        finally:
            await c.aclose()

    assert "all-minilm" in run(ask())
    dead = client(Server(lambda r: httpx.Response(502)))

    async def ask_dead() -> str:
        try:
            return await dead.health()
        finally:
            await dead.aclose()

    with pytest.raises(ServerUnavailable, match="OLLAMA_URL"):
        run(ask_dead())
