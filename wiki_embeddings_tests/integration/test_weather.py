"""Production weather (issue 20): a steady 503 rate, a sick or dead server among several, a storm and its end, the
model missing on one server. Each server has its own health: a failing one leaves the rotation and its batches go
to the others; the run ends by itself; nothing is marked failed for the servers' faults. Speed is in benchmarks/."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from wiki_embeddings.core.status import collect_status
from wiki_embeddings.devtools.ollama_server import OllamaServer
from wiki_embeddings_tests.integration.conftest import TEST_DIM, TEST_MODEL
from wiki_embeddings_tests.integration.test_faults_support import wrong_vectors

MODELS = [f"{TEST_MODEL}:{TEST_DIM}"]


@pytest.fixture
def second() -> Iterator[OllamaServer]:
    with OllamaServer(backend="hash", models=MODELS) as srv:
        yield srv


def dead_url() -> str:
    """A port nobody listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_a_steady_503_rate_keeps_the_batch_and_loses_nothing(make_table, ollama):
    table = make_table(batch_size=32)
    chunks = table.load_wiki(300)
    ollama.set_faults(fail_every_n=5, fail_status=503)
    report = table.backfill()
    assert report.state == "completed" and report.embedded == len(chunks) and report.failed == 0
    assert report.tuning["batch_sizes"] == [32], "an overload answer says nothing about the batch's size"
    assert wrong_vectors(table) == []


def test_one_server_always_503_leaves_the_rotation_and_the_run_ends_by_itself(make_table, ollama, second):
    table = make_table(ollama_url=f"{ollama.url},{second.url}", batch_size=16)
    chunks = table.load_wiki(200)
    second.set_faults(down=True)
    report = table.backfill()
    assert report.state == "completed" and report.embedded == len(chunks) and report.failed == 0
    servers = report.tuning["servers"]
    assert servers[0]["state"] == "in" and servers[1]["state"] == "out", servers
    assert ollama.stats()["requests"] > 5 * max(second.stats()["requests"], 1)
    status = collect_status(table.store, table.settings)
    assert f"{second.url} out (" in status["last_run_servers"], status["last_run_servers"]


def test_a_dead_second_url_is_taken_out_of_the_rotation(make_table, ollama):
    table = make_table(ollama_url=f"{ollama.url},{dead_url()}", batch_size=16)
    chunks = table.load_wiki(120)
    report = table.backfill()
    assert report.state == "completed" and report.embedded == len(chunks) and report.failed == 0
    assert report.tuning["servers"][1]["state"] == "out"


def test_a_server_that_answers_500_to_everything_gets_no_chunk_quarantined(make_table, ollama, second):
    """The canary goes to the server that failed: a sick server fails it and leaves the rotation; the chunks it
    refused are embedded by the healthy one. (Round robin used to ask the healthy one and blame the chunk.)"""
    table = make_table(ollama_url=f"{second.url},{ollama.url}", batch_size=8)
    chunks = table.load_wiki(80)
    second.set_faults(fail_every_n=1, fail_status=500)
    report = table.backfill()
    assert report.state == "completed" and report.embedded == len(chunks) and report.failed == 0, report.message
    assert table.store.list_failures() == []
    assert report.tuning["servers"][0]["state"] == "out"


def test_the_model_missing_on_one_server_takes_only_that_server_out(make_table, ollama):
    with OllamaServer(backend="hash", models=["nomic-embed-text:768"]) as other:
        table = make_table(ollama_url=f"{ollama.url},{other.url}", batch_size=16)
        chunks = table.load_wiki(100)
        report = table.backfill()
        assert report.state == "completed" and report.embedded == len(chunks)
        assert report.tuning["servers"][1]["state"] == "no_model"


def test_the_model_missing_everywhere_is_exit_4(make_table):
    with (
        OllamaServer(backend="hash", models=["nomic-embed-text:768"]) as a,
        OllamaServer(backend="hash", models=["nomic-embed-text:768"]) as b,
    ):
        table = make_table(ollama_url=f"{a.url},{b.url}")
        table.load_wiki(10)
        report = table.backfill()
        assert report.state == "model_not_found" and report.exit_code == 4, report.message
        assert "ollama pull" in report.message


def test_every_server_out_longer_than_the_wait_ends_with_exit_3_and_nothing_failed(make_table, ollama, second):
    table = make_table(ollama_url=f"{ollama.url},{second.url}", batch_size=8, server_wait_sec=1.0)
    table.load_wiki(400)
    ollama.set_faults(latency_ms=5)
    start = ollama.stats()["requests"]

    def storm() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and ollama.stats()["requests"] < start + 10:
            time.sleep(0.005)
        ollama.set_faults(down=True)
        second.set_faults(down=True)

    threading.Thread(target=storm, daemon=True).start()
    began = time.monotonic()
    report = table.backfill()
    assert report.state == "server_unavailable" and report.exit_code == 3, report.message
    assert "WIKI_EMBED_SERVER_WAIT_SEC" in report.message
    assert report.failed == 0 and table.store.list_failures() == []
    assert time.monotonic() - began < 30
    assert collect_status(table.store, table.settings)["missing"] == report.remaining > 0


def test_after_a_storm_on_the_only_server_the_run_resumes_by_itself(make_table, ollama):
    table = make_table(batch_size=16, server_wait_sec=30.0)
    chunks = table.load_wiki(200)
    ollama.set_faults(latency_ms=5)
    start = ollama.stats()["requests"]
    ended: list[float] = []

    def storm() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and ollama.stats()["requests"] < start + 8:
            time.sleep(0.005)
        ollama.set_faults(latency_ms=5, down=True)
        time.sleep(3.0)
        ollama.set_faults(down=False)
        ended.append(time.monotonic())

    threading.Thread(target=storm, daemon=True).start()
    report = table.backfill()
    assert report.state == "completed" and report.embedded == len(chunks) and report.failed == 0, report.message
    assert ended, "the storm happened during the run"
    health = report.tuning["servers"][0]
    assert health["state"] == "in" and health["failures"] > 0
