"""Every HTTP call of the project: the Ollama embedding API (`/api/embed`, fallback `/api/embeddings`).

The client decides what a failure *means*, because the engine acts on that meaning:
- `ServerUnavailable`: transport errors and overload (connect errors, 429/502/503/504) that persisted
  through retries with backoff. The chunks are fine; the run stops cleanly and marks nothing failed.
- `ModelNotFound`: the model is not pulled on the server; nothing can be embedded.
- `InputRejected`: the server refused this input (400) - tied to the texts: the engine bisects.
- `ContextExceeded`: a 400 saying the input is over the model's context (Ollama >= 0.13.5 answers it whatever
  `truncate` says, ollama#14186): never the chunk's fault; the engine cuts the text to fit (core/context.py).
- `AmbiguousFailure`: a 500, a deadline hit, a malformed answer - either the input or the server; the
  engine asks a known-good canary text before blaming the input.
- `InvalidVectors`: the answer parsed, but some vectors are unusable (NaN, infinity, wrong or zero
  length); the valid ones come with it so they can still be written.

Every request sends `truncate: false` (the tool cuts texts itself, so a stored vector is known to be of the
text recorded), `keep_alive` (the model stays loaded between batches) and, when set, `options.num_ctx` and
`dimensions`. Answers are read with a size bound: a body larger than a batch can legitimately be, or one that
never ends, is cut off and treated as a server fault.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np
import orjson

from wiki_embeddings.core import tuning as tune
from wiki_embeddings.settings import mask_url

TRANSIENT_STATUSES = {408, 429, 502, 503, 504}
OVERLOAD_STATUSES = {429, 502, 503, 504}  # answers that shrink depth and batch size (core/tuning.py)
MAX_BATCH_TEXTS = 4096  # settings.MAX_BATCH_SIZE: a client built without a tuning never limits the batch
# Ollama's refusal of an over-long input (0.13.5+: "the input length exceeds the context length").
_CONTEXT_REFUSAL = re.compile(r"context (length|window)|exceeds the context|too many tokens", re.IGNORECASE)
ERROR_BODY_LIMIT = 64 * 1024  # an error answer is a line of text; more is cut off
BYTES_PER_NUMBER = 32  # a float in JSON ("-0.012345678901234567,") with a generous margin
UNKNOWN_DIMENSIONS = 16_384  # the answer bound before the model's vector length is known
RESPONSE_SLACK = 64 * 1024


class EmbedFailure(Exception):
    """Base of every embedding failure; `kind` is the short error class logged in failure records."""

    kind = "embed_failed"

    def __init__(self, message: str, *, http_status: int | None = None, kind: str | None = None):
        super().__init__(message)
        self.message = message
        self.http_status = http_status
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


class AmbiguousFailure(EmbedFailure):
    kind = "server_error"


class InvalidVectors(EmbedFailure):
    """Some vectors of an otherwise good answer are unusable; `vectors[i]` is None where `reasons` has i."""

    kind = "invalid_vector"

    def __init__(self, vectors: list[np.ndarray | None], reasons: dict[int, str]):
        first = next(iter(reasons.values()))
        super().__init__(f"{len(reasons)} of {len(vectors)} vectors unusable ({first})", http_status=200)
        self.vectors = vectors
        self.reasons = reasons


@dataclass
class _Endpoint:
    url: str
    index: int
    active: int = 0  # our requests in flight there; at most its depth (core/tuning.py)
    legacy: bool = False  # /api/embed answered 404: an older Ollama, use /api/embeddings
    requests: int = 0


class _Turns:
    """A semaphore whose limit can change: the embed workers that may hold a batch at once (= total depth)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self._waiters: list[asyncio.Future[None]] = []

    async def __aenter__(self) -> None:
        while self.active >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.active += 1

    async def __aexit__(self, *exc: object) -> None:
        self.active -= 1
        self.wake()

    def set_limit(self, limit: int) -> None:
        if limit != self.limit:
            self.limit = limit
            self.wake()

    def wake(self) -> None:
        for waiter in self._waiters[: max(self.limit - self.active, 0)]:
            if not waiter.done():
                waiter.set_result(None)


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    texts: int = 0
    seconds_waiting: float = 0.0
    by_url: dict[str, int] = field(default_factory=dict)


class OllamaClient:
    """One pooled async HTTP client over one or more Ollama servers, used round-robin with per-server slots."""

    def __init__(
        self,
        urls: Sequence[str],
        model: str,
        *,
        timeout_sec: float = 120.0,
        retries: int = 5,
        backoff_base_sec: float = 0.5,
        backoff_max_sec: float = 30.0,
        per_url_in_flight: int | None = 1,
        text_prefix: str = "",
        dimensions: int | None = None,
        connect_timeout_sec: float = 10.0,
        keep_alive: str | None = "30m",
        num_ctx: int | None = None,
        load_timeout_sec: float = 300.0,
        tuning: tune.Tuning | None = None,
    ):
        if not urls:
            raise ValueError("at least one Ollama URL is needed")
        self.model = model
        self.timeout_sec = timeout_sec
        self.retries = retries
        self.backoff_base_sec = backoff_base_sec
        self.backoff_max_sec = backoff_max_sec
        self.text_prefix = text_prefix
        self.dimensions = dimensions  # the vector length every answer must have (None: not checked yet)
        self.request_dimensions: int | None = None  # sent as `dimensions` (Matryoshka models, opt-in)
        self.keep_alive = keep_alive
        self.num_ctx = num_ctx
        self.load_timeout_sec = max(load_timeout_sec, timeout_sec)
        self.last_prompt_eval_count: int | None = None
        self._probing = False  # the first request may load the model: its time is no evidence for tuning
        self._deadline_name = "--timeout-sec"
        self._urls = [u.rstrip("/") for u in urls]
        # Requests in flight per server: pinned (per_url_in_flight), or self-tuning (None / 0; core/tuning.py).
        self.tuning = tuning or tune.Tuning(
            len(self._urls), pinned_depth=per_url_in_flight or None, max_batch=MAX_BATCH_TEXTS
        )
        if self.tuning.servers != len(self._urls):
            raise ValueError("the tuning must have one depth per server")
        self._endpoints: list[_Endpoint] | None = None
        self._next = 0  # where the round-robin starts looking for a server with a free slot
        self._slot_waiters: list[asyncio.Future[None]] = []
        self._turns: _Turns | None = None
        self._connect_timeout = min(connect_timeout_sec, timeout_sec)
        self._http: httpx.AsyncClient | None = None
        self.stats = ClientStats()

    # ------------------------------------------------------------ lifecycle
    def _ensure_open(self) -> httpx.AsyncClient:
        """Create the pool lazily, inside the running event loop (semaphores bind to it)."""
        if self._http is None:
            self._endpoints = [_Endpoint(u, i) for i, u in enumerate(self._urls)]
            self._turns = _Turns(self.tuning.total_depth)
            self._slot_waiters = []
            slots = self.tuning.max_workers
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_sec, connect=self._connect_timeout),
                limits=httpx.Limits(max_connections=slots + 4, max_keepalive_connections=slots + 4),
                headers={"content-type": "application/json", "user-agent": "wiki-embeddings"},
                trust_env=False,  # Ollama sits on the internal network: never route it through an HTTP proxy
                # Plain-HTTP servers need no TLS context (building one loads the CA store: ~15 ms a run).
                verify=any(u.startswith("https://") for u in self._urls),
            )
        return self._http

    def turn(self) -> _Turns:
        """Held by an embed worker for a whole batch: no more workers hold claimed batches than servers take."""
        self._ensure_open()
        assert self._turns is not None
        return self._turns

    async def _acquire_endpoint(self) -> _Endpoint:
        """The next server (round-robin) with a free slot under its depth; waits while every one is full."""
        assert self._endpoints is not None
        endpoints = self._endpoints
        while True:
            for k in range(len(endpoints)):
                endpoint = endpoints[(self._next + k) % len(endpoints)]
                if endpoint.active < self.tuning.depth(endpoint.index):
                    endpoint.active += 1
                    self._next = (endpoint.index + 1) % len(endpoints)
                    return endpoint
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)

    def _release_endpoint(self, endpoint: _Endpoint, ticket: tune.Ticket, outcome: str) -> float:
        endpoint.active -= 1
        seconds = self.tuning.done(ticket, outcome)
        if self._turns is not None:
            self._turns.set_limit(self.tuning.total_depth)
        for waiter in self._slot_waiters:
            if not waiter.done():
                waiter.set_result(None)
        return seconds

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> OllamaClient:
        self._ensure_open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def expect_dimensions(self, dimensions: int) -> None:
        """From now on every vector must have this length (the column's), or the answer is invalid."""
        self.dimensions = dimensions

    def ask_dimensions(self, dimensions: int) -> None:
        """Send `dimensions: D` with every request (a Matryoshka model cuts its vectors to the column's length)."""
        self.request_dimensions = dimensions

    @property
    def where(self) -> str:
        return ", ".join(mask_url(u) for u in self._urls)

    # ------------------------------------------------------------ public calls
    async def version(self) -> str:
        """GET /api/version on the first server; ServerUnavailable with a one-line reason when it does not answer."""
        http = self._ensure_open()
        url = self._urls[0]
        try:
            resp = await asyncio.wait_for(http.get(f"{url}/api/version"), self._connect_timeout)
            resp.raise_for_status()
            data = _loads(resp.content)
            return str(data.get("version", "?")) if isinstance(data, dict) else "?"
        except (httpx.HTTPError, TimeoutError, ValueError) as exc:
            raise ServerUnavailable(
                f"the Ollama server at {mask_url(url)} (OLLAMA_URL) does not answer: {_describe(exc)}"
            ) from exc

    async def show(self) -> dict[str, object]:
        """POST /api/show for the model: its context length, architecture and default parameters.

        Returns {} when the server cannot describe the model (an older server, a proxy): the context is then
        learned from refusals alone.
        """
        http = self._ensure_open()
        url = self._urls[0]
        try:
            resp = await asyncio.wait_for(
                http.post(f"{url}/api/show", content=orjson.dumps({"model": self.model})), self._connect_timeout
            )
        except (httpx.HTTPError, TimeoutError):
            return {}
        if resp.status_code != 200:
            return {}
        try:
            data = _loads(resp.content[: ERROR_BODY_LIMIT * 16])
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    async def model_digest(self) -> str | None:
        """The model's digest as GET /api/tags lists it on the first server (`name` and `name:latest` are one
        model), or None when the server does not answer or does not list it. Recorded per run: a digest that
        changed under the same name explains vectors that no longer verify (`ollama pull` replaced the weights)."""
        http = self._ensure_open()
        url = self._urls[0]
        try:
            resp = await asyncio.wait_for(http.get(f"{url}/api/tags"), self._connect_timeout)
            data = _loads(resp.content[: ERROR_BODY_LIMIT * 256]) if resp.status_code == 200 else {}
        except (httpx.HTTPError, TimeoutError, ValueError):
            return None

        def norm(name: object) -> str:
            text = str(name or "").strip().lower()
            return text[: -len(":latest")] if text.endswith(":latest") else text

        models = data.get("models") if isinstance(data, dict) else None
        for entry in models if isinstance(models, list) else []:
            if isinstance(entry, dict) and norm(self.model) in (norm(entry.get("name")), norm(entry.get("model"))):
                digest = entry.get("digest")
                return str(digest) if digest else None
        return None

    async def probe_dimensions(self, text: str = "dimension probe") -> int:
        """Embed one text to learn the model's vector length (and prove the model is there).

        This is the run's first request, so it may pay the model's load time: it runs under the load allowance
        (`load_timeout_sec`), not under `--timeout-sec`, and a cold start is never counted as a timeout.
        """
        saved, self.dimensions = self.dimensions, None
        saved_timeout, self.timeout_sec = self.timeout_sec, self.load_timeout_sec
        self._probing = True
        self._deadline_name = "--load-timeout-sec (the first request may load the model)"
        try:
            vectors = await self.embed([text])
        finally:
            self.dimensions = saved
            self.timeout_sec = saved_timeout
            self._probing = False
            self._deadline_name = "--timeout-sec"
        return int(vectors[0].shape[0])

    async def embed(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One validated batch: one finite float32 vector of the expected length per input, or an EmbedFailure."""
        vectors, _ = await self.embed_counted(texts)
        return vectors

    async def embed_counted(self, texts: Sequence[str]) -> tuple[list[np.ndarray], int | None]:
        """`embed`, plus the server's `prompt_eval_count` (tokens evaluated over all inputs; None if not sent)."""
        self._ensure_open()
        assert self._endpoints is not None
        payload_texts = [self.text_prefix + t for t in texts] if self.text_prefix else list(texts)
        probing = self._probing
        attempt = timeouts = 0
        while True:
            endpoint = await self._acquire_endpoint()
            ticket = self.tuning.sent(endpoint.index, len(texts), endpoint.active)
            outcome = tune.ERROR
            try:
                try:
                    async with asyncio.timeout(self.timeout_sec):  # no extra task per request (wait_for makes one)
                        vectors, count = await self._request(endpoint, payload_texts)
                    outcome = tune.IGNORE if probing else tune.OK
                except TimeoutError:
                    outcome = tune.IGNORE if probing else tune.TROUBLE
                    raise
                except _Transient as exc:
                    if exc.http_status is None or exc.http_status in OVERLOAD_STATUSES:
                        outcome = tune.TROUBLE
                    raise
                finally:
                    self.stats.seconds_waiting += self._release_endpoint(endpoint, ticket, outcome)
                self.stats.texts += len(texts)
                self.last_prompt_eval_count = count
                return self._validate(vectors, len(texts)), count
            except TimeoutError as exc:
                timeouts += 1
                if timeouts > min(1, self.retries):
                    # A deadline hit twice: the engine asks a canary whether the server or the input is at fault.
                    raise AmbiguousFailure(
                        f"no complete answer from {mask_url(endpoint.url)} within {self._deadline_name} "
                        f"{self.timeout_sec:g} ({timeouts} attempts)",
                        kind="timeout",
                    ) from exc
                self.stats.retries += 1
                await asyncio.sleep(self._backoff(timeouts))
            except _Transient as exc:
                attempt += 1
                if attempt > self.retries:
                    raise ServerUnavailable(
                        f"the Ollama server at {self.where} (OLLAMA_URL) is unreachable or overloaded after "
                        f"{attempt} attempts: {exc}",
                        http_status=exc.http_status,
                    ) from exc
                self.stats.retries += 1
                await asyncio.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter in its upper half, so many workers do not retry in lockstep."""
        ceiling = min(self.backoff_max_sec, self.backoff_base_sec * (2 ** (attempt - 1)))
        return ceiling * (0.5 + random.random() / 2)

    # ------------------------------------------------------------ one HTTP exchange
    def _common_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {}
        if self.keep_alive is not None:
            fields["keep_alive"] = _keep_alive_value(self.keep_alive)
        if self.num_ctx:
            fields["options"] = {"num_ctx": self.num_ctx}
        return fields

    def _answer_limit(self, texts: int) -> int:
        """The largest answer `texts` vectors can legitimately make (JSON numbers at a generous width)."""
        dims = self.request_dimensions or self.dimensions or UNKNOWN_DIMENSIONS
        return max(texts, 1) * dims * BYTES_PER_NUMBER + RESPONSE_SLACK

    async def _request(self, endpoint: _Endpoint, texts: list[str]) -> tuple[list[object], int | None]:
        http = self._ensure_open()
        self.stats.requests += 1
        self.stats.by_url[endpoint.url] = self.stats.by_url.get(endpoint.url, 0) + 1
        if endpoint.legacy:
            return [await self._legacy_one(endpoint, t) for t in texts], None
        payload: dict[str, object] = {"model": self.model, "input": texts, "truncate": False, **self._common_fields()}
        if self.request_dimensions:
            payload["dimensions"] = self.request_dimensions
        resp = await self._post(
            http, f"{endpoint.url}/api/embed", orjson.dumps(payload), self._answer_limit(len(texts))
        )
        if resp.status_code == 404 and not _mentions_model(resp):
            endpoint.legacy = True  # an Ollama older than /api/embed
            return [await self._legacy_one(endpoint, t) for t in texts], None
        data = self._json_or_raise(resp, endpoint)
        embeddings = data.get("embeddings") if isinstance(data, dict) else None
        if not isinstance(embeddings, list):
            raise AmbiguousFailure(
                f"answer from {mask_url(endpoint.url)} has no 'embeddings' list",
                http_status=200,
                kind="bad_response",
            )
        count = data.get("prompt_eval_count") if isinstance(data, dict) else None
        return embeddings, count if isinstance(count, int) and not isinstance(count, bool) else None

    async def _legacy_one(self, endpoint: _Endpoint, text: str) -> object:
        http = self._ensure_open()
        body = orjson.dumps({"model": self.model, "prompt": text, **self._common_fields()})
        resp = await self._post(http, f"{endpoint.url}/api/embeddings", body, self._answer_limit(1))
        data = self._json_or_raise(resp, endpoint)
        return data.get("embedding") if isinstance(data, dict) else None

    @staticmethod
    async def _post(http: httpx.AsyncClient, url: str, body: bytes, limit: int) -> _Answer:
        """POST and read the answer, never more than `limit` bytes (ERROR_BODY_LIMIT for an error answer).

        A body over the bound, or one that never ends, is cut off and treated as a server fault: retried,
        then a clean stop with nothing marked failed; memory stays bounded whatever the server sends.
        """
        try:
            async with http.stream("POST", url, content=body) as resp:
                cap = limit if resp.status_code < 400 else ERROR_BODY_LIMIT
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > cap and resp.status_code < 400:
                    raise _Transient(
                        f"answer of {int(declared):,} bytes from {mask_url(url)} is larger than a batch can be "
                        f"({cap:,} bytes): refused"
                    )
                parts: list[bytes] = []
                size = 0
                async for part in resp.aiter_bytes():
                    size += len(part)
                    if size > cap:
                        if resp.status_code >= 400:
                            break  # an error text: its first part is enough
                        raise _Transient(
                            f"answer from {mask_url(url)} exceeded {cap:,} bytes (more than a batch can be, or "
                            "a body that never ends): cut off"
                        )
                    parts.append(part)
                return _Answer(resp.status_code, resp.headers, b"".join(parts)[:cap], resp.reason_phrase)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise _Transient(f"{_describe(exc)} from {mask_url(url)}") from exc

    def _json_or_raise(self, resp: _Answer, endpoint: _Endpoint) -> object:
        status = resp.status_code
        where = mask_url(endpoint.url)
        if status in TRANSIENT_STATUSES:
            raise _Transient(f"HTTP {status} from {where}: {_error_text(resp)}", http_status=status)
        if status == 404:
            raise ModelNotFound(
                f"model {self.model!r} is not available on {where}: {_error_text(resp)}. "
                f"Pull it first (`ollama pull {self.model}`) or set OLLAMA_MODEL to a model the server has.",
                http_status=404,
            )
        if status == 400 and _CONTEXT_REFUSAL.search(_error_text(resp)):
            raise ContextExceeded(f"HTTP 400: {_error_text(resp)}", http_status=400)
        if 400 <= status < 500:
            raise InputRejected(f"HTTP {status}: {_error_text(resp)}", http_status=status, kind=f"http_{status}")
        if status >= 500:
            raise AmbiguousFailure(f"HTTP {status}: {_error_text(resp)}", http_status=status, kind=f"http_{status}")
        try:
            return _loads(resp.content)
        except ValueError as exc:
            ctype = resp.headers.get("content-type", "?")
            raise AmbiguousFailure(
                f"answer from {where} is not JSON (content-type {ctype}): {resp.text[:120]!r}",
                http_status=status,
                kind="bad_response",
            ) from exc

    # ------------------------------------------------------------ validation
    def _validate(self, raw: list[object], expected: int) -> list[np.ndarray]:
        if len(raw) != expected:
            raise AmbiguousFailure(f"asked for {expected} vectors, got {len(raw)}", http_status=200, kind="wrong_count")
        # Fast path: the whole answer as one 2-D array (one numpy call, not one per vector; the client shares
        # the CPU with the embedder, see benchmarks/RESULTS.md). Anything off falls through to the per-vector
        # checks below, which name the bad vectors.
        try:
            matrix = np.array(raw, dtype=np.float32) if expected else None
        except (TypeError, ValueError):
            matrix = None
        if (
            matrix is not None
            and matrix.ndim == 2
            and matrix.shape[1] > 0
            and (self.dimensions is None or matrix.shape[1] == self.dimensions)
            and np.isfinite(matrix).all()
        ):
            return list(matrix)
        vectors: list[np.ndarray | None] = []
        reasons: dict[int, str] = {}
        want = self.dimensions
        for i, item in enumerate(raw):
            reason = None
            arr = None
            if not isinstance(item, list) or not item:
                reason = "empty vector"
            else:
                try:
                    arr = np.asarray(item, dtype=np.float32)
                except (TypeError, ValueError):
                    reason = "vector holds non-numbers"
                if arr is not None and reason is None:
                    if arr.ndim != 1:
                        reason = "vector is not flat"
                    elif want is not None and arr.shape[0] != want:
                        reason = f"vector length {arr.shape[0]} != column dimension {want}"
                    elif not np.isfinite(arr).all():
                        reason = "vector holds NaN or infinity"
            if reason:
                reasons[i] = reason
                vectors.append(None)
            else:
                vectors.append(arr)
        if reasons:
            raise InvalidVectors(vectors, reasons)
        return vectors  # type: ignore[return-value]


@dataclass
class _Answer:
    """An HTTP answer read within its size bound."""

    status_code: int
    headers: httpx.Headers
    content: bytes
    reason_phrase: str = ""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


def _keep_alive_value(value: str) -> str | int:
    """Ollama takes a duration ("30m", "1h") or seconds as a number (-1: forever, 0: unload at once)."""
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        return text


class _Transient(Exception):
    """Internal: a failure worth retrying (transport error, overload status)."""

    def __init__(self, message: str, http_status: int | None = None):
        super().__init__(message)
        self.http_status = http_status


def _loads(content: bytes) -> object:
    """orjson first (fast); the standard parser for answers that carry NaN/Infinity literals, so they are seen."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)


def _error_text(resp: _Answer) -> str:
    try:
        data = _loads(resp.content)
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])[:300]
    except ValueError:
        pass
    return resp.text[:200].strip() or resp.reason_phrase


def _mentions_model(resp: _Answer) -> bool:
    return "model" in resp.text.lower()


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc).strip()
    return f"{name}: {text}" if text else name
