"""What the server answers: the reply type, Ollama's own error texts and the signal that the server stops.

A leaf module: every other part of the package builds its answers from these, so a text Ollama prints
is written once.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator

import orjson

JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
NDJSON = "application/x-ndjson"
NOT_FOUND = b"404 page not found"
NOT_ALLOWED = b"405 method not allowed"  # gin's text, with HandleMethodNotAllowed as Ollama sets it
RUNNING = b"Ollama is running"
HTML_ERROR = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
BUSY = "server busy, please try again.  maximum pending requests exceeded"  # real Ollama's 503 text
TOO_LONG = "the input length exceeds the context length"  # the runner's text (400 on /api/embed)
OLD_TOO_LONG = "input exceeds maximum context length"  # /api/embed with truncate:false before 0.13.5
NAN_ERROR = "failed to encode response: json: unsupported value: NaN"  # Go's encoder on a NaN, as a 500
RUNNER_TERMINATED = "llama runner process has terminated"
PULL_UNKNOWN = "pull model manifest: file does not exist"


def runner_crashed(port: int) -> str:
    """What Ollama 0.30+ answers when llama-server aborts on an input (its request to the runner meets EOF)."""
    return f'do embedding request: Post "http://127.0.0.1:{port}/v1/embeddings": EOF'


class Stopping(Exception):
    """Raised in a handler thread when the server stops while the request waits (hang, slot, load, trickle)."""


class Reply(typing.NamedTuple):
    status: int
    body: bytes
    content_type: str = JSON
    chunks: Iterator[bytes] | None = None  # a body streamed with chunked transfer encoding (after ``body``)
    headers: tuple[tuple[str, str], ...] = ()


def error(status: int, message: str) -> Reply:
    """Ollama's error shape: ``{"error": message}``."""
    return Reply(status, orjson.dumps({"error": message}))
