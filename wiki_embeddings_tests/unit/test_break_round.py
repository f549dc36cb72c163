"""Defects found by the outside try of issues 19/20 (the `break` branch): each test states the behaviour the issue
asks for (fixed: the checks of a batch go to the server that answered it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from wiki_embeddings.core.backfill.outcomes import Batch
from wiki_embeddings.core.backfill.worker import EmbedWorker
from wiki_embeddings.core.context import Window
from wiki_embeddings.core.embedders import Answer
from wiki_embeddings_tests.unit.fakes import FakeEmbedder, Outcomes, hash_vector, run, words

pytestmark = pytest.mark.unit


class OneCutterOfTwo(FakeEmbedder):
    """Two servers; only server 1 cuts silently at `cut_at` tokens (an Ollama 0.30+ past its num_batch beside an
    older one that takes the whole window)."""

    def __init__(self, cut_at: int, **kwargs: object):
        super().__init__(servers=2, **kwargs)  # type: ignore[arg-type]
        self.cut_at = cut_at

    async def embed_texts(self, texts: Sequence[str], *, server: int | None = None) -> Answer:
        chosen = server if server is not None else self._next  # the server round robin is about to pick
        self.silent_window = self.cut_at if chosen == 1 else None
        return await super().embed_texts(texts, server=server)


def test_a_batch_cut_by_one_server_is_rechecked_on_that_server_and_no_vector_is_of_less_text_than_recorded():
    fake = OneCutterOfTwo(cut_at=60)
    worker = EmbedWorker(fake)
    worker.window = Window(context_length=512)  # what /api/show says on both
    fake._next = 1  # this batch lands on the cutter (the window probe landed on the other one, or failed)
    long = words(300)
    out = Outcomes()
    run(worker.embed(Batch([(1, long), (2, "short")]), out.emit))
    [done] = out.embedded
    vector, chars = done.vectors[0], done.chars[0]
    assert np.array_equal(vector, hash_vector(long[:chars], fake.dim)), (
        f"the stored vector is of fewer characters than the {chars} recorded (requests: "
        f"{[(len(r.texts), r.server, r.pinned) for r in fake.requests]})"
    )
