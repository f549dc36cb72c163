"""Trust the vectors: re-embed a sample of what is stored and compare (`wiki-embeddings verify`, the drift check).

A vector is re-embedded exactly as it was made: the stored text cut to the characters that were sent
(`chars_sent` in its provenance, else the recorded `--max-chars`), cleaned (`core.text.clean_text`), with the
recorded text prefix, by the live model. Then cosine(stored, fresh):

- `match`          every compared vector is at least `MIN_COSINE` and none stored has norm 0;
- `model_changed`  at least half are below: the model answering under the live name is not the one that made the
                   vectors (an `ollama pull` replaced its weights, another server answers under the name...);
- `mismatch`       some are below, or stored vectors have norm 0 (a NaN/zero answer written by another writer,
                   a server that garbled a batch): those chunks need re-embedding;
- `not_evaluated`  the server did not answer (or nothing could be compared): never read as "model changed";
- `nothing_to_verify` the column holds no vector yet (an empty table, a fresh import): nothing is asked of the
                   server, exit 0, and it blocks nothing.

A server whose vectors have another length than the stored ones is `model_changed` too, saying both lengths
(`stored_length`, `server_length`): no cosine is computed across lengths.

MIN_COSINE is set from measurement: batch size changes vectors slightly (ollama#6262). The dev server's real
all-MiniLM-L6-v2 (`--backend minilm`) re-embedding 256 wiki chunks alone and in batches of 2, 8, 16, 32, 64 and
128 differs by at most 1.2e-7 in cosine (float32 rounding); llama.cpp's batched kernels are reported to move
vectors by up to ~1e-3. 0.995 sits well above both, and far above what another model gives (the hash backend
against MiniLM: |cosine| < 0.25; different trained models: typically below 0.9).

The sample is spread over the whole id range (`Store.sample_ids`: one primary-key probe per stratum), so it
costs `sample` embeddings and reads whatever the table's size; `full=True` walks every embedded chunk instead.
Exit codes: 0 match or nothing to verify, 8 model_changed, 1 mismatch, 3 not evaluated (4: the model is not on the
server) (`EXIT_CODES`).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wiki_embeddings.core import fingerprint, identity
from wiki_embeddings.core.db import Store
from wiki_embeddings.core.embedders import EmbedFailure, InputRejected, InvalidVectors, ModelNotFound
from wiki_embeddings.core.factories import build_client
from wiki_embeddings.core.fingerprint import cosine
from wiki_embeddings.core.modelname import same_model
from wiki_embeddings.core.pooling import Pooling
from wiki_embeddings.core.readiness import BLOCKING_DRIFT
from wiki_embeddings.core.text import clean_text
from wiki_embeddings.settings import Settings

MIN_COSINE = 0.995
DEFAULT_SAMPLE = 200
FULL_PAGE = 1000
#: The commands' one exit-code table (README "Exit codes", cli/exits.py): `model_changed` is 8 as for a backfill whose
#: column changed model; `not_evaluated` 3 as for a server that did not answer, 4 when the model is not on it.
EXIT_CODES = {"match": 0, "nothing_to_verify": 0, "model_changed": 8, "mismatch": 1, "not_evaluated": 3}
MODEL_NOT_FOUND_EXIT = 4
#: Verdicts that say something about the stored vectors (a later one replaces an earlier one); the others
#: (`not_evaluated`, `nothing_to_verify`) say nothing and change nothing (core/readiness.py).
DECISIVE = ("match", "model_changed", "mismatch")
#: Status keys (core/status.py) filled from the last recorded result; `status` never re-embeds or scans.
STATUS_KEYS = [
    "verify_result",
    "verify_at",
    "verify_compared",
    "verify_min_cosine",
    "verify_below_threshold",
    "verify_zero_norm",
    "model_digest",
]


@dataclass
class VerifyReport:
    verdict: str
    model: str
    column: str
    threshold: float = MIN_COSINE
    full: bool = False
    sampled: int = 0  # vectors read
    compared: int = 0  # re-embedded and compared
    min_cosine: float | None = None
    median_cosine: float | None = None
    below_threshold: int = 0
    zero_norm: int = 0  # stored vectors of norm 0 (cosine search cannot rank them)
    skipped: dict[str, int] = field(default_factory=dict)  # no_provenance, other_model, text_changed, rejected
    worst: list[list[Any]] = field(default_factory=list)  # [[id, cosine], ...] lowest first, at most 5
    other_length: int = 0  # re-embedded vectors whose length differs from the stored one (no cosine computed)
    stored_length: int | None = None  # set when other_length > 0: the stored vectors' length ...
    server_length: int | None = None  # ... and the length the server answers with now
    model_missing: bool = False  # not evaluated because the server does not have the model (exit 4)
    digest: str | None = None  # the model's digest as /api/tags reports it now
    recorded_digest: str | None = None  # the digest recorded by the last run of the model that reported one
    api: str = identity.DEFAULT_API  # the API the sample was re-embedded through (WIKI_EMBED_API)
    api_accepted: bool = False  # a match through another API than the column's: that API is now the column's
    message: str = ""

    @property
    def exit_code(self) -> int:
        if self.verdict == "not_evaluated" and self.model_missing:
            return MODEL_NOT_FOUND_EXIT
        return EXIT_CODES.get(self.verdict, 1)

    @property
    def digest_changed(self) -> bool | None:
        if not self.digest or not self.recorded_digest:
            return None
        return self.digest != self.recorded_digest

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exit_code": self.exit_code, "digest_changed": self.digest_changed}


def verify(
    store: Store,
    settings: Settings,
    model: str,
    *,
    sample: int = DEFAULT_SAMPLE,
    full: bool = False,
    threshold: float = MIN_COSINE,
    seed: int | None = None,
    record: bool = True,
) -> VerifyReport:
    """Re-embed a sample (or, with `full`, every vector) of the store's column with `model` and compare."""
    report = VerifyReport("not_evaluated", model, store.table.embedding_column, threshold=threshold, full=full)
    report.api = settings.api
    cosines: list[tuple[int, float]] = []
    lengths: list[tuple[int, int]] = []  # (stored, fresh) of each vector answered with another length
    skipped: dict[str, int] = defaultdict(int)
    batches = _pages(store, settings, sample, full, seed)
    first = next(batches, None)
    if first is None:  # no vector in the column: nothing is asked of the server
        report.verdict = "nothing_to_verify"
        report.message = (
            f"nothing to verify: {store.table.qualified}.{store.table.embedding_column} holds no vector yet; "
            "this blocks nothing"
        )
        _finish(store, report, record)
        return report
    try:
        report.digest = asyncio.run(_digest(settings, model))
        last = store.latest_trust("model_digest", model)
        report.recorded_digest = (last or {}).get("digest")
        for ids in itertools.chain([first], batches):
            rows = store.read_for_verify(ids, settings.max_chars)
            report.sampled += len(rows)
            todo = _comparable(rows, model, skipped, report)
            if todo:
                cosines += asyncio.run(_compare(settings, model, todo, skipped, lengths))
    except EmbedFailure as exc:
        report.model_missing = isinstance(exc, ModelNotFound)
        report.message = (
            f"not evaluated: the model server did not re-embed the sample ({exc.message}); this says nothing about "
            "the stored vectors"
        )
        report.skipped = dict(skipped)
        _finish(store, report, record)
        return report
    report.skipped = dict(skipped)
    _judge(report, cosines, lengths)
    _finish(store, report, record, settings)
    return report


def _pages(store: Store, settings: Settings, sample: int, full: bool, seed: int | None) -> Any:
    if not full:
        ids = store.sample_ids(sample, seed=seed)
        for k in range(0, len(ids), max(settings.batch_size * 4, 64)):
            yield ids[k : k + max(settings.batch_size * 4, 64)]
        return
    after = None
    while True:
        ids = store.embedded_ids_after(after, FULL_PAGE)
        if not ids:
            return
        yield ids
        after = ids[-1]


def _comparable(
    rows: list[dict[str, Any]], model: str, skipped: dict[str, int], report: VerifyReport
) -> list[tuple[int, str, str, np.ndarray, Pooling | None]]:
    """(id, prefix, text as sent, stored vector, how it was pooled) of the rows whose provenance says how they were
    made (a pooled vector is rebuilt from its recorded pieces and weights: one embedding per piece)."""
    out = []
    for r in rows:
        stored = r["vector"]
        if not np.isfinite(stored).all() or float(np.dot(stored, stored)) == 0.0:
            report.zero_norm += 1
            continue
        if r["model"] is None:
            skipped["no_provenance"] += 1
        elif not same_model(r["model"], model):
            skipped["other_model"] += 1
        elif r["text_md5"] != r["current_md5"]:
            skipped["text_changed"] += 1
        elif not (r["text"] or "").strip():
            skipped["empty_text"] += 1
        else:
            pooling = Pooling.from_json(r["pooling"]) if r.get("pooling") else None
            out.append((int(r["id"]), r["text_prefix"] or "", clean_text(r["text"]), stored, pooling))
    return out


async def _digest(settings: Settings, model: str) -> str | None:
    client = build_client(settings, model)
    try:
        return await client.model_digest()
    finally:
        await client.aclose()


async def _compare(
    settings: Settings,
    model: str,
    todo: list[tuple[int, str, str, np.ndarray, Pooling | None]],
    skipped: dict[str, int],
    lengths: list[tuple[int, int]],
) -> list[tuple[int, float]]:
    """Cosine of each stored vector with the live model's vector of the same text (grouped by prefix; a pooled one
    rebuilt from its recorded pieces); a fresh vector of another length gets no cosine: its (stored, fresh) lengths
    go to `lengths`."""
    by_prefix: dict[str, list[tuple[int, str, np.ndarray, Pooling | None]]] = defaultdict(list)
    for cid, prefix, text, stored, pooling in todo:
        by_prefix[prefix].append((cid, text, stored, pooling))
    out: list[tuple[int, float]] = []
    for prefix, rows in by_prefix.items():
        client = build_client(settings.replace(text_prefix=prefix), model)
        try:
            for k in range(0, len(rows), settings.batch_size):
                batch = rows[k : k + settings.batch_size]
                for (cid, _, stored, _), vector in zip(batch, await _fresh(client, batch, skipped), strict=True):
                    if vector is not None and vector.shape != stored.shape and vector.size > 1:
                        lengths.append((int(stored.shape[0]), int(vector.shape[0])))
                    elif vector is not None:
                        out.append((cid, cosine(stored, vector)))
        finally:
            await client.aclose()
    return out


async def _fresh(
    client: Any, batch: list[tuple[int, str, np.ndarray, Pooling | None]], skipped: dict[str, int]
) -> list[np.ndarray | None]:
    """The live model's vector of each row as it was made: its text, or its recorded pieces pooled."""
    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    for _, text, _, pooling in batch:
        pieces = pooling.texts(text) if pooling is not None else [text]
        spans.append((len(texts), len(texts) + len(pieces)))
        texts += pieces
    vectors = await _embed(client, texts, skipped)
    out: list[np.ndarray | None] = []
    for (start, end), (_, _, _, pooling) in zip(spans, batch, strict=True):
        got = vectors[start:end]
        whole = [v for v in got if v is not None]
        if pooling is None:
            out.append(got[0])
        elif len(whole) < len(got) or len({v.shape for v in whole}) > 1 or any(v.size <= 1 for v in whole):
            out.append(next((v for v in got if v is None or v.size <= 1), None))  # a piece refused or invalid
        else:
            out.append(pooling.combine(whole))
    return out


async def _embed(client: Any, texts: list[str], skipped: dict[str, int]) -> list[np.ndarray | None]:
    """Vectors for `texts`; a text the server refuses alone is skipped (counted), an invalid vector scores 0."""
    try:
        return list(await client.embed(texts))
    except InvalidVectors as exc:  # NaN / wrong length: the server does not reproduce the vector
        return [v if v is not None else np.zeros(1, np.float32) for v in exc.vectors]
    except InputRejected:
        if len(texts) == 1:
            skipped["rejected"] += 1
            return [None]
        out: list[np.ndarray | None] = []
        for text in texts:
            out += await _embed(client, [text], skipped)
        return out


def _judge(report: VerifyReport, cosines: list[tuple[int, float]], lengths: Sequence[tuple[int, int]] = ()) -> None:
    if lengths:
        _other_length(report, cosines, lengths)
        return
    report.compared = len(cosines)
    values = [c for _, c in cosines]
    if values:
        report.min_cosine = round(min(values), 6)
        report.median_cosine = round(statistics.median(values), 6)
    report.below_threshold = sum(1 for c in values if c < report.threshold)
    report.worst = [[cid, round(c, 6)] for cid, c in sorted(cosines, key=lambda x: x[1])[:5]]
    name = f"{report.model!r}"
    cause = ""
    if report.digest_changed:
        cause = (
            f" The server reports digest {report.digest[:12]} for it; the runs that embedded recorded "  # type: ignore[index]
            f"{report.recorded_digest[:12]}: its weights were replaced (an `ollama pull`)."  # type: ignore[index]
        )
    if not values and not report.zero_norm:
        report.verdict = "not_evaluated"
        report.message = (
            f"not evaluated: none of the {report.sampled} sampled vectors could be compared "
            f"(skipped: {report.skipped or 'none'}); embed with this tool so provenance is recorded"
        )
    elif values and report.below_threshold * 2 >= len(values):
        report.verdict = "model_changed"
        report.message = (
            f"the model answering as {name} changed: {report.below_threshold} of {len(values)} re-embedded vectors "
            f"differ from the stored ones (min cosine {report.min_cosine}, median {report.median_cosine}, threshold "
            f"{report.threshold}).{cause} Re-embed with `wiki-embeddings migrate-model --to {report.model}` (allowed "
            "after this result: fills a shadow column with the new weights, then --swap), or restore the model the "
            "vectors were made with."
        )
    elif report.below_threshold or report.zero_norm:
        report.verdict = "mismatch"
        worst = ", ".join(str(cid) for cid, c in report.worst if c < report.threshold)
        report.message = (
            f"{report.below_threshold} of {len(values)} re-embedded vectors differ from the stored ones (worst ids: "
            f"{worst or '-'}) and {report.zero_norm} stored vectors have norm 0 or hold NaN; the model {name} "
            "still reproduces the rest. Re-embed those chunks (set their vector to NULL and run maintenance)."
        )
    else:
        report.verdict = "match"
        report.message = (
            f"the stored vectors match the live model {name}: {len(values)} re-embedded, min cosine "
            f"{report.min_cosine} >= {report.threshold}"
        )


def _other_length(report: VerifyReport, cosines: list[tuple[int, float]], lengths: Sequence[tuple[int, int]]) -> None:
    """The server answers with vectors of another length than the stored ones: another model answers under the
    name (or a `dimensions` option cuts them). Said with both lengths; no cosine across lengths is invented."""
    (stored, fresh), _ = Counter(lengths).most_common(1)[0]
    report.compared = len(cosines)
    report.other_length, report.stored_length, report.server_length = len(lengths), stored, fresh
    report.verdict = "model_changed"
    report.message = (
        f"the model answering as {report.model!r} changed: it now returns vectors of length {fresh}, the stored "
        f"vectors have length {stored} ({len(lengths)} of {len(lengths) + len(cosines)} re-embedded vectors). "
        f"Re-embed with `wiki-embeddings migrate-model --to {report.model}` (a new column of length {fresh}, then "
        "--swap), or restore the model the vectors were made with."
    )


def _finish(store: Store, report: VerifyReport, record: bool, settings: Settings | None = None) -> None:
    if record and report.verdict == "match" and identity.accept_api(store, report.model, report.api):
        report.api_accepted = True
        report.message += (
            f"; made through another API before, they are reproduced through the {report.api} API "
            "(WIKI_EMBED_API), which is now accepted for this column"
        )
    if record and report.verdict == "match" and settings is not None:
        # Reproduced through these servers: their answers to the probe text join the column's (core/fingerprint.py),
        # so a run through them is no longer refused as another model.
        fingerprint.accept(store, settings, report.model, report.threshold)
    if record:
        store.record_trust("verify", report.as_dict(), model=report.model)


def status_figures(store: Store) -> dict[str, Any]:
    """The status keys from the last recorded verification and run digest (no re-embedding, no scan)."""
    model, _ = store.recorded_model()
    last = store.latest_trust("verify")
    digest = store.latest_trust("model_digest", model) if model else None
    at = last.get("recorded_at") if last else None
    return {
        "verify_result": (last or {}).get("verdict") or "",
        "verify_at": at.isoformat(timespec="seconds") if at else "",
        "verify_compared": (last or {}).get("compared", ""),
        "verify_min_cosine": "" if not last or last.get("min_cosine") is None else last["min_cosine"],
        "verify_below_threshold": (last or {}).get("below_threshold", ""),
        "verify_zero_norm": (last or {}).get("zero_norm", ""),
        "model_digest": (digest or {}).get("digest") or "",
    }


def drift_figures(store: Store) -> dict[str, Any]:
    """The drift verdict that stands for readiness (core/readiness.py `assess`), from the database alone: the last
    decisive `verify` / drift-check verdict of the table, unless a later swap or rollback replaced the column, or -
    for `mismatch`, whose remedy is re-embedding those chunks - a run of the column that started after it wrote
    vectors. A later `match` replaces it; `not_evaluated` and `nothing_to_verify` say nothing and change nothing.
    `model_changed` is cleared by `migrate-model` (its swap) or a `match`."""
    last = store.latest_trust("verify", verdicts=DECISIVE)
    verdict = str((last or {}).get("verdict") or "")
    out: dict[str, Any] = {"drift_verdict": "", "drift_at": "", "drift_detail": ""}
    if not last or verdict not in BLOCKING_DRIFT:
        return out
    at = last["recorded_at"]
    swapped = store.table_state().get("swapped_at")
    if swapped is not None and swapped > at:
        return out
    if verdict == "mismatch" and store.embedded_since(at):
        return out
    detail = str(last.get("message") or "").split(". ")[0]
    return {"drift_verdict": verdict, "drift_at": at.isoformat(timespec="seconds"), "drift_detail": detail}


def format_report(report: VerifyReport) -> str:
    lines = [
        f"verify: {report.verdict} (exit {report.exit_code})",
        f"model={report.model} column={report.column} {'full' if report.full else 'sample'}={report.sampled} "
        f"compared={report.compared} threshold={report.threshold}",
        f"min_cosine={'' if report.min_cosine is None else report.min_cosine} "
        f"median_cosine={'' if report.median_cosine is None else report.median_cosine} "
        f"below_threshold={report.below_threshold} zero_norm={report.zero_norm}",
        f"skipped={','.join(f'{k}:{v}' for k, v in sorted(report.skipped.items())) or '-'} "
        f"digest={report.digest or '-'} recorded_digest={report.recorded_digest or '-'}",
        report.message,
    ]
    if report.other_length:
        lines.insert(
            3,
            f"other_length={report.other_length} stored_length={report.stored_length} "
            f"server_length={report.server_length}",
        )
    return "\n".join(lines)
