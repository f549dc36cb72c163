"""A server whose window is hard (issue 20 items 3-4): Ollama 0.31's runner that crashes past its physical batch
(each crash a model reload), Ollama 0.30's that cuts silently there. Its window is learned with few crashes (a
bracket of token counts, narrowed by ratios), and texts and pending pieces are planned well below it at once,
so they need no count of their own and cost no further crash. Against the dev server's generations:
integration/test_engine_generations.py and test_break_round.py (a reload longer than --timeout-sec)."""

from __future__ import annotations

import numpy as np
import pytest

from wiki_embeddings.core.backfill import cuts
from wiki_embeddings.core.backfill.cuts import Bracket
from wiki_embeddings.core.backfill.outcomes import Embedded
from wiki_embeddings.core.backfill.pooler import Pooler
from wiki_embeddings.core.backfill.probe import CANARY_TEXT, CrashProbes, learn_by_crashes
from wiki_embeddings.core.backfill.worker import EmbedWorker
from wiki_embeddings.core.context import TokenEstimator, Window
from wiki_embeddings.core.pooling import Pooling, split_for_window
from wiki_embeddings_tests.unit.fakes import FakeEmbedder, Outcomes, hash_vector, run, words

pytestmark = pytest.mark.unit

LONG = " ".join(f"word{i} sentence number {i} goes here." for i in range(120))


def long_rows(n: int, size: int = 300) -> list[tuple[int, str]]:
    return [(k + 1, words(size, word=f"w{k}x")) for k in range(n)]


def embed(worker: EmbedWorker, rows: list[tuple[int, str]]) -> Outcomes:
    from wiki_embeddings.core.backfill.outcomes import Batch

    out = Outcomes()
    run(worker.embed(Batch(rows), out.emit))
    return out


def assert_pooled_as_recorded(out: Outcomes, rows: list[tuple[int, str]], fake: FakeEmbedder) -> None:
    """Every vector is the weighted mean of its recorded pieces' vectors (or the whole text's), none cut."""
    texts = dict(rows)
    for done in out.embedded:
        for k, cid in enumerate(done.ids):
            assert not done.cut[k] and not done.truncated[k]
            description = done.pooling[k] if done.pooling else None
            if description is None:
                want = hash_vector(texts[cid], fake.dim)
            else:
                plan = Pooling.from_json(description)
                want = plan.combine([hash_vector(t, fake.dim) for t in plan.texts(texts[cid])])
            assert np.allclose(done.vectors[k], want, atol=1e-6)


# --------------------------------------------------------------------------------------------- the bracket


def test_a_bracket_keeps_the_largest_answer_and_the_smallest_crash_and_narrows_by_ratios():
    bracket = Bracket(answered=22)
    bracket.crash(7782)
    bracket.crash(9000)  # a larger crash teaches nothing
    assert bracket.crashed == 7782 and bracket.next_try() == int((22 * 7782) ** 0.5)
    bracket.answer(400)
    bracket.answer(100)  # a smaller answer teaches nothing
    assert bracket.answered == 400 and not bracket.settled
    bracket.crash(430)
    assert bracket.settled and bracket.next_try() is None  # 400 of 430: within a tenth
    bracket.answer(500)  # an answer over an estimated ceiling: the ceiling was wrong, the answer stands
    assert bracket.crashed is None and bracket.answered == 500 and bracket.settled


@pytest.mark.parametrize("window", [64, 256, 2048])
def test_learning_a_crashing_runners_window_costs_a_few_crashes_and_lands_within_a_tenth_below_it(window):
    fake = FakeEmbedder(crash_window=window)

    async def call(texts: list[str]):
        return await fake.embed_texts(texts)

    one, two = fake.tokens(CANARY_TEXT), fake.tokens(CANARY_TEXT + " " + CANARY_TEXT)
    bracket = Bracket(answered=two)
    bracket.crash(cuts.repeats_for(8192 * cuts.PROBE_SHARE, one, two)[1])  # the probe's 95 % text crashed
    run(learn_by_crashes(call, bracket, one, two))
    step = two - one  # the canary's grain: the search cannot land closer than one repeat
    assert min(0.9 * window, window - step) <= bracket.answered <= window
    assert fake.crashes <= 4 and len(fake.requests) <= 8


@pytest.mark.parametrize("window", [64, 256, 2048])
def test_a_text_planned_for_a_hard_window_cannot_reach_it(window):
    estimator = TokenEstimator()
    text = LONG * (1 + window // 200)
    pieces = split_for_window(text, "query: ", cuts.plan_window(window), estimator)
    assert len(pieces) > 1
    assert not any(cuts.may_reach(Window(learned=window), estimator, "query: ", p.of(text)) for p in pieces)


# --------------------------------------------------------------------------------------------- the pooler


def test_a_piece_replanned_for_a_smaller_window_is_replaced_by_pieces_that_cover_it():
    pooler = Pooler(TokenEstimator())
    [first, *rest] = pooler.expand((7, LONG), "", 256)
    again = pooler.resplit(first[0], "", 64)
    assert len(again) > 1 and "".join(t for _, t in again) == first[1]
    assert pooler.resplit(again[0][0], "", 64) == [again[0]], "a piece that fits stays as it is"
    pieces = again + rest

    async def go() -> list[Embedded]:
        out: list[Embedded] = []

        async def emit(outcome) -> None:
            out.append(outcome)

        vectors = [hash_vector(t, 8) for _, t in pieces]
        await pooler.take(
            Embedded(
                [k for k, _ in pieces],
                vectors,
                [len(t) for _, t in pieces],
                [False] * len(pieces),
                [False] * len(pieces),
            ),
            emit,
        )
        return out

    [done] = run(go())
    plan = Pooling.from_json(done.pooling[0])
    assert plan.texts(LONG) == [t for _, t in pieces]
    assert np.allclose(done.vectors[0], plan.combine([hash_vector(t, 8) for _, t in pieces]), atol=1e-6)


# --------------------------------------------------------------------------------------------- the worker


def test_the_window_probe_searches_a_crashing_runners_window_and_pieces_are_planned_below_it():
    fake = FakeEmbedder(crash_window=64)  # describes 512 tokens, its runner crashes past 64
    worker = EmbedWorker(fake, long_text="pool")
    worker.window = Window(context_length=512)
    run(worker.probe_window())
    assert worker.crash.seen and 58 <= (worker.window.tokens or 0) <= 64
    probe_crashes = fake.crashes
    assert probe_crashes <= 4
    fake.requests.clear()
    batch = long_rows(8)
    out = embed(worker, batch)
    assert fake.crashes == probe_crashes, "no crash once the window is known"
    assert fake.sizes() == [sum(len(Pooling.from_json(d).pieces) for o in out.embedded for d in o.pooling or [])]
    assert out.embedded_ids == [cid for cid, _ in batch]
    assert_pooled_as_recorded(out, batch, fake)


def test_a_crash_mid_run_learns_the_window_and_replans_the_batch_at_once_not_crash_by_crash():
    fake = FakeEmbedder(crash_window=64)
    worker = EmbedWorker(fake, long_text="pool")
    worker.window = Window(context_length=512)  # no probe: the first crash is met mid-run
    lines: list[str] = []
    worker._log = lines.append
    batch = long_rows(8)
    out = embed(worker, batch)
    assert out.embedded_ids == [cid for cid, _ in batch] and not out.isolated
    assert fake.crashes <= 5, f"{fake.crashes} crashes: the batch's, then the window search's"
    assert 58 <= (worker.window.tokens or 0) <= 64 and any("it takes about" in line for line in lines)
    assert_pooled_as_recorded(out, batch, fake)


def test_batches_wait_for_a_window_search_under_way_instead_of_crashing_the_runner_meanwhile():
    probes = CrashProbes()
    fake = FakeEmbedder(crash_window=64)
    order: list[str] = []

    async def call(texts: list[str]):
        order.append("probe")
        return await fake.embed_texts(texts)

    async def scenario() -> None:
        import asyncio

        async def batch() -> None:
            await asyncio.sleep(0)
            await probes.settled()
            order.append("batch")

        search = asyncio.ensure_future(probes.learn(call, 0, 2000))
        await asyncio.gather(batch(), search)

    run(scenario())
    assert order[-1] == "batch" and order.count("probe") >= 3


def test_a_silent_cutters_pieces_are_planned_below_its_window_and_share_one_request():
    fake = FakeEmbedder(silent_window=100)  # describes 512 tokens, cuts past 100 without a word
    worker = EmbedWorker(fake, long_text="pool")
    worker.window = Window(context_length=512)
    run(worker.probe_window())
    assert worker.silent_cut and worker.window.tokens == 100
    fake.requests.clear()
    batch = [*long_rows(6), (50, words(100))]  # six long chunks and one near the window (~80 of 100 tokens)
    out = embed(worker, batch)
    assert len(fake.requests) == 1, f"one request, no text counted alone: {fake.sizes()}"
    assert out.embedded_ids == sorted(cid for cid, _ in batch) and worker.server_truncated == 0
    assert_pooled_as_recorded(out, batch, fake)
