"""Pooled embeddings of long texts (core/pooling.py, issue 23): how a text is split for the window, how the pieces'
vectors are combined, and that the recorded description rebuilds the vector exactly."""

from __future__ import annotations

import asyncio
import hashlib
import json

import numpy as np
import pytest

from wiki_embeddings.core.context import SAFETY, TokenEstimator
from wiki_embeddings.core.pooling import (
    Piece,
    Pooling,
    pool,
    rebuild,
    rebuild_async,
    split_for_window,
    split_piece,
    weights_for,
)

pytestmark = pytest.mark.unit

EST = TokenEstimator()
WINDOW = 256
BUDGET = WINDOW * SAFETY

ENGLISH = " ".join(
    f"Sentence number {i} tells of the river Thames, which flows through London and Oxford in {1800 + i}."
    for i in range(60)
)
KOREAN = "\n".join(
    f"{i}번째 문장은 서울을 흐르는 한강에 대한 이야기이며 조선 시대부터 중요한 교통로였다." for i in range(40)
)


def fake_vector(text: str, dim: int = 16) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def embed(texts: list[str]) -> list[np.ndarray]:
    return [fake_vector(t) for t in texts]


def assert_covering(text: str, pieces: list[Piece]) -> None:
    assert pieces[0].start == 0 and pieces[-1].end == len(text)
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert a.start < b.start <= a.end < b.end  # no gap, always advancing
    assert all(len(p) > 0 for p in pieces)


def fits(piece_text: str, prefix: str = "") -> bool:
    return EST.estimate(prefix + piece_text) <= BUDGET


def test_a_text_that_fits_is_one_piece_and_an_unknown_window_sends_it_whole():
    assert split_for_window("a short text", "", WINDOW, EST) == [Piece(0, 12)]
    assert split_for_window(ENGLISH, "", None, EST) == [Piece(0, len(ENGLISH))]


@pytest.mark.parametrize("text", [ENGLISH, KOREAN], ids=["english", "korean"])
def test_pieces_cover_the_whole_text_each_fits_and_they_cut_at_sentence_ends(text):
    pieces = split_for_window(text, "", WINDOW, EST)
    assert len(pieces) > 2
    assert_covering(text, pieces)
    assert [p.start for p in pieces[1:]] == [p.end for p in pieces[:-1]]  # overlap 0: adjacent
    assert all(fits(p.of(text)) for p in pieces)
    for p in pieces[:-1]:  # every cut follows a sentence's end, and no piece is under half the room
        assert p.of(text).rstrip()[-1] in ".다", p.of(text)[-20:]
        assert EST.estimate(p.of(text)) > BUDGET / 2


def test_the_prefix_is_accounted_for_in_every_piece():
    prefix = "search_document: a rather long instruction prefix that takes its share of the window "
    bare = split_for_window(ENGLISH, "", WINDOW, EST)
    with_prefix = split_for_window(ENGLISH, prefix, WINDOW, EST)
    assert len(with_prefix[0]) < len(bare[0])
    assert not fits(bare[0].of(ENGLISH), prefix)  # the bare piece would overflow once the prefix is sent with it
    assert_covering(ENGLISH, with_prefix)
    assert all(fits(p.of(ENGLISH), prefix) for p in with_prefix)
    with pytest.raises(ValueError, match="prefix"):
        split_for_window(ENGLISH, "word " * 400, WINDOW, EST)


@pytest.mark.parametrize("overlap", [16, 32, 64])
def test_consecutive_pieces_overlap_by_about_the_tokens_asked_starting_at_a_word(overlap):
    pieces = split_for_window(KOREAN, "", WINDOW, EST, overlap_tokens=overlap)
    assert_covering(KOREAN, pieces)
    assert all(fits(p.of(KOREAN)) for p in pieces)
    base = EST.estimate("")
    for a, b in zip(pieces, pieces[1:], strict=False):
        shared = KOREAN[b.start : a.end]
        assert 0 < EST.estimate(shared) - base <= overlap
        assert EST.estimate(shared) - base >= overlap / 2  # snapped forward to a word, not far
        assert KOREAN[b.start - 1].isspace() and not KOREAN[b.start].isspace()
    assert len(pieces) >= len(split_for_window(KOREAN, "", WINDOW, EST))


def test_an_overlap_over_half_a_piece_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        split_for_window(ENGLISH, "", WINDOW, EST, overlap_tokens=200)


def test_whitespace_cuts_when_no_sentence_ends_nearby():
    text = " ".join(["alpha", "beta", "gamma", "delta"] * 150)  # no sentence ends at all
    pieces = split_for_window(text, "", WINDOW, EST)
    assert_covering(text, pieces)
    for p in pieces[:-1]:
        assert text[p.end - 1] == " " and text[p.end] != " "  # a word is never split


def test_a_huge_word_is_cut_at_characters_and_costs_little():
    word = "x" * 50_000
    pieces = split_for_window(word, "q: ", WINDOW, EST, overlap_tokens=16)
    assert_covering(word, pieces)
    assert all(fits(p.of(word), "q: ") for p in pieces)
    assert len(pieces) < 50  # each piece is close to the room, not a sliver
    mixed = "intro words here " + word + " outro words"
    assert_covering(mixed, split_for_window(mixed, "", WINDOW, EST))


def test_splitting_is_deterministic():
    runs = {tuple(split_for_window(KOREAN + ENGLISH, "p: ", WINDOW, EST, 32)) for _ in range(3)}
    assert len(runs) == 1
    with pytest.raises(ValueError, match="empty"):
        split_for_window("", "", WINDOW, EST)


def test_a_refused_piece_is_halved_at_whitespace_near_its_middle():
    piece = split_for_window(ENGLISH, "", WINDOW, EST)[0]
    left, right = split_piece(ENGLISH, piece)
    assert (left.start, right.end) == (piece.start, piece.end) and left.end == right.start
    assert ENGLISH[left.end - 1] == " " and abs(len(left) - len(right)) < 20
    assert split_piece("abcdef", Piece(0, 6)) == [Piece(0, 3), Piece(3, 6)]
    assert split_piece("a", Piece(0, 1)) == [Piece(0, 1)]


def test_weights_are_characters_or_estimated_tokens():
    pieces = split_for_window(KOREAN, "", WINDOW, EST, 32)
    assert weights_for(pieces, KOREAN) == [float(len(p)) for p in pieces]
    tokens = weights_for(pieces, KOREAN, "tokens", EST)
    assert tokens == [pytest.approx(EST.estimate(p.of(KOREAN)) - EST.estimate("")) for p in pieces]
    assert weights_for([Piece(0, 1)], " ", "tokens", EST) == [1.0]  # never zero
    with pytest.raises(ValueError, match="estimator"):
        weights_for(pieces, KOREAN, "tokens")
    with pytest.raises(ValueError, match="unknown"):
        weights_for(pieces, KOREAN, "words")  # type: ignore[arg-type]


def test_the_pooled_vector_is_the_weighted_mean_of_the_pieces_vectors_normalized():
    vectors = [fake_vector(str(i)) for i in range(3)]
    weights = [100.0, 40.0, 7.0]
    got = pool(vectors, weights)
    mean = (weights[0] * vectors[0] + weights[1] * vectors[1] + weights[2] * vectors[2]) / sum(weights)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean), rtol=1e-6, atol=1e-7)
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-6)
    one = pool([vectors[0]], [5.0])
    np.testing.assert_allclose(one, vectors[0] / np.linalg.norm(vectors[0]), rtol=1e-6)


@pytest.mark.parametrize(
    ("vectors", "weights", "message"),
    [
        ([], [], "non-empty"),
        ([np.ones(4)], [1.0, 2.0], "weights"),
        ([np.ones(4), np.ones(4)], [0.0, 0.0], "not all zero"),
        ([np.ones(4)], [-1.0], "non-negative"),
        ([np.ones(4), -np.ones(4)], [1.0, 1.0], "norm 0"),
        ([np.array([1.0, np.nan])], [1.0], "not finite"),
    ],
)
def test_pool_refuses_what_has_no_mean(vectors, weights, message):
    with pytest.raises(ValueError, match=message):
        pool(vectors, weights)


def test_the_description_is_compact_json_and_rebuilds_the_vector_exactly():
    prefix = "passage: "
    plan = Pooling.make(KOREAN, prefix, WINDOW, EST, overlap_tokens=32, weights="tokens")
    assert plan.pooled
    made = plan.combine(embed(plan.texts(KOREAN, prefix)))
    stored = json.dumps(plan.to_json())
    assert len(stored) < 40 * len(plan.pieces) + 40
    again = rebuild(stored, KOREAN, embed, prefix)
    np.testing.assert_array_equal(again, made)
    np.testing.assert_array_equal(rebuild(json.loads(stored), KOREAN, embed, prefix), made)

    async def aembed(texts: list[str]) -> list[np.ndarray]:
        return embed(texts)

    np.testing.assert_array_equal(asyncio.run(rebuild_async(plan, KOREAN, aembed, prefix)), made)
    # the estimator may have learned since: the recorded pieces and weights still rule, not a new split
    learned = TokenEstimator()
    learned.observe([KOREAN[:500]], 900)
    assert Pooling.make(KOREAN, prefix, WINDOW, learned, overlap_tokens=32, weights="tokens") != plan
    np.testing.assert_array_equal(rebuild(stored, KOREAN, embed, prefix), made)


def test_chars_weights_are_stored_as_integers_and_a_short_text_is_one_piece():
    plan = Pooling.make("short text", "", WINDOW, EST)
    assert not plan.pooled
    assert plan.to_json() == {"v": 1, "pieces": [[0, 10]], "weights": [10]}
    np.testing.assert_allclose(rebuild(plan.to_json(), "short text", embed), pool(embed(["short text"]), [1.0]))


@pytest.mark.parametrize(
    "bad",
    [
        {"v": 2, "pieces": [[0, 1]], "weights": [1]},
        {"v": 1, "pieces": [[0, 1]], "weights": [1, 2]},
        {"v": 1, "pieces": [[3, 3]], "weights": [1]},
        {"v": 1, "pieces": "nope", "weights": [1]},
        "[1, 2]",
    ],
)
def test_a_malformed_description_is_refused(bad):
    with pytest.raises(ValueError):
        Pooling.from_json(bad)


def test_rebuild_refuses_a_text_shorter_than_recorded_and_a_wrong_vector_count():
    plan = Pooling((Piece(0, 5), Piece(5, 10)), (5.0, 5.0))
    with pytest.raises(ValueError, match="has 8"):
        rebuild(plan, "abcdefgh", embed)
    with pytest.raises(ValueError, match="1 vectors for 2"):
        rebuild(plan, "abcdefghij", lambda texts: embed(texts)[:1])
