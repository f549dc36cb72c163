"""A server that cuts input silently and reports no token counts: found out by its vectors, not by its counts.

Most servers say how many tokens they evaluated (Ollama's `prompt_eval_count`, `usage.prompt_tokens`), and the
embed worker finds a silent cut from those counts. Some do not, or report characters instead (infinity-emb), and
some of those cut every input at the model's window without a word (sentence-transformers truncates at
`max_seq_length`). The vectors still tell: a text and the same text with its end changed embed to the same vector
exactly when the server never read the end.

- `probe` (a run's start, counts absent): one request of two long texts that differ only in their last tenth, as
  dense in tokens as any text of the run can be. Identical vectors: the server cuts silently. With no window known
  (none published, no --num-ctx) the run is refused before anything is written (`WindowRequired`): nothing could
  tell how much of each chunk a vector holds. With one, a second pair well inside it (60 % by estimate) must give two
  vectors, or the window given is larger than what the server reads and the run is refused too; then every text
  that may reach the window is checked by its twin.
- `twins` (each batch, on such a server): each text that may reach the window is sent again without its last word.
  Different vectors prove the shorter text was read whole (the server read past its end), so its vector is stored
  with exactly its characters; identical vectors mean both were cut: the text is cut shorter and tried again. A text
  left unproven (a twin request that failed FAILED_TRIES times, or no cut proven whole within TWIN_TRIES) is never
  stored: its vector may be of less text than it would be recorded with. `check_twins` takes it out of the batch and
  returns it; the worker records it as a failure (once its server is proven well), which a later run retries.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np

from wiki_embeddings.core.backfill.errors import DimensionMismatch
from wiki_embeddings.core.backfill.outcomes import Embedded
from wiki_embeddings.core.context import MAX_TOKENS_PER_CHAR, TokenEstimator
from wiki_embeddings.core.embedders import Answer, ContextExceeded, EmbedFailure, InputRejected

SAME = 1.0 - 1e-6  # cosine at or above which two vectors are one (float32 rounding of the same input)
CHANGED_SHARE = 0.1  # the probe's texts differ in this last share of their words
TWIN_TRIES = 4
FAILED_TRIES = 3  # tries of one twin request that fails (a sporadic 500) before its texts are left unproven
SHRINK = 0.85  # a text cut silently is cut by this much more before its twin is tried again
# The inside probe's share of the window given, by estimate: English through a BERT tokenizer counts up to about
# 1.35 times the estimate, so its real length stays under the window given when that window is right.
INSIDE_SHARE = 0.6
INSIDE_SENTENCE = "The quick brown fox jumps over the lazy dog."
#: Why a text left unproven is recorded as a failure (a later run retries it) rather than written.
UNPROVEN = (
    "the server cuts silently and counts no tokens, and no vector of this text could be proven to hold the characters "
    "it would be recorded with (its twin requests failed, or every shorter cut came back cut too); nothing was "
    "written for it, a later run tries it again"
)

Call = Callable[[list[str]], Awaitable[Answer]]


class WindowRequired(DimensionMismatch):
    """The server cuts silently, publishes no window and counts nothing: the run needs --num-ctx."""


def probe_text(estimator: TokenEstimator, tokens: float, tail: str) -> str:
    """Distinct words until the estimate reaches `tokens`; the last CHANGED_SHARE of them spelled with `tail`."""
    words: list[str] = []
    text = ""
    while estimator.estimate(text) < tokens:
        words.extend(f"w{len(words) + k}q" for k in range(64))
        text = " ".join(words)
    keep = int(len(words) * (1 - CHANGED_SHARE))
    return " ".join(words[:keep] + [f"{w}{tail}" for w in words[keep:]])


async def probe(call: Call, estimator: TokenEstimator, longest_chars: int, window: int | None, where: str) -> bool:
    """Does the server cut silently within the longest text this run can send? (True: it does; the caller checks
    texts by their twins.) Refused as too long, or any failure: False (refusals are handled as they come)."""
    tokens = longest_chars * MAX_TOKENS_PER_CHAR
    try:
        answer = await call([probe_text(estimator, tokens, "a"), probe_text(estimator, tokens, "b")])
    except ContextExceeded:
        return False
    except EmbedFailure:
        return False
    if cosine(answer.vectors[0], answer.vectors[1]) < SAME:
        return False
    if window is None:
        raise WindowRequired(
            f"the embedding server at {where} (OLLAMA_URL) publishes no context window and reports no token counts, "
            "and it cut a long probe text silently (two texts that differ only in their end gave one vector): no "
            "vector could be known to hold the text recorded for it. Give the model's window in tokens with "
            "--num-ctx (WIKI_EMBED_NUM_CTX; e.g. 256 for all-MiniLM-L6-v2 served by sentence-transformers, its "
            "max_seq_length); nothing was written"
        )
    # The window given must be one the server reads whole: a plain English text well inside it, twice, differing
    # only in its last word. One vector: the server cuts inside the window given (all-MiniLM-L6-v2's card says 512,
    # sentence-transformers cuts at 256), and texts between its cut and that window would be stored as read whole.
    inside = window * INSIDE_SHARE
    try:
        answer = await call([inside_text(estimator, inside, "alpha"), inside_text(estimator, inside, "omega")])
    except EmbedFailure:
        return True
    if cosine(answer.vectors[0], answer.vectors[1]) >= SAME:
        raise WindowRequired(
            f"the embedding server at {where} (OLLAMA_URL) reports no token counts and cut silently a text of about "
            f"{inside:.0f} tokens, well inside the window given ({window} tokens, --num-ctx / WIKI_EMBED_NUM_CTX): "
            "the model's real window is smaller, and no vector could be known to hold the text recorded for it. Give "
            "the window the server really reads (e.g. 256 for all-MiniLM-L6-v2 served by sentence-transformers, its "
            "max_seq_length, not the 512 of its config.json); nothing was written"
        )
    return True


def inside_text(estimator: TokenEstimator, tokens: float, last: str) -> str:
    """Plain English sentences until the estimate reaches `tokens`, ended by the word `last`."""
    sentences: list[str] = []
    while estimator.estimate(" ".join(sentences)) < tokens:
        sentences.append(INSIDE_SENTENCE)
    return " ".join(sentences) + f" {last}"


def shorter(text: str) -> str:
    """`text` without its last word (or its last few characters when it has no space near its end)."""
    cut = text.rstrip()
    space = cut.rfind(" ", max(0, len(cut) - 40))
    return cut[:space] if space > 0 else cut[: max(1, len(cut) - 4)]


async def twins(call: Call, texts: list[str], vectors: list[np.ndarray]) -> list[tuple[np.ndarray, int] | None]:
    """For each text: (a vector proven to be of exactly `n` characters of it, n), or None when no cut was proven
    whole within TWIN_TRIES or a twin request failed (unproven: the caller must not store its vector)."""
    out: list[tuple[np.ndarray, int] | None] = [None] * len(texts)
    todo = list(range(len(texts)))
    current = list(texts)
    known = list(vectors)
    for _ in range(TWIN_TRIES):
        if not todo:
            break
        short = [shorter(current[k]) for k in todo]
        answer = await _asked(call, short)
        if answer is None:
            return out
        again: list[int] = []
        retry: list[str] = []
        for k, text, vector in zip(todo, short, answer.vectors, strict=True):
            if cosine(known[k], vector) < SAME:
                out[k] = (vector, len(text))  # the server read past its end: this one is whole
            else:  # both stopped at the server's window: cut further and compare again
                current[k] = text[: max(1, int(len(text) * SHRINK))]
                again.append(k)
                retry.append(current[k])
        if again:
            refit = await _asked(call, retry)
            if refit is None:
                return out
            for k, vector in zip(again, refit.vectors, strict=True):
                known[k] = vector
        todo = again
    return out


async def check_twins(call: Call, embedded: Embedded, sent: list[str], risky: list[int]) -> list[int]:
    """A silent cutter without counts: each `risky` text (one that may reach the window) of an embedded batch gets
    the vector of a prefix of it proven whole (`twins`), with exactly that prefix's characters recorded. Returns the
    positions left unproven, taken out of `embedded` (whose vectors must not be written: the caller records them as
    failures)."""
    if not risky:
        return []
    found = await twins(call, [sent[k] for k in risky], [embedded.vectors[k] for k in risky])
    unproven = []
    for k, proven in zip(risky, found, strict=True):
        if proven is not None:
            embedded.vectors[k], embedded.chars[k] = proven
            embedded.cut[k] = True
        else:
            unproven.append(k)
    embedded.drop(unproven)
    return unproven


async def _asked(call: Call, texts: list[str]) -> Answer | None:
    """`call`, sent again after a server-side failure (a sporadic 500 must not leave a text unproven, nor be taken
    for a proof); None when it kept failing or was refused."""
    for _ in range(FAILED_TRIES):
        try:
            return await call(texts)
        except InputRejected:
            return None
        except EmbedFailure:
            continue
    return None


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.dot(a, b) / (na * nb)) if na and nb else 0.0
