"""One bounded HTTP exchange and the reading of its answer: shared by every embedder that speaks HTTP.

Answers are read with a size bound: a body larger than a batch can legitimately be, or one that never ends, is
cut off and treated as a server fault (retried, then a clean stop): memory stays bounded whatever a server sends.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import orjson

from wiki_embeddings.core.embedders.base import AmbiguousFailure
from wiki_embeddings.settings import mask_url

ERROR_BODY_LIMIT = 64 * 1024  # an error answer is a line of text; more is cut off
BYTES_PER_NUMBER = 32  # a float in JSON ("-0.012345678901234567,") with a generous margin
UNKNOWN_DIMENSIONS = 16_384  # the answer bound before the model's vector length is known
RESPONSE_SLACK = 64 * 1024
# Ollama 0.31.x's runner crash on an input over its physical batch: `do embedding request: Post "…/embedding": EOF`
# (on /api/embed and on its OpenAI-compatible /v1/embeddings alike).
RUNNER_CRASH = re.compile(r"embedding.*\bEOF\b", re.IGNORECASE)


class Transient(Exception):
    """A failure worth retrying (transport error, overload status); never leaves the embedders package."""

    def __init__(self, message: str, http_status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.http_status = http_status
        self.retry_after = retry_after  # seconds the server asked us to wait (Retry-After), if it said
        self.pause_sec = 0.0  # set by the client: seconds the failed request waits before that server again


@dataclass
class HttpAnswer:
    """An HTTP answer read within its size bound."""

    status_code: int
    headers: httpx.Headers
    content: bytes
    reason_phrase: str = ""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def retry_after(self) -> float | None:
        """`Retry-After` in seconds (a number or an HTTP date), None when absent or unreadable."""
        raw = self.headers.get("retry-after")
        if not raw:
            return None
        raw = raw.strip()
        try:
            seconds = float(raw)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                return None
            if when.tzinfo is None:  # asctime or `-0000`: an HTTP date is GMT whatever the machine's zone
                when = when.replace(tzinfo=datetime.UTC)
            seconds = when.timestamp() - time.time()
        return max(0.0, seconds) if math.isfinite(seconds) else None

    def is_json_error(self) -> bool:
        """Is the body a JSON object (the model server's own error shape, as Ollama, OpenAI, TEI, vLLM answer),
        not a proxy's HTML or plain-text page?"""
        try:
            return isinstance(loads(self.content), dict)
        except ValueError:
            return False

    def error_text(self) -> str:
        """The server's error message (`{"error": …}`), else the start of the body, else the reason phrase."""
        try:
            data = loads(self.content)
            if isinstance(data, dict) and "error" in data:
                return str(data["error"])[:300]
        except ValueError:
            pass
        return self.text[:200].strip() or self.reason_phrase


def answer_limit(texts: int, dimensions: int | None) -> int:
    """The largest answer `texts` vectors can legitimately make (JSON numbers at a generous width)."""
    return max(texts, 1) * (dimensions or UNKNOWN_DIMENSIONS) * BYTES_PER_NUMBER + RESPONSE_SLACK


async def post_bounded(http: httpx.AsyncClient, url: str, body: bytes, limit: int) -> HttpAnswer:
    """POST and read the answer, never more than `limit` bytes (ERROR_BODY_LIMIT for an error answer)."""
    try:
        async with http.stream("POST", url, content=body) as resp:
            cap = limit if resp.status_code < 400 else ERROR_BODY_LIMIT
            declared = resp.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > cap and resp.status_code < 400:
                raise Transient(
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
                    raise Transient(
                        f"answer from {mask_url(url)} exceeded {cap:,} bytes (more than a batch can be, or "
                        "a body that never ends): cut off"
                    )
                parts.append(part)
            return HttpAnswer(resp.status_code, resp.headers, b"".join(parts)[:cap], resp.reason_phrase)
    except (httpx.TransportError, httpx.TimeoutException) as exc:
        raise Transient(f"{describe(exc)} from {mask_url(url)}") from exc


def parse_json(resp: HttpAnswer, where: str, server: int, scrub: Callable[[str], str] = lambda text: text) -> object:
    """A 2xx answer's JSON, or AmbiguousFailure (`bad_response`) showing what came instead (`scrub`bed of secrets)."""
    try:
        return loads(resp.content)
    except ValueError as exc:
        ctype = resp.headers.get("content-type", "?")
        raise AmbiguousFailure(
            f"answer from {where} is not JSON (content-type {ctype}): {scrub(resp.text[:120])!r}",
            http_status=resp.status_code,
            kind="bad_response",
            server=server,
        ) from exc


def loads(content: bytes) -> object:
    """orjson first (fast); the standard parser for answers that carry NaN/Infinity literals, so they are seen."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)


def describe(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc).strip()
    return f"{name}: {text}" if text else name
