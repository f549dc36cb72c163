"""The operators' commands: the runbook's scripts and flags, status output, stop/resume, failures, config."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wiki_embeddings import __version__
from wiki_embeddings.cli import main
from wiki_embeddings.core.failure_log import read_entries

REPO = Path(__file__).resolve().parents[2]


def run_cli(table, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    out = io.StringIO()
    base = [
        "--database-url",
        table.url,
        "--table",
        table.settings.table,
        "--ollama-url",
        table.settings.ollama_url,
    ]
    command, rest = args[0], list(args[1:])
    old = dict(os.environ)
    os.environ["EMBED_STOP_FILE"] = table.settings.stop_file
    os.environ.update(env or {})
    try:
        code = main([command, *base, *rest], out=out)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return code, out.getvalue()


def status_of(table) -> dict[str, str]:
    code, text = run_cli(table, "status")
    assert code == 0
    return dict(line.split("=", 1) for line in text.strip().splitlines())


def test_the_runbook_bootstrap_flags_fill_the_table_and_status_prints_key_value_lines(make_table):
    table = make_table()
    table.load_wiki(150)
    log = table.tmp / "wiki-embed-failures-bootstrap.jsonl"
    code, out = run_cli(
        table,
        "backfill",
        "--batch-size", "64", "--report-every", "1", "--timeout-sec", "120", "--sleep-ms", "0",
        "--max-chars", "2000", "--failure-log", str(log), "--model", "all-minilm",
    )  # fmt: skip
    assert code == 0, out
    assert "progress: 64/150 embedded" in out and "backfill completed" in out
    status = status_of(table)
    assert status["missing"] == "0" and status["coverage_pct"] == "100.00" and status["total"] == "150"
    assert status["model"] == "all-minilm" and status["dimensions"] == "384"
    assert status["last_run_state"] == "completed" and status["last_run_embedded"] == "150"
    assert not log.exists(), "no failure, no failure log lines"


def test_the_maintenance_command_uses_the_model_recorded_by_the_bootstrap(make_table):
    table = make_table()
    table.load([(i, f"text {i}") for i in range(1, 31)])
    assert run_cli(table, "backfill", "--model", "all-minilm", "--max-chunks", "10")[0] == 0
    # The runbook's maintenance command names no model: the recorded one is used, not nomic-embed-text (768-d).
    code, out = run_cli(
        table,
        "backfill",
        "--batch-size", "32", "--max-chunks", "20000", "--report-every", "20", "--timeout-sec", "120",
        "--sleep-ms", "100", "--failure-log", str(table.tmp / "maintenance.jsonl"),
    )  # fmt: skip
    assert code == 0, out
    assert "with model 'all-minilm'" in out
    assert status_of(table)["missing"] == "0"


def test_status_json_and_check(make_table):
    table = make_table()
    table.load([(1, "one"), (2, "two")])
    code, text = run_cli(table, "status", "--json")
    data = json.loads(text)
    assert code == 0 and data["missing"] == 2 and data["coverage_pct"] == "0.00"
    assert run_cli(table, "status", "--check")[0] == 1
    run_cli(table, "backfill", "--model", "all-minilm")
    assert run_cli(table, "status", "--check")[0] == 0


def test_stop_then_resume_continues_with_the_last_runs_options(make_table):
    table = make_table()
    table.load([(i, f"text {i}") for i in range(1, 41)])
    code, out = run_cli(table, "stop")
    assert code == 0 and Path(table.settings.stop_file).exists()
    assert status_of(table)["stop_requested"] == "true"
    code, out = run_cli(table, "backfill", "--model", "all-minilm", "--batch-size", "7")
    assert code == 0 and "stopped on request" in out
    assert status_of(table)["missing"] == "40"
    code, out = run_cli(table, "resume")
    assert code == 0, out
    assert "resuming with the options of run" in out and "batch 7" in out
    status = status_of(table)
    assert status["missing"] == "0" and status["stop_requested"] == "false"
    assert not Path(table.settings.stop_file).exists()


def test_failures_lists_and_clears_and_retry_failed_reruns_them(make_table, ollama):
    table = make_table()
    table.load([(1, "fine"), (2, "BAD one"), (3, "BAD two")])
    ollama.set_faults(bad_request_marker="BAD")
    log = table.tmp / "f.jsonl"
    assert run_cli(table, "backfill", "--model", "all-minilm", "--failure-log", str(log))[0] == 0
    assert [e["chunk_id"] for e in read_entries(log)] == [2, 3]
    code, out = run_cli(table, "failures")
    assert code == 0 and out.count("http_400") == 2
    assert run_cli(table, "failures", "clear", "3")[0] == 0
    assert json.loads(run_cli(table, "failures", "--json")[1])[0]["chunk_id"] == 2
    ollama.reset_faults()
    code, out = run_cli(table, "backfill", "--model", "all-minilm", "--retry-failed")
    assert code == 0 and "embedded=1" in out
    assert status_of(table)["missing"] == "1", "chunk 3 was forgotten, so --retry-failed left it"


def test_dry_run_says_what_would_be_embedded_and_writes_nothing(make_table, ollama):
    table = make_table()
    table.load([(i, f"text {i}") for i in range(1, 11)])
    before = ollama.stats()["embed_requests"]
    code, out = run_cli(table, "backfill", "--dry-run", "--max-chunks", "4", "--model", "all-minilm")
    assert code == 0 and "would embed 4 of 10 missing chunks" in out and "(ids 1..10)" in out
    assert "pre-flight: model context" in out, "the pre-flight estimate is part of a dry run"
    assert ollama.stats()["embed_requests"] == before and status_of(table)["missing"] == "10"


def test_an_unreachable_ollama_is_a_one_line_error_naming_OLLAMA_URL_and_nothing_is_written(make_table, capsys):
    table = make_table(ollama_url="http://127.0.0.1:9")
    table.load([(1, "text")])
    fast = {"WIKI_EMBED_RETRIES": "1", "WIKI_EMBED_BACKOFF_BASE_SEC": "0.01"}
    code, _ = run_cli(table, "backfill", "--ollama-url", "http://127.0.0.1:9", "--model", "all-minilm", env=fast)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and "OLLAMA_URL" in err[0] and "127.0.0.1:9" in err[0]
    assert status_of(table)["missing"] == "1"


def test_an_unknown_model_tells_the_operator_to_pull_it(make_table, capsys):
    table = make_table()
    table.load([(1, "text")])
    code, _ = run_cli(table, "backfill", "--model", "no-such-model")
    assert code != 0
    assert "ollama pull no-such-model" in capsys.readouterr().err


def test_config_masks_the_database_password(make_table):
    table = make_table()
    out = io.StringIO()
    code = main(["config", "--database-url", "postgresql://app:s3cret-pw@db.internal/wiki"], out=out)
    assert code == 0
    assert "s3cret-pw" not in out.getvalue() and "app:***@db.internal" in out.getvalue()
    assert table  # the fixture's database stays untouched


def test_import_is_idempotent_and_creates_the_table_with_the_asked_dimension(pg_url, tmp_path):
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS imp CASCADE")
        conn.execute("CREATE SCHEMA imp")
    args = ["import", "--database-url", pg_url, "--table", "imp.wiki_chunks", "--limit", "200", "--dimensions", "16"]
    out = io.StringIO()
    assert main(args, out=out) == 0
    assert "created imp.wiki_chunks with embedding vector(16)" in out.getvalue()
    assert "imported 200 new chunks" in out.getvalue()
    out = io.StringIO()
    assert main(args, out=out) == 0
    assert "imported 0 new chunks (200 in imp.wiki_chunks)" in out.getvalue()


def test_hostile_table_names_are_refused(make_table, capsys):
    table = make_table()
    code, _ = run_cli(table, "status", "--table", 'wiki_chunks"; DROP TABLE x; --')
    assert code == 2 and "forbidden characters" in capsys.readouterr().err


def test_the_runbook_scripts_run_the_cli(make_table):
    table = make_table()
    table.load([(1, "text")])
    env = {
        **os.environ,
        "DATABASE_URL": table.url,
        "WIKI_EMBED_TABLE": table.settings.table,
        "OLLAMA_URL": table.settings.ollama_url,
        "EMBED_STOP_FILE": table.settings.stop_file,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    version = subprocess.run(
        [str(Path(sys.executable).parent / "wiki-embeddings"), "--version"], capture_output=True, text=True
    )
    assert version.stdout.strip() == f"wiki-embeddings {__version__}"
    for script, args in [
        ("wiki_embeddings_stop.sh", []),
        ("wiki_embeddings_resume.sh", ["--model", "all-minilm"]),
        ("wiki_embeddings_status.sh", ["--check"]),
    ]:
        proc = subprocess.run(["bash", str(REPO / "scripts" / script), *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (script, proc.stdout, proc.stderr)
    assert "missing=0" in proc.stdout


@pytest.mark.parametrize("flag", ["--batch-size", "--report-every", "--timeout-sec", "--max-chars"])
def test_nonsense_flag_values_are_refused(make_table, capsys, flag):
    table = make_table()
    assert run_cli(table, "backfill", flag, "0")[0] == 2
    assert flag.lstrip("-") in capsys.readouterr().err
