"""Real Ollama's limits, against the dev server in its default (current Ollama) mode: a chunk is never failed for
being long, the cut is recorded, keep_alive / num_ctx / dimensions are sent, answers are bounded, URLs masked."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from wiki_embeddings.cli import main
from wiki_embeddings.core.status import collect_status
from wiki_embeddings.devtools.ollama_server import ModelSpec, OllamaServer, hash_vector
from wiki_embeddings_tests.integration.conftest import TEST_MODEL
from wiki_embeddings_tests.integration.test_faults_support import cli_env, wrong_vectors


@pytest.fixture(scope="module")
def small_context() -> Iterator[OllamaServer]:
    """A server whose model has a 128-token window, as `/api/show` says and as it enforces (400 over it)."""
    with OllamaServer(backend="hash", models=[ModelSpec("all-minilm:latest", 384, context_length=128)]) as srv:
        yield srv


def provenance(table) -> list[tuple[int, int, bool, bool, str]]:
    return table.sql(
        f"SELECT p.chunk_id, p.chars_sent, p.context_cut, p.server_truncated, p.text_md5 = md5(t.content)"
        f" FROM {table.settings.state_schema}.embedding_provenance p JOIN {table.settings.table} t ON t.id = p.chunk_id"
        " WHERE p.table_name = %s ORDER BY 1",
        (table.settings.table,),
    )


def test_korean_and_english_wiki_chunks_are_never_failed_for_being_long(make_table, small_context):
    """The runbook's bootstrap flags (batch 64, --max-chars 2000) against a 128-token model: everything embedded."""
    lines: list[str] = []
    table = make_table(long_text="cut", ollama_url=small_context.url, batch_size=64, max_chars=2000)
    chunks = table.load_wiki(400)
    s = table.settings
    from wiki_embeddings.core.backfill import Backfill
    from wiki_embeddings.core.factories import build_client, build_store

    with build_store(s, table.url) as store:
        report = Backfill(s, store, build_client(s, TEST_MODEL), log=lines.append).run()
    assert report.state == "completed" and report.failed == 0, report.message
    status = collect_status(table.store, s)
    assert status["missing"] == 0 and status["failed"] == 0 and status["quarantined"] == 0
    rows = provenance(table)
    cut = [r for r in rows if r[2]]
    assert len(rows) == len(chunks) and len(cut) == status["cut_for_context"] == report.context_cut > 0
    assert all(r[4] for r in rows), "text_md5 stays the md5 of the whole stored text"
    by_id = {c.id: c.content for c in chunks}
    assert all(r[1] < len(by_id[r[0]][:2000]) for r in cut) and all(not r[2] for r in rows if r not in cut)
    assert wrong_vectors(table, 2000) == [], "each vector is the server's answer for exactly the characters recorded"
    refused = small_context.stats()["status_counts"].get(400, 0)
    assert refused <= len(chunks) * 0.25, f"refusals stay rare once the window is known: {refused}"
    assert any(line.startswith("pre-flight: model context 128 tokens") for line in lines), lines[:3]
    assert any("cut_for_context=" in line for line in lines)


def test_a_server_that_takes_less_than_it_says_is_learned_from_its_refusals(make_table, ollama):
    """`/api/show` says 512 tokens, the server refuses past 100 (OLLAMA_CONTEXT_LENGTH set lower, say)."""
    table = make_table(long_text="cut", batch_size=32)
    chunks = table.load_wiki(120)
    ollama.set_faults(max_input_tokens=100)
    report = table.backfill()
    assert report.failed == 0, table.store.list_failures()[:3]
    assert report.state == "completed" and report.embedded == len(chunks)
    # The first refused chunk teaches the window (its search is the long one); after it texts are cut to fit.
    assert 0 < report.fit_searches <= 3, report.fit_searches
    assert collect_status(table.store, table.settings)["cut_for_context"] == report.context_cut > 0
    assert wrong_vectors(table) == []


def test_a_real_input_error_is_still_isolated_as_before(make_table, ollama):
    table = make_table(batch_size=8)
    table.load([(i, f"text {i}" + (" POISON" if i == 5 else "")) for i in range(1, 17)])
    ollama.set_faults(bad_request_marker="POISON")
    report = table.backfill()
    assert report.failed_ids == [5] and report.embedded == 15
    assert table.store.list_failures()[0]["error"] == "http_400"


def test_a_server_that_cuts_silently_below_the_window_it_describes_is_found_out_before_the_first_batch(
    make_table, ollama
):
    """`/api/show` says 512 tokens, the server cuts everything past 60 silently (Ollama before 0.13.5 past num_ctx,
    0.30+ past its physical batch): the run's window probe sees it, every text is cut by us to fit, and every stored
    vector is of exactly the characters its provenance records (issue 20: 71 of 79 cut chunks went unrecorded)."""
    lines: list[str] = []
    table = make_table(long_text="cut", batch_size=16)
    chunks = table.load_wiki(60)
    ollama.set_faults(max_input_tokens=60, silent_truncate=True, ignore_truncate=True)
    s = table.settings
    from wiki_embeddings.core.backfill import Backfill
    from wiki_embeddings.core.factories import build_client, build_store

    with build_store(s, table.url) as store:
        report = Backfill(s, store, build_client(s, TEST_MODEL), log=lines.append).run()
    assert report.state == "completed" and report.failed == 0 and report.embedded == len(chunks)
    assert report.context_tokens is not None and report.context_tokens <= 60
    assert any("window probe" in line and "cuts silently" in line for line in lines), lines[:5]
    assert wrong_vectors(table) == [], "no stored vector comes from less text than its provenance records"
    status = collect_status(table.store, s)
    assert status["server_truncated"] == report.server_truncated == 0, "the server cut nothing that was stored"
    assert status["cut_for_context"] == report.context_cut > 0


def test_a_server_that_starts_cutting_silently_mid_run_is_found_out_text_by_text(make_table, ollama):
    """The probe at the start saw a whole window; then the server (replaced behind a proxy, say) cuts silently at 60
    tokens. Suspect batches are counted text by text, with no cap: each cut chunk is found, the window learned, the
    chunk embedded again from our own cut, recorded server_truncated; no vector of less text than recorded."""
    table = make_table(long_text="cut", batch_size=16)
    chunks = table.load_wiki(160)
    ollama.set_faults(latency_ms=20)
    start = ollama.stats()["requests"]

    def cut_after_a_while() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and ollama.stats()["requests"] < start + 6:
            time.sleep(0.005)
        ollama.set_faults(latency_ms=20, max_input_tokens=60, silent_truncate=True, ignore_truncate=True)

    switch = threading.Thread(target=cut_after_a_while, daemon=True)
    switch.start()
    report = table.backfill()
    switch.join()
    assert report.state == "completed" and report.failed == 0 and report.embedded == len(chunks)
    assert report.server_truncated > 0 and report.context_tokens is not None
    assert wrong_vectors(table) == [], "every cut chunk was embedded again from the characters recorded"
    flagged = [r for r in provenance(table) if r[3]]
    assert len(flagged) == collect_status(table.store, table.settings)["server_truncated"] == report.server_truncated
    assert all(r[2] for r in flagged), "a chunk the server cut is stored from our own cut"


def test_vectors_written_before_a_silent_cutter_was_found_are_counted_and_re_embedded_by_reembed_cut(
    make_table, ollama, monkeypatch
):
    """An older version of this tool (no window probe, no text-by-text counts) stored vectors of texts the server
    cut silently. Once a run finds the server cutting at 60 tokens, `status` counts the vectors written before that
    from texts long enough to have been cut (`suspect_truncated`), and `--reembed-cut` re-embeds them from our own
    cut: afterwards every vector is of exactly its recorded characters."""
    table = make_table(long_text="cut", batch_size=16)
    chunks = table.load_wiki(80)
    ollama.set_faults(max_input_tokens=60, silent_truncate=True, ignore_truncate=True)
    from wiki_embeddings.core.backfill.worker import EmbedWorker

    async def no_probe(self: EmbedWorker) -> None:
        return None

    async def no_check(self: EmbedWorker, *_args: object) -> None:
        return None

    with monkeypatch.context() as older_version:  # neither the probe nor the text-by-text counts
        older_version.setattr(EmbedWorker, "probe_window", no_probe)
        older_version.setattr(EmbedWorker, "_check_truncation", no_check)
        first = table.backfill()
    assert first.state == "completed" and first.embedded == len(chunks)
    damaged = wrong_vectors(table)
    assert damaged, "the old damage: vectors of less text than recorded"
    found = table.backfill(reembed_cut=True)
    assert found.state == "completed"
    status = collect_status(table.store, table.settings)
    assert wrong_vectors(table) == [], "--reembed-cut repaired every vector of less text than recorded"
    assert status["suspect_truncated"] == 0 and found.refreshed >= len(damaged)


def test_maintenance_re_embeds_cut_chunks_on_request_after_num_ctx_was_raised(make_table):
    spec = ModelSpec("all-minilm:latest", 384, context_length=1024, num_ctx=128)
    with OllamaServer(backend="hash", models=[spec]) as server:
        table = make_table(long_text="cut", ollama_url=server.url, batch_size=32)
        table.load_wiki(80)
        first = table.backfill()
        cut_before = collect_status(table.store, table.settings)["cut_for_context"]
        assert first.failed == 0 and cut_before > 0
        again = table.backfill(num_ctx=1024, reembed_cut=True)  # never refused: max-chars / num_ctx may change
        assert again.state == "completed" and again.refreshed >= cut_before
        assert collect_status(table.store, table.settings)["cut_for_context"] < cut_before
        assert server.stats()["last_options"] == {"num_ctx": 1024}
        assert wrong_vectors(table) == []


def test_keep_alive_is_sent_with_every_request(make_table, ollama):
    table = make_table()
    table.load([(1, "one"), (2, "two")])
    table.backfill(keep_alive="45m")
    assert ollama.stats()["last_keep_alive"] == "45m"
    table.load([(3, "three")])
    table.backfill(keep_alive="-1")
    assert ollama.stats()["last_keep_alive"] == -1, "a number of seconds is sent as a number"


def test_a_cold_model_load_is_not_counted_as_a_timeout(make_table, ollama):
    table = make_table(timeout_sec=0.5, retries=0)
    table.load([(1, "one"), (2, "two")])
    ollama.set_faults(load_ms=1500)  # the first request pays 1.5 s of model load, three times --timeout-sec
    report = table.backfill(load_timeout_sec=10)
    assert report.state == "completed" and report.embedded == 2


def test_a_narrower_column_is_filled_with_dimensions_only_when_asked(make_table, ollama):
    table = make_table(dim=8, ollama_model="nomic-embed-text")
    table.load([(1, "matryoshka"), (2, "doll")])
    from wiki_embeddings.core.backfill import DimensionMismatch

    with pytest.raises(DimensionMismatch, match=r"768-dimensional vectors but .* vector\(8\).*--request-dimensions"):
        table.backfill()
    report = table.backfill(request_dimensions=True)
    assert report.state == "completed" and report.embedded == 2
    assert ollama.stats()["last_dimensions"] == 8
    full = hash_vector("nomic-embed-text", "doll", 768)[:8]
    stored = table.store.read_vectors([2])[2]
    assert np.allclose(stored, full / np.linalg.norm(full), atol=1e-5)


@pytest.mark.parametrize("fault", [{"endless_body": True}, {"oversize_body_mb": 96.0}], ids=["endless", "oversize"])
def test_an_answer_larger_than_a_batch_can_be_is_cut_off_and_the_run_stops_cleanly(make_table, ollama, fault):
    """Measured on a `wiki-embeddings backfill` process of its own (the test process hosts the server); VmHWM, the
    peak resident size since exec (ru_maxrss would count the forked copy of the big test process)."""
    table = make_table(batch_size=4)
    table.load([(i, f"text {i}") for i in range(1, 9)])
    table.backfill(max_chunks=4)  # the column's model is recorded; 4 chunks stay missing
    ollama.set_faults(**fault)
    measured = (
        "import sys\nfrom wiki_embeddings.cli import main\ncode = main(sys.argv[1:])\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "print(f'peak_kb={hwm}', file=sys.stderr)\nsys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", measured, "backfill", "--batch-size", "4", "--timeout-sec", "20"],
        env=cli_env(table),
        capture_output=True,
        text=True,
        timeout=120,
    )
    peak_mb = int(done.stderr.rsplit("peak_kb=", 1)[1]) / 1024
    assert done.returncode == 3, done.stdout + done.stderr
    assert "exceeded" in done.stderr or "larger than a batch" in done.stderr, done.stderr
    assert peak_mb < 200, f"the client's memory stays bounded whatever the server sends ({peak_mb:.0f} MB)"
    assert table.store.list_failures() == [] and table.status()["missing"] == 4


def cli(table, *args: str, ollama_url: str) -> tuple[int, str]:
    out = io.StringIO()
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([args[0], "--database-url", table.url, "--table", table.settings.table, *args[1:]], out=out)
    return code, out.getvalue() + err.getvalue()


def test_credentials_in_ollama_url_are_masked_in_every_command(make_table, ollama, monkeypatch):
    table = make_table()
    table.load([(1, "one"), (2, "two")])
    secret_url = ollama.url.replace("http://", "http://operator:s3cr3t-pw@")
    monkeypatch.setenv("OLLAMA_URL", secret_url)
    monkeypatch.setenv("EMBED_STOP_FILE", table.settings.stop_file)
    monkeypatch.setenv("OLLAMA_MODEL", TEST_MODEL)
    outputs = []
    for args in (
        ("backfill", "--dry-run"),
        ("backfill", "--with-ollama"),
        ("status",),
        ("config",),
        ("stop",),
        ("resume",),
    ):
        code, text = cli(table, *args, ollama_url=secret_url)
        assert code == 0, text
        outputs.append(text)
    joined = "\n".join(outputs)
    assert "s3cr3t-pw" not in joined and "operator:***@" in joined
    saved = table.sql("SELECT options::text FROM wiki_embeddings.runs WHERE table_name = %s", (table.settings.table,))
    assert saved and all("s3cr3t-pw" not in row[0] for row in saved), "never written to the bookkeeping either"


@pytest.mark.parametrize(
    "url, says",
    [("127.0.0.1:11434", "needs a scheme"), ("http://ollama:99999", "not a valid URL"), ("http://:80", "no host")],
)
def test_a_malformed_ollama_url_is_a_clear_configuration_error(make_table, url, says, capsys):
    table = make_table()
    code, text = cli(table, "backfill", "--ollama-url", url, ollama_url=url)
    assert code == 2 and says in text and "Traceback" not in text, text
