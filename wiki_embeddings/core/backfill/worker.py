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
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import numpy as np

from wiki_embeddings.core.backfill import cuts, probe, silent
from wiki_embeddings.core.backfill.errors import Fatal
from wiki_embeddings.core.backfill.outcomes import Batch, Embedded, Isolated
from wiki_embeddings.core.backfill.pooler import Pooler
from wiki_embeddings.core.backfill.probe import CANARY_TEXT, CrashProbes
from wiki_embeddings.core.context import (
    MAX_TOKENS_PER_CHAR,
    SAFETY,
    TokenEstimator,
    Window,
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
    RunnerCrashed,
    ServerUnavailable,
)

ALONE_TRIES = 5  # tries alone of a chunk that met a server-side error, before the canary decides
CANARY_TRIES = 3  # a known-good text's tries before its server is taken for sick
# Failures decided from the text alone: recorded without asking the server whether it is well.
TEXT_ERRORS = {"empty_text", "invalid_utf8", "write_error"}
# A batch whose `prompt_eval_count` is below this share of its estimated tokens is checked text by text.
BATCH_TRUST_SHARE = 0.85
LOOSE_TRUST_SHARE = 0.6
WINDOW_PROBE_TEXTS = 3  # texts (one a request) the window probe sends at a run's start

Emit = Callable[[Embedded | Isolated], Awaitable[None]]


class EmbedWorker:
    """Embeds batches for one run; owns the model's window as learned, the token estimator and the canary."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        num_ctx: int | None = None,
        max_chars: int = 2000,
        sleep_ms: int = 0,
        log: Callable[[str], None] = lambda _line: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        long_text: str = "cut",
    ):
        self.embedder = embedder
        self.window = Window(num_ctx=num_ctx)  # the model's context as this run understands it
        self.estimator = TokenEstimator()  # tokens per text, learned from the server's counts
        self.pooler = Pooler(self.estimator) if long_text == "pool" else None  # long chunks as pieces, pooled
        self._learned_from_refusal = False
        self.crash = CrashProbes()  # runner crashes: each server's window as they showed it, the search under way
        self.known_good: str | None = None  # a text the server embedded: tells a sick server from a bad chunk
        self.sleep_ms = sleep_ms
        self._log = log
        self._sleep = sleep
        self.fit_searches = 0  # refused chunks whose longest fitting prefix was searched
        self.fit_requests = 0  # requests the successful searches sent
        self.fit_found = 0  # searches that found a prefix the server takes
        self.server_truncated = 0  # chunks the server was caught truncating silently
        self.silent_cut = False  # the server cuts over-long input silently (learned): long texts are counted alone
        # The window probe saw the whole window taken and a longer text refused: nothing can be cut silently, so
        # batches are not counted text by text (their counts still teach the estimator).
        self.refuses_over_window = False
        self.max_chars = max_chars  # the longest text the run sends (the silent-cut probe must be as long)
        self.twin_check = False  # a silent cutter without token counts: texts near the window are checked by twins
        self.silent_found_at: float | None = None  # when (epoch seconds) that was found: recorded by the run
        self.probe_vectors: dict[int, np.ndarray | None] = {}  # server -> its canary vector (None: failed there)

    async def embed(self, batch: Batch, emit: Emit) -> None:
        """Every chunk of the batch ends as one outcome handed to `emit` (or the run ends: errors.Fatal)."""
        for cid, reason, size in batch.invalid:
            await emit(Isolated(cid, "invalid_utf8", reason, None, size))
        rows = batch.rows
        if self.pooler is not None:
            emit = self._pooled(emit)
        await self._embed_rows(rows, emit)  # planned there: long chunks as pieces in pool mode

    # ------------------------------------------------------------ long texts, pooled
    def _pooled(self, emit: Emit) -> Emit:
        """`emit` behind the pooler: pieces' outcomes become their chunk's; pieces the server cut go again, split."""
        assert self.pooler is not None
        pooler = self.pooler

        async def through_pooler(outcome: Embedded | Isolated) -> None:
            again = await pooler.take(outcome, emit)
            if again:
                await self._embed_rows(again, through_pooler)

        return through_pooler

    def _plan(self) -> tuple[int | None, bool]:
        """What rows are planned for: the window, and whether it is hard (texts planned well below it)."""
        return self.window.tokens, self.silent_cut or self.crash.seen

    def _pieces_of(self, row: tuple[int, str]) -> list[tuple[int, str]]:
        assert self.pooler is not None
        return self.pooler.plan(row, self.embedder.text_prefix, self.window, hard=self._plan()[1])

    def _planned(self, rows: list[tuple[int, str]], planned: object) -> tuple[list[tuple[int, str]], list[str]]:
        """`rows` re-planned when the window changed since they were planned for `planned`, and the text each
        sends: pool mode never cuts (what was judged to fit, or made a piece, goes whole); cut mode cuts to fit."""
        if self.pooler is None:
            return rows, [self._fit(r[1]) for r in rows]
        if planned != self._plan():
            rows = [piece for row in rows for piece in self._pieces_of(row)]
        return rows, [r[1] for r in rows]

    async def _split_refused(self, row: tuple[int, str], exc: ContextExceeded, emit: Emit) -> None:
        """Pool mode never cuts: a piece (or a chunk estimated to fit) the server refused as too long is split in
        two, each embedded (and split again if need be); a piece of one character fails its chunk."""
        assert self.pooler is not None
        if not self._learned_from_refusal and not isinstance(exc, RunnerCrashed):  # a crash is searched by probes
            self._learned_from_refusal = True  # once a run: the server's real window, as cut mode learns it
            await self._learn_window(row[1], exc)
            again = self._pieces_of(row)
            if again != [row]:
                await self._embed_rows(again, emit, self._plan())
                return
        halves = self.pooler.split(row[0]) if self.pooler.is_piece(row[0]) else self.pooler.halves(row)
        if halves:
            await self._embed_rows(halves, emit, self._plan())
        else:
            message = f"no piece of this chunk fits the model's context: {exc.message}"
            await emit(Isolated(row[0], exc.kind, message, 400, len(row[1])))

    # ------------------------------------------------------------ requests
    async def _call(self, texts: list[str], server: int | None = None) -> Answer:
        try:
            return await self.embedder.embed_texts(texts, server=server)
        finally:
            if self.sleep_ms:
                await self._sleep(self.sleep_ms / 1000)

    def _fit(self, text: str) -> str:
        return fit_text(text, self.embedder.text_prefix, self.window.tokens, self.estimator)

    async def _embed_rows(self, rows: list[tuple[int, str]], emit: Emit, planned: object = None) -> None:
        """Embed rows (planned for the window `planned`, see _plan: re-planned if it changed since); on an
        input-tied failure split the batch until the bad chunks stand alone."""
        await self.crash.settled()  # a window search under way: wait for it rather than crash the runner meanwhile
        rows, sent = self._planned(rows, planned)
        planned = self._plan()
        for row in [r for r in rows if not r[1].strip()]:
            await self._isolate(row, "empty_text", "text is empty or whitespace only", None, None, emit)
        rows, sent = [r for r in rows if r[1].strip()], [t for r, t in zip(rows, sent, strict=True) if r[1].strip()]
        if not rows:
            return
        if self.pooler is not None and len(rows) > (size := max(self.embedder.tuning.batch_size, 1)):
            for start in range(0, len(rows), size):  # --batch-size counts pieces: at most that many a request
                await self._embed_rows(rows[start : start + size], emit, planned)
            return
        if self.silent_cut and len(rows) > 1:
            risky = [k for k, text in enumerate(sent) if self._may_reach(text)]
            if risky:  # a server known to cut silently: texts that may reach its window are counted alone
                for k in risky:
                    await self._embed_rows([rows[k]], emit, planned)
                alone = set(risky)
                await self._embed_rows([r for k, r in enumerate(rows) if k not in alone], emit, planned)
                return
        try:
            with _fatal():  # the server gone or the model missing ends the run
                answer = await self._call(sent)
        except ContextExceeded as exc:
            if isinstance(exc, RunnerCrashed) and await self._crashed(exc, sent):
                again, resent = self._planned(rows, None)
                if resent != sent:  # planned for the window just learned, at once (not halved crash by crash)
                    await self._embed_rows(again, emit, self._plan())
                    return
            if len(rows) == 1 and self.pooler is not None:
                await self._split_refused(rows[0], exc, emit)
            elif len(rows) == 1:
                await self._fit_one(rows[0], len(sent[0]), exc, emit)
            else:
                for part in cuts.split_after_refusal(self.window, self.estimator, sent):
                    await self._embed_rows([rows[k] for k in part], emit, planned)
            return
        except InvalidVectors as exc:
            good = [k for k, v in enumerate(exc.vectors) if v is not None]
            if good:
                await emit(_embedded(rows, sent, exc.vectors, good))
                self.known_good = sent[good[0]]
            bad = [rows[i] for i in sorted(exc.reasons)]
            if len(rows) == 1:
                if not await self._alone_again(rows[0], sent[0], emit):  # a NaN now and then embeds on another try
                    await self._isolate(bad[0], exc.kind, exc.reasons[0], exc.http_status, exc.server, emit)
            else:
                for row in bad:  # each alone: a vector that is bad again is the chunk's
                    await self._embed_rows([row], emit, planned)
            return
        except (InputRejected, AmbiguousFailure) as exc:
            if isinstance(exc, AmbiguousFailure) and not await self._server_well(exc.server):
                await self._server_sick(exc.server, exc.message, rows, emit)
                return
            if len(rows) == 1 and isinstance(exc, AmbiguousFailure) and await self._alone_again(rows[0], sent[0], emit):
                return  # a sporadic server error: the chunk embeds on another try
            if len(rows) == 1:
                await self._isolate(rows[0], exc.kind, exc.message, exc.http_status, exc.server, emit)
            else:
                half = len(rows) // 2
                await self._embed_rows(rows[:half], emit, planned)
                await self._embed_rows(rows[half:], emit, planned)
            return
        self.known_good = sent[0]
        embedded = _embedded(rows, sent, answer.vectors, list(range(len(rows))))
        if answer.tokens is None and self.twin_check:  # each text that may reach the window proven whole by twins
            risky = [k for k, t in enumerate(sent) if self._may_reach(t)]
            for k in await silent.check_twins(self._call, embedded, sent, risky):  # unproven: never written so
                await self._isolate(rows[k], "unproven_cut", silent.UNPROVEN, None, answer.server, emit)
        elif answer.tokens is not None:
            if len(rows) == 1 and self.silent_cut and cuts.at_window(self.window, answer.tokens):
                refit = await self._refit(embedded_text(rows[0], embedded), answer.server)  # cut by us until whole
                if refit is not None:
                    embedded.vectors[0], embedded.chars[0] = refit
                    embedded.cut[0] = embedded.chars[0] < len(rows[0][1])
            else:
                await self._check_truncation(embedded, sent, answer.tokens, answer.server)
        if embedded.ids:
            await emit(embedded)

    # ------------------------------------------------------------ truncation and context
    async def probe_window(self) -> None:
        """Each server's window probed at the start (probe.py): silent cutters found before the first batch."""
        longest = len(self.embedder.text_prefix) + self.max_chars
        servers = len(self.embedder.server_states())
        found = await probe.probe_window(
            self._call, servers, self.window.tokens, self.estimator, longest, self.embedder.where
        )
        self.twin_check, self.refuses_over_window = found.twin_check, found.refuses_over_window
        self.crash.adopt(found)
        self.probe_vectors = found.vectors  # each server's vector of the canary: the run checks its model by them
        if found.crash_at is not None:
            self.window.learn(found.crash_at)
        if found.silent_at is not None:
            self._found_silent(found.silent_at[1])
        for line in found.notes(self.window.tokens):
            self._log(line)

    async def _check_truncation(self, embedded: Embedded, sent: list[str], count: int, server: int) -> None:
        """A server that cut a text silently evaluated fewer tokens than the batch has: when `prompt_eval_count` is
        short of the estimate, every text of the batch is counted alone (no cap); a text whose count stays the same
        for a shorter prefix of it was cut at that count (its window, learned); it is embedded again, cut by us to
        fit, so its vector is of exactly the characters recorded. A batch that looks right teaches the estimator."""
        prefix = self.embedder.text_prefix
        window = self.window.tokens
        if window and (len(prefix) + max(map(len, sent), default=0)) * MAX_TOKENS_PER_CHAR <= window * SAFETY:
            return  # no text of this batch can reach the window: nothing to detect, nothing worth learning
        estimates = [self.estimator.estimate(prefix + t) for t in sent]
        # A server seen refusing past its window, or a known silent cutter's batch planned below its window, is
        # checked only for a large shortfall (another server put behind the same URL mid-run, say); else the
        # estimate's own error is the bound.
        below = self.silent_cut and not any(cuts.estimate_may_reach(self.window, e) for e in estimates)
        share = LOOSE_TRUST_SHARE if self.refuses_over_window or below else BATCH_TRUST_SHARE
        if count >= share * sum(estimates) or len(sent) == 0:
            self.estimator.observe([prefix + t for t in sent], count)
            return
        for k in range(len(sent)):
            on_it = functools.partial(self._call, server=server)  # the server that answered the batch, no other
            cut_at = await cuts.cut_by_server(on_it, self.estimator, prefix, sent[k], estimates[k])
            if cut_at is None:
                continue
            self._found_silent(cut_at)
            refit = await self._refit(sent[k], server)
            if refit is None:
                continue  # the batch's vector stands; only the flag is unknown (the run goes on)
            embedded.vectors[k], embedded.chars[k] = refit
            embedded.cut[k] = True
            embedded.truncated[k] = True
            self.server_truncated += 1
        if any(embedded.truncated):
            self._log(
                f"the server truncated {sum(embedded.truncated)} chunk(s) silently (it evaluated fewer tokens than "
                f"they have); embedded again cut to {self.window.tokens} tokens, recorded as server_truncated"
            )

    def _may_reach(self, text: str) -> bool:
        return cuts.may_reach(self.window, self.estimator, self.embedder.text_prefix, text)

    async def _refit(self, text: str, server: int | None = None) -> tuple[np.ndarray, int] | None:
        call = functools.partial(self._call, server=server)
        return await cuts.refit(call, self._fit, self.window, self.estimator, self.embedder.text_prefix, text)

    def _found_silent(self, tokens: int) -> None:
        if tokens < cuts.MIN_CUT_TOKENS:
            return  # never a window: a few words' count (a misreading, not a cut)
        self.refuses_over_window = False
        self.window.learn(tokens)
        if not self.silent_cut:
            self.silent_cut = True
            self.silent_found_at = time.time()

    async def _learn_window(self, text: str, exc: ContextExceeded) -> None:
        """The longest prefix of a refused text the server takes, searched only to learn its real window."""
        tokens = None  # unless found: the halves are embedded anyway, only the window stays unknown
        with contextlib.suppress(EmbedFailure), _fatal():
            tokens = await cuts.longest_fit_tokens(self._call, self.window, self.estimator, text)
        if tokens and tokens >= cuts.MIN_CUT_TOKENS:  # a few words' count is no window (a misread refusal)
            self.window.learn(tokens)
            self._log(f"the server refused a text as too long ({exc.message}); its window is about {tokens} tokens")

    async def _crashed(self, exc: RunnerCrashed, sent: list[str]) -> bool:
        """A runner crash: the server's window searched by crash probes (probe.py; other batches wait for it). True
        when the plan changed (a window learned, or the first crash: texts planned well below it from now on)."""
        before = self._plan()
        upper = cuts.crash_bound(self.window, self.estimator, self.embedder.text_prefix, sent)
        with contextlib.suppress(EmbedFailure), _fatal():  # the texts are split anyway; only the window stays unknown
            learned = await self.crash.learn(functools.partial(self._call, server=exc.server), exc.server, upper)
            if learned:
                self.window.learn(learned)
                self._log(f"the runner crashed on a text ({exc.message}); it takes about {learned} tokens")
        return self._plan() != before

    async def _fit_one(self, row: tuple[int, str], refused_chars: int, exc: ContextExceeded, emit: Emit) -> None:
        """One chunk refused as over the context: embed the longest prefix the server takes (>= 90 % of it)."""
        try:
            with _fatal():
                found = await cuts.fit_search(self._call, self.window, self.estimator, row[1], refused_chars)
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
        self.fit_found += 1
        if found.tokens and cuts.shows_smaller_window(found, self.window.tokens):
            self.window.learn(found.tokens)  # the server takes less than it said: about what this prefix used
        self.known_good = row[1][: found.chars]
        await emit(Embedded([row[0]], [found.vector], [found.chars], [found.chars < len(row[1])], [False]))

    # ------------------------------------------------------------ isolation
    async def _alone_again(self, row: tuple[int, str], text: str, emit: Emit) -> bool:
        """A server error or a NaN on one chunk: more tries alone before it is blamed (a steady 500/NaN rate)."""
        for _ in range(ALONE_TRIES):
            try:
                answer = await self._call([text])
            except (AmbiguousFailure, InvalidVectors):
                continue
            except EmbedFailure as exc:  # too long after all (the 500 came first): split or cut, never blamed
                if too_long := isinstance(exc, ContextExceeded):
                    await self._embed_rows([row], emit, self._plan())
                return too_long
            await emit(_embedded([row], [text], answer.vectors, [0]))
            return True
        return False

    async def _server_well(self, server: int | None) -> bool:
        """Does a known-good text still embed on `server` (CANARY_TRIES tries: one error is no sick server)?"""
        for _ in range(CANARY_TRIES):
            try:
                await self._call([self.known_good or CANARY_TEXT], server)
                return True
            except EmbedFailure:
                continue
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
            await self._server_sick(server, message, [row], emit)
            return
        await emit(Isolated(row[0], error, message, http_status, len(row[1])))

    async def _server_sick(self, server: int | None, message: str, rows: list[tuple[int, str]], emit: Emit) -> None:
        """A known-good text failed too: the server, not the chunks. It leaves the rotation and the rows go again,
        to another server or, with none left, to this one when a probe finds it well (the embedder waits for that
        at most WIKI_EMBED_SERVER_WAIT_SEC, then the run ends `server_unavailable`, nothing marked failed)."""
        if server is None:
            raise Fatal("server_unavailable", f"the embedding server fails even on a known-good text: {message}")
        self.embedder.take_out(server, f"failed a known-good text after: {message}")
        await self._embed_rows(rows, emit)


@contextlib.contextmanager
def _fatal() -> Iterator[None]:
    """The server gone or the model missing ends the run (errors.Fatal); other failures pass as they are."""
    try:
        yield
    except ServerUnavailable as failure:
        raise Fatal("server_unavailable", failure.message) from failure
    except ModelNotFound as failure:
        raise Fatal("model_not_found", failure.message) from failure


def embedded_text(row: tuple[int, str], embedded: Embedded) -> str:
    """The characters sent for the one chunk of `embedded`."""
    return row[1][: embedded.chars[0]]


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
