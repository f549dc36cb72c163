"""The embed worker (core/backfill/worker.py): what it sends for a claimed batch, and what each chunk becomes
(embedded, cut, isolated) or whether the run ends. Against the real server: integration/test_backfill_runbook.py,
test_faults_bad_input.py, test_faults_bad_output.py, test_faults_model_server.py, test_long_chunks.py,
test_context_window.py."""

from __future__ import annotations

import numpy as np
import pytest

from wiki_embeddings.core.backfill import cuts
from wiki_embeddings.core.backfill.errors import Fatal
from wiki_embeddings.core.backfill.outcomes import Batch
from wiki_embeddings.core.backfill.worker import ALONE_TRIES, CANARY_TEXT, CANARY_TRIES, EmbedWorker
from wiki_embeddings.core.context import Window
from wiki_embeddings_tests.unit.fakes import FakeClock, FakeEmbedder, Outcomes, hash_vector, run, words


def rows(*texts: str, first_id: int = 1) -> list[tuple[int, str]]:
    return [(first_id + k, t) for k, t in enumerate(texts)]


def embed(worker: EmbedWorker, batch: Batch | list[tuple[int, str]]) -> Outcomes:
    out = Outcomes()
    run(worker.embed(batch if isinstance(batch, Batch) else Batch(batch), out.emit))
    return out


def test_a_clean_batch_is_one_request_and_one_embedded_outcome():
    fake = FakeEmbedder()
    worker = EmbedWorker(fake)
    out = embed(worker, rows("alpha", "beta", "gamma"))
    [done] = out.all
    assert done.ids == [1, 2, 3] and out.isolated == []
    assert all(
        np.array_equal(v, hash_vector(t, fake.dim))
        for v, t in zip(done.vectors, ["alpha", "beta", "gamma"], strict=True)
    )
    assert done.chars == [5, 4, 5] and done.cut == [False] * 3 and done.truncated == [False] * 3
    assert fake.sizes() == [3]
    assert worker.known_good == "alpha"  # the canary of later batches: a text this server embedded


def test_a_poisoned_chunk_is_isolated_and_the_rest_embedded():
    fake = FakeEmbedder()
    fake.reject("POISON")
    texts = [f"chunk {i}" for i in range(16)]
    texts[11] = "chunk POISON"
    out = embed(EmbedWorker(fake), rows(*texts, first_id=100))
    assert out.embedded_ids == [100 + i for i in range(16) if i != 11]
    [bad] = out.isolated
    assert (bad.chunk_id, bad.error, bad.http_status, bad.text_length) == (111, "http_400", 400, len(texts[11]))


def test_a_400_halves_the_batch_until_the_bad_chunk_stands_alone():
    fake = FakeEmbedder()
    fake.reject("POISON")
    texts = [f"chunk {i}" for i in range(8)]
    texts[5] = "POISON"
    embed(EmbedWorker(fake), rows(*texts))
    assert [len(r.texts) for r in fake.requests if not r.pinned] == [8, 4, 4, 2, 1, 1, 2]
    [canary] = [r for r in fake.requests if r.pinned]
    assert canary.texts == ["chunk 4"]  # before blaming the chunk: a text the server just embedded, again


def test_a_500_asks_the_canary_before_isolating():
    fake = FakeEmbedder(servers=2)
    fake.fail("BOOM")
    out = embed(EmbedWorker(fake), rows("a", "b BOOM", "c", "d"))
    first, second = fake.requests[:2]
    assert first.texts == ["a", "b BOOM", "c", "d"] and not first.pinned
    assert second.texts == [CANARY_TEXT] and second.pinned and second.server == first.server
    assert out.embedded_ids == [1, 3, 4]
    assert [(i.chunk_id, i.error, i.http_status) for i in out.isolated] == [(2, "http_500", 500)]


def test_the_canary_goes_to_the_server_that_failed():
    fake = FakeEmbedder(servers=2)
    fake.sick(1)  # server 0 is well, server 1 answers 500 to everything
    worker = EmbedWorker(fake)
    first = embed(worker, rows("healthy text"))  # round robin: server 0
    assert first.embedded_ids == [1]
    out = embed(worker, rows("x", "y", first_id=2))  # round robin: server 1
    failed, canary = fake.requests[1:3]
    assert failed.server == 1 and not failed.pinned
    assert (canary.texts, canary.server, canary.pinned) == (["healthy text"], 1, True)  # not the healthy server 0
    assert out.isolated == []  # a sick server never gets a healthy chunk isolated


def test_a_server_that_fails_the_canary_leaves_the_rotation_and_its_rows_go_to_another():
    fake = FakeEmbedder(servers=2)
    fake.sick(1)
    worker = EmbedWorker(fake)
    embed(worker, rows("healthy text"))
    out = embed(worker, rows("x", "y", first_id=2))
    assert list(fake.out) == [1] and fake.out[1].startswith("failed a known-good text after: HTTP 500")
    assert out.embedded_ids == [2, 3] and out.isolated == []
    assert fake.requests[-1].texts == ["x", "y"] and fake.requests[-1].server == 0  # sent again, elsewhere


def test_when_the_canary_fails_and_no_server_is_left_the_run_ends_server_unavailable_and_nothing_is_isolated():
    fake = FakeEmbedder()
    fake.sick(0)
    out = Outcomes()
    with pytest.raises(Fatal) as ended:
        run(EmbedWorker(fake).embed(Batch(rows("a", "b", "c")), out.emit))
    assert ended.value.state == "server_unavailable"
    assert "WIKI_EMBED_SERVER_WAIT_SEC" in str(ended.value) and "known-good text" in str(ended.value)
    # the batch, then the canary (asked up to CANARY_TRIES times: one sporadic error is no sick server); no bisection
    assert out.all == [] and 2 <= len(fake.requests) <= 1 + CANARY_TRIES
    assert [len(r.texts) for r in fake.requests[1:]] == [1] * (len(fake.requests) - 1)


@pytest.mark.parametrize(("fault", "state"), [("down", "server_unavailable"), ("model_missing", "model_not_found")])
def test_a_server_down_or_a_missing_model_ends_the_run(fault, state):
    fake = FakeEmbedder()
    getattr(fake, fault)()
    out = Outcomes()
    with pytest.raises(Fatal) as ended:
        run(EmbedWorker(fake).embed(Batch(rows("a", "b")), out.emit))
    assert ended.value.state == state
    assert out.all == [] and fake.sizes() == [2]  # nothing isolated, nothing retried here (the client retried)


def test_a_nan_vector_keeps_the_valid_vectors_of_its_answer_and_isolates_the_bad_text_after_a_retry_alone():
    fake = FakeEmbedder()
    fake.nan("NAN")
    out = embed(EmbedWorker(fake), rows("good one", "NAN here", "good two"))
    [kept] = out.embedded
    assert kept.ids == [1, 3]
    assert np.array_equal(kept.vectors[1], hash_vector("good two", fake.dim))
    [bad] = out.isolated
    assert (bad.chunk_id, bad.error, bad.http_status) == (2, "invalid_vector", 200)
    assert "NaN" in bad.message
    # The bad text alone, then ALONE_TRIES more (a server answering NaN now and then fails no chunk), then the canary.
    alone = [["NAN here"]] * (1 + ALONE_TRIES)
    assert [r.texts for r in fake.requests] == [["good one", "NAN here", "good two"], *alone, ["good one"]]


def test_empty_text_and_invalid_utf8_are_isolated_without_any_request():
    fake = FakeEmbedder()
    batch = Batch(rows("   ", "\n\t"), invalid=[(3, "invalid UTF-8 byte 0xff at offset 4", 12)])
    out = embed(EmbedWorker(fake), batch)
    assert sorted((i.chunk_id, i.error, i.text_length) for i in out.isolated) == [
        (1, "empty_text", 3),
        (2, "empty_text", 2),
        (3, "invalid_utf8", 12),
    ]
    assert fake.requests == []  # the text's own fault: no canary either


def test_an_empty_text_does_not_hold_back_the_rest_of_its_batch():
    fake = FakeEmbedder()
    out = embed(EmbedWorker(fake), rows("a", "", "c"))
    assert out.embedded_ids == [1, 3] and [i.chunk_id for i in out.isolated] == [2]
    assert [r.texts for r in fake.requests] == [["a", "c"]]


def test_a_text_is_cut_before_sending_to_fit_the_window():
    fake = FakeEmbedder(window=64)
    worker = EmbedWorker(fake)
    worker.window = Window(context_length=64)
    text = words(200)
    out = embed(worker, rows(text, "short"))
    [done] = out.embedded
    sent = fake.requests[0].texts[0]
    assert text.startswith(sent) and len(sent) < len(text)
    assert done.cut == [True, False] and done.chars == [len(sent), 5]
    assert np.array_equal(done.vectors[0], hash_vector(sent, fake.dim))  # the vector is of exactly what was sent
    assert fake.sizes() == [2]  # cut beforehand: never refused


def longest_prefix_that_fits(fake: FakeEmbedder, text: str) -> int:
    return max(n for n in range(len(text) + 1) if fake.tokens(text[:n]) <= (fake.window or 0))


def test_a_text_refused_as_too_long_is_cut_to_the_longest_prefix_the_server_takes_never_isolated():
    fake = FakeEmbedder(window=100)  # the server takes less than /api/show said
    worker = EmbedWorker(fake)
    worker.window = Window(context_length=512)
    text = words(300)
    out = embed(worker, rows(text))
    assert out.isolated == []
    [done] = out.embedded
    assert done.cut == [True] and done.chars[0] >= 0.9 * longest_prefix_that_fits(fake, text)
    assert np.array_equal(done.vectors[0], hash_vector(text[: done.chars[0]], fake.dim))
    assert worker.fit_searches == 1 and worker.fit_requests == len(fake.requests) - 1  # the refused batch aside
    assert worker.fit_requests <= 8
    assert worker.window.tokens is not None and worker.window.tokens <= 100  # learned: later texts are cut to it


def test_when_no_prefix_fits_the_chunk_is_isolated_context_exceeded_and_the_others_embedded():
    fake = FakeEmbedder()
    unfit = "UNFIT " + words(20)
    fake.refuse_prefixes_of(unfit)
    worker = EmbedWorker(fake)
    out = embed(worker, rows("before", unfit, "after"))
    assert out.embedded_ids == [1, 3]
    [bad] = out.isolated
    assert (bad.chunk_id, bad.error, bad.http_status) == (2, "context_exceeded", 400)
    assert "no prefix of this chunk fits" in bad.message
    assert worker.fit_searches == 1


def test_a_batch_refused_for_length_sends_the_risky_texts_alone():
    fake = FakeEmbedder(window=100)
    worker = EmbedWorker(fake)
    worker.window = Window(context_length=512)
    long = words(450)  # estimated near the window the run believes: the likely cause of the refusal
    embed(worker, rows("short one", long, "short two", "short three"))
    assert fake.requests[0].texts == ["short one", long, "short two", "short three"]
    assert fake.requests[1].texts == [long]  # alone first, not half the batch
    assert ["short one", "short two", "short three"] in [r.texts for r in fake.requests]


def test_a_batch_refused_for_length_with_no_risky_text_is_halved():
    worker = EmbedWorker(FakeEmbedder())
    assert cuts.split_after_refusal(worker.window, worker.estimator, ["a", "b", "c", "d", "e"]) == [
        [0, 1],
        [2, 3, 4],
    ]  # window unknown


def test_silent_truncation_is_caught_the_window_learned_and_the_text_embedded_again_cut_by_us():
    fake = FakeEmbedder(silent_window=50)  # an older server that cuts without saying
    worker = EmbedWorker(fake)
    lines: list[str] = []
    worker._log = lines.append
    long = words(200)
    out = embed(worker, rows("short one", long, "short two", "short three"))
    [done] = out.embedded
    assert done.truncated == [False, True, False, False] and done.cut == [False, True, False, False]
    assert worker.server_truncated == 1 and worker.silent_cut
    assert 45 <= (worker.window.tokens or 0) <= 50  # what the server really takes, learned from its own counts
    # The vector is the server's for exactly the characters recorded: our cut, under its window, not its cut.
    assert np.array_equal(done.vectors[1], hash_vector(long[: done.chars[1]], fake.dim))
    assert fake.tokens(long[: done.chars[1]]) < 48
    assert [r.texts for r in fake.requests[1:4]] == [["short one"], [long], [long[: int(len(long) * 0.8)]]]
    assert "truncated 1 chunk(s) silently" in lines[0]


def test_the_window_probe_catches_a_server_that_cuts_silently_before_any_chunk_is_sent():
    fake = FakeEmbedder(silent_window=100)
    worker = EmbedWorker(fake)
    worker.window = Window(context_length=512)  # what /api/show says
    run(worker.probe_window())
    assert worker.silent_cut and worker.window.tokens == 100
    assert len(fake.requests) == 3 and all(r.texts[0].startswith(CANARY_TEXT) for r in fake.requests)


def test_the_window_probe_leaves_a_server_that_takes_its_whole_window_alone():
    worker = EmbedWorker(FakeEmbedder(window=512))
    worker.window = Window(context_length=512)
    run(worker.probe_window())
    assert not worker.silent_cut and worker.window.tokens == 512


def test_a_known_silent_cutter_gets_the_texts_near_its_window_alone():
    fake = FakeEmbedder(silent_window=100)
    worker = EmbedWorker(fake)
    worker.window = Window(context_length=512)
    run(worker.probe_window())
    fake.requests.clear()
    long = words(100)  # about 80 tokens: fits, but its estimate may be 30 % short of a window of 100
    out = embed(worker, rows("short one", long, "short two"))
    assert [r.texts for r in fake.requests][:2] == [[long], ["short one", "short two"]]
    assert out.embedded_ids == [1, 2, 3]


def test_a_batch_whose_token_count_looks_right_is_not_rechecked():
    fake = FakeEmbedder()
    worker = EmbedWorker(fake)
    out = embed(worker, rows(words(200), "short"))
    assert out.embedded[0].truncated == [False, False] and fake.sizes() == [2]
    assert worker.estimator.observations == 1  # the count taught the estimator instead


def test_sleep_ms_sleeps_after_each_request():
    clock = FakeClock()
    fake = FakeEmbedder()
    fake.reject("POISON")
    worker = EmbedWorker(fake, sleep_ms=25, sleep=clock.sleep)
    embed(worker, rows("a", "b", "POISON", "d"))
    assert len(fake.requests) == 6  # the batch, halves, the bad one alone, and the canary
    assert clock.sleeps == [0.025] * len(fake.requests)


def test_no_sleep_without_sleep_ms():
    clock = FakeClock()
    embed(EmbedWorker(FakeEmbedder(), sleep=clock.sleep), rows("a", "b"))
    assert clock.sleeps == []
