"""The one seam between the engine and a model server: what an embedder answers and how its failures are classed.

The engine (core/backfill/) depends on `Embedder` only; `OllamaClient` (ollama.py) implements it over Ollama's
HTTP API, and the unit tier implements it in memory. A failure says whose fault it is, because the engine acts
on that meaning:
- `ServerUnavailable`: transport errors and overload that persisted through retries: the chunks are fine, the
  run stops cleanly and marks nothing failed.
- `ModelNotFound`: the model is not on the server: nothing can be embedded.
- `InputRejected`: the server refused this input: tied to the texts, the engine bisects.
- `ContextExceeded`: refused as longer than the model's window: never the chunk's fault; the text is cut to fit.
- `AmbiguousFailure`: a 500, a deadline hit, a malformed answer: the input or the server; the engine asks a
  known-good canary text of the same server before blaming the input.
- `InvalidVectors`: the answer parsed but some vectors are unusable (NaN, infinity, wrong or zero length); the
  valid ones come with it so they can still be written.
Every failure carries `server`, the index of the server that answered it (None when unknown), so the canary can
be sent to the server that failed rather than to whichever is next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from wiki_embeddings.core.context import Window
from wiki_embeddings.core.tuning import Tuning


class StopWhileWaiting(Exception):  # noqa: N818 - a signal, not an error
    """A stop request came while a request waited long for a server (held by Retry-After, out of the rotation):
    the batch goes back unsent, so that a stop is honoured in seconds, not after WIKI_EMBED_SERVER_WAIT_SEC."""


class EmbedFailure(Exception):
    """Base of every embedding failure; `kind` is the short error class logged in failure records."""

    kind = "embed_failed"
    foreign = (
        False  # the answer was not in the model server's error shape (a proxy's page): no setting of ours to blame
    )

    def __init__(
        self, message: str, *, http_status: int | None = None, kind: str | None = None, server: int | None = None
    ):
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.server = server
        if kind:
            self.kind = kind


class ServerUnavailable(EmbedFailure):
    kind = "server_unavailable"


class ModelNotFound(EmbedFailure):
    kind = "model_not_found"


class InputRejected(EmbedFailure):
    kind = "input_rejected"


class ContextExceeded(InputRejected):
    """The server refused an input as longer than the model's context window (in tokens)."""

    kind = "context_exceeded"


class RunnerCrashed(ContextExceeded):
    """Ollama 0.31.x: the runner crashed on an input over its physical batch (HTTP 500 `… EOF`, then a reload):
    handled as a refusal of length (cut to fit, the window learned), never as the chunk's or the server's fault."""

    kind = "runner_crash"


class AmbiguousFailure(EmbedFailure):
    kind = "server_error"


class InvalidVectors(EmbedFailure):
    """Some vectors of an otherwise good answer are unusable; `vectors[i]` is None where `reasons` has i."""

    kind = "invalid_vector"

    def __init__(self, vectors: list[np.ndarray | None], reasons: dict[int, str], server: int | None = None):
        first = next(iter(reasons.values()))
        super().__init__(f"{len(reasons)} of {len(vectors)} vectors unusable ({first})", http_status=200, server=server)
        self.vectors = vectors
        self.reasons = reasons


@dataclass(frozen=True)
class Answer:
    """One embedded batch: a valid vector per text, the tokens the server evaluated (None: not reported), and the
    index of the server that answered."""

    vectors: list[np.ndarray]
    tokens: int | None
    server: int


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    texts: int = 0
    seconds_waiting: float = 0.0
    by_url: dict[str, int] = field(default_factory=dict)


class Embedder(Protocol):
    """What the engine needs of a model server (implemented by `OllamaClient` and by the unit tier's fakes)."""

    model: str
    text_prefix: str
    tuning: Tuning
    stats: ClientStats

    @property
    def where(self) -> str:
        """The servers, credentials masked, for messages."""
        ...

    async def embed_texts(self, texts: Sequence[str], *, server: int | None = None) -> Answer:
        """One validated batch, or an EmbedFailure; `server` sends it to that server (the canary's retry)."""
        ...

    async def probe_dimensions(self, text: str = ..., expected: int | None = None) -> int:
        """The model's vector length, from one text (the run's first request: it may load the model). `expected`
        (the column's length): a server answering another length while another server answers it leaves the
        rotation."""
        ...

    def expect_dimensions(self, dimensions: int) -> None:
        """From now on every vector must have this length (the column's)."""
        ...

    def ask_dimensions(self, dimensions: int) -> None:
        """Ask a Matryoshka model for vectors of this length."""
        ...

    async def context_window(self, num_ctx: int | None) -> Window:
        """The model's context window as the server publishes it (unknown: learned from refusals)."""
        ...

    async def model_digest(self) -> str | None:
        """The model's weights' digest (None when the server does not say): recorded per run for `verify`."""
        ...

    async def health(self) -> str:
        """The server's version; ServerUnavailable with a one-line reason when it does not answer."""
        ...

    def server_states(self) -> list[dict[str, object]]:
        """Each server's standing (URL masked, in the rotation or out and why, depth, batch size): the heartbeat
        records it for `status`."""
        ...

    def take_out(self, server: int, why: str) -> None:
        """Take a server out of the rotation (it failed a known-good text); probes bring it back."""
        ...

    def check_returns(self, check: Callable[[int, np.ndarray], str | None]) -> None:
        """A server coming back into the rotation is judged by `check` on its vector of the probe text (its health
        probe's answer): a reason takes it out again (another model answers there)."""
        ...

    def stop_waiting_on(self, event: asyncio.Event) -> None:
        """Once `event` is set, a request that would wait over a second for a server raises StopWhileWaiting."""
        ...

    def turn(self) -> AbstractAsyncContextManager[None]:
        """Held by an embed worker for a whole batch: no more workers hold batches than the servers take."""
        ...

    async def aclose(self) -> None: ...


def validate_vectors(raw: list[object], expected: int, dimensions: int | None, server: int | None) -> list[np.ndarray]:
    """One finite float32 vector of the expected length per input, or AmbiguousFailure / InvalidVectors."""
    if len(raw) != expected:
        raise AmbiguousFailure(
            f"asked for {expected} vectors, got {len(raw)}", http_status=200, kind="wrong_count", server=server
        )
    # Fast path: the whole answer as one 2-D array (one numpy call, not one per vector; the client shares the CPU
    # with the embedder, see benchmarks/RESULTS.md). Anything off falls through to the per-vector checks below,
    # which name the bad vectors.
    try:
        matrix = np.array(raw, dtype=np.float32) if expected else None
    except (TypeError, ValueError):
        matrix = None
    if (
        matrix is not None
        and matrix.ndim == 2
        and matrix.shape[1] > 0
        and (dimensions is None or matrix.shape[1] == dimensions)
        and np.isfinite(matrix).all()
    ):
        return list(matrix)
    vectors: list[np.ndarray | None] = []
    reasons: dict[int, str] = {}
    for i, item in enumerate(raw):
        reason = _vector_problem(item, dimensions)
        if reason:
            reasons[i] = reason
            vectors.append(None)
        else:
            vectors.append(np.asarray(item, dtype=np.float32))
    if reasons:
        raise InvalidVectors(vectors, reasons, server=server)
    return [v for v in vectors if v is not None]


def _vector_problem(item: object, dimensions: int | None) -> str | None:
    if not isinstance(item, list | np.ndarray) or not len(item):  # JSON numbers, or decoded base64 (float32)
        return "empty vector"
    try:
        arr = np.asarray(item, dtype=np.float32)
    except (TypeError, ValueError):
        return "vector holds non-numbers"
    if arr.ndim != 1:
        return "vector is not flat"
    if dimensions is not None and arr.shape[0] != dimensions:
        return f"vector length {arr.shape[0]} != column dimension {dimensions}"
    if not np.isfinite(arr).all():
        return "vector holds NaN or infinity"
    return None
