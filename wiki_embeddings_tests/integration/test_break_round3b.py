"""Outside tester's round 3b: pooling under a steady error rate, stop/kill mid-chunk, `--batch-size` counted at
the server, `--reembed-cut` and `--long-text` switches, the start probe's 4xx mapping, frozen runs, `--until`
across daylight saving, and secrets in every place a run leaves text. What held stays a test; what broke is
fixed or marked xfail(strict) with its cause."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from wiki_embeddings.core.backfill.errors import ModelChanged
from wiki_embeddings.core.status import collect_status
from wiki_embeddings.core.verify import verify
from wiki_embeddings.devtools.ollama_server import ModelSpec, OllamaServer
from wiki_embeddings_tests.integration.conftest import TEST_DIM, TEST_MODEL
from wiki_embeddings_tests.integration.test_faults_support import (
    cli_env,
    filled,
    kill9,
    run_cli,
    start_cli,
    wait_until,
    wrong_vectors,
)

LONG = " ".join(f"word{k} sentence number {k}." for k in range(300))  # ~11 pieces in a 128-token window


class CountingServer(OllamaServer):
    """The dev server (128-token window) that records the number of inputs of every embed request it receives."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(
            backend="hash", models=[ModelSpec("all-minilm:latest", TEST_DIM, context_length=128)], **kwargs
        )
        self.sizes: list[int] = []
        self._lock = threading.Lock()
        respond = self._routes.respond

        def counting(method: str, path: str, body: bytes):
            if path in ("/api/embed", "/api/embeddings", "/v1/embeddings") and body:
                try:
                    data = orjson.loads(body)
                    texts = data.get("input", data.get("prompt"))
                    with self._lock:
                        self.sizes.append(len(texts) if isinstance(texts, list) else 1)
                except (orjson.JSONDecodeError, AttributeError):
                    pass
            return respond(method, path, body)

        self._routes.respond = counting  # type: ignore[method-assign]


@pytest.fixture
def counting() -> Iterator[CountingServer]:
    with CountingServer() as srv:
        yield srv


def _insert(table, rows: list[tuple[int, str]]) -> None:
    for cid, text in rows:
        table.sql(f"INSERT INTO {table.settings.table} (id, content) VALUES (%s, %s)", (cid, text))


def _pooled_all_whole(table) -> None:
    status = collect_status(table.store, table.settings)
    assert status["missing"] == 0 and status["failed"] == 0, status
    assert wrong_vectors(table, 50000) == [], "every vector is the mean of exactly its recorded pieces"
    assert verify(table.store, table.settings, TEST_MODEL, full=True).verdict == "match"


@pytest.mark.parametrize("status_code", [503, 500])
@pytest.mark.parametrize("batch", [1, 3])
def test_pooling_under_a_steady_error_rate_writes_whole_chunks_in_requests_of_at_most_the_batch_size(
    make_table, counting, status_code, batch
):
    table = make_table(ollama_url=counting.url, batch_size=batch, max_chars=50000)
    _insert(table, [(cid, f"chunk {cid}. " + LONG) for cid in range(1, 9)])
    counting.set_faults(fail_rate=0.15, fail_seed=7, fail_status=status_code)
    done = run_cli(
        table,
        "backfill",
        "--max-chars",
        "50000",
        "--batch-size",
        str(batch),
        env=cli_env(table, WIKI_EMBED_RETRIES="6"),
        timeout=120,
    )
    counting.reset_faults()
    assert done.returncode == 0, done.stdout + done.stderr
    assert max(counting.sizes) <= batch, f"a request of {max(counting.sizes)} inputs under --batch-size {batch}"
    assert counting.stats()["status_counts"].get(status_code, 0) > 0, "the error rate fired"
    _pooled_all_whole(table)
    assert collect_status(table.store, table.settings)["pooled"] == 8
    assert min(_piece_counts(table)) >= 10, "each chunk was pooled from 10+ pieces"


def _piece_counts(table) -> list[int]:
    rows = table.sql(
        f"SELECT p.pooling FROM {table.settings.state_schema}.embedding_provenance p WHERE p.table_name = %s",
        (table.settings.table,),
    )
    return [len(r[0]["pieces"]) if r[0] else 1 for r in rows]


def test_a_stop_in_the_middle_of_a_chunks_pieces_then_resume_writes_no_partial_pool(make_table, counting, tmp_path):
    table = make_table(ollama_url=counting.url, batch_size=2, max_chars=50000)
    _insert(table, [(cid, f"chunk {cid}. " + LONG) for cid in range(1, 7)])
    counting.set_faults(latency_ms=150, fail_rate=0.1, fail_seed=3)
    proc = start_cli(table, "backfill", "--max-chars", "50000", "--batch-size", "2", log=tmp_path / "stop.log")
    try:
        wait_until(lambda: len(counting.sizes) >= 4, 60, "the first chunk's pieces in flight")
        open(table.settings.stop_file, "w").close()
        assert proc.wait(60) == 0, (tmp_path / "stop.log").read_text()
    finally:
        kill9(proc)
    assert wrong_vectors(table, 50000) == []
    counting.reset_faults()

    os.unlink(table.settings.stop_file)
    done = run_cli(table, "resume")
    assert done.returncode == 0, done.stdout + done.stderr
    _pooled_all_whole(table)


def test_kill9_in_the_middle_of_a_chunks_pieces_under_errors_then_resume(make_table, counting, tmp_path):
    table = make_table(ollama_url=counting.url, batch_size=3, max_chars=50000)
    _insert(table, [(cid, f"chunk {cid}. " + LONG) for cid in range(1, 9)])
    counting.set_faults(latency_ms=60, fail_rate=0.2, fail_seed=11, fail_status=500)
    proc = start_cli(table, "backfill", "--max-chars", "50000", "--batch-size", "3", log=tmp_path / "k.log")
    try:
        wait_until(lambda: filled(table) >= 1 and len(counting.sizes) % 12 >= 3, 60, "mid-chunk after a write")
    finally:
        kill9(proc)
    assert wrong_vectors(table, 50000) == []
    counting.reset_faults()
    done = run_cli(table, "backfill", "--max-chars", "50000", "--batch-size", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert max(counting.sizes) <= 3
    _pooled_all_whole(table)


class _Proxy400:
    """A reverse proxy in front of the dev server that answers every embed request itself with `status` and an
    nginx-style HTML page (a body-size or header limit of its own), and forwards everything else."""

    def __init__(self, upstream: str, status: int, body: bytes = b"") -> None:
        import http.server
        import urllib.request

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else None
                if self.path.startswith(("/api/embed", "/v1/embeddings")):
                    page = (
                        proxy.body
                        or (
                            f"<html><head><title>{status} Bad Request</title></head><body><center><h1>{status} Bad "
                            "Request</h1></center><hr><center>nginx</center></body></html>"
                        ).encode()
                    )
                    self.send_response(status)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                req = urllib.request.Request(upstream + self.path, data=data, method=self.command)
                req.add_header("Content-Type", "application/json")
                try:
                    with urllib.request.urlopen(req, timeout=10) as resp:
                        code, out = resp.status, resp.read()
                except urllib.error.HTTPError as err:
                    code, out = err.code, err.read()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_HEAD = _answer

        self.body = body
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status_code", [400, 413, 422])
def test_a_proxys_own_4xx_at_the_start_probe_is_not_blamed_on_our_settings(make_table, ollama, status_code):
    proxy = _Proxy400(ollama.url, status_code)
    try:
        table = make_table(ollama_url=proxy.url)
        table.load([(1, "hello there"), (2, "another")])
        done = run_cli(table, "backfill", "--retries", "1")
    finally:
        proxy.close()
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    assert done.returncode == 3, f"exit {done.returncode}: {out}"
    assert "OLLAMA_MODEL" not in out and "setting" not in out, out
    assert filled(table) == 0


def test_the_model_servers_own_400_to_the_probe_is_still_a_bad_setting_naming_what_every_request_carries(
    make_table, ollama
):
    table = make_table()
    table.load([(1, "hello there")])
    ollama.set_faults(bad_request_marker="quick brown fox")  # Ollama's JSON {"error": ...} to the probe text
    done = run_cli(table, "backfill")
    assert done.returncode == 2 and "OLLAMA_MODEL" in done.stderr and "Traceback" not in done.stderr, done.stderr


def _made(table) -> tuple[int, int]:
    return table.store.made_by()


def test_reembed_cut_turns_cut_chunks_into_pooled_ones_and_a_second_run_right_after_has_nothing_to_do(
    make_table, counting
):
    table = make_table(ollama_url=counting.url, batch_size=4, max_chars=50000, long_text="cut")
    _insert(table, [(cid, f"chunk {cid}. " + LONG) for cid in range(1, 9)])
    assert table.backfill().context_cut == 8 and _made(table) == (8, 0)
    with pytest.raises(ModelChanged, match="must not mix"):
        table.backfill(long_text="pool")
    first = table.backfill(long_text="pool", reembed_cut=True)
    assert first.state == "completed" and first.refreshed == 8, first.message
    assert _made(table) == (0, 8)
    second = table.backfill(long_text="pool", reembed_cut=True)
    assert second.state == "completed" and second.refreshed == 0 and second.embedded == 0, "".join(second.summary())
    assert _made(table) == (0, 8) and wrong_vectors(table, 50000) == []


def test_a_conversion_cut_short_is_never_left_as_a_silent_mix(make_table, counting):
    """`--long-text pool --reembed-cut` stopped part way (here by --max-chunks) leaves cut and pooled vectors in one
    column; the next plain run must finish the conversion or be refused, never accept the mix as it is."""
    table = make_table(ollama_url=counting.url, batch_size=2, max_chars=50000, long_text="cut")
    _insert(table, [(cid, f"chunk {cid}. " + LONG) for cid in range(1, 9)])
    table.backfill()
    part = table.backfill(long_text="pool", reembed_cut=True, max_chunks=2)
    cut, pooled = _made(table)
    assert pooled > 0 and cut > 0, (part.state, part.refreshed, cut, pooled)
    with pytest.raises(ModelChanged, match="left unfinished"):
        table.backfill(long_text="pool")
    with pytest.raises(ModelChanged, match="left unfinished"):
        table.backfill(long_text="cut")
    assert _made(table) == (cut, pooled), "nothing written by the refused runs"
    done = table.backfill(long_text="pool", reembed_cut=True)
    assert done.state == "completed" and _made(table) == (0, 8) and wrong_vectors(table, 50000) == []


_LEASED_RUN = """
import os, sys
from wiki_embeddings.core import spread
from wiki_embeddings.core.backfill import Backfill
from wiki_embeddings.core.factories import build_client, build_store
from wiki_embeddings.settings import from_env
s = from_env(dict(os.environ)).replace(batch_size=4)
urls = s.ollama_url.split(",")
with build_store(s, s.database_url) as store:
    with spread.server_share(store, urls, 1, log=print, stop_requested=lambda: False) as held:
        mine = s.replace(ollama_url=urls[held[0]])
        report = Backfill(mine, store, build_client(mine, mine.ollama_model), log=print).run()
        print("ended", report.state, flush=True)
"""


class LeaseStillHeld(AssertionError):
    """What the test raises when the lease stays held (a setup that went wrong fails differently)."""


def test_a_released_frozen_run_gives_back_its_model_server_lease(make_table, ollama, tmp_path):
    import signal
    import subprocess
    import sys

    second = OllamaServer(backend="hash", models=[f"{TEST_MODEL}:{TEST_DIM}"]).start()
    table = make_table(batch_size=4)
    table.load([(i, f"paragraph {i} of a leased run") for i in range(1, 41)])
    ollama.set_faults(latency_ms=400, slots=0)
    second.set_faults(latency_ms=400, slots=0)
    urls = [ollama.url, second.url]
    env = cli_env(table, OLLAMA_URL=",".join(urls))
    log = open(tmp_path / "leased.log", "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([sys.executable, "-c", _LEASED_RUN], env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        try:
            wait_until(lambda: filled(table) >= 4 and any(table.store.leased(urls)), 30, "a leased run mid-way")
        except AssertionError as exc:
            raise RuntimeError((tmp_path / "leased.log").read_text()) from exc
        os.kill(proc.pid, signal.SIGSTOP)
        run_id = int(table.sql(f"SELECT max(run_id) FROM {table.settings.state_schema}.runs")[0][0])
        table.sql(
            f"UPDATE {table.settings.state_schema}.runs SET heartbeat_at = now() - interval '100 seconds'"
            " WHERE run_id = %s",
            (run_id,),
        )
        released = run_cli(table, "runs", "release", str(run_id))
        if released.returncode != 0:
            raise RuntimeError(released.stdout + released.stderr)
        if table.store.leased(urls) != [False, False]:
            raise LeaseStillHeld("the released run's model-server lease is still held")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        second.stop()


def _everything_a_run_left(table, env: dict[str, str]) -> str:
    """Every text the tool shows or stores about the table: its commands' output, its bookkeeping rows, the log."""
    out = []
    for args in (["status"], ["status", "--json"], ["runs", "--json"], ["failures", "--json"], ["config"]):
        done = run_cli(table, *args, env=env)
        out += [done.stdout, done.stderr]
    schema = table.settings.state_schema
    for (name,) in table.sql("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)):
        out += [str(r) for r in table.sql(f'SELECT t::text FROM "{schema}"."{name}" t')]
    log = Path(table.settings.failure_log)
    out.append(log.read_text() if log.exists() else "")
    return "\n".join(out)


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_no_password_or_key_in_anything_a_run_leaves(make_table, ollama, tmp_path, api):
    import dagster as dg

    from wiki_embeddings.defs.assets import embedding_coverage, wiki_chunk_embeddings
    from wiki_embeddings.defs.checks import missing_is_zero
    from wiki_embeddings_tests.integration.dagster_support import range_config, resources_for

    secrets = ["DBs3cretPW", "OLLs3cretPW", "KEYs3cretXYZ"]
    table = make_table(batch_size=4)
    db_url = table.url.replace("postgres:@", "postgres:DBs3cretPW@", 1)
    assert db_url != table.url
    ollama_url = ollama.url.replace("http://", "http://ops:OLLs3cretPW@", 1)
    table.load([(i, f"paragraph {i}" + (" POISON" if i == 3 else "")) for i in range(1, 13)])
    ollama.set_faults(bad_request_marker="POISON", fail_every_n=4)
    env = cli_env(
        table, DATABASE_URL=db_url, OLLAMA_URL=ollama_url, WIKI_EMBED_API=api, WIKI_EMBED_API_KEY="KEYs3cretXYZ"
    )
    done = run_cli(table, "backfill", "--batch-size", "4", "--report-every", "1", env=env)
    assert done.returncode == 0 and "failed=1" in done.stdout, done.stdout + done.stderr
    text = done.stdout + done.stderr + _everything_a_run_left(table, env)
    table.load([(100, "a chunk for dagster POISON"), (101, "another for dagster")])
    resources = resources_for(table, ollama)
    resources["database"] = resources["database"].model_copy(update={"database_url": db_url})
    resources["ollama"] = resources["ollama"].model_copy(
        update={"url": ollama_url, "api": api, "api_key": "KEYs3cretXYZ"}
    )
    instance = dg.DagsterInstance.ephemeral()
    try:
        ran = dg.materialize(
            [wiki_chunk_embeddings],
            partition_key="00000000-00099999",
            resources=resources,
            run_config=range_config(table),
            instance=instance,
            raise_on_error=False,
        )
        cov = dg.materialize(
            [embedding_coverage, missing_is_zero], resources=resources, instance=instance, raise_on_error=False
        )
        for result in (ran, cov):
            for event in result.all_events:
                text += "\n" + repr(event)
        for record in instance.get_event_records(dg.EventRecordsFilter(dg.DagsterEventType.ASSET_MATERIALIZATION)):
            text += "\n" + repr(record)
    finally:
        instance.dispose()
    text += _everything_a_run_left(table, env)
    assert "***" in text or "ops" in text, "the masked URL is shown somewhere"
    leaked = [s for s in secrets if s in text]
    assert not leaked, [text[max(0, text.index(s) - 200) : text.index(s) + 50] for s in leaked]
