"""The integration tier: one real PostgreSQL (pgvector) per test session, a real Ollama-protocol server, a fresh
chunk table per test. (The isolation from the operators' services and files is the root conftest's.)"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest

from wiki_embeddings.core import importer
from wiki_embeddings.core.backfill import Backfill, RunReport
from wiki_embeddings.core.db import Store
from wiki_embeddings.core.factories import build_client, build_store
from wiki_embeddings.devtools import embedded_postgres
from wiki_embeddings.devtools.ollama_server import OllamaServer, hash_vector
from wiki_embeddings.settings import Settings, from_env
from wiki_embeddings_tests.conftest import DEFAULT_PATHS_ENV

TEST_MODEL = "all-minilm"
TEST_DIM = 384
# The root conftest's guard names the embedded server's data-dir variable without importing it: the same one.
assert embedded_postgres.PGDATA_ENV in DEFAULT_PATHS_ENV


@pytest.fixture(scope="session")
def pg_data_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="we-pg-", dir="/tmp"))
    data = base / "data"
    yield data
    embedded_postgres.stop(data)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_url(pg_data_dir: Path) -> str:
    """The session's PostgreSQL 16 + pgvector (the project's embedded server in a temp dir)."""
    return embedded_postgres.ensure_running(pg_data_dir, database="wiki_test")


@pytest.fixture(scope="session")
def ollama() -> Iterator[OllamaServer]:
    """The project's Ollama-protocol server over real HTTP, hash backend (deterministic vectors)."""
    with OllamaServer(backend="hash", models=[f"{TEST_MODEL}:{TEST_DIM}", "nomic-embed-text:768", "tiny:8"]) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean_faults(ollama: OllamaServer) -> Iterator[None]:
    ollama.reset_faults()
    yield
    ollama.reset_faults()


_table_counter = itertools.count()


@dataclass
class ChunkTable:
    """A fresh chunk table in its own schema, with settings pointing at it."""

    settings: Settings
    store: Store
    tmp: Path

    @property
    def url(self) -> str:
        assert self.settings.database_url
        return self.settings.database_url

    def load(self, rows: list[tuple[int, str]]) -> None:
        self.store.insert_chunks((cid, f"title {cid}", 0, text) for cid, text in rows)

    def load_wiki(self, limit: int) -> list[importer.Chunk]:
        chunks = list(importer.iter_chunks(limit=limit))
        self.store.insert_chunks((c.id, c.title, c.chunk_index, c.content) for c in chunks)
        return chunks

    def backfill(self, **overrides: object) -> RunReport:
        """One run as a separate process would do it: its own store (connections) and client."""
        s = self.settings.replace(**overrides)
        with build_store(s, self.url) as store:
            engine = Backfill(s, store, build_client(s, s.ollama_model or TEST_MODEL), log=lambda _m: None)
            return engine.run()

    def status(self) -> dict:
        return self.store.status(self.settings.max_attempts)

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []


@pytest.fixture
def make_table(pg_url: str, ollama: OllamaServer, tmp_path: Path) -> Iterator[Callable[..., ChunkTable]]:
    made: list[Store] = []

    def make(dim: int = TEST_DIM, **overrides: object) -> ChunkTable:
        schema = f"t{next(_table_counter)}_{os.getpid()}"
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            conn.execute(f'CREATE SCHEMA "{schema}"')
        settings = from_env(
            {},
            database_url=pg_url,
            ollama_url=ollama.url,
            ollama_model=TEST_MODEL,
            table=f"{schema}.wiki_chunks",
            stop_file=str(tmp_path / "wiki-embed.stop"),
            failure_log=str(tmp_path / "failures.jsonl"),
            batch_size=16,
            report_every=1,
            retries=2,
            backoff_base_sec=0.01,
            backoff_max_sec=0.05,
            timeout_sec=10.0,
            server_wait_sec=3.0,
        ).replace(**overrides)
        store = build_store(settings, pg_url)
        store.migrate()
        store.ensure_table(dim)
        made.append(store)
        return ChunkTable(settings, store, tmp_path)

    yield make
    for store in made:
        store.close()


def expected_vector(text: str, model: str = TEST_MODEL, dim: int = TEST_DIM) -> np.ndarray:
    """What the hash backend returns for `text` (the engine sends the cut text)."""
    return hash_vector(model, text, dim)
