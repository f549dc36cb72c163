"""Before the first claim: the checks that refuse a run before anything is written, and the bulk-load policy.

- the bookkeeping schema is current and the column's vector length is read (`vector(D)`);
- the column's recorded model (or a migration's target for a shadow column), text prefix and API must match;
- the model's vectors must have the column's length (a Matryoshka model may be asked for it, opt-in);
- the model's context window is read and a pre-flight estimate of the cuts printed;
- with --drop-vector-index, HNSW/IVFFlat indexes are dropped for the run and rebuilt after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from wiki_embeddings.core import identity
from wiki_embeddings.core.backfill.errors import DimensionMismatch, ModelChanged
from wiki_embeddings.core.backfill.worker import CANARY_TEXT, EmbedWorker
from wiki_embeddings.core.context import PREFLIGHT_SAMPLE, format_preflight, preflight
from wiki_embeddings.core.db import DatabaseError, Store
from wiki_embeddings.core.embedders import ContextExceeded, Embedder, EmbedFailure, InputRejected, RunnerCrashed
from wiki_embeddings.core.modelname import same_model
from wiki_embeddings.core.pooling import piece_counter
from wiki_embeddings.settings import Settings


def prepare_database(store: Store) -> int:
    """Migrate the bookkeeping schema, make sure of the extension and the partial index; the column's length."""
    store.migrate()
    store.ensure_extension()
    store.ensure_missing_index()
    _ = store.failure_key  # decided once, before the stages share the store
    return store.column_dimensions()


def check_recorded_model(store: Store, model: str, text_prefix: str, api: str = identity.DEFAULT_API) -> bool:
    """The column's model is recorded in the database: another model is refused before anything is written.

    The live column takes only the live model (a change of model goes through `migrate-model`); a migration's
    shadow column takes only the migration's target model. Returns whether the column is a migration's shadow.
    """
    live, _ = store.recorded_model()
    target, shadow = store.migration_target()
    column = f"{store.table.qualified}.{store.table.embedding_column}"
    is_shadow = shadow is not None and shadow == store.table.embedding_column
    if is_shadow:
        if not same_model(target, model):
            raise ModelChanged(
                f"{column} is the shadow column of the migration to model {target!r}; model "
                f"{model!r} is refused there; nothing was written"
            )
    elif live and not same_model(live, model):
        raise ModelChanged(
            f"{column} holds vectors of model {live!r}; a backfill with model {model!r} is refused "
            f"and nothing was written. To change the model without downtime use "
            f"`wiki-embeddings migrate-model --to {model}` (then --swap)"
        )
    prefix = identity.prefix_problem(store, model, text_prefix, shadow=is_shadow)
    if prefix:  # identity is model + dimensions + text prefix
        raise ModelChanged(prefix)
    other_api = identity.api_problem(store, model, api, shadow=is_shadow)
    if other_api:  # ... made through one API: another is another model until `verify` matches
        raise ModelChanged(other_api)
    return is_shadow


def check_long_text(store: Store, settings: Settings) -> None:
    """How long texts are embedded (`--long-text`) is part of a column's identity like its prefix: a column whose
    long texts were pooled takes no cut ones and the other way round (a silent mix retrieves worse than either).
    Changing it is a re-embed: `--reembed-cut` re-embeds the chunks made the other way, in place."""
    if settings.reembed_cut:
        return
    cut, pooled = store.made_by()
    made = "pool" if settings.long_text == "cut" else "cut"  # the other way: any vector made so is a mix
    count = pooled if made == "pool" else cut
    if not count:
        return
    column = f"{store.table.qualified}.{store.table.embedding_column}"
    mine = pooled if made == "cut" else cut
    unfinished = f" (and {mine} made with --long-text {settings.long_text}: a change left unfinished)" if mine else ""
    raise ModelChanged(
        f"{column} holds {count} vectors of long texts made with --long-text {made}{unfinished}; this run's is "
        f"{settings.long_text!r} (WIKI_EMBED_LONG_TEXT) and a column must not mix them; nothing was written. Keep "
        f"--long-text {made}, or change it with one run of `wiki-embeddings backfill --long-text {settings.long_text}"
        f" --reembed-cut`, which re-embeds those {count} chunks in place"
    )


async def check_dimensions(embedder: Embedder, dimensions: int, column: str, request_dimensions: bool) -> None:
    """Refuse a model whose vectors have another length than the column, before anything is written."""
    got = await embedder.probe_dimensions(CANARY_TEXT, expected=dimensions)
    if got != dimensions and request_dimensions and dimensions < got:
        # A Matryoshka model (nomic-embed-text v1.5, ...) can answer shorter vectors when asked: opt-in, because
        # not every model is trained for it (the server would just cut an ordinary model's vectors).
        embedder.ask_dimensions(dimensions)
        try:
            got = await embedder.probe_dimensions(CANARY_TEXT)
        except InputRejected as exc:
            raise DimensionMismatch(
                f"model {embedder.model!r} refused `dimensions: {dimensions}` ({exc.message}); {column} is "
                f"vector({dimensions}); nothing was written"
            ) from exc
    if got != dimensions:
        hint = (
            f" (the model answers {got} values: --request-dimensions asks a Matryoshka model for {dimensions})"
            if dimensions < got and not request_dimensions
            else ""
        )
        raise DimensionMismatch(
            f"model {embedder.model!r} returns {got}-dimensional vectors but {column} is vector({dimensions});"
            f" nothing was written. Use the model the column was built for, or migrate the column{hint}."
        )
    embedder.expect_dimensions(dimensions)


def refused_setting(exc: EmbedFailure, settings: Settings, prefix: str, model: str) -> str | None:
    """Why the start probe's refusal is our setting's fault (a bad setting: exit 2, naming it), or None.

    The probe is a short known-good text: refused as over the window only when the text prefix before it (nearly)
    fills the window; refused as malformed (HTTP 400) only for something every request of ours carries."""
    if not isinstance(exc, InputRejected) or isinstance(exc, RunnerCrashed) or exc.http_status != 400 or exc.foreign:
        return None  # a proxy's own page (HTML, plain text) is not the model server judging our request
    if isinstance(exc, ContextExceeded):
        if not prefix:
            return None
        return (
            f"WIKI_EMBED_TEXT_PREFIX (--text-prefix): the model refused a {len(CANARY_TEXT)}-character probe text "
            f"as longer than its window with the {len(prefix)}-character text prefix before it ({exc.message}): the "
            "prefix alone (nearly) fills the window, so no chunk could be embedded; shorten it, or raise --num-ctx "
            "(WIKI_EMBED_NUM_CTX); nothing was written"
        )
    sent = [f"OLLAMA_MODEL={model!r}"] + ([f"WIKI_EMBED_TEXT_PREFIX={prefix!r}"] if prefix else [])
    if settings.api == "ollama":
        sent.insert(1, f"WIKI_EMBED_KEEP_ALIVE={settings.keep_alive!r}")
    if settings.num_ctx:
        sent.append(f"WIKI_EMBED_NUM_CTX={settings.num_ctx}")
    return (
        f"the model server refused a known-good probe request as malformed ({exc.message}): a setting every request "
        f"carries ({', '.join(sent)}) is one the server does not take; nothing was written"
    )


async def learn_context(
    worker: EmbedWorker, store: Store, settings: Settings, log: Callable[[str], None]
) -> dict[str, Any]:
    """Ask the server for the model's window (the worker cuts to it) and print the pre-flight estimate."""
    worker.window = await worker.embedder.context_window(settings.num_ctx)
    worker.max_chars = settings.max_chars  # the longest text of the run: the silent-cut probe is as long
    await worker.probe_window()
    try:
        sample = await asyncio.to_thread(store.sample_texts, PREFLIGHT_SAMPLE, settings.max_chars)
    except DatabaseError as exc:  # an estimate only: it never stops a run
        log(f"pre-flight: no sample ({type(exc).__name__}); model context {worker.window.describe()}")
        return {}
    prefix = worker.embedder.text_prefix
    pieces = piece_counter(prefix, worker.window.tokens, worker.estimator) if settings.long_text == "pool" else None
    figures = preflight(sample, worker.window, worker.estimator, settings.max_chars, prefix, pieces)
    log(format_preflight(figures))
    return figures


def refresh_wanted(settings: Settings) -> bool:
    """Does this run include the pass over embedded chunks (changed text; with --reembed-cut, cut ones)?"""
    if settings.retry_failed:
        return False
    if settings.reembed_cut:
        return True
    return settings.refresh_changed if settings.refresh_changed is not None else settings.max_chunks is not None


def count_remaining(store: Store, settings: Settings) -> int:
    """What the run has to do: missing chunks in its range, or the recorded failures still missing."""
    if settings.retry_failed:
        return len([f for f in store.list_failures(settings.max_attempts) if f["still_missing"]])
    return store.count_missing(settings.id_min, settings.id_max)


def drop_vector_indexes(store: Store, settings: Settings, log: Callable[[str], None]) -> list[dict[str, str]]:
    """Bulk-load policy: an HNSW/IVFFlat index makes every write several times slower (pgvector #810).

    Only with the operator's consent (`--drop-vector-index`) is it dropped for the run and rebuilt after;
    otherwise it stays and the operator is told what it costs.
    """
    indexes = store.vector_indexes()
    if not indexes:
        return []
    names = ", ".join(i["name"] for i in indexes)
    if not settings.drop_vector_index:
        log(
            f"note: vector index {names} stays in place; bulk writes are several times slower with it "
            "(pass --drop-vector-index to drop it for the bootstrap and rebuild it after)"
        )
        return []
    for index in indexes:
        seconds = store.drop_index(index["schema"], index["name"])
        log(f"dropped vector index {index['name']} for the bulk load ({seconds:.2f} s)")
    return indexes


def rebuild_vector_indexes(
    store: Store, indexes: list[dict[str, str]], settings: Settings, log: Callable[[str], None]
) -> float:
    total = 0.0
    for index in indexes:
        seconds = store.create_index(index["definition"], settings.maintenance_work_mem)
        total += seconds
        log(f"rebuilt vector index {index['name']} in {seconds:.1f} s")
    return round(total, 2)
