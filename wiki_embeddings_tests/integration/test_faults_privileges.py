"""Least privilege: real roles with exactly the README's grants, and a role that lacks CREATE on the database.

Once the bookkeeping schema exists no command runs DDL (each reads `schema_migrations` first), so a backfill
role without `CREATE` on the database works, and `status` never writes, so a read-only role can monitor.
The grants are the README's own SQL block ("Database privileges"), run as written with the names replaced.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from wiki_embeddings_tests.integration.test_faults_support import cli_env, filled, run_cli

README = Path(__file__).resolve().parents[2] / "README.md"
_names = itertools.count()


def readme_grants() -> list[str]:
    """The statements of the SQL block under the README's "Database privileges" heading."""
    text = README.read_text()
    section = text[text.index("### Database privileges") :]
    block = re.search(r"```sql\n(.*?)```", section, re.S)
    assert block, "the README shows the grants as an SQL block"
    lines = [line for line in block.group(1).splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def role_url(pg_url: str, role: str, password: str) -> str:
    """pg_url (the embedded server: `postgresql://postgres:@/DB?host=SOCKETDIR`) as another role."""
    parts = urlsplit(pg_url)
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{parts.netloc.rpartition('@')[2]}"))


@pytest.fixture
def make_role(pg_url: str) -> Iterator[Callable[[str], tuple[str, str]]]:
    """LOGIN roles with nothing granted beyond PUBLIC's defaults; (name, URL). Dropped at the end."""
    made: list[str] = []

    def make(kind: str) -> tuple[str, str]:
        name = f"we_{kind}_{os.getpid()}_{next(_names)}"
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'pw-{name}'")
        made.append(name)
        return name, role_url(pg_url, name, f"pw-{name}")

    yield make
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for name in made:
            conn.execute(f"DROP OWNED BY {name}")
            conn.execute(f"DROP ROLE {name}")


def grant_as_documented(table, state_schema: str, embedder: str, monitor: str) -> None:
    schema = table.settings.table.split(".")[0]
    names = {"public": schema, "wiki_embeddings": state_schema, "embedder": embedder, "monitor": monitor}
    for statement in readme_grants():
        table.sql(re.sub(r"\b(public|wiki_embeddings|embedder|monitor)\b", lambda m: names[m.group(1)], statement))


def _state_schema() -> str:
    return f"we_state_{os.getpid()}_{next(_names)}"


def _env(table, url: str, state_schema: str) -> dict[str, str]:
    return cli_env(table, DATABASE_URL=url, WIKI_EMBED_STATE_SCHEMA=state_schema)


def test_a_backfill_role_with_exactly_the_documented_privileges_runs_backfill_and_status(make_table, make_role):
    state = _state_schema()
    table = make_table(state_schema=state)  # the owner's first command creates the bookkeeping schema
    table.load([(i, f"paragraph {i}") for i in range(1, 51)])
    assert table.backfill(max_chunks=10).state == "max_chunks"  # the owner's first run; the embedder goes on
    (embedder, url), (monitor, _) = make_role("fill"), make_role("mon")
    grant_as_documented(table, state, embedder, monitor)
    assert table.sql("SELECT has_database_privilege(%s, current_database(), 'CREATE')", (embedder,)) == [(False,)]

    done = run_cli(table, "backfill", env=_env(table, url, state))
    assert done.returncode == 0, done.stdout + done.stderr
    assert filled(table) == 50
    shown = run_cli(table, "status", "--json", env=_env(table, url, state))
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["missing"] == 0 and status["last_run_state"] == "completed" and status["model"] == "all-minilm"
    maintenance = run_cli(table, "backfill", "--max-chunks", "100", env=_env(table, url, state))
    assert maintenance.returncode == 0, maintenance.stdout + maintenance.stderr


def test_a_read_only_role_runs_status(make_table, make_role):
    state = _state_schema()
    table = make_table(state_schema=state)
    table.load([(i, f"paragraph {i}") for i in range(1, 31)])
    assert table.backfill(max_chunks=20).state == "max_chunks"
    (embedder, _), (monitor, url) = make_role("fill"), make_role("mon")
    grant_as_documented(table, state, embedder, monitor)
    for privilege in ("INSERT", "UPDATE", "DELETE"):
        assert table.sql(f"SELECT has_table_privilege(%s, %s, '{privilege}')", (monitor, table.settings.table)) == [
            (False,)
        ]

    shown = run_cli(table, "status", "--json", env=_env(table, url, state))
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert (status["total"], status["embedded"], status["missing"]) == (30, 20, 10)
    assert status["last_run_state"] == "max_chunks" and status["invalid_indexes"] == 0
    checked = run_cli(table, "status", "--check", env=_env(table, url, state))
    assert checked.returncode == 1 and "missing=10" in checked.stdout, "--check: exit 1 while chunks are missing"


def test_a_role_without_create_on_the_database_gets_one_line_naming_the_privilege(make_table, make_role):
    table = make_table()
    state = _state_schema()  # no bookkeeping schema of that name yet: the first command would create it
    role, url = make_role("new")
    for command in (["status"], ["backfill"]):
        result = run_cli(table, *command, env=_env(table, url, state))
        assert result.returncode == 2, result.stdout + result.stderr
        error = result.stderr.strip()
        assert len(error.splitlines()) == 1 and "Traceback" not in error, error
        assert f"the role {role} lacks CREATE on database wiki_test" in error
        assert f"bookkeeping schema {state}" in error
        assert f"GRANT CREATE ON DATABASE wiki_test TO {role}" in error
    assert table.sql("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (state,)) == [(0,)]
