"""The engine against each of Ollama's generations (issue 20 items 3-5): before 0.13.5 (silent cut past the window
unless `truncate: false`), 0.13.5-0.2x (400 over the window), 0.30+ (silent cut at the physical batch, num_batch,
whatever num_ctx says) and 0.31's runner crash on such an input. In each: every chunk embedded, none failed or
quarantined, a few requests per long chunk, and every stored vector recomputed from its recorded cut."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from wiki_embeddings.core.status import collect_status
from wiki_embeddings.devtools.ollama_server import ModelSpec, OllamaServer
from wiki_embeddings_tests.integration.conftest import TEST_DIM
from wiki_embeddings_tests.integration.test_faults_support import wrong_vectors

CHUNKS = 120
BATCH = 16


@pytest.fixture(params=["0.12", "0.20", "0.30", "0.31-crash"])
def generation(request: pytest.FixtureRequest) -> Iterator[OllamaServer]:
    """A server whose model describes a 1,024-token window; past 128 tokens the generation's rule applies (the
    window itself for 0.12/0.20, the physical batch for 0.30/0.31)."""
    version = request.param
    window = 128 if version in ("0.12", "0.20") else 1024
    spec = ModelSpec("all-minilm:latest", TEST_DIM, context_length=window, num_ctx=window)
    with OllamaServer(backend="hash", models=[spec], ollama_version=version, num_batch=128, reload_ms=20) as srv:
        yield srv


def test_every_generation_embeds_every_chunk_of_exactly_its_recorded_characters(make_table, generation):
    table = make_table(ollama_url=generation.url, batch_size=BATCH)
    chunks = table.load_wiki(CHUNKS)
    report = table.backfill()
    assert report.state == "completed" and report.failed == 0 and report.embedded == len(chunks), report.message
    status = collect_status(table.store, table.settings)
    assert status["failed"] == 0 and status["quarantined"] == 0 and status["missing"] == 0
    assert wrong_vectors(table) == [], "each stored vector is the model's vector of exactly its recorded cut"
    long_chunks = max(status["cut_for_context"] + status["pooled"], 1)  # cut (--long-text cut) or pooled
    requests = generation.stats()["requests"]
    baseline = math.ceil(len(chunks) / BATCH) + 5  # one request a batch, the start-up probes
    assert (requests - baseline) / long_chunks <= 4, f"{requests} requests for {long_chunks} long chunks"


def test_a_window_over_2048_asks_0_30_for_a_physical_batch_as_large(make_table):
    spec = ModelSpec("all-minilm:latest", TEST_DIM, context_length=8192, num_ctx=2048)
    with OllamaServer(backend="hash", models=[spec], ollama_version="0.30") as srv:
        table = make_table(ollama_url=srv.url, batch_size=BATCH, num_ctx=4096)
        chunks = table.load_wiki(40)
        report = table.backfill()
        assert report.state == "completed" and report.embedded == len(chunks)
        assert srv.stats()["last_options"] == {"num_ctx": 4096, "num_batch": 4096}
        assert report.context_tokens == 4096, "the probe found the whole window taken"
        assert wrong_vectors(table) == []
