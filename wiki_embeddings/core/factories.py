"""Building a run's parts from one Settings object: the store, the client with its tuning, the model to use.

Kept out of the run's package (core/backfill/) so the CLI, the Dagster resources, verification and the
benchmarks build their parts the same way without importing the loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from wiki_embeddings.core.context import PREFLIGHT_SAMPLE, TokenEstimator, Window, preflight
from wiki_embeddings.core.db import Store, TableRef
from wiki_embeddings.core.embedders import OllamaClient, OpenAIClient, PooledClient
from wiki_embeddings.core.pooling import piece_counter
from wiki_embeddings.core.tuning import Tuning
from wiki_embeddings.settings import DEFAULT_MODEL, DEFAULT_TARGET_REQUEST_SEC, LOCAL_SERVER_MODEL, Settings


def resolve_model(settings: Settings, store: Store, local_default: bool = False) -> str:
    """OLLAMA_MODEL if set; else the model recorded for the table by its last run; else the default.

    So the runbook's bootstrap and maintenance commands, written without a model, use one model.
    """
    if settings.ollama_model:
        return settings.ollama_model
    try:
        store.migrate()
        recorded, _ = store.recorded_model()
    except Exception:  # noqa: BLE001 - a fresh database has no record; the default applies
        recorded = None
    if recorded:
        return recorded
    return LOCAL_SERVER_MODEL if local_default else DEFAULT_MODEL


def probe_model_dimensions(settings: Settings, model: str) -> int:
    """Ask `model` for one vector (proves it is there) and return its length: it sizes a new column."""
    client = build_client(settings, model)

    async def probe() -> int:
        try:
            return await client.probe_dimensions()
        finally:
            await client.aclose()

    return asyncio.run(probe())


def preflight_estimate(settings: Settings, store: Store, model: str) -> dict[str, Any]:
    """The pre-flight estimate without a run (`--dry-run`): the model's window from the server (`/api/show`, or what
    an OpenAI-compatible server publishes: a read; nothing is embedded) and a sample of the missing chunks. An
    unreachable server gives an unknown window."""
    client = build_client(settings, model)

    async def ask() -> Window:
        try:
            return await client.context_window(settings.num_ctx)
        finally:
            await client.aclose()

    window = asyncio.run(ask())
    sample = store.sample_texts(PREFLIGHT_SAMPLE, settings.max_chars)
    estimator, prefix = TokenEstimator(), settings.text_prefix
    pieces = piece_counter(prefix, window.tokens, estimator) if settings.long_text == "pool" else None
    return preflight(sample, window, estimator, settings.max_chars, prefix, pieces)


def polite_mode(settings: Settings) -> bool:
    """Is this run polite to live queries (batches sized to --target-request-sec, depth 1)?

    --polite / --no-polite decide; else a given --target-request-sec means yes; else a maintenance run (one with
    --max-chunks) is polite once the readiness flag (WIKI_EMBEDDINGS_READY in WIKI_EMBEDDINGS_ENV_FILE) is set:
    then the beta backend embeds its users' queries on the same Ollama.
    """
    if settings.polite is not None:
        return settings.polite
    if settings.target_request_sec is not None:
        return True
    if settings.max_chunks is None or settings.retry_failed:
        return False
    from wiki_embeddings.core import readiness

    try:
        return bool(readiness.read_flag(readiness.ReadinessSettings.from_env().env_path))
    except (OSError, ValueError):
        return False


def build_tuning(settings: Settings, servers: int) -> Tuning:
    """Depth per server and batch size for a run (core/tuning.py): --concurrency N pins the depth; --sleep-ms > 0
    (the operator asked for idle time) and polite mode mean depth 1; otherwise it tunes itself."""
    polite = polite_mode(settings)
    pinned = settings.concurrency or (1 if settings.sleep_ms > 0 or polite else None)
    target = (settings.target_request_sec or DEFAULT_TARGET_REQUEST_SEC) if polite else None
    return Tuning(
        servers,
        pinned_depth=pinned,
        max_batch=settings.batch_size,
        target_sec=target,
        backoff_base_sec=settings.backoff_base_sec,
        backoff_max_sec=settings.backoff_max_sec,
    )


def build_client(settings: Settings, model: str, urls: list[str] | None = None) -> PooledClient:
    """The embedder for WIKI_EMBED_API: Ollama's API, or the OpenAI-compatible one (same servers, OLLAMA_URL)."""
    urls = urls or settings.ollama_urls
    common: dict[str, Any] = {
        "timeout_sec": settings.timeout_sec,
        "retries": settings.retries,
        "backoff_base_sec": settings.backoff_base_sec,
        "backoff_max_sec": settings.backoff_max_sec,
        "tuning": build_tuning(settings, len(urls)),
        "text_prefix": settings.text_prefix,
        "load_timeout_sec": settings.load_timeout_sec,
        "server_wait_sec": settings.server_wait_sec,
    }
    if settings.api == "openai":
        return OpenAIClient(urls, model, api_key=settings.api_key, num_ctx=settings.num_ctx, **common)
    return OllamaClient(urls, model, keep_alive=settings.keep_alive, num_ctx=settings.num_ctx, **common)


def build_store(settings: Settings, database_url: str) -> Store:
    table = TableRef.parse(settings.table, settings.id_column, settings.text_column, settings.embedding_column)
    return Store(database_url, table, settings.state_schema)
