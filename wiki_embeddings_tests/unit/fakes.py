"""In-memory stand-ins for what the backfill stages talk to: a model server, the database's stores, the clock.

Each fake keeps to the real interface's contract (core/embedders/base.py's `Embedder`, the stores' claim, write and
failure statements returning the real core.db record types) and records what it was asked, so a test reads as
"what the stage sent, and what it decided". Every behaviour a fake stands for is also tested for real on
PostgreSQL and the Ollama-protocol server in wiki_embeddings_tests/integration/.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wiki_embeddings.core import tuning as tune
from wiki_embeddings.core.backfill.outcomes import Embedded, Isolated
from wiki_embeddings.core.context import PRIOR, Window, features
from wiki_embeddings.core.db import Claim, DataRefused, ModelMismatch, Provenance, TableRef, VectorNotes, WriteResult
from wiki_embeddings.core.embedders import (
    AmbiguousFailure,
    Answer,
    ClientStats,
    ContextExceeded,
    EmbedFailure,
    InputRejected,
    InvalidVectors,
    ModelNotFound,
    RunnerCrashed,
    ServerUnavailable,
)
from wiki_embeddings.settings import Settings


def run(awaitable: Any) -> Any:
    """Run one coroutine to its end on a fresh event loop (the stages are async; the tests are not)."""
    return asyncio.run(awaitable)


def settings(**overrides: Any) -> Settings:
    """The run's settings as the stages read them (no environment, no database URL needed)."""
    return Settings(**{"batch_size": 4, "busy_wait_sec": 30.0, **overrides}).validate()


# --------------------------------------------------------------------------------------------- time


class FakeClock:
    """A clock that moves only when told to (or when something sleeps on it): monotonic(), time(), sleep()."""

    def __init__(self, start: float = 1_000.0):
        self.now = start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        """Sleeping moves the clock at once (and lets other tasks run)."""
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


# --------------------------------------------------------------------------------------------- model server


def fake_tokens(text: str) -> int:
    """The fake tokenizer: what the engine's prior estimate says (core/context.py), so a text the engine believes
    fits does fit unless a test narrows the server's window."""
    return max(1, math.ceil(float(features(text) @ PRIOR)))


def hash_vector(text: str, dim: int) -> np.ndarray:
    """A deterministic unit vector of `text`: equal texts, equal vectors; a cut text, another vector."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def words(n: int, word: str = "word") -> str:
    """A text of `n` plain words (the fake tokenizer counts about 0.7 tokens each, plus 2 per input)."""
    return " ".join(f"{word}{i % 10}" for i in range(n))


@dataclass
class Request:
    """One embedding request as the fake received it."""

    texts: list[str]
    server: int  # the server that answered
    pinned: bool  # sent to that server on purpose (`server=`), not by round robin


class FakeEmbedder:
    """An `Embedder` in memory with scripted behaviour per text and per server.

    - `window`: inputs over this many tokens are refused as too long (ContextExceeded, Ollama >= 0.13.5);
    - `silent_window`: inputs are cut to this many tokens silently (older Ollama): the vector is the cut text's and
      `prompt_eval_count` counts only what was kept;
    - `crash_window`: a request holding an input over this many tokens crashes the runner (Ollama 0.31: an error
      naming EOF, RunnerCrashed); `crashes` counts them;
    - `reject(marker)`: a 400 for any batch holding a text with the marker (InputRejected, the input's fault);
    - `fail(marker)`: a 500 for such a batch (AmbiguousFailure: the input's or the server's);
    - `nan(marker)`: the answer's vector of such a text holds NaN (InvalidVectors, the others valid);
    - `refuse_prefixes_of(text)`: every non-empty prefix of that text is refused as too long;
    - `sick(server)`: every request to that server answers 500; `down()` / `model_missing()`: every request fails.
    Servers are taken round robin unless a request names one (`server=`: the canary's retry). A server taken out of
    the rotation (`take_out`: it failed a known-good text) gets no more round-robin requests; with none left, a
    request fails ServerUnavailable at once, as the real pool does once WIKI_EMBED_SERVER_WAIT_SEC has passed with
    no probe bringing one back.
    """

    def __init__(
        self,
        *,
        servers: int = 1,
        dim: int = 8,
        window: int | None = None,
        silent_window: int | None = None,
        crash_window: int | None = None,
        tokens: Callable[[str], int] = fake_tokens,
        report_tokens: bool = True,
        text_prefix: str = "",
        model: str = "fake-minilm",
    ):
        self.model = model
        self.text_prefix = text_prefix
        self.tuning = tune.Tuning(servers, pinned_depth=1, max_batch=64)
        self.stats = ClientStats()
        self.dim = dim
        self.window = window
        self.silent_window = silent_window
        self.crash_window = crash_window
        self.crashes = 0
        self.tokens = tokens
        self.report_tokens = report_tokens
        self.requests: list[Request] = []
        self._servers = servers
        self._next = 0
        self._rejected: dict[str, int] = {}
        self._failing: dict[str, int] = {}
        self._nan: set[str] = set()
        self._unfit: list[str] = []
        self._sick: set[int] = set()
        self._down: EmbedFailure | None = None
        self.out: dict[int, str] = {}  # servers out of the rotation, and why
        self.expected_dimensions: int | None = None
        self.asked_dimensions: int | None = None

    # ------------------------------------------------------------ scripting
    def reject(self, marker: str, status: int = 400) -> None:
        self._rejected[marker] = status

    def fail(self, marker: str, status: int = 500) -> None:
        self._failing[marker] = status

    def nan(self, marker: str) -> None:
        self._nan.add(marker)

    def refuse_prefixes_of(self, text: str) -> None:
        self._unfit.append(text)

    def sick(self, server: int) -> None:
        self._sick.add(server)

    def down(self) -> None:
        self._down = ServerUnavailable("the Ollama server at fake (OLLAMA_URL) is unreachable after 3 attempts")

    def model_missing(self) -> None:
        self._down = ModelNotFound(f"model {self.model!r} is not available on fake", http_status=404)

    # ------------------------------------------------------------ what was sent
    def sizes(self) -> list[int]:
        return [len(r.texts) for r in self.requests]

    # ------------------------------------------------------------ the Embedder protocol
    @property
    def where(self) -> str:
        return "fake"

    async def embed_texts(self, texts: Sequence[str], *, server: int | None = None) -> Answer:
        await asyncio.sleep(0)
        chosen = server if server is not None else self._round_robin()
        if chosen is None:
            reasons = "; ".join(f"server {i}: {why}" for i, why in sorted(self.out.items()))
            raise ServerUnavailable(
                "the model server(s) at fake (OLLAMA_URL) are unreachable or overloaded: every one has been out of "
                f"the rotation for 300 s (WIKI_EMBED_SERVER_WAIT_SEC): {reasons}"
            )
        sent = [self.text_prefix + t for t in texts]
        self.requests.append(Request(list(texts), chosen, server is not None))
        self.stats.requests += 1
        self.stats.texts += len(texts)
        if self._down is not None:
            raise self._down
        if chosen in self._sick:
            raise AmbiguousFailure("HTTP 500: the server is sick", http_status=500, kind="http_500", server=chosen)
        for t, s in zip(texts, sent, strict=True):
            if (self.window is not None and self.tokens(s) > self.window) or any(
                t and u.startswith(t) for u in self._unfit
            ):
                raise ContextExceeded(
                    "HTTP 400: the input length exceeds the context length", http_status=400, server=chosen
                )
        if self.crash_window is not None and any(self.tokens(s) > self.crash_window for s in sent):
            self.crashes += 1
            message = 'HTTP 400: do embedding request: Post "http://127.0.0.1:40000/embedding": EOF'
            raise RunnerCrashed(message, http_status=400, server=chosen)
        for marker, status in self._rejected.items():
            if any(marker in t for t in texts):
                raise InputRejected(
                    f"HTTP {status}: bad input", http_status=status, kind=f"http_{status}", server=chosen
                )
        for marker, status in self._failing.items():
            if any(marker in t for t in texts):
                raise AmbiguousFailure(
                    f"HTTP {status}: the model failed", http_status=status, kind=f"http_{status}", server=chosen
                )
        kept = [self._silently_cut(s) for s in sent]
        vectors: list[np.ndarray | None] = [
            None if any(m in t for m in self._nan) else hash_vector(k, self.dim)
            for t, k in zip(texts, kept, strict=True)
        ]
        if any(v is None for v in vectors):
            reasons = {i: "vector holds NaN or infinity" for i, v in enumerate(vectors) if v is None}
            raise InvalidVectors(vectors, reasons, server=chosen)
        count = sum(self.tokens(k) for k in kept) if self.report_tokens else None
        return Answer([v for v in vectors if v is not None], count, chosen)

    async def probe_dimensions(self, text: str = "dimension probe", expected: int | None = None) -> int:
        return (await self.embed_texts([text])).vectors[0].shape[0]

    def expect_dimensions(self, dimensions: int) -> None:
        self.expected_dimensions = dimensions

    def ask_dimensions(self, dimensions: int) -> None:
        self.asked_dimensions = dimensions

    async def context_window(self, num_ctx: int | None) -> Window:
        return Window(context_length=self.window, num_ctx=num_ctx)

    async def model_digest(self) -> str | None:
        return "sha256:fake"

    async def health(self) -> str:
        return "0.0-fake"

    def server_states(self) -> list[dict[str, object]]:
        return [{"server": i, "state": "out" if i in self.out else "in"} for i in range(self._servers)]

    def take_out(self, server: int, why: str) -> None:
        self.out[server] = why

    def check_returns(self, check: Callable[[int, np.ndarray], str | None]) -> None:
        self.admit = check

    def stop_waiting_on(self, event: asyncio.Event) -> None:
        self.stop_event = event

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        yield

    async def aclose(self) -> None:
        return None

    # ------------------------------------------------------------ internals
    def _round_robin(self) -> int | None:
        """The next server in the rotation (None: every one is out)."""
        for k in range(self._servers):
            chosen = (self._next + k) % self._servers
            if chosen not in self.out:
                self._next = (chosen + 1) % self._servers
                return chosen
        return None

    def _silently_cut(self, text: str) -> str:
        """What a truncating server embeds of `text`: its longest prefix within `silent_window` tokens."""
        if self.silent_window is None or self.tokens(text) <= self.silent_window:
            return text
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.tokens(text[:mid]) <= self.silent_window:
                lo = mid
            else:
                hi = mid - 1
        return text[:lo]


class Outcomes:
    """What an embed worker handed on: `emit` is the stage's callback."""

    def __init__(self) -> None:
        self.all: list[Embedded | Isolated] = []

    async def emit(self, outcome: Embedded | Isolated) -> None:
        self.all.append(outcome)

    @property
    def embedded(self) -> list[Embedded]:
        return [o for o in self.all if isinstance(o, Embedded)]

    @property
    def isolated(self) -> list[Isolated]:
        return [o for o in self.all if isinstance(o, Isolated)]

    @property
    def embedded_ids(self) -> list[int]:
        return sorted(cid for o in self.embedded for cid in o.ids)


# --------------------------------------------------------------------------------------------- database


class InlineDb:
    """DbCalls.call without threads or connections: `fn(None, ...)` at once; every call's role recorded."""

    def __init__(self) -> None:
        self.roles: list[str] = []

    async def call(self, role: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.roles.append(role)
        return fn(None, *args, **kwargs)

    async def thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """DbCalls.thread: `fn(*args)` (calls that belong to no role, e.g. re-taking claims on a fresh session)."""
        return fn(*args)


def md5_of(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class FakeClaimStore:
    """The claim statements (core/db/claims.py, content.py) over an in-memory table of missing chunks.

    `busy_until[id]`: another session holds that chunk's claim key until the clock reads that (inf: for good);
    `quarantined` / `failed`: what the failures table says (for the claim modes); `invalid`: stored bytes that are
    not text; `changed`: embedded chunks whose text changed (the refresh pass) and how many the scan found."""

    def __init__(self, texts: dict[int, str], clock: FakeClock | None = None):
        self.texts = dict(texts)  # the chunks still missing
        self.clock = clock or FakeClock()
        self.busy_until: dict[int, float] = {}
        self.quarantined: set[int] = set()
        self.failed: set[int] = set()
        self.invalid: dict[int, tuple[str, int]] = {}
        self.changed: dict[int, str] = {}
        self.taken_while_away: set[int] = set()  # claims another run takes while this one reconnects
        self.held: set[int] = set()  # what this session holds
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.released: list[list[int]] = []

    def _busy(self, cid: int) -> bool:
        return self.clock.now < self.busy_until.get(cid, float("-inf"))

    def _candidates(self, mode: str) -> list[int]:
        ids = sorted(self.texts) + sorted(self.invalid)
        if mode == "normal":
            ids = [i for i in ids if i not in self.quarantined]
        elif mode == "retry_failed":
            ids = [i for i in ids if i in self.failed]
        return sorted(ids)

    def _lock(self, candidates: list[int], max_chars: int, found: int = 0) -> Claim:
        if not candidates:
            return Claim([], None, 0)
        busy = [c for c in candidates if self._busy(c)]
        locked = [c for c in candidates if not self._busy(c)]
        self.held.update(locked)
        rows = [(c, self.texts[c][:max_chars]) for c in locked if c in self.texts]
        invalid = [(c, *self.invalid[c]) for c in locked if c in self.invalid]
        md5s = {c: md5_of(self.texts[c]) for c in locked if c in self.texts}
        return Claim(rows, candidates[-1], len(busy), invalid, md5s, found=found, busy_ids=busy)

    def claim(
        self,
        conn: Any,
        *,
        after_id: int | None,
        limit: int,
        max_chars: int,
        id_min: int | None = None,
        id_max: int | None = None,
        mode: str = "normal",
        max_attempts: int = 3,
    ) -> Claim:
        self.calls.append(("claim", {"after_id": after_id, "limit": limit, "mode": mode, "id_min": id_min}))
        lower = after_id if after_id is not None else (id_min - 1 if id_min is not None else None)
        ids = [i for i in self._candidates(mode) if (lower is None or i > lower) and (id_max is None or i <= id_max)]
        return self._lock(ids[:limit], max_chars)

    def claim_changed(
        self, conn: Any, *, after_id: int | None, limit: int, max_chars: int, include_cut: bool = False, **_: Any
    ) -> Claim:
        self.calls.append(("claim_changed", {"after_id": after_id, "limit": limit, "include_cut": include_cut}))
        ids = [i for i in sorted(self.changed) if after_id is None or i > after_id][:limit]
        if not ids:
            return Claim([], None, 0)
        self.held.update(ids)
        rows = [(i, self.changed[i][:max_chars]) for i in ids]
        return Claim(rows, ids[-1], 0, text_md5={i: md5_of(self.changed[i]) for i in ids}, found=len(ids))

    def claim_ids(
        self, conn: Any, ids: Sequence[int], *, max_chars: int, mode: str = "normal", max_attempts: int = 3, limit: int
    ) -> Claim:
        self.calls.append(("claim_ids", {"ids": list(ids), "limit": limit, "mode": mode}))
        wanted = set(ids)
        return self._lock([i for i in self._candidates(mode) if i in wanted][:limit], max_chars)

    def release(self, conn: Any, ids: Sequence[int]) -> None:
        self.released.append(list(ids))
        self.held.difference_update(ids)

    def relock(self, conn: Any, ids: Sequence[int]) -> list[int]:
        self.calls.append(("relock", {"ids": list(ids), "conn": conn}))
        return [i for i in ids if i not in self.taken_while_away]

    def embedded_elsewhere(self, ids: Sequence[int]) -> None:
        """Another run embedded these chunks: they are no longer missing."""
        for i in ids:
            self.texts.pop(i, None)


@dataclass
class Write:
    ids: list[int]
    vectors: list[np.ndarray]
    md5s: list[str] | None
    provenance: Provenance | None
    replace: bool
    notes: VectorNotes | None


class FakeWriteStore:
    """`write_vectors` in memory: `refused` ids make the database refuse any write that holds them (a trigger),
    `row_locked` ids are held by another transaction (skipped, returned as locked), `swapped` makes every write
    meet a column that now takes another model."""

    def __init__(self) -> None:
        self.writes: list[Write] = []
        self.written: dict[int, np.ndarray] = {}
        self.refused: set[int] = set()
        self.row_locked: set[int] = set()
        self.swapped = False

    def write_vectors(
        self,
        conn: Any,
        ids: list[int],
        vectors: list[np.ndarray],
        md5s: list[str] | None,
        provenance: Provenance | None,
        replace: bool,
        notes: VectorNotes | None,
        run_id: int | None = None,
    ) -> WriteResult:
        self.writes.append(Write(list(ids), list(vectors), md5s, provenance, replace, notes))
        if self.swapped:
            raise ModelMismatch("the column was swapped during this run: it now takes model 'other'")
        bad = [i for i in ids if i in self.refused]
        if bad:
            raise DataRefused(f'refused by trigger for id {bad[0]}\nCONTEXT: PL/pgSQL function "no_{bad[0]}"', "P0001")
        locked = tuple(i for i in ids if i in self.row_locked)
        for i, v in zip(ids, vectors, strict=True):
            if i not in locked:
                self.written[i] = v
        return WriteResult(len(ids) - len(locked), locked)


@dataclass
class FailureRecord:
    chunk_id: int
    error: str
    message: str
    http_status: int | None
    run_id: int | None


@dataclass
class FakeFailureStore:
    """The failures table: one row per chunk, its attempts counted."""

    table: TableRef = field(default_factory=lambda: TableRef.parse("public.wiki_chunks"))
    records: list[FailureRecord] = field(default_factory=list)
    attempts: dict[int, int] = field(default_factory=dict)

    def record_failure(
        self, chunk_id: int, *, error: str, message: str, http_status: int | None, run_id: int | None
    ) -> int:
        self.records.append(FailureRecord(chunk_id, error, message, http_status, run_id))
        self.attempts[chunk_id] = self.attempts.get(chunk_id, 0) + 1
        return self.attempts[chunk_id]
