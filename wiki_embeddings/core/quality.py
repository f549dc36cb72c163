"""The swap's quality gate: does the shadow column (the new model) retrieve at least as well as the live one?

A retrieval self-test on a sample of chunks that have both vectors (`Store.sample_ids` over both columns, spread
over the id range): for each sampled chunk a query is made from part of its own text (`make_query`: a run of
words from its middle, never the whole text), embedded by each column's model with that model's own *query*
prefix (`--query-prefix`, recorded per column in `column_identity`; nomic's `search_query: `), and the chunk's
rank among the sample is found by exact cosine search over the sample only (a matrix product: seconds at any
table size). Figures per column: recall@10 (share of queries whose chunk ranks in the top 10) and MRR.

The swap is refused when the shadow is worse than the live column on either figure by more than the margin
(`DEFAULT_MARGIN`, absolute; `--quality-margin`) and by more than two standard errors of the paired per-query
difference (a small sample's chance deficit never refuses), or when the test could not run (the model server is
away). A table with fewer than `MIN_SAMPLE` queryable chunks skips the test (recorded, not a refusal);
`--force` swaps anyway and the forced swap is recorded with the figures. Results are recorded in
`<state schema>.trust_log` (kind `quality`), shown by `migrate-model --status` and the shadow's Dagster metadata.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wiki_embeddings.core import identity, migration
from wiki_embeddings.core.db import Store
from wiki_embeddings.core.embedders import EmbedFailure
from wiki_embeddings.core.factories import build_client
from wiki_embeddings.core.text import clean_text
from wiki_embeddings.settings import Settings

DEFAULT_SAMPLE = 2000
#: How much worse (absolute) the shadow's recall@10 or MRR may be than the live column's before a swap is refused.
#: Paired on the same queries, the difference's noise at 2000 queries is about 0.005; a model that is really
#: worse (a missing query prefix, a weaker model) loses several points.
DEFAULT_MARGIN = 0.02
TOP_K = 10
MIN_SAMPLE = 2 * TOP_K  # fewer queryable chunks: the test is skipped (a tiny table), never a refusal
QUERY_WORDS = 12
QUALITY_KEYS = [
    "quality_result",
    "quality_at",
    "quality_sample",
    "live_recall_at_10",
    "live_mrr",
    "shadow_recall_at_10",
    "shadow_mrr",
    "quality_margin",
    "quality_forced",
]


class QualityRefused(RuntimeError):
    """The swap was refused by the retrieval self-test; the message carries the figures, `figures` the recorded
    ones (`latest_figures`)."""

    def __init__(self, message: str, figures: dict[str, Any] | None = None):
        super().__init__(message)
        self.figures = figures or {}


@dataclass
class ColumnScore:
    column: str
    model: str
    query_prefix: str
    recall_at_10: float | None = None
    mrr: float | None = None


@dataclass
class QualityReport:
    verdict: str  # pass | refused | not_evaluated (server away: refused unless --force) | skipped (tiny table)
    sample: int
    margin: float
    live: ColumnScore
    shadow: ColumnScore
    forced: bool = False
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict in ("pass", "skipped")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def figures(self) -> dict[str, Any]:
        """Flat key=value figures (migrate-model --status, Dagster metadata)."""
        return {
            "quality_result": self.verdict + (" (forced swap)" if self.forced and not self.passed else ""),
            "quality_sample": self.sample,
            "live_recall_at_10": self.live.recall_at_10,
            "live_mrr": self.live.mrr,
            "shadow_recall_at_10": self.shadow.recall_at_10,
            "shadow_mrr": self.shadow.mrr,
            "quality_margin": self.margin,
            "quality_forced": self.forced,
        }


def make_query(text: str, words: int = QUERY_WORDS) -> str:
    """A query made from part of a chunk's own text: `words` consecutive words from its middle (at most half of
    its words, so the query is never the whole text). Deterministic, so a repeated test gives the same figures."""
    tokens = clean_text(text).split()
    if len(tokens) < 4:
        return " ".join(tokens)
    take = max(2, min(words, len(tokens) // 2))
    start = (len(tokens) - take) // 2
    return " ".join(tokens[start : start + take])


def ranks(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """The rank of doc i for query i among all docs, by exact cosine (ties count against it)."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    d = docs / np.maximum(np.linalg.norm(docs, axis=1, keepdims=True), 1e-12)
    scores = q @ d.T
    own = np.diag(scores)
    return 1 + (scores > own[:, None]).sum(axis=1) + ((scores == own[:, None]).sum(axis=1) - 1)


def rank_figures(queries: np.ndarray, docs: np.ndarray, k: int = TOP_K) -> tuple[float, float]:
    """(recall@k, MRR) of query i retrieving doc i among all docs."""
    r = ranks(queries, docs)
    return round(float((r <= k).mean()), 4), round(float((1.0 / r).mean()), 4)


def worse_beyond_noise(live: np.ndarray, shadow: np.ndarray, margin: float) -> bool:
    """Is the shadow's per-query score lower by more than `margin` and by more than two standard errors of the
    paired difference (so a small sample's chance deficit does not refuse a swap)?"""
    diff = shadow.astype(np.float64) - live.astype(np.float64)
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return mean < -margin and mean < -2 * se


async def _embed_queries(settings: Settings, model: str, prefix: str, texts: list[str]) -> np.ndarray:
    client = build_client(settings.replace(text_prefix=prefix), model)
    out: list[np.ndarray] = []
    try:
        for k in range(0, len(texts), settings.batch_size):
            out += await client.embed(texts[k : k + settings.batch_size])
    finally:
        await client.aclose()
    return np.vstack(out) if out else np.zeros((0, 1), np.float32)


def self_test(
    store: Store,
    settings: Settings,
    *,
    sample: int = DEFAULT_SAMPLE,
    margin: float = DEFAULT_MARGIN,
    seed: int | None = 0,
) -> QualityReport:
    """Run the retrieval self-test of the migration in progress (live column vs shadow column)."""
    state = store.table_state()
    live_model, shadow_model = state.get("model") or "", state.get("migration_model") or ""
    live_col, shadow_col = store.table.embedding_column, state.get("migration_column") or ""
    with store.for_column(shadow_col) as sh:
        live = ColumnScore(live_col, live_model, identity.query_prefix(store, settings.query_prefix))
        shadow = ColumnScore(shadow_col, shadow_model, identity.query_prefix(sh))
    report = QualityReport("not_evaluated", 0, margin, live, shadow)
    ids = store.sample_ids(sample, columns=[live_col, shadow_col], seed=seed)
    pairs = store.read_pairs(ids, shadow_col, settings.max_chars)
    pairs = [p for p in pairs if len(clean_text(p[1]).split()) >= 4]
    report.sample = len(pairs)
    if len(pairs) < MIN_SAMPLE:
        report.verdict = "skipped"
        report.message = (
            f"retrieval self-test skipped: only {len(pairs)} chunks with both vectors and at least 4 words (a test "
            f"needs {MIN_SAMPLE}); nothing to compare on a table this small"
        )
        return report
    queries = [make_query(p[1]) for p in pairs]
    found: dict[str, np.ndarray] = {}
    try:
        for score, docs in ((live, np.vstack([p[2] for p in pairs])), (shadow, np.vstack([p[3] for p in pairs]))):
            vectors = asyncio.run(_embed_queries(settings, score.model, score.query_prefix, queries))
            if vectors.shape[1] != docs.shape[1]:
                raise EmbedFailure(
                    f"model {score.model!r} answers {vectors.shape[1]}-d vectors but {score.column} holds "
                    f"{docs.shape[1]}-d ones"
                )
            found[score.column] = r = ranks(vectors, docs)
            score.recall_at_10, score.mrr = round(float((r <= TOP_K).mean()), 4), round(float((1.0 / r).mean()), 4)
    except EmbedFailure as exc:
        report.message = f"not evaluated: the model server did not embed the test queries ({exc.message})"
        return report
    assert live.recall_at_10 is not None and live.mrr is not None
    assert shadow.recall_at_10 is not None and shadow.mrr is not None
    worse = []
    live_ranks, shadow_ranks = found[live_col], found[shadow_col]
    if worse_beyond_noise(live_ranks <= TOP_K, shadow_ranks <= TOP_K, margin):
        worse.append(f"recall@10 {shadow.recall_at_10:.4f} < {live.recall_at_10:.4f}")
    if worse_beyond_noise(1.0 / live_ranks, 1.0 / shadow_ranks, margin):
        worse.append(f"MRR {shadow.mrr:.4f} < {live.mrr:.4f}")
    figures = (
        f"live {live_col} ({live_model!r}, query prefix {live.query_prefix!r}): recall@10 {live.recall_at_10:.4f}, "
        f"MRR {live.mrr:.4f}; shadow {shadow_col} ({shadow_model!r}, query prefix {shadow.query_prefix!r}): "
        f"recall@10 {shadow.recall_at_10:.4f}, MRR {shadow.mrr:.4f}; {len(pairs)} chunks, margin {margin}"
    )
    if worse:
        report.verdict = "refused"
        report.message = (
            f"the shadow retrieves worse than the live column ({'; '.join(worse)}, margin {margin}): {figures}. "
            "Check the new model's --text-prefix / --query-prefix (nomic: 'search_document: ' / 'search_query: '); "
            "`migrate-model --swap --force` swaps anyway (recorded)"
        )
    else:
        report.verdict = "pass"
        report.message = f"retrieval self-test passed: {figures}"
    return report


def gate(
    store: Store,
    settings: Settings,
    *,
    force: bool = False,
    sample: int = DEFAULT_SAMPLE,
    margin: float = DEFAULT_MARGIN,
    log: Any = lambda _m: None,
) -> QualityReport:
    """The self-test before a swap, recorded; QualityRefused unless it passed or `force` is set."""
    blocker = migration.swap_blocker(store)
    if blocker:
        raise migration.MigrationError(blocker)
    report = self_test(store, settings, sample=sample, margin=margin)
    report.forced = force and not report.passed
    who = os.environ.get("USER") or "operator"
    store.record_trust(
        "quality", {**report.as_dict(), "forced_by": who if report.forced else ""}, model=report.shadow.model
    )
    if report.passed:
        log(report.message)
        return report
    if force:
        store.record_trust(
            "swap_forced", {**report.figures(), "by": who, "message": report.message}, model=report.shadow.model
        )
        log(f"{report.message}\n--force: swapping although the quality gate says {report.verdict}; recorded")
        return report
    raise QualityRefused(
        f"swap refused by the retrieval self-test ({report.verdict}): {report.message}", latest_figures(store)
    )


def latest_figures(store: Store) -> dict[str, Any]:
    """The latest self-test of the migration in progress (its target model), as flat figures; {} when none."""
    target, _ = store.migration_target()
    if not target:
        return {}
    last = store.latest_trust("quality", target)
    if not last:
        return {k: "" for k in QUALITY_KEYS}
    live, shadow = last.get("live") or {}, last.get("shadow") or {}
    at = last.get("recorded_at")
    return {
        "quality_result": (last.get("verdict") or "") + (" (forced swap)" if last.get("forced") else ""),
        "quality_at": at.isoformat(timespec="seconds") if at else "",
        "quality_sample": last.get("sample", ""),
        "live_recall_at_10": live.get("recall_at_10", ""),
        "live_mrr": live.get("mrr", ""),
        "shadow_recall_at_10": shadow.get("recall_at_10", ""),
        "shadow_mrr": shadow.get("mrr", ""),
        "quality_margin": last.get("margin", ""),
        "quality_forced": bool(last.get("forced")),
    }
