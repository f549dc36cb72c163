"""The `Embedder` over Ollama's HTTP API (`/api/embed`, fallback `/api/embeddings`): every HTTP call to Ollama.

Every request sends `truncate: false` (the tool cuts texts itself, so a stored vector is known to be of the text
recorded), `keep_alive` (the model stays loaded between batches) and, when set, `options.num_ctx` and
`dimensions`. Failures are classed as base.py describes; transport errors and overload are retried with backoff
by the shared pool (pooled.py), so the engine sees only what persisted.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from wiki_embeddings.core.context import Window, window_from_show
from wiki_embeddings.core.embedders.base import (
    AmbiguousFailure,
    ContextExceeded,
    InputRejected,
    ModelNotFound,
    RunnerCrashed,
    ServerUnavailable,
)
from wiki_embeddings.core.embedders.http import (
    ERROR_BODY_LIMIT,
    RUNNER_CRASH,
    HttpAnswer,
    Transient,
    describe,
    loads,
    parse_json,
    post_bounded,
)
from wiki_embeddings.core.embedders.pooled import MAX_BATCH_TEXTS, OVERLOAD_STATUSES, PROBE_TEXT, PooledClient
from wiki_embeddings.core.embedders.servers import Server
from wiki_embeddings.core.modelname import same_model
from wiki_embeddings.settings import mask_url

__all__ = ["MAX_BATCH_TEXTS", "OVERLOAD_STATUSES", "PROBE_TEXT", "OllamaClient"]

TRANSIENT_STATUSES = {408, 429, 502, 503, 504}
OLLAMA_DEFAULT_NUM_BATCH = 2048  # settings.MAX_BATCH_SIZE: a client built without a tuning never limits the batch
# Ollama's refusal of an over-long input (0.13.5+: "the input length exceeds the context length").
_CONTEXT_REFUSAL = re.compile(r"context (length|window)|exceeds the context|too many tokens", re.IGNORECASE)


class OllamaClient(PooledClient):
    """The pooled client (pooled.py) speaking Ollama's native API."""

    server_kind = "Ollama server"

    def __init__(
        self,
        urls: Sequence[str],
        model: str,
        *,
        keep_alive: str | None = "30m",
        num_ctx: int | None = None,
        **options: Any,
    ):
        """`options`: the pooled client's (pooled.py: timeouts, retries, tuning, text prefix, ...)."""
        if not urls:
            raise ValueError("at least one Ollama URL is needed")
        super().__init__(urls, model, **options)
        self.keep_alive = keep_alive
        self.num_ctx = num_ctx

    async def __aenter__(self) -> OllamaClient:
        self._ensure_open()
        return self

    # ------------------------------------------------------------ questions about the model
    async def version(self) -> str:
        """GET /api/version on the first server; ServerUnavailable with a one-line reason when it does not answer."""
        url = self._urls[0]
        try:
            resp = await self._get("/api/version")
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
        for url in self._urls:  # the first server that answers (a dead first URL must not hide the window)
            try:
                resp = await asyncio.wait_for(
                    http.post(f"{url}/api/show", content=orjson.dumps({"model": self.model})), self._connect_timeout
                )
            except (httpx.HTTPError, TimeoutError):
                continue
            if resp.status_code == 200:
                break
        else:
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
        try:
            resp = await self._get("/api/tags")
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

    async def _request(self, server: Server, texts: list[str]) -> tuple[list[object], int | None]:
        http, _ = self._ensure_open()
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
        if status in (400, 500) and RUNNER_CRASH.search(resp.error_text()):
            # Ollama 0.31.x: an input over its physical batch crashes the runner, which reloads (400 from 0.30's
            # handler, 500 from older ones): a length problem, never the chunk's fault, never the server's.
            raise RunnerCrashed(f"HTTP {status}: {resp.error_text()}", http_status=status, server=index)
        if status == 400 and _CONTEXT_REFUSAL.search(resp.error_text()):
            raise ContextExceeded(f"HTTP 400: {resp.error_text()}", http_status=400, server=index)
        if 400 <= status < 500:
            rejected = InputRejected(
                f"HTTP {status}: {resp.error_text()}", http_status=status, kind=f"http_{status}", server=index
            )
            rejected.foreign = not resp.is_json_error()
            raise rejected
        if status >= 500:
            raise AmbiguousFailure(
                f"HTTP {status}: {resp.error_text()}", http_status=status, kind=f"http_{status}", server=index
            )
        return parse_json(resp, where, index)


def _keep_alive_value(value: str) -> str | int:
    """Ollama takes a duration ("30m", "1h") or seconds as a number (-1: forever, 0: unload at once)."""
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        return text
