"""The embed worker: one claimed batch in, explicit outcomes out (embedded vectors, isolated chunks).

What it decides, and nothing else decides:
- each text is cut to fit the model's context (estimated in tokens, core/context.py); a text the server still
  refuses as too long is cut to the longest prefix it takes, never failed for its length;
- an error tied to the input splits the batch until the bad chunks stand alone (a refusal of length sends the
  texts nearest the window alone first);
- before a chunk is isolated for a server-side error, a known-good text must still embed on the server that
  failed (else it is the server, not the chunk: the run ends `server_unavailable`, nothing marked failed);
- a batch whose `prompt_eval_count` is well below its estimate is checked text by text for silent truncation.
The server being down or the model missing ends the run (errors.Fatal); everything else is an outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from wiki_embeddings.core.backfill.errors import Fatal
from wiki_embeddings.core.backfill.outcomes import Batch, Embedded, Isolated
from wiki_embeddings.core.context import (
    MAX_TOKENS_PER_CHAR,
    SAFETY,
    ContextRefused,
    TokenEstimator,
    Window,
    fit_prefix,
    fit_text,
)
from wiki_embeddings.core.embedders import (
    AmbiguousFailure,
    Answer,
    ContextExceeded,
    Embedder,
    EmbedFailure,
    InputRejected,
    InvalidVectors,
    ModelNotFound,
    ServerUnavailable,
)

CANARY_TEXT = "The quick brown fox jumps over the lazy dog."
# Failures decided from the text alone: recorded without asking the server whether it is well.
TEXT_ERRORS = {"empty_text", "invalid_utf8", "write_error"}
# A batch whose `prompt_eval_count` is below this share of its estimated tokens is re-checked text by text.
SILENT_TRUNCATION_SHARE = 0.6
RECHECK_MAX = 8  # the longest texts of a suspect batch re-checked alone
RISKY_SHARE = 0.6  # after a refusal of length, texts estimated over this share of the window go alone

Emit = Callable[[Embedded | Isolated], Awaitable[None]]


class EmbedWorker:
    """Embeds batches for one run; owns the model's window as learned, the token estimator and the canary."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        num_ctx: int | None = None,
        sleep_ms: int = 0,
        log: Callable[[str], None] = lambda _line: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.embedder = embedder
        self.window = Window(num_ctx=num_ctx)  # the model's context as this run understands it
        self.estimator = TokenEstimator()  # tokens per text, learned from the server's counts
        self.known_good: str | None = None  # a text the server embedded: tells a sick server from a bad chunk
        self.sleep_ms = sleep_ms
        self._log = log
        self._sleep = sleep
        self.fit_searches = 0  # refused chunks whose longest fitting prefix was searched
        self.fit_requests = 0  # requests those searches sent
        self.server_truncated = 0  # chunks the server was caught truncating silently

    async def embed(self, batch: Batch, emit: Emit) -> None:
        """Every chunk of the batch ends as one outcome handed to `emit` (or the run ends: errors.Fatal)."""
        for cid, reason, size in batch.invalid:
            await emit(Isolated(cid, "invalid_utf8", reason, None, size))
        await self._embed_rows(batch.rows, emit)

    # ------------------------------------------------------------ requests
    async def _call(self, texts: list[str], server: int | None = None) -> Answer:
        try:
            return await self.embedder.embed_texts(texts, server=server)
        finally:
            if self.sleep_ms:
                await self._sleep(self.sleep_ms / 1000)

    def _fit(self, text: str) -> str:
        return fit_text(text, self.embedder.text_prefix, self.window.tokens, self.estimator)

    async def _embed_rows(self, rows: list[tuple[int, str]], emit: Emit) -> None:
        """Embed rows; on an input-tied failure split the batch until the bad chunks stand alone."""
        if not rows:
            return
        for row in [r for r in rows if not r[1].strip()]:
            await self._isolate(row, "empty_text", "text is empty or whitespace only", None, None, emit)
        rows = [r for r in rows if r[1].strip()]
        if not rows:
            return
        sent = [self._fit(r[1]) for r in rows]
        try:
            answer = await self._call(sent)
        except ServerUnavailable as exc:
            raise Fatal("server_unavailable", exc.message) from exc
        except ModelNotFound as exc:
            raise Fatal("model_not_found", exc.message) from exc
        except ContextExceeded as exc:
            if len(rows) == 1:
                await self._fit_one(rows[0], len(sent[0]), exc, emit)
            else:
                for part in self.split_after_refusal(sent):
                    await self._embed_rows([rows[k] for k in part], emit)
            return
        except InvalidVectors as exc:
            good = [k for k, v in enumerate(exc.vectors) if v is not None]
            if good:
                await emit(_embedded(rows, sent, exc.vectors, good))
                self.known_good = sent[good[0]]
            bad = [rows[i] for i in sorted(exc.reasons)]
            if len(rows) == 1:
                await self._isolate(bad[0], exc.kind, exc.reasons[0], exc.http_status, exc.server, emit)
            else:
                for row in bad:  # each alone: a vector that is bad again is the chunk's
                    await self._embed_rows([row], emit)
            return
        except (InputRejected, AmbiguousFailure) as exc:
            if isinstance(exc, AmbiguousFailure) and not await self._server_well(exc.server):
                raise Fatal(
                    "server_unavailable", f"the embedding server fails even on a known-good text after: {exc.message}"
                ) from exc
            if len(rows) == 1:
                await self._isolate(rows[0], exc.kind, exc.message, exc.http_status, exc.server, emit)
            else:
                half = len(rows) // 2
                await self._embed_rows(rows[:half], emit)
                await self._embed_rows(rows[half:], emit)
            return
        self.known_good = sent[0]
        embedded = _embedded(rows, sent, answer.vectors, list(range(len(rows))))
        if answer.tokens is not None:
            await self._check_truncation(embedded, sent, answer.tokens)
        await emit(embedded)

    def split_after_refusal(self, sent: list[str]) -> list[list[int]]:
        """A batch refused as too long: the estimate was short for some text. The texts nearest the window go
        alone, the rest together; with none (or all) of them near it, the batch is halved."""
        budget = (self.window.tokens or 0) * SAFETY
        risky = [k for k, t in enumerate(sent) if budget and self.estimator.estimate(t) >= RISKY_SHARE * budget]
        if not risky or len(risky) == len(sent):
            half = len(sent) // 2
            return [list(range(half)), list(range(half, len(sent)))]
        alone = set(risky)
        return [[k] for k in risky] + [[k for k in range(len(sent)) if k not in alone]]

    # ------------------------------------------------------------ truncation and context
    async def _check_truncation(self, embedded: Embedded, sent: list[str], count: int) -> None:
        """A server that truncates silently evaluates fewer tokens than the texts have: `prompt_eval_count` well
        below the estimate. Then the longer texts are re-checked one by one; a text whose own count is far below
        its estimate was cut by the server (flagged, and the window learned); otherwise the counts teach the
        estimator. A batch that looks right teaches it directly."""
        prefix = self.embedder.text_prefix
        window = self.window.tokens
        if window and (len(prefix) + max(map(len, sent), default=0)) * MAX_TOKENS_PER_CHAR <= window * SAFETY:
            return  # no text of this batch can reach the window: nothing to detect, nothing worth learning
        estimates = [self.estimator.estimate(prefix + t) for t in sent]
        if count >= SILENT_TRUNCATION_SHARE * sum(estimates) or len(sent) == 0:
            self.estimator.observe([prefix + t for t in sent], count)
            return
        order = sorted(range(len(sent)), key=lambda k: estimates[k], reverse=True)[:RECHECK_MAX]
        for k in order:
            try:
                own = (await self._call([sent[k]])).tokens
            except EmbedFailure:
                continue  # the batch's vector stands; only the flag is unknown
            if own is None:
                continue
            if own < SILENT_TRUNCATION_SHARE * estimates[k]:
                embedded.truncated[k] = True
                self.server_truncated += 1
                self.window.learn(own)
            else:
                self.estimator.observe([prefix + sent[k]], own)
        if any(embedded.truncated):
            self._log(
                f"the server truncated {sum(embedded.truncated)} chunk(s) silently (it evaluated fewer tokens than "
                f"they have); recorded as server_truncated; texts are now cut to {self.window.tokens} tokens"
            )

    async def _fit_one(self, row: tuple[int, str], refused_chars: int, exc: ContextExceeded, emit: Emit) -> None:
        """One chunk refused as over the context: embed the longest prefix the server takes (>= 90 % of it)."""

        async def embed_one(text: str) -> tuple[np.ndarray, int | None]:
            try:
                answer = await self._call([text])
            except ContextExceeded as refused:
                raise ContextRefused(refused.message) from refused
            return answer.vectors[0], answer.tokens

        try:
            found = await fit_prefix(
                row[1], embed_one, window_tokens=self.window.tokens, estimator=self.estimator, refused_at=refused_chars
            )
        except ServerUnavailable as failure:
            raise Fatal("server_unavailable", failure.message) from failure
        except ModelNotFound as failure:
            raise Fatal("model_not_found", failure.message) from failure
        except EmbedFailure as failure:  # a real fault of this text (NaN, another 400): isolated as always
            reason = failure.reasons[0] if isinstance(failure, InvalidVectors) else failure.message
            await self._isolate(row, failure.kind, reason, failure.http_status, failure.server, emit)
            return
        self.fit_searches += 1
        if found is None:
            message = f"no prefix of this chunk fits the model's context: {exc.message}"
            await self._isolate(row, exc.kind, message, 400, exc.server, emit)
            return
        self.fit_requests += found.requests
        believed = self.window.tokens
        if found.tokens and (not believed or found.tokens < 0.9 * believed) and found.chars >= 0.9 * found.refused_at:
            # The server takes less than it said (or said nothing): its window is about what this prefix used.
            self.window.learn(found.tokens)
        self.known_good = row[1][: found.chars]
        await emit(Embedded([row[0]], [found.vector], [found.chars], [found.chars < len(row[1])], [False]))

    # ------------------------------------------------------------ isolation
    async def _server_well(self, server: int | None) -> bool:
        """Does a known-good text still embed (on `server`, the one that failed, when known)?"""
        try:
            await self._call([self.known_good or CANARY_TEXT], server)
            return True
        except EmbedFailure:
            return False

    async def _isolate(
        self,
        row: tuple[int, str],
        error: str,
        message: str,
        http_status: int | None,
        server: int | None,
        emit: Emit,
    ) -> None:
        """One chunk that cannot be embedded, once the server it failed on is proven well."""
        if error not in TEXT_ERRORS and not await self._server_well(server):
            raise Fatal("server_unavailable", f"the embedding server fails even on a known-good text: {message}")
        await emit(Isolated(row[0], error, message, http_status, len(row[1])))


def _embedded(
    rows: list[tuple[int, str]], sent: list[str], vectors: Sequence[np.ndarray | None], positions: list[int]
) -> Embedded:
    return Embedded(
        [rows[k][0] for k in positions],
        [v for k in positions if (v := vectors[k]) is not None],
        [len(sent[k]) for k in positions],
        [len(sent[k]) < len(rows[k][1]) for k in positions],
        [False] * len(positions),
    )
