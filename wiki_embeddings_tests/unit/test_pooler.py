"""The pooler (issue 23): long rows out as pieces, pieces' outcomes back as one pooled outcome per chunk."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from wiki_embeddings.core.backfill.outcomes import Embedded, Isolated
from wiki_embeddings.core.backfill.pooler import PIECE_KEYS, Pooler
from wiki_embeddings.core.context import TokenEstimator
from wiki_embeddings.core.pooling import Pooling

pytestmark = pytest.mark.unit

LONG = " ".join(f"word{i} sentence number {i} goes here." for i in range(120))


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=8).astype(np.float32)
    return v / np.linalg.norm(v)


def collect(pooler: Pooler, outcomes: list[Embedded | Isolated]) -> tuple[list[Embedded | Isolated], list]:
    out: list[Embedded | Isolated] = []

    async def emit(o: Embedded | Isolated) -> None:
        out.append(o)

    async def go() -> list:
        again = []
        for o in outcomes:
            again += await pooler.take(o, emit)
        return again

    return out, asyncio.run(go())


def answer(rows: list[tuple[int, str]], cut: set[int] | None = None) -> Embedded:
    cut = cut or set()
    return Embedded(
        [k for k, _ in rows],
        [vec(k % 1000) for k, _ in rows],
        [len(t) for _, t in rows],
        [k in cut for k, _ in rows],
        [False] * len(rows),
    )


def test_a_long_row_goes_out_as_pieces_with_keys_no_chunk_id_can_have():
    pooler = Pooler(TokenEstimator())
    rows = pooler.expand((7, LONG), "", 128)
    assert len(rows) > 1 and all(Pooler.is_piece(k) and k >= PIECE_KEYS for k, _ in rows)
    assert "".join(t for _, t in rows) == LONG, "the pieces cover the text (no overlap by default)"
    assert pooler.expand((8, "short text"), "", 128) == [(8, "short text")]


def test_a_chunk_is_written_only_when_all_its_pieces_are_in_as_their_weighted_mean():
    pooler = Pooler(TokenEstimator())
    rows = pooler.expand((7, LONG), "", 128)
    first, rest = answer(rows[:1]), answer(rows[1:])
    out, _ = collect(pooler, [first])
    assert out == [], "one piece is not a chunk"
    out, _ = collect(pooler, [rest])
    assert len(out) == 1 and isinstance(out[0], Embedded) and out[0].ids == [7]
    pooled = out[0]
    assert pooled.chars == [len(LONG)] and pooled.cut == [False] and pooler.pooled == 1
    plan = Pooling.from_json(json.loads(pooled.pooling[0]))
    vectors = np.stack([vec(k % 1000) for k, _ in rows])
    mean = np.average(vectors, axis=0, weights=plan.weights)
    assert np.allclose(pooled.vectors[0], mean / np.linalg.norm(mean), atol=1e-6)


def test_other_chunks_of_the_same_answer_go_on_untouched():
    pooler = Pooler(TokenEstimator())
    rows = [(1, "short")] + pooler.expand((7, LONG), "", 128)
    out, _ = collect(pooler, [answer(rows)])
    assert [o.ids for o in out] == [[1], [7]]


def test_a_piece_the_server_cut_is_split_in_two_and_sent_again_never_stored_cut():
    pooler = Pooler(TokenEstimator())
    rows = pooler.expand((7, LONG), "", 128)
    cut_key = rows[0][0]
    out, again = collect(pooler, [answer(rows, cut={cut_key})])
    assert out == [] and len(again) == 2 and again[0][1] + again[1][1] == rows[0][1]
    out, more = collect(pooler, [answer(again)])
    assert more == [] and len(out) == 1 and out[0].ids == [7]
    plan = Pooling.from_json(json.loads(out[0].pooling[0]))
    assert len(plan.pieces) == len(rows) + 1


def test_a_failed_piece_fails_its_chunk_once_with_the_pieces_error():
    pooler = Pooler(TokenEstimator())
    rows = pooler.expand((7, LONG), "", 128)
    bad = Isolated(rows[1][0], "http_400", "invalid input", 400, len(rows[1][1]))
    out, _ = collect(pooler, [bad, answer(rows[:1] + rows[2:])])
    assert len(out) == 1 and isinstance(out[0], Isolated)
    assert out[0].chunk_id == 7 and out[0].error == "http_400" and out[0].text_length == len(LONG)


def test_a_chunk_that_was_estimated_to_fit_but_refused_is_pooled_from_its_halves():
    pooler = Pooler(TokenEstimator())
    halves = pooler.halves((9, "alpha beta gamma delta"))
    assert [t for _, t in halves] == ["alpha beta ", "gamma delta"]
    out, _ = collect(pooler, [answer(halves)])
    assert out[0].ids == [9] and out[0].pooling is not None
