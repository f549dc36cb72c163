"""The model's context, in tokens: estimate, learn from the server's counts, find the longest prefix that fits.

Pure logic (core/context.py) driven by a scripted tokenizer; the end-to-end behaviour against the dev server is in
test_long_chunks.py.
"""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest

from wiki_embeddings.core import importer
from wiki_embeddings.core.context import (
    ContextRefused,
    TokenEstimator,
    Window,
    fit_prefix,
    fit_text,
    preflight,
    window_from_show,
)


def scripted_tokens(text: str) -> int:
    """A tokenizer unlike the prior: 1 token per Hangul syllable, 2 per ASCII word, 1 per other character."""
    hangul = len(re.findall(r"[\uac00-\ud7a3]", text))
    words = len(re.findall(r"[A-Za-z0-9]+", text))
    other = len(re.findall(r"[^\x00-\x7f\uac00-\ud7a3\s]", text))
    return hangul + 2 * words + other + 2


def scripted_server(window: int, calls: list[str]):
    async def embed_one(text: str) -> tuple[np.ndarray, int | None]:
        calls.append(text)
        tokens = scripted_tokens(text)
        if tokens > window:
            raise ContextRefused("the input length exceeds the context length")
        return np.ones(4, dtype=np.float32), tokens

    return embed_one


def longest_fitting(text: str, window: int) -> int:
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if scripted_tokens(text[:mid]) <= window:
            lo = mid
        else:
            hi = mid - 1
    return lo


@pytest.fixture(scope="module")
def wiki_texts() -> list[str]:
    return [c.content for c in importer.iter_chunks(limit=400)]


def test_a_refused_chunk_gets_at_least_90_percent_of_the_longest_prefix_that_fits_in_few_requests(wiki_texts):
    window = 128
    long_texts = [t for t in wiki_texts if scripted_tokens(t) > window][:60]
    assert len(long_texts) >= 30, "the sample must hold Korean and English chunks longer than the window"
    requests = []
    for text in long_texts:
        calls: list[str] = []
        found = asyncio.run(
            fit_prefix(
                text,
                scripted_server(window, calls),
                window_tokens=window,
                estimator=TokenEstimator(),
                refused_at=len(text),
            )
        )
        assert found is not None
        best = longest_fitting(text, window)
        assert found.chars >= 0.9 * best, (found.chars, best)
        assert scripted_tokens(text[: found.chars]) <= window
        assert found.requests == len(calls)
        requests.append(found.requests)
    average = sum(requests) / len(requests)
    assert average <= 3.5, f"average requests per refused chunk: {average:.2f}"


def test_the_prefix_search_works_without_knowing_the_window(wiki_texts):
    text = next(t for t in wiki_texts if scripted_tokens(t) > 300)
    calls: list[str] = []
    found = asyncio.run(
        fit_prefix(
            text, scripted_server(100, calls), window_tokens=None, estimator=TokenEstimator(), refused_at=len(text)
        )
    )
    assert found is not None and found.chars >= 0.9 * longest_fitting(text, 100)


def test_the_estimator_learns_the_servers_tokenizer_from_prompt_eval_count(wiki_texts):
    estimator = TokenEstimator()
    held_out = wiki_texts[300:]

    def error() -> float:
        return float(
            np.median([abs(estimator.estimate(t) - scripted_tokens(t)) / scripted_tokens(t) for t in held_out])
        )

    before = error()
    for k in range(0, 300, 16):  # batches of 16, one count per batch, as /api/embed reports it
        batch = wiki_texts[k : k + 16]
        estimator.observe(batch, sum(scripted_tokens(t) for t in batch))
    after = error()
    assert after < before / 2 and after < 0.15, (before, after)


def test_texts_are_cut_to_fit_before_sending_and_short_ones_left_whole(wiki_texts):
    estimator = TokenEstimator()
    for k in range(0, 300, 16):
        batch = wiki_texts[k : k + 16]
        estimator.observe(batch, sum(scripted_tokens(t) for t in batch))
    fitted = [fit_text(t, "", 256, estimator) for t in wiki_texts[300:]]
    assert all(fitted_text == t for fitted_text, t in zip(fitted, wiki_texts[300:], strict=True) if len(t) < 50)
    over = sum(scripted_tokens(f) > 256 for f in fitted)
    assert over <= len(fitted) * 0.05, f"{over} of {len(fitted)} still over the window after the cut"


def test_window_comes_from_api_show_and_num_ctx_is_capped_by_the_model():
    show = {
        "model_info": {"general.architecture": "nomic-bert", "nomic-bert.context_length": 8192},
        "parameters": "num_ctx                        2048",
    }
    assert window_from_show(show, None).tokens == 2048  # the modelfile's default
    assert window_from_show(show, 8192).tokens == 8192  # raised by the operator
    assert window_from_show(show, 20000).tokens == 8192  # never past the model's own maximum
    bert = window_from_show({"model_info": {"general.architecture": "bert", "bert.context_length": 512}}, None)
    assert bert.tokens == 512 and "bert.context_length 512" in bert.describe()
    unknown = window_from_show({}, None)
    assert unknown.tokens is None
    unknown.learn(300)
    assert unknown.tokens == 300
    assert Window(context_length=512, learned=256).tokens == 256


def test_preflight_says_how_much_of_a_korean_and_an_english_chunk_survives(wiki_texts):
    figures = preflight(wiki_texts[:200], Window(context_length=256), TokenEstimator(), 2000)
    assert figures["sample"] == 200 and 0 < figures["over_context_pct"] < 100
    assert 0 < figures["ko_kept_pct"] <= 100 and figures["ko_kept_chars"] > 0
    assert figures["hint"], "a window that cuts many chunks comes with a hint"
    raised = preflight(wiki_texts[:200], Window(context_length=8192, modelfile_num_ctx=2048), TokenEstimator(), 2000)
    assert raised["over_context_pct"] < figures["over_context_pct"]
