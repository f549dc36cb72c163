"""A vector column's identity is model + dimensions + text prefix: vectors of one column must agree on all three.

`nomic-embed-text` embeds `search_document: X` and `X` into different places; a column whose vectors mix the
two retrieves worse than either. So a run whose `--text-prefix` differs from the prefix the column's vectors were
made with is refused, like another model is, with a pointer to `migrate-model`, which may target the same model
with the new prefix (`migrate-model --to MODEL --text-prefix 'search_document: '`). Cuts (`--max-chars`, the
context) are not identity: they stay per-vector provenance and are never refused.

The identity is recorded per column attnum in `<state schema>.column_identity` (so it follows the columns through
a swap's renames), together with the model's *query* prefix (`--query-prefix`), which the retrieval self-test
before a swap uses. A column without a record (vectors written before this was recorded) falls back to its
provenance. No SQL here: the store owns it.

The API the vectors were made through (`WIKI_EMBED_API`: `ollama` or `openai`) is recorded with it. The same model
name served by another program is not the same model until shown to be: quantisation, pooling, normalisation or a
tokenizer setting may differ. So a run through another API than the recorded one is refused like another model,
until `verify` through the new API finds the stored vectors reproduced (a `match`), which records that API as
accepted for the column. A record without an API (made before it was recorded) was made through Ollama's. Another
server under the same name and API is told apart by its vectors: the record also holds the model's answers to a probe
text (core/fingerprint.py), which every run checks each server against (core/backfill/servercheck.py).
"""

from __future__ import annotations

from typing import Any

from wiki_embeddings.core.db import Store
from wiki_embeddings.core.modelname import same_model, same_prefix
from wiki_embeddings.settings import Settings

DEFAULT_API = "ollama"


def recorded(store: Store) -> dict[str, Any] | None:
    """The column's identity: the record, else (model, text_prefix) from one provenance row, else None."""
    identity = store.column_identity()
    if identity is not None:
        return identity
    found = store.provenance_prefix()
    if found is None:
        return None
    return {"model": found[0], "dimensions": None, "text_prefix": found[1], "query_prefix": "", "api": None}


def recorded_api(identity: dict[str, Any]) -> str:
    return str(identity.get("api") or DEFAULT_API)


def api_problem(store: Store, model: str, api: str, *, shadow: bool = False) -> str | None:
    """Why a run of `model` through `api` may not write this column (another API than its vectors'), or None."""
    identity = recorded(store)
    if identity is None or not same_model(identity["model"], model):
        return None
    have = recorded_api(identity)
    if have == api:
        return None
    column = f"{store.table.qualified}.{store.table.embedding_column}"
    if shadow:  # `verify` compares the live column only: a shadow is finished through its API, or begun again
        return (
            f"{column} (a model migration's shadow) holds vectors of model {model!r} made through the {have} API; "
            f"this run uses the {api} API (WIKI_EMBED_API), whose server may embed the same name differently, so it "
            f"is refused and nothing was written. Finish the migration through the {have} API (WIKI_EMBED_API={have}), "
            f"or begin it again through the {api} API: `wiki-embeddings migrate-model --abort`, then "
            f"`wiki-embeddings migrate-model --to {model}` with WIKI_EMBED_API={api}"
        )
    return (
        f"{column} holds vectors of model {model!r} made through the {have} API; this run uses the {api} API "
        f"(WIKI_EMBED_API), whose server may embed the same name differently, so it is refused like another model "
        f"and nothing was written. Run `wiki-embeddings verify` with WIKI_EMBED_API={api} (--api {api}): when the "
        f"vectors match, the {api} API is accepted for this column; otherwise change the model with "
        f"`wiki-embeddings migrate-model --to {model}` through the new server (then --swap)"
    )


def accept_api(store: Store, model: str, api: str) -> bool:
    """`verify` matched through `api`: record it as the column's API (True when it changed)."""
    identity = store.column_identity()
    if identity is None or not same_model(identity["model"], model) or recorded_api(identity) == api:
        return False
    return store.record_column_api(api)


def prefix_problem(store: Store, model: str, text_prefix: str, *, shadow: bool) -> str | None:
    """Why a run of `model` with `text_prefix` may not write this column, or None. The model itself is checked by
    the engine (`_check_recorded_model`); this is the prefix part of the identity."""
    identity = recorded(store)
    if identity is None or not same_model(identity["model"], model):
        return None  # nothing recorded yet, or another model (the engine decides about that)
    have = identity["text_prefix"] or ""
    if same_prefix(have, text_prefix):
        return None
    column = f"{store.table.qualified}.{store.table.embedding_column}"
    if shadow:
        return (
            f"{column} is being filled for the migration to {model!r} with text prefix {have!r}; this run's prefix "
            f"is {text_prefix!r}. Run with --text-prefix {have!r} (WIKI_EMBED_TEXT_PREFIX), or `migrate-model "
            "--abort` and start the migration again with the new prefix; nothing was written"
        )
    return (
        f"{column} holds vectors of model {model!r} embedded with text prefix {have!r}; a run with prefix "
        f"{text_prefix!r} is refused (a column must not mix prefixes) and nothing was written. Use --text-prefix "
        f"{have!r} (WIKI_EMBED_TEXT_PREFIX), or change the prefix without downtime: `wiki-embeddings migrate-model "
        f"--to {model} --text-prefix {text_prefix!r}` (then --swap)"
    )


def record(store: Store, model: str, dimensions: int, settings: Settings) -> None:
    """The column's identity as a run (or a migration's start) with `settings` makes its vectors."""
    store.record_column_identity(
        model, dimensions, settings.text_prefix or "", settings.query_prefix or "", settings.api
    )


def query_prefix(store: Store, fallback: str = "") -> str:
    """The query prefix recorded for the column's model, else `fallback` (the setting)."""
    identity = store.column_identity()
    return (identity or {}).get("query_prefix") or fallback


def shadow_prefixes(store: Store, shadow: str) -> dict[str, str]:
    """Settings overrides for a fill of the migration's shadow column: the text and query prefixes the migration
    was started with (so a maintenance run with the live model's prefix fills the shadow with the target's)."""
    if not store.column_exists(shadow):
        return {}
    with store.for_column(shadow) as sh:
        identity = sh.column_identity()
    if not identity:
        return {}
    return {"text_prefix": identity.get("text_prefix") or "", "query_prefix": identity.get("query_prefix") or ""}
