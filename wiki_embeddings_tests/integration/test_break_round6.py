"""Break round 6: the start's length probe (core/embedders/pooled.py `_first_answer`, `_length_agreed`), the lease
probe's embed (core/embedders/probe.py `answers`) and the writer's queued releases (core/backfill/claimer.py
`release_soon` / `settle`), as production would meet them: a real PostgreSQL and real HTTP stand-ins
(test_break_api.py's). Each test is named as the promise it checks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from wiki_embeddings.core.db import Store
from wiki_embeddings.core.embedders.probe import answers
from wiki_embeddings.core.status import collect_status
from wiki_embeddings.devtools import embedded_postgres
from wiki_embeddings_tests.integration.conftest import TEST_DIM, TEST_MODEL
from wiki_embeddings_tests.integration.test_break_api import Reply, StandIn, failures, openai_answer, seeded, well
from wiki_embeddings_tests.integration.test_faults_support import (
    advisory_locks,
    cli_env,
    filled,
    kill9,
    wait_until,
    wrong_vectors,
)

Embed = Callable[[int, list[str], dict[str, Any]], Reply]


@pytest.fixture
def stand_in() -> Iterator[Callable[..., StandIn]]:
    """OpenAI-compatible stand-ins over real HTTP (test_break_api.py's), shut at the test's end."""
    with contextlib.ExitStack() as stack:
        yield lambda embed, **kw: stack.enter_context(StandIn(embed, **kw))


def longer(dim: int = TEST_DIM + 128) -> Embed:
    """Another model's length for every text (a server with other weights under the name)."""

    def embed(_n: int, texts: list[str], body: dict[str, Any]) -> Reply:
        return 200, {}, openai_answer(TEST_MODEL, texts, dim=dim)

    return embed


def matryoshka(full: int = TEST_DIM * 2) -> Embed:
    """A Matryoshka model: `full`-long vectors, cut to `dimensions` when the request asks for them."""

    def embed(_n: int, texts: list[str], body: dict[str, Any]) -> Reply:
        return 200, {}, openai_answer(TEST_MODEL, texts, dim=int(body.get("dimensions") or full))

    return embed


def nan_at(rate: float, seed: int) -> Embed:
    """A steady `rate` of answers whose vectors are NaN (a sick GPU), the rest well."""
    fails = seeded(rate, seed)

    def embed(n: int, texts: list[str], body: dict[str, Any]) -> Reply:
        answer = openai_answer(TEST_MODEL, texts)
        if fails(n):
            for item in answer["data"]:
                item["embedding"] = [float("nan")] * TEST_DIM
        return 200, {}, answer

    return embed


def openai_table(make_table: Any, urls: str, rows: int = 20, **kw: Any) -> Any:
    table = make_table(ollama_url=urls, api="openai", num_ctx=512, long_text="cut", **kw)
    table.load_wiki(rows)
    return table


def states(report: Any) -> list[str]:
    return [s["state"] for s in report.servers]


# ---------------------------------------------------------------- 1. the start's length probe
def test_two_of_three_servers_answering_another_length_never_write_and_the_good_one_fills_the_column(
    make_table, stand_in
):
    """Two servers of three answer another length than the column's; the third answers it. The run completes
    through the good one, nothing of the wrong length is written and no chunk is failed for a server's fault."""
    bad1, bad2, good = stand_in(longer()), stand_in(longer(TEST_DIM + 64)), stand_in(well())
    table = openai_table(make_table, f"{bad1.url},{bad2.url},{good.url}", server_wait_sec=10.0)
    report = table.backfill()
    assert report.state == "completed" and table.status()["missing"] == 0, report.message
    assert wrong_vectors(table) == [] and failures(table) == []


def test_every_server_answering_a_longer_length_with_request_dimensions_takes_none_out(make_table, stand_in):
    """Matryoshka: every server answers a longer vector unless asked for the column's length. With
    --request-dimensions nobody leaves the rotation and the column fills with the asked length."""
    a, b = stand_in(matryoshka()), stand_in(matryoshka())
    table = openai_table(make_table, f"{a.url},{b.url}", request_dimensions=True)
    report = table.backfill()
    assert report.state == "completed" and table.status()["missing"] == 0, report.message
    assert wrong_vectors(table) == [] and failures(table) == []
    assert "out" not in " ".join(states(report)), report.servers
    assert a.posts and b.posts[-1].get("dimensions") == TEST_DIM


def test_the_only_server_answering_nan_ends_the_start_with_a_clear_error_quickly(make_table, stand_in):
    """The only server answers NaN to everything: the run ends before writing, saying why, in bounded time."""
    only = stand_in(nan_at(1.0, 1))
    table = openai_table(make_table, only.url, retries=2, backoff_base_sec=0.05)
    started = time.monotonic()
    try:
        report = table.backfill()
    except Exception as exc:  # noqa: BLE001 - a refusal at the start is an answer too
        message = str(exc)
    else:
        assert report.state != "completed"
        message = report.message or ""
    assert time.monotonic() - started < 6.0
    assert "nan" in message.lower() or "finite" in message.lower(), message
    assert table.status()["missing"] == 20


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "beside-a-good-one"])
def test_a_server_answering_nan_a_steady_fifth_of_the_time_never_ends_a_good_run(make_table, stand_in, alone):
    """A server answers NaN a steady 20 % of the time (its first answer included): it is not out for good and the
    run completes with every chunk written right and none failed."""
    flaky = stand_in(nan_at(0.2, 3))
    urls = flaky.url if alone else f"{flaky.url},{stand_in(well()).url}"
    table = openai_table(make_table, urls, rows=40, server_wait_sec=10.0, backoff_base_sec=0.05)
    report = table.backfill(batch_size=4)
    assert report.state == "completed" and table.status()["missing"] == 0, report.message
    assert wrong_vectors(table) == [] and failures(table) == []


def test_a_wrong_length_server_that_comes_back_through_the_health_probe_never_writes(make_table, stand_in):
    """A server answers the column's length to its first request and to the health probe, another length to the
    chunks' texts: whatever comes back in, the writer and validation refuse its vectors; the good server fills
    the column and no chunk is failed for the sick server's fault."""

    def sly(n: int, texts: list[str], body: dict[str, Any]) -> Reply:
        from wiki_embeddings.core.embedders.pooled import PROBE_TEXT

        dim = TEST_DIM if texts == [PROBE_TEXT] else TEST_DIM + 128
        return 200, {}, openai_answer(TEST_MODEL, texts, dim=dim)

    bad, good = stand_in(sly), stand_in(well())
    table = openai_table(make_table, f"{bad.url},{good.url}", rows=30, server_wait_sec=10.0)
    report = table.backfill(batch_size=4)
    assert report.state == "completed" and table.status()["missing"] == 0, report.message
    assert wrong_vectors(table) == [] and failures(table) == []


# ---------------------------------------------------------------- 2. the lease probe's embed
def test_a_server_slow_for_every_embed_but_good_counts_as_answering(stand_in):
    """4 s per embed (a model loading, a long queue): past the 3 s of the embed probe, it still counts."""

    def slow(n: int, texts: list[str], body: dict[str, Any]) -> Reply:
        time.sleep(4.0)
        return well()(n, texts, body)

    server = stand_in(slow)
    started = time.monotonic()
    assert answers(server.url, "openai", model=TEST_MODEL)
    assert time.monotonic() - started < 4.5


def test_the_key_is_sent_to_a_server_that_wants_it_and_never_logged(stand_in, caplog):
    """A server that 401s without the key: with WIKI_EMBED_API_KEY the probe sends it and the server counts;
    without it the server does not; the key appears in no log line."""
    key = "sk-probe-SECRET-4711"

    def keyed(n: int, texts: list[str], body: dict[str, Any]) -> Reply:
        if server.auth[-1] != f"Bearer {key}":
            return 401, {}, {"error": {"message": "Incorrect API key provided"}}
        return well()(n, texts, body)

    server = stand_in(keyed)
    with caplog.at_level(logging.DEBUG):
        assert answers(server.url, "openai", model=TEST_MODEL, api_key=key)
        assert not answers(server.url, "openai", model=TEST_MODEL)
    assert key not in caplog.text
    assert server.auth[0] == f"Bearer {key}"


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1", "/api/v2/"])
def test_an_openai_base_url_with_a_path_prefix_is_probed_where_the_client_sends(stand_in, prefix, monkeypatch):
    """The probe's embed goes to the same path as the run's requests (`<base>/embeddings`) under any prefix."""
    seen: list[str] = []
    real = httpx.Client.post

    def spy(self: httpx.Client, url: Any, *args: Any, **kw: Any) -> httpx.Response:
        seen.append(str(url))
        return real(self, url, *args, **kw)

    monkeypatch.setattr(httpx.Client, "post", spy)
    base = stand_in(well()).url + prefix
    answers(base, "openai", model=TEST_MODEL)
    assert seen == [base.rstrip("/") + "/embeddings"], seen


def test_a_bare_host_serving_the_api_at_its_root_counts_as_answering():
    """infinity-emb's default: `/embeddings` at the root, 404 under /v1. The run's client falls back to the root
    (core/embedders/openai.py); the lease probe must too, or a good server is leased last as 'not answering'."""

    class Root(BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
            status, reply = (200, openai_answer(TEST_MODEL, body["input"])) if self.path == "/embeddings" else (404, {})
            raw = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Root)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert answers(f"http://127.0.0.1:{server.server_address[1]}", "openai", model=TEST_MODEL)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("model", ["hf.co/Org/Model-GGUF:Q4_K_M", "name with spaces", "modèle/ünï", 'quo"te\\'])
def test_a_model_name_with_odd_characters_reaches_the_server_as_it_is(stand_in, model):
    """The model name travels in the JSON body unchanged (no URL or header quoting)."""
    server = stand_in(well())
    assert answers(server.url, "openai", model=model)
    assert server.posts[-1]["model"] == model


def test_a_server_without_the_model_does_not_count_while_one_with_it_does(ollama):
    """Ollama's 404 'model not found' on one server: not answering; the same server with the run's model: is."""
    assert answers(ollama.url, "ollama", model=TEST_MODEL)
    assert not answers(ollama.url, "ollama", model="not-pulled-here:latest")


# ---------------------------------------------------------------- 3. the writer's queued releases
SLOW_RELEASE = """
import runpy, time
from wiki_embeddings.core.db import Store
real = Store.release
def slow(self, conn, ids):
    time.sleep(0.25)  # the claim lane lags: the writer's releases queue up behind it
    return real(self, conn, ids)
Store.release = slow
runpy.run_module("wiki_embeddings.cli", run_name="__main__", alter_sys=True)
"""


def slow_releases(monkeypatch: pytest.MonkeyPatch, pending: threading.Event, sec: float = 0.25) -> None:
    """Every release of claims lags `sec` on the claim lane (a busy database): `release_soon`'s queue fills."""
    real = Store.release

    def slow(self: Any, conn: Any, ids: Any) -> None:
        pending.set()
        time.sleep(sec)
        real(self, conn, ids)

    monkeypatch.setattr(Store, "release", slow)


def run_in_thread(table: Any, **kw: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["report"] = table.backfill(**kw)
        except Exception as exc:  # noqa: BLE001 - shown by the test
            out["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, out


def ended_clean(table: Any, rows: int) -> None:
    status = collect_status(table.store, table.settings)
    assert status["missing"] == 0 and status["failed"] == 0 and status["locked"] == 0, status
    assert filled(table) == rows and wrong_vectors(table) == []
    assert not advisory_locks(table)


def test_postgres_restarted_while_releases_are_pending_the_run_finishes_and_leaves_no_claim(
    make_table, ollama, pg_data_dir, monkeypatch
):
    """PostgreSQL restarts while written batches' releases wait on the claim lane: the run reconnects, finishes,
    every chunk is written once and status shows locked 0."""
    table = make_table(batch_size=8)
    table.load([(i, f"chunk {i} about the Han river") for i in range(1, 161)])
    pending = threading.Event()
    slow_releases(monkeypatch, pending)
    thread, out = run_in_thread(table)
    assert pending.wait(30)
    wait_until(lambda: filled(table) >= 24, 30, "a few batches written")
    embedded_postgres.restart(pg_data_dir)
    embedded_postgres.ensure_running(pg_data_dir)
    table.store.close()
    thread.join(60)
    assert not thread.is_alive() and "error" not in out, out
    assert out["report"].state == "completed", out["report"].message
    ended_clean(table, 160)


def test_kill_9_while_releases_are_pending_then_a_resume_loses_no_chunk_and_leaves_none_claimed(make_table, ollama):
    """A run killed with SIGKILL while its writes' releases queue behind a lagging claim lane: its claims die with
    its sessions (locked 0), the next run fills what is left, nothing is lost or written twice."""
    table = make_table(batch_size=8)
    table.load([(i, f"paragraph {i} on the rivers of Korea") for i in range(1, 201)])
    log = table.tmp / "killed.log"
    with open(log, "ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_RELEASE, "backfill", "--batch-size", "8"],
            env=cli_env(table),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: filled(table) >= 40, 60, "batches written while releases lag")
    finally:
        kill9(proc)
    assert 0 < filled(table) < 200, log.read_text()
    wait_until(lambda: not advisory_locks(table), 10, "the killed run's claims to go")
    assert collect_status(table.store, table.settings)["locked"] == 0
    report = table.backfill()
    assert report.state == "completed", report.message
    ended_clean(table, 200)


def test_a_frozen_claim_session_thawed_lets_the_run_finish_and_leaves_no_claim(make_table, ollama, monkeypatch):
    """The claim session's backend frozen (SIGSTOP) while releases are pending, thawed 2 s later: the run
    finishes with every chunk written and no claim left (locked 0)."""
    table = make_table(batch_size=8)
    table.load([(i, f"chunk {i} about the Yalu river") for i in range(1, 161)])
    pending = threading.Event()
    slow_releases(monkeypatch, pending, sec=0.05)
    thread, out = run_in_thread(table)
    assert pending.wait(30)
    sql = "SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' AND pid <> pg_backend_pid()"
    pids = wait_until(lambda: [r[0] for r in table.sql(sql)], 10, "the claim session's backend")
    assert isinstance(pids, list)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2.0)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    thread.join(60)
    assert not thread.is_alive() and "error" not in out, out
    assert out["report"].state == "completed", out["report"].message
    ended_clean(table, 160)
