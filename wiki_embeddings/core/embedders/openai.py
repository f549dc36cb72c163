"""The `Embedder` over the OpenAI-compatible embeddings API (`POST /v1/embeddings`): TEI, vLLM, infinity-emb,
llama.cpp's server, Ollama's own `/v1`, hosted APIs.

A request is `{"model", "input": [texts], "encoding_format": "base64", "dimensions"?}`. Base64 answers (little-endian
float32) are a quarter of the JSON numbers' size; a server that refuses the field (a 400 naming `encoding_format`)
or answers plain floats anyway is asked for floats for the rest of the run. `usage.prompt_tokens` is the token
count the context logic learns from, except where a server reports characters instead (infinity-emb counts
`len(text)`): a first answer whose count equals the characters of an English text is taken as such, and counts
are ignored from then on.

The server URL (OLLAMA_URL) is the API's base: `http://host:port` means `http://host:port/v1` (falling back to the
root for a server that serves `/embeddings` there, as infinity-emb does by default); a URL with a path is taken as
the base itself (`http://gateway/openai/v1`). An optional bearer key comes from WIKI_EMBED_API_KEY: it is sent only
in the Authorization header, never shown (every message is scrubbed of it) and never stored.

Failures are classed as base.py says: a 400/413/422/500 that says the input is too long (vLLM's "maximum context
length", TEI's "must have less than N tokens", llama.cpp's 500 "input is too large to process") is a refusal of
length (cut to fit); TEI's "batch size N > maximum allowed batch size M" (OpenAI's "array too long. Expected an
array with maximum length M") caps that server's batch at M; any other 413 is a request too large (the batch
shrinks); TEI's 424 (its backend failed) is a server error like a 500; 408/429/502/503/504 are overload (backoff,
`Retry-After` honoured, out of the rotation when they persist); 404 is a model this server does not serve; 401/403 a
key refused (the run stops, nothing marked failed). The model's window is what the server publishes (TEI `GET /info`
`max_input_length`, vLLM `GET /v1/models` `max_model_len`), else `--num-ctx` (WIKI_EMBED_NUM_CTX) read as the window
in tokens, else unknown (learned from refusals; core/backfill/probe.py and silent.py find a server that cuts
silently). There is no model digest: drift is what `verify`'s sampled re-embed sees.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson

from wiki_embeddings.core.context import Window
from wiki_embeddings.core.embedders import base
from wiki_embeddings.core.embedders import http as wire
from wiki_embeddings.core.embedders.pooled import PooledClient
from wiki_embeddings.core.embedders.servers import Server
from wiki_embeddings.settings import redact

TRANSIENT_STATUSES = {408, 429, 502, 503, 504}
# A refusal of length, as vLLM ("This model's maximum context length is 512 tokens"), TEI ("`inputs` must have
# less than 512 tokens"), llama.cpp ("input is too large", "exceeds the context size") and OpenAI word it.
CONTEXT_REFUSAL = re.compile(
    r"context (length|window|size)|exceeds the context|too many tokens|too long|less than \d+ tokens"
    r"|input (is )?too large|maximum (input|sequence) length",
    re.IGNORECASE,
)
# llama.cpp's server answers its refusals of length with a 500 ("input is too large to process. increase the physical
# batch size", "input is larger than the max context size"): a 500 in those words is a refusal of length too.
CONTEXT_STATUSES = {400, 413, 422, 500}
# More inputs than the server takes in one request: TEI's 422 "batch size 64 > maximum allowed batch size 32"
# (--max-client-batch-size), the same words from hosted gateways. Not the input's fault: that server's batch shrinks.
# OpenAI's own: 400 "Invalid 'input': array too long. Expected an array with maximum length 2048, ..." (its "too
# long" is about the list, not a text: checked before the refusals of length).
TOO_MANY_INPUTS = re.compile(
    r"batch size \d+ > maximum allowed batch size (\d+)|array too long\. Expected an array with maximum length (\d+)",
    re.IGNORECASE,
)
# TEI's answer when its model backend fails (CUDA out of memory, a device error): 424 Failed Dependency. The server's
# failure, like a 500: ambiguous (the canary decides), never the input's at once.
BACKEND_FAILED = 424
COUNT_CHECK_CHARS = 20  # an English text at least this long has clearly fewer tokens than characters


class OpenAIClient(PooledClient):
    """The pooled client (pooled.py) speaking the OpenAI-compatible embeddings API."""

    server_kind = "embedding server"

    def __init__(
        self,
        urls: Sequence[str],
        model: str,
        *,
        api_key: str | None = None,
        num_ctx: int | None = None,
        **options: Any,
    ):
        super().__init__(urls, model, **options)
        self.num_ctx = num_ctx  # the window in tokens when the server publishes none (--num-ctx)
        self._key = api_key or None
        self._base64 = True  # asked for until the server refuses it or answers floats
        self._counts: bool | None = None  # usage.prompt_tokens are tokens (None: not known yet)
        # Per server: does the API live under /v1 (the default for a bare host:port, until a 404 says otherwise)?
        self._v1 = [not urlsplit(u).path for u in self._urls]

    async def __aenter__(self) -> OpenAIClient:
        self._ensure_open()
        return self

    def _headers(self) -> dict[str, str]:
        headers = super()._headers()
        if self._key:
            headers["authorization"] = f"Bearer {self._key}"
        return headers

    def _scrub(self, text: str) -> str:
        """A message with the key taken out (a server or proxy may echo the header back)."""
        return redact(text, [self._key]) if self._key else text

    def _api_path(self, index: int) -> str:
        return "/v1" if self._v1[index] else ""

    # ------------------------------------------------------------ questions about the model
    async def health(self) -> str:
        """GET <base>/models (else /health) on the first server: what it serves, or ServerUnavailable."""
        models = await self._json(self._api_path(0) + "/models")
        if isinstance(models, dict):
            names = [str(m.get("id")) for m in models.get("data") or [] if isinstance(m, dict)]
            return f"OpenAI-compatible ({', '.join(names) or 'no model listed'})"
        try:
            resp = await self._get("/health")
        except (httpx.HTTPError, TimeoutError) as exc:
            raise base.ServerUnavailable(
                self._scrub(f"the embedding server at {self.where} (OLLAMA_URL) does not answer: {wire.describe(exc)}")
            ) from exc
        if resp.status_code >= 400:
            raise base.ServerUnavailable(
                f"the embedding server at {self.where} (OLLAMA_URL) answers HTTP {resp.status_code} to /models and "
                "/health"
            )
        return "OpenAI-compatible"

    async def context_window(self, num_ctx: int | None) -> Window:
        """The window the server publishes (TEI /info, vLLM /v1/models), capped by --num-ctx when given."""
        return Window(context_length=await self.published_window(), num_ctx=num_ctx or self.num_ctx)

    async def published_window(self) -> int | None:
        info = await self._json("/info")  # TEI, at the server's root
        length = info.get("max_input_length") if isinstance(info, dict) else None
        if isinstance(length, int) and _positive(length):
            return length
        models = await self._json(self._api_path(0) + "/models")
        entries = models.get("data") if isinstance(models, dict) else None
        listed = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
        for entry in listed:  # vLLM: the served model's max_model_len
            if (entry.get("id") == self.model or len(listed) == 1) and _positive(entry.get("max_model_len")):
                return int(entry["max_model_len"])
        return None

    async def model_digest(self) -> str | None:
        """The API names no weights: drift is seen by `verify`'s sampled re-embed."""
        return None

    async def _json(self, path: str) -> object:
        """GET `path` on the first server as JSON, None when it does not answer it."""
        try:
            resp = await self._get(path)
            return wire.loads(resp.content[: wire.ERROR_BODY_LIMIT * 16]) if resp.status_code == 200 else None
        except (httpx.HTTPError, TimeoutError, ValueError):
            return None

    # ------------------------------------------------------------ one HTTP exchange
    async def _request(self, server: Server, texts: list[str]) -> tuple[list[object], int | None]:
        http, _ = self._ensure_open()
        while True:
            payload: dict[str, object] = {"model": self.model, "input": texts}
            if self._base64:
                payload["encoding_format"] = "base64"
            if self.request_dimensions:
                payload["dimensions"] = self.request_dimensions
            url = f"{server.url}{self._api_path(server.index)}/embeddings"
            resp = await wire.post_bounded(http, url, orjson.dumps(payload), self._limit(len(texts)))
            if resp.status_code == 404 and self._v1[server.index] and "model" not in resp.text.lower():
                self._v1[server.index] = False  # no /v1 here: the API is at the root (infinity-emb's default)
                continue
            if resp.status_code in (400, 422) and self._base64 and "encoding_format" in resp.text:
                self._base64 = False  # the server takes only floats: asked for them from now on
                continue
            return self._parse(self._json_or_raise(resp, server), texts, server)

    def _parse(self, data: object, texts: list[str], server: Server) -> tuple[list[object], int | None]:
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise base.AmbiguousFailure(
                f"answer from {server.masked} has no 'data' list",
                http_status=200,
                kind="bad_response",
                server=server.index,
            )
        indexes = [i.get("index") for i in items]
        if any(k is not None for k in indexes):
            # Answers may come in any order, each naming its input; names that are not 0..n-1 once each (a proxy that
            # numbers each part of a split request from 0 again) would put a vector on another chunk: refused.
            if sorted(k if isinstance(k, int) and not isinstance(k, bool) else -1 for k in indexes) != list(
                range(len(items))
            ):
                raise base.AmbiguousFailure(
                    f"answer from {server.masked} numbers its embeddings {_shown(indexes)}, not 0..{len(items) - 1} "
                    "once each: which vector is whose cannot be known",
                    http_status=200,
                    kind="bad_response",
                    server=server.index,
                )
            items = sorted(items, key=lambda i: i["index"])
        vectors: list[object] = []
        for item in items:
            raw = item.get("embedding")
            if isinstance(raw, str):
                vectors.append(self._decode(raw, server))
            else:
                self._base64 = self._base64 and not isinstance(raw, list)  # floats despite base64: ask for floats
                vectors.append(raw)
        usage = data.get("usage") if isinstance(data, dict) else None
        count = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if not isinstance(count, int) or isinstance(count, bool):
            return vectors, None
        return vectors, count if self._counts_are_tokens(texts, count) else None

    def _decode(self, raw: str, server: Server) -> np.ndarray:
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise base.AmbiguousFailure(
                f"answer from {server.masked} holds an embedding that is not base64",
                http_status=200,
                kind="bad_response",
                server=server.index,
            ) from exc
        if len(data) % 4:
            raise base.AmbiguousFailure(
                f"answer from {server.masked} holds a base64 embedding of {len(data)} bytes (not float32 values)",
                http_status=200,
                kind="bad_response",
                server=server.index,
            )
        return np.frombuffer(data, dtype="<f4").astype(np.float32)

    def _counts_are_tokens(self, texts: list[str], count: int) -> bool:
        """Decided once, on the first answer of enough English text: a count equal to its characters is a count
        of characters (infinity-emb), and such counts are never used as tokens. A count of 0 for some text is no count
        at all (LocalAI, proxies that fill `usage` with zeros): never used either."""
        if count <= 0 and any(texts):
            self._counts = False
        if self._counts is None:
            chars = sum(len(t) for t in texts)
            if chars >= COUNT_CHECK_CHARS and all(t.isascii() for t in texts):
                self._counts = count != chars
        return self._counts is not False

    def _json_or_raise(self, resp: wire.HttpAnswer, server: Server) -> object:
        status, where, index = resp.status_code, server.masked, server.index
        text = self._scrub(_error_message(resp))
        if status in TRANSIENT_STATUSES:
            raise wire.Transient(
                f"HTTP {status} from {where}: {text}", http_status=status, retry_after=resp.retry_after()
            )
        if status in (400, 500) and wire.RUNNER_CRASH.search(text):
            # Ollama 0.31's runner crash on an input over its physical batch (its /v1 handler answers it as a 400):
            # a length problem, never the chunk's fault.
            raise base.RunnerCrashed(f"HTTP {status}: {text}", http_status=status, server=index)
        if status in (400, 413, 422) and (most := TOO_MANY_INPUTS.search(text)):
            inputs = int(most.group(1) or most.group(2))
            self.tuning.controls[index].sizer.limit(inputs, f"the server takes at most {inputs} inputs a request")
            raise wire.Transient(f"HTTP {status} from {where}: {text}", http_status=413)
        if status in CONTEXT_STATUSES and CONTEXT_REFUSAL.search(text):
            raise base.ContextExceeded(f"HTTP {status}: {text}", http_status=status, server=index)
        if status == 413:  # too large, not too long: a smaller batch is the cure
            raise wire.Transient(f"HTTP 413 from {where}: {text}", http_status=413, retry_after=resp.retry_after())
        if status == 404:
            raise base.ModelNotFound(
                f"model {self.model!r} is not served at {where} (HTTP 404: {text}). Set OLLAMA_MODEL to the name the "
                "server serves it under, or check that OLLAMA_URL is the server's OpenAI-compatible API",
                http_status=404,
                server=index,
            )
        if status in (401, 403):
            raise base.ServerUnavailable(
                f"the embedding server at {where} refused the request (HTTP {status}: {text}): check "
                "WIKI_EMBED_API_KEY",
                http_status=status,
                server=index,
            )
        if 400 <= status < 500 and status != BACKEND_FAILED:
            rejected = base.InputRejected(
                f"HTTP {status}: {text}", http_status=status, kind=f"http_{status}", server=index
            )
            rejected.foreign = not resp.is_json_error()
            raise rejected
        if status >= 400:
            raise base.AmbiguousFailure(
                f"HTTP {status}: {text}", http_status=status, kind=f"http_{status}", server=index
            )
        return wire.parse_json(resp, where, index, self._scrub)


def _error_message(resp: wire.HttpAnswer) -> str:
    """The error's text in each server's shape: OpenAI `{"error": {"message"}}`, TEI `{"error": "..."}`, vLLM
    `{"message"}`, FastAPI `{"detail"}`; else the body's start or the reason phrase."""
    try:
        data = wire.loads(resp.content)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        for key in ("error", "message", "detail"):
            if data.get(key):
                return str(data[key])[:300]
    return resp.text[:200].strip() or resp.reason_phrase


def _shown(indexes: list[object]) -> str:
    """The first few indexes of an answer, for a message."""
    return "[" + ", ".join(map(str, indexes[:8])) + (", ...]" if len(indexes) > 8 else "]")


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
