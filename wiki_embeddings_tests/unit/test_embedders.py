"""The seam to the model server (core/embedders/): which server takes a request, what counts as a valid answer, and
how the Ollama client classes an HTTP answer (over httpx.MockTransport: no server). Against the real protocol
server: integration/test_ollama_server.py, test_faults_model_server.py, test_faults_bad_output.py,
test_long_chunks.py, test_backfill_runbook.py (several servers)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from wiki_embeddings.core import tuning as tune
from wiki_embeddings.core.embedders import (
    AmbiguousFailure,
    ContextExceeded,
    InputRejected,
    InvalidVectors,
    ModelNotFound,
    OllamaClient,
    ServerUnavailable,
)
from wiki_embeddings.core.embedders.base import validate_vectors
from wiki_embeddings.core.embedders.servers import Server, ServerPool, Turns
from wiki_embeddings_tests.unit.fakes import run

URLS = ["http://gpu-a:11434", "http://gpu-b:11434", "http://gpu-c:11434"]


# --------------------------------------------------------------------------------------------- the pool


async def no_probe(_server: Server) -> None:
    raise AssertionError("no server is out: nothing to probe")


def pool(servers: int = 3, depth: int = 1) -> ServerPool:
    return ServerPool(URLS[:servers], tune.Tuning(servers, pinned_depth=depth), no_probe)


def done(p: ServerPool, server: Server) -> None:
    p.release(server)


def test_requests_go_round_robin_over_the_servers():
    async def scenario() -> list[int]:
        p = pool(depth=2)
        return [(await p.acquire()).index for _ in range(5)]

    assert run(scenario()) == [0, 1, 2, 0, 1]


def test_a_server_at_its_depth_is_skipped_and_a_full_pool_waits_for_a_free_slot():
    async def scenario() -> tuple[list[int], bool, int]:
        p = pool(servers=2, depth=1)
        first, second = await p.acquire(), await p.acquire()
        waiting = asyncio.ensure_future(p.acquire())
        await asyncio.sleep(0.01)
        blocked = not waiting.done()
        done(p, second)
        return [first.index, second.index], blocked, (await waiting).index

    assert run(scenario()) == ([0, 1], True, 1)


def test_a_pinned_request_goes_to_its_server_and_leaves_the_round_robin_where_it_was():
    async def scenario() -> list[int]:
        p = pool(depth=2)
        return [(await p.acquire(only=2)).index, (await p.acquire()).index, (await p.acquire(only=2)).index]

    assert run(scenario()) == [2, 0, 2]


def test_a_pinned_request_waits_for_its_own_server_even_when_others_are_free():
    async def scenario() -> tuple[bool, int]:
        p = pool(servers=2, depth=1)
        held = await p.acquire(only=1)
        waiting = asyncio.ensure_future(p.acquire(only=1))
        await asyncio.sleep(0.01)
        blocked = not waiting.done()  # server 0 is free, but the canary must ask server 1
        done(p, held)
        return blocked, (await waiting).index

    assert run(scenario()) == (True, 1)


def test_no_more_workers_hold_a_batch_than_the_turns_allow_and_a_raised_limit_lets_one_more_in():
    async def scenario() -> tuple[int, int]:
        turns = Turns(2)
        inside = 0

        async def worker() -> None:
            nonlocal inside
            async with turns:
                inside += 1
                await asyncio.sleep(1)

        tasks = [asyncio.ensure_future(worker()) for _ in range(3)]
        await asyncio.sleep(0.01)
        before = inside
        turns.set_limit(3)
        await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
        return before, inside

    assert run(scenario()) == (2, 3)


# --------------------------------------------------------------------------------------------- answers


def test_a_valid_answer_is_one_float32_vector_per_input():
    vectors = validate_vectors([[1, 2, 3], [4, 5, 6]], 2, 3, server=0)
    assert [v.dtype for v in vectors] == [np.float32, np.float32]
    assert np.array_equal(vectors[1], np.array([4, 5, 6], dtype=np.float32))


def test_an_answer_with_the_wrong_count_of_vectors_is_ambiguous():
    with pytest.raises(AmbiguousFailure) as failed:
        validate_vectors([[1.0, 2.0]], 2, 2, server=1)
    assert (failed.value.kind, failed.value.server) == ("wrong_count", 1)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ([1.0, math.nan], "vector holds NaN or infinity"),
        ([1.0, math.inf], "vector holds NaN or infinity"),
        ([1.0, 2.0, 3.0], "vector length 3 != column dimension 2"),
        ([], "empty vector"),
        (["a", "b"], "vector holds non-numbers"),
    ],
)
def test_an_unusable_vector_is_named_and_the_valid_ones_kept(bad, reason):
    with pytest.raises(InvalidVectors) as failed:
        validate_vectors([[0.5, 0.5], bad, [0.25, 0.75]], 3, 2, server=2)
    exc = failed.value
    assert exc.reasons == {1: reason} and exc.server == 2 and exc.kind == "invalid_vector"
    assert exc.vectors[1] is None
    assert np.array_equal(exc.vectors[2], np.array([0.25, 0.75], dtype=np.float32))


def test_without_a_known_length_any_consistent_length_is_valid():
    assert [len(v) for v in validate_vectors([[1.0] * 5, [2.0] * 5], 2, None, server=0)] == [5, 5]


# --------------------------------------------------------------------------------------------- the Ollama client


Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, servers: int = 2, **kwargs: Any) -> OllamaClient:
    """A client whose HTTP goes to `handler`; backoffs of milliseconds (core/health.py)."""
    return OllamaClient(
        URLS[:servers],
        "all-minilm",
        transport=httpx.MockTransport(handler),
        retries=2,
        tuning=tune.Tuning(servers, pinned_depth=1, backoff_base_sec=0.001, backoff_max_sec=0.002),
        **kwargs,
    )


def embed(c: OllamaClient, texts: list[str], server: int | None = None) -> Any:
    async def scenario() -> Any:
        try:
            return await c.embed_texts(texts, server=server)
        finally:
            await c.aclose()

    return run(scenario())


def answer(texts: int, dim: int = 4, tokens: int = 9) -> httpx.Response:
    return httpx.Response(200, json={"embeddings": [[0.5] * dim] * texts, "prompt_eval_count": tokens})


def test_the_client_sends_truncate_false_and_returns_the_vectors_the_token_count_and_the_server():
    sent: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append({"host": request.url.host, **orjson.loads(request.content)})
        return answer(2, tokens=11)

    got = embed(client(handler, text_prefix="passage: "), ["a", "b"], server=1)
    assert (got.tokens, got.server, len(got.vectors)) == (11, 1, 2)
    [body] = sent
    assert body["host"] == "gpu-b" and body["model"] == "all-minilm"
    assert body["input"] == ["passage: a", "passage: b"] and body["truncate"] is False
    assert body["keep_alive"] == "30m"


def test_the_client_spreads_requests_round_robin():
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return answer(1)

    async def scenario() -> list[int]:
        c = client(handler, servers=3)
        try:
            return [(await c.embed_texts(["x"])).server for _ in range(4)]
        finally:
            await c.aclose()

    assert run(scenario()) == [0, 1, 2, 0] and hosts == ["gpu-a", "gpu-b", "gpu-c", "gpu-a"]


def test_a_400_context_refusal_is_context_exceeded_with_the_server_that_refused():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": "the input length exceeds the context length"})

    with pytest.raises(ContextExceeded) as refused:
        embed(client(handler), ["a very long text"], server=1)
    assert (refused.value.server, refused.value.http_status, refused.value.kind) == (1, 400, "context_exceeded")


def test_another_400_is_the_inputs_fault():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": "invalid input type"})

    with pytest.raises(InputRejected) as refused:
        embed(client(handler), ["x"])
    assert not isinstance(refused.value, ContextExceeded)
    assert (refused.value.kind, refused.value.server) == ("http_400", 0)


def test_a_404_naming_the_model_on_every_server_is_model_not_found_with_a_pull_hint():
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(404, json={"error": 'model "all-minilm" not found, try pulling it first'})

    with pytest.raises(ModelNotFound) as missing:
        embed(client(handler), ["x"])
    assert "no server has the model" in missing.value.message and "ollama pull all-minilm" in missing.value.message
    assert hosts == ["gpu-a", "gpu-b"]  # each server asked once: nothing can be embedded


def test_a_server_without_the_model_leaves_the_rotation_and_the_request_goes_to_one_that_has_it():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "gpu-a":
            return httpx.Response(404, json={"error": 'model "all-minilm" not found, try pulling it first'})
        return answer(1)

    c = client(handler)
    assert embed(c, ["x"]).server == 1
    assert c.tuning.controls[0].health.state == "no_model"


def test_a_server_answering_503_to_every_try_leaves_the_rotation_and_with_none_left_it_is_unavailable():
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503, json={"error": "server busy, please try again"})

    c = client(handler, servers=1, server_wait_sec=0.2)
    with pytest.raises(ServerUnavailable) as down:
        embed(c, ["x"])
    assert calls == 3  # retries=2: three attempts, each after a backoff
    assert "unreachable or overloaded" in down.value.message and "OLLAMA_URL" in down.value.message
    # A 503 is an answer (the server is there, busy): the run waits for it, then gives up naming the setting.
    assert "WIKI_EMBED_SERVER_WAIT_SEC" in down.value.message
    assert c.tuning.controls[0].health.state == "out"


def test_a_503_from_one_server_sends_the_request_to_another():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "gpu-a":
            return httpx.Response(503, json={"error": "server busy, please try again"})
        return answer(1)

    c = client(handler)
    assert embed(c, ["x"]).server == 1 and c.stats.retries == 1


def test_a_503_absorbed_by_a_retry_is_an_answer():
    statuses = iter([503, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(statuses)
        return answer(1) if status == 200 else httpx.Response(status, json={"error": "busy"})

    c = client(handler, servers=1)
    assert len(embed(c, ["x"]).vectors) == 1 and c.stats.retries == 1


def test_a_503_delays_the_request_that_got_it_not_the_next_one_to_the_same_server():
    """Issue 20: one 503 in five used to hold the whole server for the backoff, idling it."""
    sent: list[tuple[float, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        text = orjson.loads(request.content)["input"][0]
        sent.append((asyncio.get_running_loop().time(), text))
        if len(sent) == 1:
            return httpx.Response(503, json={"error": "server busy, please try again"})
        return answer(1)

    tuning = tune.Tuning(1, pinned_depth=2, backoff_base_sec=0.2, backoff_max_sec=0.4)
    c = OllamaClient(URLS[:1], "all-minilm", transport=httpx.MockTransport(handler), retries=2, tuning=tuning)

    async def scenario() -> None:
        try:
            first = asyncio.ensure_future(c.embed_texts(["first"]))
            await asyncio.sleep(0.02)  # after its 503
            await c.embed_texts(["second"])
            await first
        finally:
            await c.aclose()

    run(scenario())
    (t503, a), (t_second, b), (t_retry, a_again) = sent
    assert (a, b, a_again) == ("first", "second", "first")
    assert t_second - t503 < 0.08, "the next request was not held behind the backoff"
    assert t_retry - t503 >= 0.09, "the failed one waited its pause (0.1-0.2 s before any answer was timed)"


def test_a_request_refused_on_every_try_while_its_server_answers_others_does_not_take_the_server_out():
    """Bad luck of one request (one 503 in two can meet it seven times) is not a sick server."""

    def handler(request: httpx.Request) -> httpx.Response:
        if orjson.loads(request.content)["input"] == ["unlucky"]:
            return httpx.Response(503, json={"error": "server busy, please try again"})
        return answer(1)

    c = client(handler, servers=1, server_wait_sec=0.2)
    others = 0

    async def scenario() -> None:
        nonlocal others
        try:
            unlucky = asyncio.ensure_future(c.embed_texts(["unlucky"]))
            while not unlucky.done():
                await c.embed_texts(["other"])
                others += 1
                await asyncio.sleep(0.001)  # the engine's own work between two requests
            with pytest.raises(ServerUnavailable, match="503"):
                await unlucky  # it gives up after its bound of tries, not by taking the server out
        finally:
            await c.aclose()

    run(scenario())
    health = c.tuning.controls[0].health
    assert health.state == "in" and health.failures > c.retries + 1 and others > 0


def test_a_500_is_ambiguous_and_names_its_server():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": "llama runner process has terminated"})

    with pytest.raises(AmbiguousFailure) as failed:
        embed(client(handler), ["x"], server=1)
    assert (failed.value.kind, failed.value.http_status, failed.value.server) == ("http_500", 500, 1)
