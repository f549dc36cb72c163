"""Which weights answer under the column's model name: the model's answer to one fixed probe text, per column.

A model name says nothing about the weights behind it: TEI's fp16 bge-m3 and a quantised one elsewhere, or two
Ollama hosts with different pulls, answer under the same name, and the OpenAI-compatible API names no digest. What
tells them apart is the vectors. So the column's identity (core/identity.py) holds the vectors its servers gave for
`TEXT` (with the column's text prefix, as every request sends it): recorded by the first run that writes it, checked
by every later run - each server's answer at the run's start (the window probe already sends that text to each
server, so it costs no request there), and each server's again whenever it comes back into the rotation (the health
probe sends that text too). A cosine below the threshold `verify` uses (`verify.MIN_COSINE`) is another model: the
run is refused like a model change (core/backfill/servercheck.py). The way out is `verify` through the new servers:
when the stored vectors are reproduced (a `match`) their answers are added to the column's (`accept`).

A column filled before this was recorded has no answers on record: its run re-embeds a small sample of the stored
vectors through each server (`verify` on a sample, per server) before recording them.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from wiki_embeddings.core.db import Store
from wiki_embeddings.core.embedders import Embedder, EmbedFailure
from wiki_embeddings.core.embedders.pooled import PROBE_TEXT
from wiki_embeddings.core.factories import build_client
from wiki_embeddings.core.modelname import same_model, same_prefix
from wiki_embeddings.settings import Settings

TEXT = PROBE_TEXT  # the health probe's text: a server coming back answers it anyway
MAX_RECORDED = 8  # answers kept per column (the same weights on other hardware may differ in the last digits)


def recorded(store: Store, model: str, text_prefix: str) -> list[np.ndarray]:
    """The column's recorded answers to `TEXT` from `model` with `text_prefix` (empty: none recorded, or recorded
    for another text, model or prefix - a table dropped and made again keeps its predecessor's identity row)."""
    return _answers_of(store.column_fingerprint(), model, text_prefix)


def _answers_of(found: dict[str, Any] | None, model: str, text_prefix: str) -> list[np.ndarray]:
    if not found or found.get("text") != TEXT or not same_model(str(found.get("model")), model):
        return []
    if not same_prefix(str(found.get("text_prefix") or ""), text_prefix):
        return []
    return [_decode(v) for v in found.get("vectors") or []]


def best(vector: np.ndarray, answers: Sequence[np.ndarray]) -> float:
    """The highest cosine of `vector` with any of `answers` (0.0 for none, or another length)."""
    scores = [cosine(a, vector) for a in answers]
    return max(scores, default=0.0)


def add(store: Store, vectors: Sequence[np.ndarray], model: str, text_prefix: str, threshold: float) -> bool:
    """Record `vectors` among the column's answers from `model` with `text_prefix` (those not already matched by
    one); True when any was added."""
    return _update(store, vectors, model, text_prefix, threshold, first=False)[0]


def claim(
    store: Store, vectors: Sequence[np.ndarray], model: str, text_prefix: str, threshold: float
) -> list[np.ndarray]:
    """A fresh column's answers: `vectors` recorded only if none are on record yet. Returns the column's answers
    after (another run starting at the same time may have recorded its servers' first: the caller compares)."""
    return _update(store, vectors, model, text_prefix, threshold, first=True)[1]


def _update(
    store: Store, vectors: Sequence[np.ndarray], model: str, text_prefix: str, threshold: float, first: bool
) -> tuple[bool, list[np.ndarray]]:
    """Read, merge and write back only if unchanged meanwhile (another run, another `verify`), else again."""
    for _ in range(5):
        found = store.column_fingerprint()
        have = _answers_of(found, model, text_prefix)
        if first and have:
            return False, have
        new = [v for v in vectors if best(v, have) < threshold]
        if not new:
            return False, have
        have = (have + new)[-MAX_RECORDED:]
        answers = {"text": TEXT, "model": model, "text_prefix": text_prefix, "vectors": [_encode(v) for v in have]}
        if store.record_column_fingerprint(answers, found):
            return True, have
        if store.column_identity() is None:
            return False, []  # no identity recorded to hold them
    return False, recorded(store, model, text_prefix)


async def answers(
    client: Embedder, servers: int, only: Sequence[int] | None = None
) -> dict[int, np.ndarray | EmbedFailure]:
    """Each server's answer to `TEXT` (of `only` when given; asked pinned, all at once), or the failure it gave."""

    async def one(server: int) -> np.ndarray | EmbedFailure:
        try:
            return (await client.embed_texts([TEXT], server=server)).vectors[0]
        except EmbedFailure as exc:
            return exc

    asked = list(range(servers) if only is None else only)
    got = await asyncio.gather(*(one(k) for k in asked))
    return dict(zip(asked, got, strict=True))


def accept(store: Store, settings: Settings, model: str, threshold: float) -> int:
    """`verify` matched through `settings`' servers: their answers join the column's (how many servers answered)."""
    identity = store.column_identity()
    if identity is None or not same_model(identity["model"], model):
        return 0
    dimensions, prefix = identity.get("dimensions"), identity.get("text_prefix") or ""

    async def ask() -> dict[int, Any]:
        # As a run of the column asks: its text prefix, and its length where the model is asked for one.
        client = build_client(settings.replace(text_prefix=prefix), model)
        if settings.request_dimensions and dimensions:
            client.ask_dimensions(dimensions)
        try:
            return await answers(client, len(settings.ollama_urls))
        finally:
            await client.aclose()

    got = asyncio.run(ask()).values()
    vectors = [v for v in got if isinstance(v, np.ndarray) and (not dimensions or v.shape[0] == dimensions)]
    add(store, vectors, model, prefix, threshold)
    return len(vectors)


def _encode(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def _decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two vectors; 0.0 across lengths (another model), for a zero vector, or a fresh one holding NaN."""
    if a.shape != b.shape:
        return 0.0  # another vector length: another model
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0 or not np.isfinite(b).all():
        return 0.0
    return float(np.dot(a, b) / (na * nb))
