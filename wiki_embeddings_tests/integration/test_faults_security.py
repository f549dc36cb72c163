"""Nobody let in: identifiers only through `psycopg.sql`, no password in any output, no write through a planted link."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from wiki_embeddings.core import db as db_package
from wiki_embeddings.core.backfill import Backfill
from wiki_embeddings.core.db import StoreError, TableRef
from wiki_embeddings.core.factories import build_client, build_store
from wiki_embeddings.core.failure_log import read_entries
from wiki_embeddings.settings import from_env
from wiki_embeddings_tests.integration.conftest import TEST_DIM, TEST_MODEL
from wiki_embeddings_tests.integration.test_faults_support import (
    cli_env,
    dagster_materialize,
    filled,
    run_cli,
    wait_until,
    wrong_vectors,
)

SECRET = "S3cret-Pa55word"


# ------------------------------------------------------------------------------------------ SQL building


def _sql_argument_nodes(tree: ast.AST):
    """The first argument of every `sql.SQL(...)`, `.execute(...)` and `.executemany(...)` call."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("SQL", "execute", "executemany"):
            yield node.lineno, node.args[0]


def _module_string_constants(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Constant, ast.List)):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


# Non-literal SQL text allowed in store.py, and why.
ALLOWED_SQL_NAMES = {
    "statement": "a migration from the module constant MIGRATIONS, composed with .format(s=Identifier)",
    "definition": "pg_get_indexdef() text produced by PostgreSQL itself for an index it had",
    "stmt": "a psycopg.sql.Composed built from sql.SQL(literal).format(...) (or its as_bytes(), composed once)",
    "query": "a psycopg.sql.Composed built from sql.SQL(literal).format(...) (or its as_bytes(), composed once)",
}


def _sql_offenders(source: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    constants = _module_string_constants(tree)
    offenders = []
    for lineno, arg in _sql_argument_nodes(tree):
        for node in ast.walk(arg):
            if isinstance(node, ast.JoinedStr):
                offenders.append((lineno, "f-string"))
            elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
                offenders.append((lineno, "% or + on SQL text"))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "format"
                and isinstance(node.func.value, ast.Constant)
            ):
                offenders.append((lineno, "str.format on SQL text"))
        if isinstance(arg, ast.Name) and arg.id not in ALLOWED_SQL_NAMES and arg.id not in constants:
            offenders.append((lineno, f"SQL text from variable {arg.id!r}"))
    return offenders


def test_store_builds_sql_only_from_literals_and_psycopg_sql_composition():
    """No f-string, `%`, `+` or `str.format` ever makes SQL text in core/db: identifiers go through sql.Identifier."""
    modules = sorted(Path(db_package.__file__).parent.glob("*.py"))
    assert len(modules) >= 10
    assert {m.name: _sql_offenders(m.read_text()) for m in modules} == {m.name: [] for m in modules}


def test_the_sql_check_catches_each_unsafe_spelling():
    bad = (
        "conn.execute(f'SELECT * FROM {table}')\n"
        "conn.execute('SELECT * FROM %s' % table)\n"
        "conn.execute('SELECT * FROM ' + table)\n"
        "sql.SQL('SELECT * FROM {}'.format(table))\n"
        "cur.executemany(text, rows)\n"
    )
    assert [line for line, _ in _sql_offenders(bad)] == [1, 2, 3, 4, 5]


HOSTILE_NAMES = ['wiki_chunks"; DROP TABLE x; --', "wiki'chunks", "wiki;chunks", "wiki\\chunks", "wiki\x00",
                 "tab\there", "x" * 64, ""]  # fmt: skip
IDENTIFIER_SETTINGS = ["table", "schema", "id_column", "text_column", "embedding_column", "state_schema"]


@pytest.mark.parametrize(
    ("what", "name"),
    # An empty schema part ('.wiki_chunks') means public, as documented: not a hostile name.
    [(w, n) for w in IDENTIFIER_SETTINGS for n in HOSTILE_NAMES if (w, n) != ("schema", "")],
)
def test_hostile_identifiers_are_refused_everywhere(pg_url, what, name):
    parts = {"table": "public.wiki_chunks", "id_column": "id", "text_column": "content", "embedding_column": "emb"}
    with pytest.raises(StoreError, match="forbidden characters|1 to 63 bytes"):
        if what == "state_schema":
            build_store(from_env({}, state_schema=name, database_url=pg_url), pg_url)
        elif what == "schema":
            TableRef.parse(f"{name}.wiki_chunks")
        else:
            TableRef.parse(**{**parts, what: name if what != "table" else f"public.{name}"})


def test_legal_but_odd_names_work_quoted(pg_url, ollama, tmp_path):
    """Spaces, capitals, a hyphen, non-ASCII: legal PostgreSQL names, always quoted, never split or folded."""
    schema, table_name = "Wiki Data-2", "Wiki Chunks"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    settings = from_env(
        {},
        database_url=pg_url,
        ollama_url=ollama.url,
        ollama_model=TEST_MODEL,
        table=f"{schema}.{table_name}",
        id_column="Chunk ID",
        text_column="본문 텍스트",
        embedding_column="Embedding Vec",
        state_schema="Embed State",
        stop_file=str(tmp_path / "stop"),
        failure_log=str(tmp_path / "f.jsonl"),
        batch_size=4,
    )
    with build_store(settings, pg_url) as store:
        store.migrate()
        store.ensure_table(TEST_DIM)
        store.insert_chunks((i, "t", 0, f"odd {i}") for i in range(1, 11))
        report = Backfill(settings, store, build_client(settings, TEST_MODEL), log=lambda _m: None).run()
        assert report.state == "completed" and report.embedded == 10
        assert store.status()["missing"] == 0 and store.last_run()["state"] == "completed"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema IN (%s, %s)",
            (schema, "Embed State"),
        ).fetchall()
    assert (schema, table_name) in tables and ("Embed State", "runs") in tables


# ------------------------------------------------------------------------------------------ passwords


def _with_password(url: str) -> str:
    assert "postgres:@" in url, url
    return url.replace("postgres:@", f"postgres:{SECRET}@", 1)


def test_the_database_password_never_appears_in_output_logs_status_or_bookkeeping(make_table, ollama, pg_url):
    table = make_table()
    table.load([(i, "POISON here" if i == 3 else f"text {i}") for i in range(1, 21)])
    ollama.set_faults(error_marker="POISON")
    secret_url = _with_password(table.url)  # trust auth on the socket: any password is accepted, never checked
    env = cli_env(table, DATABASE_URL=secret_url)
    outputs = []
    for args in (
        ["backfill", "--report-every", "1"],
        ["status"],
        ["status", "--json"],
        ["failures"],
        ["failures", "--json"],
        ["config"],
        ["stop"],
        ["resume", "--no-run"],
        ["backfill", "--database-url", secret_url.split("?")[0] + "?host=/nonexistent-socket-dir"],
        ["status", "--database-url", "postgresql://u:" + SECRET + "@[broken/db"],
        ["status", "--database-url", f"postgresql://u@/db?host=/nonexistent&password={SECRET}"],
    ):
        done = run_cli(table, *args, env=env)
        outputs.append((args[0], done.returncode, done.stdout + done.stderr))
    assert [code for _, code, _ in outputs[:8]] == [0] * 8, outputs
    # A database that does not answer is 5, a URL that cannot be parsed a bad setting, 2 (README "Exit codes").
    assert [code for _, code, _ in outputs[8:]] == [5, 2, 5], outputs[8:]
    for command, _, text in outputs:
        assert SECRET not in text, (command, text)
        assert "Traceback" not in text, (command, text)
    assert "***" in outputs[5][2], "config shows the password masked"
    assert read_entries(table.settings.failure_log), "the failure log was written"
    assert SECRET not in Path(table.settings.failure_log).read_text()
    dumped = table.sql(
        "SELECT (SELECT coalesce(json_agg(r)::text, '') FROM {s}.runs r)"
        " || (SELECT coalesce(json_agg(f)::text, '') FROM {s}.failures f)"
        " || (SELECT coalesce(json_agg(t)::text, '') FROM {s}.table_state t)".replace("{s}", table.store.state_schema)
    )[0][0]
    assert '"state":"completed"' in dumped.replace(" ", "") and SECRET not in dumped


def test_a_lost_database_mid_run_is_reported_without_the_password(make_table, ollama, pg_data_dir):
    """The reconnect path quotes the driver's error: it passes through the same redaction."""
    from wiki_embeddings.devtools import embedded_postgres

    table = make_table(batch_size=8, db_reconnect_sec=0.5, backoff_base_sec=0.05)
    table.load([(i, f"text {i}") for i in range(1, 401)])
    ollama.set_faults(latency_ms=20)
    settings = table.settings.replace(database_url=_with_password(table.url))
    lines: list[str] = []

    def stop_soon() -> None:
        wait_until(lambda: filled(table) >= 16, 30, "two batches")
        embedded_postgres.stop(pg_data_dir)

    stopper = threading.Thread(target=stop_soon)
    stopper.start()
    try:
        with build_store(settings, settings.database_url) as store:
            report = Backfill(settings, store, build_client(settings, TEST_MODEL), log=lines.append).run()
    finally:
        stopper.join()
        embedded_postgres.ensure_running(pg_data_dir)
        table.store.close()
    assert report.state == "database_unavailable" and report.exit_code == 5
    assert SECRET not in report.message and all(SECRET not in line for line in lines)
    assert SECRET not in json.dumps(report.as_dict(), default=str)


def test_a_connection_error_raised_to_a_front_end_carries_no_password(pg_url):
    """Dagster and other front ends get the store's exception itself: it must be clean at the source."""
    from wiki_embeddings.core.db import DatabaseError, Store

    for url in (f"postgresql://u:{SECRET}@[broken/db", f"postgresql://u:{SECRET}@/db?host=/nonexistent"):
        store = Store(url, TableRef.parse("public.wiki_chunks"))
        with pytest.raises(DatabaseError) as caught:  # the project's error: no driver exception leaves core/db
            store.ping()
        assert SECRET not in str(caught.value) and SECRET not in repr(caught.value)
        assert SECRET not in str(caught.value.__cause__), "nor in the driver's error it was made from"


DAGSTER_MISSING = importlib.util.find_spec("wiki_embeddings.definitions") is None


@pytest.mark.slow
@pytest.mark.skipif(DAGSTER_MISSING, reason="wiki_embeddings/definitions.py (the Dagster layer) does not exist yet")
def test_the_password_never_reaches_dagster_logs_metadata_or_storage(make_table, ollama, tmp_path):
    from wiki_embeddings.defs.partitions import range_key

    table = make_table()
    table.load([(i, "POISON" if i == 2 else f"text {i}") for i in range(1, 11)])
    ollama.set_faults(error_marker="POISON")  # the range fails: a Failure with description and metadata
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = cli_env(table, DATABASE_URL=_with_password(table.url), DAGSTER_HOME=str(home))
    # The run config's failure log, not the bootstrap default (/tmp/wiki-embed-failures-bootstrap.jsonl, an
    # operator's file): WIKI_EMBED_FAILURE_LOG does not override a Dagster config default.
    config = {"ops": {"wiki_chunk_embeddings": {"config": {"failure_log": table.settings.failure_log}}}}
    done = subprocess.run(
        [*dagster_materialize(range_key(0)), "--config-json", json.dumps(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode != 0 and "1 failed in this run" in done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr
    stored = [p for p in home.rglob("*") if p.is_file()]
    assert stored, "Dagster stored its run"
    for path in stored:
        assert SECRET.encode() not in path.read_bytes(), path
    assert [e["chunk_id"] for e in read_entries(table.settings.failure_log)] == [2], "the run config's log"


# ------------------------------------------------------------------------------------------ planted links


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "precious.conf"
    target.write_text("untouched\n")
    target.chmod(0o644)
    return target


def test_a_failure_log_symlink_is_refused_before_anything_is_sent(make_table, ollama, victim):
    table = make_table()
    table.load([(1, "POISON"), (2, "fine")])
    Path(table.settings.failure_log).symlink_to(victim)
    before = ollama.stats()["texts_embedded"]
    done = run_cli(table, "backfill")
    assert done.returncode == 2 and "symbolic link" in done.stderr and "Traceback" not in done.stderr
    assert victim.read_text() == "untouched\n"
    assert ollama.stats()["texts_embedded"] == before and table.status()["missing"] == 2


def test_a_failure_log_symlink_planted_mid_run_is_not_written_through_and_the_run_stops(make_table, ollama, victim):
    table = make_table(batch_size=4)
    table.load([(i, "POISON" if i == 40 else f"text {i}") for i in range(1, 61)])
    ollama.set_faults(error_marker="POISON", latency_ms=10)
    log = Path(table.settings.failure_log)

    def plant() -> None:
        wait_until(lambda: filled(table) >= 8, 30, "two batches")
        log.symlink_to(victim)

    planter = threading.Thread(target=plant)
    planter.start()
    report = table.backfill()
    planter.join()
    assert report.state == "failure_log_error" and report.exit_code == 6, report.message
    assert "symbolic link" in report.message and str(log) in report.message
    assert victim.read_text() == "untouched\n"
    assert [r["chunk_id"] for r in table.store.list_failures()] == [40], "the database still has the record"
    assert wrong_vectors(table) == []


def test_a_new_failure_log_is_private_to_its_owner(make_table, ollama):
    table = make_table()
    table.load([(1, "POISON"), (2, "fine")])
    ollama.set_faults(error_marker="POISON")
    table.backfill()
    assert stat.S_IMODE(os.stat(table.settings.failure_log).st_mode) == 0o600


def test_stop_with_a_symlink_at_the_stop_file_does_not_write_through_but_still_stops_runs(make_table, victim):
    table = make_table()
    table.load([(1, "text")])
    Path(table.settings.stop_file).symlink_to(victim)
    done = run_cli(table, "stop")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "symbolic link" in done.stderr and "stop requested in the database" in done.stderr
    assert victim.read_text() == "untouched\n"
    assert table.store.stop_requested(), "the database brake is on"
    resumed = run_cli(table, "resume", "--no-run")
    assert resumed.returncode == 0 and not os.path.lexists(table.settings.stop_file)
    assert victim.read_text() == "untouched\n", "resume removed the link, not its target"


READINESS_MISSING = importlib.util.find_spec("wiki_embeddings.core.readiness") is None


@pytest.mark.skipif(READINESS_MISSING, reason="wiki_embeddings/core/readiness.py does not exist yet")
def test_the_readiness_flag_flip_refuses_a_symlinked_env_file_and_keeps_the_files_mode(tmp_path, victim):
    from wiki_embeddings.core.readiness import ReadinessError, read_flag, set_flag

    env_file = tmp_path / ".env.beta"
    env_file.symlink_to(victim)
    with pytest.raises(ReadinessError, match="symbolic link"):
        set_flag(env_file, True)
    assert victim.read_text() == "untouched\n"
    env_file.unlink()
    env_file.write_text("# beta\nAPI_KEY=abc\nWIKI_EMBEDDINGS_READY=false\n")
    env_file.chmod(0o640)
    change = set_flag(env_file, True)
    assert change.changed and read_flag(env_file) is True
    assert env_file.read_text() == "# beta\nAPI_KEY=abc\nWIKI_EMBEDDINGS_READY=true\n"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640
    assert not env_file.is_symlink()
