"""The server in a thread: :class:`OllamaServer` assembles the parts and serves them on a daemon thread.

Tests start it in-process (``with OllamaServer(...) as srv``); the CLI and :func:`start_subprocess` run
the same class in its own process (:mod:`wiki_embeddings.devtools.ollama_dev.process`). Every instance has
its own faults, counters, models and generation, so several in one process stand for several Ollama
servers, each healthy, failing or dead (stopped: connection refused; :meth:`OllamaServer.start` again serves
on the same port).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from wiki_embeddings.devtools.ollama_dev.backends import BACKENDS, make_backend
from wiki_embeddings.devtools.ollama_dev.faults import FaultControl, Faults
from wiki_embeddings.devtools.ollama_dev.models import (
    DEFAULT_HASH_MODELS,
    DEFAULT_MINILM_MODELS,
    DEFAULT_NUM_CTX,
    MINILM_CONTEXT_TOKENS,
    MINILM_DIM,
    Catalog,
    ModelSpec,
)
from wiki_embeddings.devtools.ollama_dev.profiles import DEFAULT_NUM_BATCH, DEFAULT_RELOAD_MS, Profile
from wiki_embeddings.devtools.ollama_dev.routes import Routes
from wiki_embeddings.devtools.ollama_dev.state import Counters, Residency, ServerState
from wiki_embeddings.devtools.ollama_dev.transport import HTTPServer, make_server
from wiki_embeddings.devtools.ollama_dev.vectors import VectorCache, Vectorizer


def _specs(backend: str, models: Sequence[str | ModelSpec] | None, context_tokens: int | None) -> list[ModelSpec]:
    """The served models, resolved: the backend's defaults, ``context_tokens`` for all, the backend's cap."""
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
            if spec.dim != MINILM_DIM and not spec.is_hash_model:
                raise ValueError(f"minilm backend serves dimension {MINILM_DIM}, not {spec.name}:{spec.dim}")
    return specs


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
        ollama_version: str = "0.20",
        num_ctx: int = DEFAULT_NUM_CTX,
        num_batch: int = DEFAULT_NUM_BATCH,
        reload_ms: float = DEFAULT_RELOAD_MS,
        crash_status: int = 400,
        profile: Profile | None = None,
    ) -> None:
        """``context_tokens``: every model's context in tokens (replacing the table's context_length and
        default num_ctx; the minilm backend caps it at 256); ``context_chars``: an extra limit in characters.

        The Ollama generation whose rules apply (:mod:`~.profiles`): ``ollama_version`` (``0.12``, ``0.20``,
        ``0.30``, ``0.31-crash`` or a full version), with this server's default ``num_ctx`` (for models
        whose Modelfile sets none) and ``num_batch``, and the crash mode's ``reload_ms`` and
        ``crash_status``; or a ready ``profile``, which overrides them all."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (hash or minilm)")
        if context_tokens is not None and context_tokens < 3:
            raise ValueError("context_tokens must be >= 3")
        if context_chars is not None and context_chars < 1:
            raise ValueError("context_chars must be >= 1")
        specs = _specs(backend, models, context_tokens)
        profile = profile or Profile.of(
            ollama_version, num_ctx=num_ctx, num_batch=num_batch, reload_ms=reload_ms, crash_status=crash_status
        )
        self.profile = profile
        self.host = host
        self.port = port
        self.backend_name = backend
        self.context_chars = context_chars
        self.verbose = verbose
        self._stop_event = threading.Event()
        self._backend = make_backend(backend)
        catalog = Catalog(specs)
        self.models: dict[str, ModelSpec] = catalog.models
        self._control = FaultControl(faults or Faults(), self._stop_event)
        state = ServerState(
            catalog=catalog,
            control=self._control,
            counters=Counters(),
            residency=Residency(self._stop_event),
            vectorizer=Vectorizer(self._backend, VectorCache(cache_entries, cache_mb * 1024 * 1024)),
            profile=profile,
            stop=self._stop_event,
            started_at=datetime.now(UTC).isoformat(),
            context_chars=context_chars,
        )
        self._routes = Routes(state)
        self._httpd: HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._loaded = False

    # --- lifecycle

    def start(self) -> OllamaServer:
        """Load the backend, bind and serve on a daemon thread; returns self once ready.

        After :meth:`stop` it serves again on the same port (a server that died and came back), with its
        faults, counters and cache as they were.
        """
        if self._httpd is not None:
            raise RuntimeError("server already started")
        if not self._loaded:
            self._backend.load()
            self._loaded = True
        self._stop_event.clear()
        httpd = make_server(self.host, self.port, self._routes, self._stop_event, self.verbose)
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
        self._control.wake_all()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
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

    # --- faults and stats (also over HTTP: /_control/faults, /_control/stats)

    @property
    def faults(self) -> Faults:
        return self._control.current

    def set_faults(self, **changes: Any) -> Faults:
        """Merge ``changes`` into the current faults (``reset=True`` starts from defaults)."""
        return self._control.set(changes)

    def reset_faults(self) -> Faults:
        return self.set_faults(reset=True)

    def stats(self) -> dict[str, Any]:
        """Counters since start (or the last reset_stats); ``status_counts`` has int keys."""
        return self._routes.stats()

    def reset_stats(self) -> None:
        self._routes.reset_stats()
