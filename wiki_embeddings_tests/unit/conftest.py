"""The unit tier: every test here is marked `unit` and runs against the fakes of fakes.py (no PostgreSQL, no
HTTP server, no subprocess), so `pytest -m unit` answers in seconds.

A session that runs unit tests only refuses to start the embedded PostgreSQL or to connect to any database (a test
that tries fails), and is checked at its end: no process was left as a child, and nothing listens on a TCP port of
this process (the dev HTTP server runs in-process).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
_tripwires = pytest.MonkeyPatch()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.unit)


def _unit_only(session: pytest.Session) -> bool:
    """Only unit tests were selected (with the whole suite, the integration tier's servers are expected)."""
    return bool(session.items) and all(item.get_closest_marker("unit") for item in session.items)


def pytest_collection_finish(session: pytest.Session) -> None:
    if not _unit_only(session):
        return
    import psycopg

    from wiki_embeddings.devtools import embedded_postgres

    def refuse(what: str) -> object:
        def refused(*_args: object, **_kwargs: object) -> None:
            raise AssertionError(f"the unit tier must not {what}: use the fakes of wiki_embeddings_tests/unit/fakes.py")

        return refused

    _tripwires.setattr(embedded_postgres, "ensure_running", refuse("start the embedded PostgreSQL"))
    _tripwires.setattr(psycopg, "connect", refuse("connect to a database"))
    _tripwires.setattr(psycopg.Connection, "connect", refuse("connect to a database"))


def pytest_sessionfinish(session: pytest.Session) -> None:
    _tripwires.undo()


@pytest.fixture(scope="session", autouse=True)
def _no_database_or_server(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not _unit_only(request.session):
        return
    trouble = []
    children = _child_processes()
    if children:
        trouble.append(f"child processes left running: {children}")
    ports = _listening_ports()
    if ports:
        trouble.append(f"this process listens on TCP ports {ports}")
    if trouble:
        pytest.fail("the unit tier must start no database or server: " + "; ".join(trouble), pytrace=False)


def _child_processes() -> list[int]:
    me = os.getpid()
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _listening_ports() -> list[int]:
    """TCP ports in LISTEN state whose socket is one of this process's open files."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            mine.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile (listdir's own)
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A" and f"socket:[{parts[9]}]" in mine:  # 0A: LISTEN
                ports.append(int(parts[1].rsplit(":", 1)[1], 16))
    return ports
