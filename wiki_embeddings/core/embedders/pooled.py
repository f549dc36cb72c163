"""What every HTTP embedder shares: the pool of servers, the retry and health loop, the tuning's bookkeeping.

`PooledClient` implements the `Embedder` protocol (base.py) except the exchange itself: a subclass sends one
request of texts to one server and parses its answer (`_request`), and says what the server publishes about the
model (`context_window`, `model_digest`, `health`). Everything that decides which server takes a request, how
often it is retried, when a server leaves the rotation and how the batch size and depth learn from each answer
lives here once, so the Ollama and the OpenAI-compatible clients behave alike under the same weather.

Failures a subclass raises from `_request`: `Transient` (retried: transport errors, overload; 413 means the
request was too large and shrinks the batch), `ModelNotFound`, and any other `EmbedFailure` (handed to the
engine as it is).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import httpx
import numpy as np

from wiki_embeddings.core import tuning as tune
from wiki_embeddings.core.context import Window
from wiki_embeddings.core.embedders.base import (
    AmbiguousFailure,
    Answer,
    ClientStats,
    EmbedFailure,
    InvalidVectors,
    ModelNotFound,
    RunnerCrashed,
    ServerUnavailable,
    validate_vectors,
)
from wiki_embeddings.core.embedders.http import Transient, answer_limit
from wiki_embeddings.core.embedders.servers import Server, ServerPool, Turns
from wiki_embeddings.settings import mask_url

OVERLOAD_STATUSES = {429, 502, 503, 504}  # answers that lower the depth, never the batch size (core/tuning.py)
FULL_STATUSES = {429, 503}  # of those, the server's own "I am full": one fewer in flight (502/504 halve the depth)
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."  # what an out server is asked to embed
MAX_BATCH_TEXTS = 4096
Admit = Callable[[int, np.ndarray], str | None]  # (server, its vector of PROBE_TEXT) -> why it stays out, or None


class ReloadWait(TimeoutError):
    """A request timed out while its server reloaded the model after a runner crash: sent again, counted against
    nobody (it waited for the reload, not for a sick server)."""


class PooledClient(ABC):
    """One pooled async HTTP client over one or more model servers, used round-robin with per-server slots."""

    #: How messages name a server of this kind ("the Ollama server at URL (OLLAMA_URL)").
    server_kind = "model server"

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
        load_timeout_sec: float = 300.0,
        tuning: tune.Tuning | None = None,
        server_wait_sec: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if not urls:
            raise ValueError("at least one model server URL is needed")
        self.model, self.text_prefix = model, text_prefix
        self.timeout_sec, self.retries = timeout_sec, retries  # per request: its deadline, its retries
        self.backoff_base_sec, self.backoff_max_sec = backoff_base_sec, backoff_max_sec
        self.dimensions = dimensions  # the vector length every answer must have (None: not checked yet)
        self.request_dimensions: int | None = None  # sent as `dimensions` (Matryoshka models, opt-in)
        self.load_timeout_sec = max(load_timeout_sec, timeout_sec)
        self.server_wait_sec = server_wait_sec  # how long a run waits while every server is out of the rotation
        self._stop_event: asyncio.Event | None = None  # the run's stop request (stop_waiting_on)
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
        self._transport = transport  # None: the network (tests pass httpx.MockTransport)
        self.stats = ClientStats()
        self._admit: Admit | None = None  # judges a server coming back by its vector of PROBE_TEXT

    # ------------------------------------------------------------ what a subclass provides
    @abstractmethod
    async def _request(self, server: Server, texts: list[str]) -> tuple[list[object], int | None]:
        """One request of `texts` to `server`: the raw vectors (one per text) and the tokens evaluated (None:
        not reported). Raises Transient to be retried, ModelNotFound, or another EmbedFailure."""

    @abstractmethod
    async def context_window(self, num_ctx: int | None) -> Window: ...

    @abstractmethod
    async def model_digest(self) -> str | None: ...

    @abstractmethod
    async def health(self) -> str: ...

    def _headers(self) -> dict[str, str]:
        """Headers sent with every request (a subclass adds its credentials here, never anywhere else)."""
        return {"content-type": "application/json", "user-agent": "wiki-embeddings"}

    # ------------------------------------------------------------ lifecycle
    def _ensure_open(self) -> tuple[httpx.AsyncClient, ServerPool]:
        """Create the pool lazily, inside the running event loop (its futures bind to it)."""
        if self._http is None or self._pool is None:
            self._pool = ServerPool(self._urls, self.tuning, self._probe, server_wait_sec=self.server_wait_sec)
            self._pool.stop_event = self._stop_event
            slots = self.tuning.max_workers
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_sec, connect=self._connect_timeout),
                limits=httpx.Limits(max_connections=slots + 4, max_keepalive_connections=slots + 4),
                headers=self._headers(),
                trust_env=False,  # model servers sit on the internal network: never route them through a proxy
                # Plain-HTTP servers need no TLS context (building one loads the CA store: ~15 ms a run).
                verify=any(u.startswith("https://") for u in self._urls),
                transport=self._transport,
            )
        return self._http, self._pool

    def stop_waiting_on(self, event: asyncio.Event) -> None:
        """A stop request (`event`) makes a long wait for a server give the batch back (StopWhileWaiting)."""
        self._stop_event = event
        if self._pool is not None:
            self._pool.stop_event = event

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

    async def __aenter__(self) -> PooledClient:
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

    def _limit(self, texts: int) -> int:
        return answer_limit(texts, self.request_dimensions or self.dimensions)

    async def _get(self, path: str) -> httpx.Response:
        """GET `path` on the first server within the connect timeout (httpx errors and TimeoutError escape)."""
        http, _ = self._ensure_open()
        return await asyncio.wait_for(http.get(f"{self._urls[0]}{path}"), self._connect_timeout)

    # ------------------------------------------------------------ the first request
    async def probe_dimensions(self, text: str = "dimension probe", expected: int | None = None) -> int:
        """Embed one text to learn the model's vector length (and prove the model is there).

        This is the run's first request, so it may pay the model's load time: it runs under the load allowance
        (`load_timeout_sec`), not under `--timeout-sec`, and a cold start is never counted as a timeout.
        """
        saved, self.dimensions = self.dimensions, None
        saved_timeout, self.timeout_sec = self.timeout_sec, self.load_timeout_sec
        self._probing = True
        self._deadline_name = "--load-timeout-sec (the first request may load the model)"
        try:
            vectors = await self._first_answer(text, expected)
        finally:
            self.dimensions = saved
            self.timeout_sec = saved_timeout
            self._probing = False
            self._deadline_name = "--timeout-sec"
        return int(vectors[0].shape[0])

    async def _first_answer(self, text: str, expected: int | None) -> list[np.ndarray]:
        """The run's first request; a server that fails it with a server-side error or an unusable vector (for a
        known-good text) leaves the rotation and the next one is asked (one sick server of several must not stop
        the run before it starts)."""
        left = len(self._urls) - 1
        tries = 0
        while True:
            try:
                return await _length_agreed(self, await self.embed_texts([text]), text, expected)
            except (AmbiguousFailure, InvalidVectors) as exc:
                tries += 1
                if exc.server is not None and left:
                    self.take_out(exc.server, f"failed the run's first request: {exc.message}")
                    left -= 1
                elif exc.server is None or tries > self.retries or exc.kind == "timeout":
                    raise  # the last server keeps failing it (a sporadic 500 is retried first)
                else:
                    await asyncio.sleep(min(self.backoff_max_sec, self.backoff_base_sec * 2 ** (tries - 1)))

    # ------------------------------------------------------------ embedding
    async def embed(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One validated batch: one finite float32 vector of the expected length per input, or an EmbedFailure."""
        return (await self.embed_texts(texts)).vectors

    async def embed_counted(self, texts: Sequence[str]) -> tuple[list[np.ndarray], int | None]:
        """`embed`, plus the tokens the server evaluated over all inputs (None if it does not say)."""
        answer = await self.embed_texts(texts)
        return answer.vectors, answer.tokens

    async def embed_texts(self, texts: Sequence[str], *, server: int | None = None) -> Answer:
        """One validated batch with its token count and the server that answered.

        Transport errors and overload are retried, each time on whichever server is free (a failing server
        backs off and, failing on, leaves the rotation: core/health.py; the request itself waits a pause that
        doubles with its failures); a request whose `--retries` attempts all failed takes its server out and goes
        on with the others, unless that server answered other requests meanwhile (one 503 in two can refuse one
        request seven times in a row: bad luck, not a sick server). It fails only when no server is left
        (ServerUnavailable; ModelNotFound when no server has the model). `server` pins the request to one
        server for one attempt: the canary's question "are you well now?" and the health probe.
        """
        _, pool = self._ensure_open()
        payload = [self.text_prefix + t for t in texts] if self.text_prefix else list(texts)
        attempts = timeouts = total = failed = 0
        limit = (self.retries + 1) * len(self._urls) * 3  # a server that flaps between probe and batch ends too
        avoid: dict[int, float] = {}  # server -> until when this request waits before it goes there again
        answered: dict[int, int] = {}  # server -> its good answers when this request's attempts began failing there
        while True:
            chosen = await pool.acquire(server, avoid)
            total += 1
            try:
                raw, count = await self._exchange(chosen, payload, failed + 1)
                self.stats.texts += len(texts)
                self.last_prompt_eval_count = count
                return Answer(validate_vectors(raw, len(texts), self.dimensions, chosen.index), count, chosen.index)
            except ReloadWait:
                if total >= limit:  # bounded like every retry
                    raise AmbiguousFailure(
                        f"no complete answer from {chosen.masked}: it kept reloading its model after runner crashes",
                        kind="timeout",
                        server=chosen.index,
                    ) from None
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
                failed += 1
                pool.pause(avoid, chosen, exc.pause_sec)
                failure = f"the {self.server_kind} at {chosen.masked} (OLLAMA_URL): {exc}"
                if server is not None or total >= limit:
                    raise ServerUnavailable(failure, http_status=exc.http_status, server=chosen.index) from exc
                successes = pool.health(chosen).successes
                answered.setdefault(chosen.index, successes)
                if attempts > self.retries:
                    if successes == answered[chosen.index]:  # it answered nobody meanwhile
                        pool.take_out(chosen, f"{attempts} attempts of one request failed: {exc}")
                    attempts = 0
                    answered.clear()
            except ModelNotFound as exc:
                self.tuning.controls[chosen.index].health.no_model(exc.message)
                if server is not None:
                    raise
            finally:
                pool.release(chosen)
            self.stats.retries += 1

    def _timed_out(self, server: Server) -> None:
        """A server that timed out leaves the rotation while another is in it (a hung server of several costs one
        timeout); alone, it keeps its place and backs off (a slow answer is no proof of a sick server)."""
        _, pool = self._ensure_open()
        others = [s for s in pool.servers if s is not server and pool.health(s).in_rotation]
        if others:
            pool.take_out(server, f"no answer within {self._deadline_name} {self.timeout_sec:g}")

    async def _exchange(self, server: Server, texts: list[str], attempt: int = 1) -> tuple[list[object], int | None]:
        """Send `texts` to `server` in pieces of its batch size; every piece is one request the tuning and the
        server's health hear about (`attempt`: this request's how-manieth try, for its backoff)."""
        size = max(1, self.tuning.size_for(server.index))
        health = self.tuning.controls[server.index].health
        raws: list[object] = []
        counts: list[int | None] = []
        for start in range(0, len(texts), size):
            piece = texts[start : start + size]
            # After a runner crash the model reloads: one request at a time waits it out (with the load allowance),
            # the others wait for that one instead of timing out into the reload; its answer ends the reload.
            lock = server.reload_lock if server.reloading else None
            if lock is not None:
                await lock.acquire()
                if not server.reloading:  # the one before it ended the reload: no need to go one at a time
                    lock.release()
                    lock = None
            reload = lock is not None
            crashes = server.crashes
            ticket = self.tuning.sent(server.index, len(piece), server.active)
            outcome = tune.ERROR
            # The first request may load the model, and so may the first after a runner crash (a reload): both
            # get the load allowance, and their time is no evidence against the server.
            loading = self._probing or reload
            try:
                async with asyncio.timeout(self.load_timeout_sec if loading else self.timeout_sec):
                    raw, count = await self._send(server, piece)
                outcome = tune.IGNORE if loading else tune.OK
                if reload:
                    server.reloading = False
            except TimeoutError as exc:
                outcome = tune.IGNORE if loading else tune.SLOW
                if not loading and (server.reloading or server.crashes != crashes):
                    # In flight when the runner crashed: it waited for the reload, not for a sick server.
                    outcome = tune.IGNORE
                    raise ReloadWait(f"{server.masked} reloaded its model after a runner crash") from exc
                if not loading:
                    health.failure(f"no answer within {self._deadline_name} {self.timeout_sec:g}")
                    self._timed_out(server)
                raise
            except RunnerCrashed:
                server.reloading = True
                server.crashes += 1
                raise
            except Transient as exc:
                if exc.http_status == 413:
                    outcome = tune.SLOW  # refused as too large: a smaller batch is the cure, the server is well
                else:
                    if exc.http_status in FULL_STATUSES:
                        outcome = tune.OVERLOAD
                    elif exc.http_status is None or exc.http_status in OVERLOAD_STATUSES:
                        outcome = tune.TROUBLE
                    answered = exc.http_status is not None
                    exc.pause_sec = health.failure(str(exc), exc.retry_after, answered=answered, attempt=attempt)
                raise
            finally:
                seconds = self.tuning.done(ticket, outcome)
                self.stats.seconds_waiting += seconds
                if lock is not None:
                    lock.release()
            health.success(seconds)
            raws.extend(raw)
            counts.append(count)
        return raws, (None if any(c is None for c in counts) else sum(c for c in counts if c is not None))

    async def _send(self, server: Server, texts: list[str]) -> tuple[list[object], int | None]:
        """Count the request, then hand it to the subclass."""
        self.stats.requests += 1
        self.stats.by_url[server.url] = self.stats.by_url.get(server.url, 0) + 1
        server.requests += 1
        return await self._request(server, texts)

    def check_returns(self, check: Admit) -> None:
        """From now on a server coming back into the rotation is judged by `check` on its vector of the probe text:
        a reason (another model answers there) takes it out again."""
        self._admit = check

    async def _probe(self, server: Server) -> None:
        """Is an out server well again? One known-good text, pinned to it (its answer puts it back, unless the
        vector shows another model than the column's: `check_returns`)."""
        answer = await self.embed_texts([PROBE_TEXT], server=server.index)
        why = self._admit(server.index, answer.vectors[0]) if self._admit is not None else None
        if why:
            self.take_out(server.index, why)


async def _length_agreed(client: PooledClient, answer: Answer, text: str, expected: int | None) -> list[np.ndarray]:
    """The first answer, unless its length is not the column's while another server's is: then that server is
    sick (it leaves the rotation) and the other's answer counts. Every server answering another length is the
    model's length (a Matryoshka model asked for fewer, or the wrong model): check_dimensions judges it."""
    length = int(answer.vectors[0].shape[0])
    if expected is None or length == expected or answer.server is None:
        return answer.vectors
    for other in (i for i in range(len(client._urls)) if i != answer.server):
        try:
            alt = await client.embed_texts([text], server=other)
        except EmbedFailure:
            continue
        if int(alt.vectors[0].shape[0]) == expected:
            client.take_out(answer.server, f"answers {length}-dimensional vectors where the others answer {expected}")
            return alt.vectors
    return answer.vectors
