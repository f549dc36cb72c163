"""What both tiers share: the test session is isolated from the operators' services and files.

Kept light on purpose (the standard library and two leaf modules of the package): the unit tier
(wiki_embeddings_tests/unit/, `pytest -m unit`) loads this and nothing of PostgreSQL or the model server. The real
PostgreSQL, the Ollama-protocol server and the chunk tables are wiki_embeddings_tests/integration/conftest.py's.
"""

from __future__ import annotations

import glob
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from wiki_embeddings.core.readiness import DEFAULT_ENV_FILE
from wiki_embeddings.core.readiness import ENV_VARS as READINESS_ENV_VARS
from wiki_embeddings.settings import DEFAULT_STOP_FILE

# Tests never talk to the operators' services, whatever the shell exported.
for _var in (
    "DATABASE_URL",
    "OLLAMA_URL",
    "OLLAMA_MODEL",
    "OLALA_START_OLLAMA",
    "WIKI_EMBED_TABLE",
    "WIKI_EMBED_API",
    "WIKI_EMBED_API_KEY",
):
    os.environ.pop(_var, None)

# ...nor touch the operators' files: every default path a run, a stop, the readiness sensor or the embedded
# PostgreSQL would use points into this session's temp dir (subprocesses inherit it), and the real defaults
# are checked untouched when the session ends (`_operators_files_untouched`).
REPO_ROOT = Path(__file__).resolve().parents[1]
SESSION_DEFAULTS = Path(tempfile.mkdtemp(prefix="we-defaults-"))
# devtools/embedded_postgres.PGDATA_ENV, named here so this guard does not import the PostgreSQL tooling
# (test_faults_files.py checks that the embedded server's default data dir lands in SESSION_DEFAULTS).
PGDATA_ENV = "WIKI_EMBED_PGDATA"
DEFAULT_PATHS_ENV = {
    "EMBED_STOP_FILE": str(SESSION_DEFAULTS / "wiki-embed.stop"),
    "WIKI_EMBED_FAILURE_LOG": str(SESSION_DEFAULTS / "wiki-embed-failures.jsonl"),
    "WIKI_EMBED_FAILURE_LOG_DIR": str(SESSION_DEFAULTS),  # the Dagster run configs' failure logs (defs/assets.py)
    READINESS_ENV_VARS["env_file"]: str(SESSION_DEFAULTS / DEFAULT_ENV_FILE),
    PGDATA_ENV: str(SESSION_DEFAULTS / "pgdata"),
}
os.environ.update(DEFAULT_PATHS_ENV)
# A run whose every model server is out waits WIKI_EMBED_SERVER_WAIT_SEC (300 s) for one to come back: the tests of
# a dead or sick server wait a few seconds instead (CLI subprocesses inherit it).
os.environ.setdefault("WIKI_EMBED_SERVER_WAIT_SEC", "3")
#: The operators' files (the defaults of settings.py, defs/assets.py, readiness.py, embedded_postgres.py).
OPERATORS_FILES = [
    Path(DEFAULT_STOP_FILE),
    REPO_ROOT / ".pgdata",
    REPO_ROOT / DEFAULT_ENV_FILE,
    Path.cwd() / DEFAULT_ENV_FILE,
]
OPERATORS_FAILURE_LOGS = "/tmp/wiki-embed-failures-*.jsonl"  # the runbook's logs, the Dagster configs' defaults


def _operators_files_state() -> dict[str, tuple[int, int, int, int] | None]:
    """(type, size, mtime, inode) of each operator file, None when absent; `.pgdata` only at its top level."""
    state: dict[str, tuple[int, int, int, int] | None] = {}
    for path in [*OPERATORS_FILES, *map(Path, sorted(glob.glob(OPERATORS_FAILURE_LOGS)))]:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            state[str(path)] = None
            continue
        state[str(path)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino)
    return state


_OPERATORS_FILES_AT_START = _operators_files_state()


@pytest.fixture(scope="session", autouse=True)
def _operators_files_untouched() -> Iterator[None]:
    """Fails the run (an error at the last teardown) when a test created, changed or removed an operator file."""
    yield
    after = _operators_files_state()
    touched = [
        f"{path}: {_show_state(_OPERATORS_FILES_AT_START.get(path))} -> {_show_state(after.get(path))}"
        for path in sorted(set(_OPERATORS_FILES_AT_START) | set(after))
        if _OPERATORS_FILES_AT_START.get(path) != after.get(path)
    ]
    if touched:
        pytest.fail("the test run touched the operators' files:\n  " + "\n  ".join(touched), pytrace=False)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The session's temp dir goes, whether tests ran or not (`--collect-only`, `-m` selecting none)."""
    shutil.rmtree(SESSION_DEFAULTS, ignore_errors=True)


def _show_state(state: tuple[int, int, int, int] | None) -> str:
    return "absent" if state is None else f"{state[1]} bytes, mtime_ns {state[2]}, inode {state[3]}"
