"""The `Embedder` over Ollama's HTTP API (`/api/embed`, fallback `/api/embeddings`): every HTTP call to Ollama.

Every request sends `truncate: false` (the tool cuts texts itself, so a stored vector is known to be of the text
recorded), `keep_alive` (the model stays loaded between batches) and, when set, `options.num_ctx` and
`dimensions`. Failures are classed as base.py describes; transport errors and overload are retried here with
backoff, so the engine sees only what persisted.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

import httpx
import numpy as np
import orjson

from wiki_embeddings.core import tuning as tune
from wiki_embeddings.core.context import Window, window_from_show
from wiki_embeddings.core.embedders.base import (
    AmbiguousFailure,
    Answer,
    ClientStats,
    ContextExceeded,
    InputRejected,
    ModelNotFound,
    RunnerCrashed,
    ServerUnavailable,
    validate_vectors,
)
from wiki_embeddings.core.embedders.http import (
    ERROR_BODY_LIMIT,
    HttpAnswer,
    Transient,
    answer_limit,
    describe,
    loads,
    post_bounded,
)
from wiki_embeddings.core.embedders.servers import Server, ServerPool, Turns
from wiki_embeddings.core.modelname import same_model
from wiki_embeddings.settings import mask_url

TRANSIENT_STATUSES = {408, 429, 502, 503, 504}
OVERLOAD_STATUSES = {429, 502, 503, 504}  # answers that shrink depth and batch size (core/tuning.py)
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."  # what an out server is asked to embed
MAX_BATCH_TEXTS = 4096
OLLAMA_DEFAULT_NUM_BATCH = 2048  # settings.MAX_BATCH_SIZE: a client built without a tuning never limits the batch
# Ollama's refusal of an over-long input (0.13.5+: "the input length exceeds the context length").
_CONTEXT_REFUSAL = re.compile(r"context (length|window)|exceeds the context|too many tokens", re.IGNORECASE)
# Ollama 0.31.x's runner crash on an input over its physical batch: `do embedding request: Post "…/embedding": EOF`.
_RUNNER_CRASH = re.compile(r"embedding.*\bEOF\b", re.IGNORECASE)


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
        server_wait_sec: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
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
        self.server_wait_sec = server_wait_sec  # how long a run waits while every server is out of the rotation
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
        self._pool: ServerPool | None = None
        self._connect_timeout = min(connect_timeout_sec, timeout_sec)
        self._http: httpx.AsyncClient | None = None
        self._transport = transport  # None: real HTTP (the unit tier passes an httpx.MockTransport)
        self.stats = ClientStats()

    # ------------------------------------------------------------ lifecycle
    def _ensure_open(self) -> tuple[httpx.AsyncClient, ServerPool]:
        """Create the pool lazily, inside the running event loop (its futures bind to it)."""
        if self._http is None or self._pool is None:
            self._pool = ServerPool(self._urls, self.tuning, self._probe, server_wait_sec=self.server_wait_sec)
            slots = self.tuning.max_workers
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_sec, connect=self._connect_timeout),
                limits=httpx.Limits(max_connections=slots + 4, max_keepalive_connections=slots + 4),
                headers={"content-type": "application/json", "user-agent": "wiki-embeddings"},
                trust_env=False,  # Ollama sits on the internal network: never route it through an HTTP proxy
                # Plain-HTTP servers need no TLS context (building one loads the CA store: ~15 ms a run).
                verify=any(u.startswith("https://") for u in self._urls),
                transport=self._transport,
            )
        return self._http, self._pool

    def turn(self) -> Turns:
        """Held by an embed worker for a whole batch: no more workers hold claimed batches than servers take."""
        return self._ensure_open()[1].turns

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
            self._pool = None

    async def __aenter__(self) -> OllamaClient:
        self._ensure_open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def server_states(self) -> list[dict[str, object]]:
        return [{"url": mask_url(u), **c.snapshot()} for u, c in zip(self._urls, self.tuning.controls, strict=True)]

    def take_out(self, server: int, why: str) -> None:
        _, pool = self._ensure_open()
        pool.take_out(pool.servers[server], why)

    def expect_dimensions(self, dimensions: int) -> None:
        """From now on every vector must have this length (the column's), or the answer is invalid."""
        self.dimensions = dimensions

    def ask_dimensions(self, dimensions: int) -> None:
        """Send `dimensions: D` with every request (a Matryoshka model cuts its vectors to the column's length)."""
        self.request_dimensions = dimensions

    @property
    def where(self) -> str:
        return ", ".join(mask_url(u) for u in self._urls)

    # ------------------------------------------------------------ questions about the model
    async def version(self) -> str:
        """GET /api/version on the first server; ServerUnavailable with a one-line reason when it does not answer."""
        http, _ = self._ensure_open()
        url = self._urls[0]
        try:
            resp = await asyncio.wait_for(http.get(f"{url}/api/version"), self._connect_timeout)
            resp.raise_for_status()
            data = loads(resp.content)
            return str(data.get("version", "?")) if isinstance(data, dict) else "?"
        except (httpx.HTTPError, TimeoutError, ValueError) as exc:
            raise ServerUnavailable(
                f"the Ollama server at {mask_url(url)} (OLLAMA_URL) does not answer: {describe(exc)}"
            ) from exc

    async def health(self) -> str:
        return await self.version()

    async def show(self) -> dict[str, object]:
        """POST /api/show for the model: its context length, architecture and default parameters.

        Returns {} when the server cannot describe the model (an older server, a proxy): the context is then
        learned from refusals alone.
        """
        http, _ = self._ensure_open()
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
            data = loads(resp.content[: ERROR_BODY_LIMIT * 16])
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    async def context_window(self, num_ctx: int | None) -> Window:
        return window_from_show(await self.show(), num_ctx)

    async def model_digest(self) -> str | None:
        """The model's digest as GET /api/tags lists it on the first server (`name` and `name:latest` are one
        model), or None when the server does not answer or does not list it. Recorded per run: a digest that
        changed under the same name explains vectors that no longer verify (`ollama pull` replaced the weights)."""
        http, _ = self._ensure_open()
        url = self._urls[0]
        try:
            resp = await asyncio.wait_for(http.get(f"{url}/api/tags"), self._connect_timeout)
            data = loads(resp.content[: ERROR_BODY_LIMIT * 256]) if resp.status_code == 200 else {}
        except (httpx.HTTPError, TimeoutError, ValueError):
            return None

        models = data.get("models") if isinstance(data, dict) else None
        for entry in models if isinstance(models, list) else []:
            names = (entry.get("name"), entry.get("model")) if isinstance(entry, dict) else ()
            if any(same_model(self.model, str(name or "")) for name in names):
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
            vectors = await self._first_answer(text)
        finally:
            self.dimensions = saved
            self.timeout_sec = saved_timeout
            self._probing = False
            self._deadline_name = "--timeout-sec"
        return int(vectors[0].shape[0])

    async def _first_answer(self, text: str) -> list[np.ndarray]:
        """The run's first request; a server that fails it with a server-side error leaves the rotation and the
        next one is asked (one sick server of several must not stop the run before it starts)."""
        for left in range(len(self._urls) - 1, -1, -1):
            try:
                return await self.embed([text])
            except AmbiguousFailure as exc:
                if exc.server is None or not left:
                    raise
                self.take_out(exc.server, f"failed the run's first request: {exc.message}")
        raise AssertionError("unreachable")  # the last server's failure is raised above

    # ------------------------------------------------------------ embedding
    async def embed(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One validated batch: one finite float32 vector of the expected length per input, or an EmbedFailure."""
        return (await self.embed_texts(texts)).vectors

    async def embed_counted(self, texts: Sequence[str]) -> tuple[list[np.ndarray], int | None]:
        """`embed`, plus the server's `prompt_eval_count` (tokens evaluated over all inputs; None if not sent)."""
        answer = await self.embed_texts(texts)
        return answer.vectors, answer.tokens

    async def embed_texts(self, texts: Sequence[str], *, server: int | None = None) -> Answer:
        """One validated batch with its token count and the server that answered.

        Transport errors and overload are retried, each time on whichever server is free (a failing server
        backs off and, failing on, leaves the rotation: core/health.py); a request whose `--retries` attempts
        all failed takes its server out and goes on with the others. It fails only when no server is left
        (ServerUnavailable; ModelNotFound when no server has the model). `server` pins the request to one
        server for one attempt: the canary's question "are you well now?" and the health probe.
        """
        _, pool = self._ensure_open()
        payload = [self.text_prefix + t for t in texts] if self.text_prefix else list(texts)
        attempts = timeouts = total = 0
        limit = (self.retries + 1) * len(self._urls) * 3  # a server that flaps between probe and batch ends too
        while True:
            chosen = await pool.acquire(server)
            total += 1
            try:
                raw, count = await self._exchange(chosen, payload)
                self.stats.texts += len(texts)
                self.last_prompt_eval_count = count
                return Answer(validate_vectors(raw, len(texts), self.dimensions, chosen.index), count, chosen.index)
            except TimeoutError as exc:
                timeouts += 1
                if server is not None or timeouts > min(1, self.retries) or total >= limit:
                    # A deadline hit twice: the engine asks a canary whether the server or the input is at fault.
                    raise AmbiguousFailure(
                        f"no complete answer from {chosen.masked} within {self._deadline_name} "
                        f"{self.timeout_sec:g} ({timeouts} attempts)",
                        kind="timeout",
                        server=chosen.index,
                    ) from exc
            except Transient as exc:
                attempts += 1
                failure = f"the Ollama server at {chosen.masked} (OLLAMA_URL): {exc}"
                if server is not None or total >= limit:
                    raise ServerUnavailable(failure, http_status=exc.http_status, server=chosen.index) from exc
                if attempts > self.retries:
                    pool.take_out(chosen, f"{attempts} attempts of one request failed: {exc}")
                    attempts = 0
            except ModelNotFound as exc:
                self.tuning.controls[chosen.index].health.no_model(exc.message)
                if server is not None:
                    raise
            finally:
                pool.release(chosen)
            self.stats.retries += 1

    async def _exchange(self, server: Server, texts: list[str]) -> tuple[list[object], int | None]:
        """Send `texts` to `server` in pieces of its batch size; every piece is one request the tuning and the
        server's health hear about."""
        size = max(1, self.tuning.size_for(server.index))
        health = self.tuning.controls[server.index].health
        raws: list[object] = []
        counts: list[int | None] = []
        for start in range(0, len(texts), size):
            piece = texts[start : start + size]
            ticket = self.tuning.sent(server.index, len(piece), server.active)
            outcome = tune.ERROR
            try:
                async with asyncio.timeout(self.timeout_sec):  # no extra task per request (wait_for makes one)
                    raw, count = await self._request(server, piece)
                outcome = tune.IGNORE if self._probing else tune.OK
            except TimeoutError:
                outcome = tune.IGNORE if self._probing else tune.SLOW
                if not self._probing:
                    health.failure(f"no answer within {self._deadline_name} {self.timeout_sec:g}")
                raise
            except Transient as exc:
                if exc.http_status == 413:
                    outcome = tune.SLOW  # refused as too large: a smaller batch is the cure, the server is well
                else:
                    outcome = (
                        tune.TROUBLE if exc.http_status is None or exc.http_status in OVERLOAD_STATUSES else outcome
                    )
                    health.failure(str(exc), exc.retry_after)
                raise
            finally:
                seconds = self.tuning.done(ticket, outcome)
                self.stats.seconds_waiting += seconds
            health.success(seconds)
            raws.extend(raw)
            counts.append(count)
        return raws, (None if any(c is None for c in counts) else sum(c for c in counts if c is not None))

    async def _probe(self, server: Server) -> None:
        """Is an out server well again? One known-good text, pinned to it (its answer puts it back)."""
        await self.embed_texts([PROBE_TEXT], server=server.index)

    # ------------------------------------------------------------ one HTTP exchange
    def _common_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {}
        if self.keep_alive is not None:
            fields["keep_alive"] = _keep_alive_value(self.keep_alive)
        if self.num_ctx:
            # Ollama 0.30+ cuts an input silently at its physical batch (2048 tokens by default) whatever num_ctx
            # says (ollama#14259): a larger window asks for a batch as large. The same options go with every
            # request (Ollama reloads a model whose runner options change).
            options: dict[str, int] = {"num_ctx": self.num_ctx}
            if self.num_ctx > OLLAMA_DEFAULT_NUM_BATCH:
                options["num_batch"] = self.num_ctx
            fields["options"] = options
        return fields

    def _limit(self, texts: int) -> int:
        return answer_limit(texts, self.request_dimensions or self.dimensions)

    async def _request(self, server: Server, texts: list[str]) -> tuple[list[object], int | None]:
        http, _ = self._ensure_open()
        self.stats.requests += 1
        self.stats.by_url[server.url] = self.stats.by_url.get(server.url, 0) + 1
        server.requests += 1
        if server.legacy:
            return [await self._legacy_one(server, t) for t in texts], None
        payload: dict[str, object] = {"model": self.model, "input": texts, "truncate": False, **self._common_fields()}
        if self.request_dimensions:
            payload["dimensions"] = self.request_dimensions
        resp = await post_bounded(http, f"{server.url}/api/embed", orjson.dumps(payload), self._limit(len(texts)))
        if resp.status_code == 404 and "model" not in resp.text.lower():
            server.legacy = True  # an Ollama older than /api/embed
            return [await self._legacy_one(server, t) for t in texts], None
        data = self._json_or_raise(resp, server)
        embeddings = data.get("embeddings") if isinstance(data, dict) else None
        if not isinstance(embeddings, list):
            raise AmbiguousFailure(
                f"answer from {server.masked} has no 'embeddings' list",
                http_status=200,
                kind="bad_response",
                server=server.index,
            )
        count = data.get("prompt_eval_count") if isinstance(data, dict) else None
        return embeddings, count if isinstance(count, int) and not isinstance(count, bool) else None

    async def _legacy_one(self, server: Server, text: str) -> object:
        http, _ = self._ensure_open()
        body = orjson.dumps({"model": self.model, "prompt": text, **self._common_fields()})
        resp = await post_bounded(http, f"{server.url}/api/embeddings", body, self._limit(1))
        data = self._json_or_raise(resp, server)
        return data.get("embedding") if isinstance(data, dict) else None

    def _json_or_raise(self, resp: HttpAnswer, server: Server) -> object:
        status, where, index = resp.status_code, server.masked, server.index
        if status in TRANSIENT_STATUSES or status == 413:
            raise Transient(
                f"HTTP {status} from {where}: {resp.error_text()}", http_status=status, retry_after=resp.retry_after()
            )
        if status == 404:
            raise ModelNotFound(
                f"model {self.model!r} is not available on {where}: {resp.error_text()}. "
                f"Pull it first (`ollama pull {self.model}`) or set OLLAMA_MODEL to a model the server has.",
                http_status=404,
                server=index,
            )
        if status in (400, 500) and _RUNNER_CRASH.search(resp.error_text()):
            # Ollama 0.31.x: an input over its physical batch crashes the runner, which reloads (400 from 0.30's
            # handler, 500 from older ones): a length problem, never the chunk's fault, never the server's.
            raise RunnerCrashed(f"HTTP {status}: {resp.error_text()}", http_status=status, server=index)
        if status == 400 and _CONTEXT_REFUSAL.search(resp.error_text()):
            raise ContextExceeded(f"HTTP 400: {resp.error_text()}", http_status=400, server=index)
        if 400 <= status < 500:
            raise InputRejected(
                f"HTTP {status}: {resp.error_text()}", http_status=status, kind=f"http_{status}", server=index
            )
        if status >= 500:
            raise AmbiguousFailure(
                f"HTTP {status}: {resp.error_text()}", http_status=status, kind=f"http_{status}", server=index
            )
        try:
            return loads(resp.content)
        except ValueError as exc:
            ctype = resp.headers.get("content-type", "?")
            raise AmbiguousFailure(
                f"answer from {where} is not JSON (content-type {ctype}): {resp.text[:120]!r}",
                http_status=status,
                kind="bad_response",
                server=index,
            ) from exc


def _keep_alive_value(value: str) -> str | int:
    """Ollama takes a duration ("30m", "1h") or seconds as a number (-1: forever, 0: unload at once)."""
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        return text
