"""The OpenAI-compatible API as Ollama serves it: ``POST /v1/embeddings``, ``GET /v1/models`` and
``GET /v1/models/{model}`` (Ollama's ``middleware/openai.go`` and ``openai/openai.go``, unchanged from 0.12.7
to 0.32).

``/v1/embeddings`` binds the body as ``openai.EmbedRequest``: ``input`` (a string or a list of strings),
``model``, ``dimensions``, ``encoding_format``; every other field (``user``, and ``truncate``, ``options``,
``keep_alive`` that ``/api/embed`` would take) is ignored. ``encoding_format`` must be ``float`` or ``base64``
(any case); ``input: ""`` becomes ``[""]``; a missing input or an empty list is a 400 ``invalid input``. The
request then goes to ``/api/embed``'s handler with only ``model``, ``input`` and ``dimensions``: no
``truncate`` (so an over-long input meets the generation's rule for ``truncate: true``: cut in 0.12, refused
in 0.20, cut at ``num_batch`` in 0.30, a runner crash in ``0.31-crash``), no ``options`` (the model's num_ctx,
the server's num_batch), the default keep_alive. The answer is ``{"object": "list", "data": [{"object":
"embedding", "embedding": [...] or base64 of little-endian float32, "index": i}], "model": ..., "usage":
{"prompt_tokens": N, "total_tokens": N}}``; an error keeps the handler's status in OpenAI's shape,
``{"error": {"message", "type", "param": null, "code": null}}``, type ``invalid_request_error`` for 400,
``not_found_error`` for 404, ``api_error`` otherwise.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

import numpy as np
import orjson

from wiki_embeddings.devtools.ollama_dev.binding import DEFAULT_KEEP_ALIVE, EmbedJob, bind, parse_json
from wiki_embeddings.devtools.ollama_dev.embed import Wire
from wiki_embeddings.devtools.ollama_dev.faults import Faults
from wiki_embeddings.devtools.ollama_dev.models import Catalog, canonical_name, name_parts
from wiki_embeddings.devtools.ollama_dev.replies import Reply, error

OPENAI_FIELDS = {"model": "string", "dimensions": "int", "encoding_format": "string"}
ENCODINGS = ("float", "base64")


def openai_error(status: int, message: str) -> Reply:
    """Ollama's ``openai.NewError``: the OpenAI error shape, its type chosen by the status."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return Reply(status, orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}))


def bind_openai(data: dict[str, Any]) -> EmbedJob | Reply:
    """``openai.EmbedRequest`` checked as the middleware checks it, then the request the handler gets."""
    if (bad := bind(data, "EmbedRequest", OPENAI_FIELDS)) is not None:
        return bad
    encoding = data.get("encoding_format") or ""
    if encoding and encoding.lower() not in ENCODINGS:
        return error(400, f"Invalid value for 'encoding_format' = {encoding}. Supported values: ['float', 'base64'].")
    raw = data.get("input")
    if raw == "":
        raw = [""]
    if raw is None or raw == []:
        return error(400, "invalid input")
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and all(isinstance(t, str) for t in raw):
        texts = raw
    else:
        return error(400, "invalid input type")  # the handler's check (token arrays included)
    forwarded = {"model": data.get("model"), "input": raw, "dimensions": data.get("dimensions")}
    return EmbedJob({**forwarded, "encoding_format": encoding.lower()}, texts, DEFAULT_KEEP_ALIVE)


def _base64(part: bytes) -> bytes:
    """A serialised vector as OpenAI's base64: little-endian float32 (stdlib json: marker faults write NaN)."""
    values = np.asarray(json.loads(part), dtype="<f4")
    return b'"' + base64.b64encode(values.tobytes()) + b'"'


class OpenAIWire(Wire):
    """``POST /v1/embeddings`` (module docstring)."""

    endless_body = False

    def bind(self, data: dict[str, Any]) -> EmbedJob | Reply:
        return bind_openai(data)

    def empty(self, job: EmbedJob) -> Reply:
        return self.answer(job, [], 0, 0, 0, Faults())

    def answer(
        self, job: EmbedJob, parts: list[bytes], tokens: int, load_ns: int, start_ns: int, faults: Faults
    ) -> Reply:
        encode = _base64 if job.data["encoding_format"] == "base64" else (lambda part: part)
        items = [b'{"object":"embedding","embedding":%b,"index":%d}' % (encode(p), i) for i, p in enumerate(parts)]
        usage = b'"usage":{"prompt_tokens":%d,"total_tokens":%d}' % (tokens, tokens)
        head = b'{"object":"list","data":[' + b",".join(items) + b'],"model":' + orjson.dumps(job.model)
        return Reply(200, head + b"," + usage + b"}")

    def wrap(self, reply: Reply) -> Reply:
        if reply.status == 200:
            return reply
        data = parse_json(reply.body)
        message = data.get("error") if isinstance(data, dict) else None
        if not isinstance(message, str):
            message = reply.body.decode(errors="replace")  # not Ollama's error JSON: the raw text, as Ollama does
        return openai_error(reply.status, message)._replace(headers=reply.headers)


OPENAI = OpenAIWire()


def _entry(name: str, started_at: str) -> dict[str, Any]:
    parts = name_parts(name)
    return {
        "id": name,
        "object": "model",
        "created": int(datetime.fromisoformat(started_at).timestamp()),
        "owned_by": parts[1] if parts else "",
    }


def list_models(catalog: Catalog, started_at: str) -> Reply:
    """``GET /v1/models``: ``/api/tags`` as an OpenAI model list (ids as ``/api/tags`` names them)."""
    data = [_entry(name, started_at) for name in catalog.models]
    return Reply(200, orjson.dumps({"object": "list", "data": data}))


def retrieve_model(catalog: Catalog, started_at: str, body: bytes) -> Reply:
    """``GET /v1/models/{model}``: the middleware hands ``/api/show`` ``{"name": model}`` (``body``); the id
    is the name as asked."""
    data = parse_json(body)
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or catalog.find(name) is None:
        return openai_error(404, f"model '{canonical_name(str(name))}' not found")
    return Reply(200, orjson.dumps(_entry(name, started_at)))
