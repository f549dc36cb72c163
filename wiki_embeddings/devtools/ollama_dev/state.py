"""Runtime state: request counters (``/_control/stats``), simulated model residency, and :class:`ServerState`,
the bundle of every part a request is served from.

Residency follows Ollama's ``keep_alive``: a model is loaded by its first request (paying fault
``load_ms``), stays loaded while requests use it and for ``keep_alive`` seconds idle after the last one
(0: unloaded at once, negative: forever), and ``/api/ps`` lists what is loaded. A runner crash (the
``0.31-crash`` generation) reloads the model: every request evaluated before the reload ends waits for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from wiki_embeddings.devtools.ollama_dev.faults import FaultControl
from wiki_embeddings.devtools.ollama_dev.models import Catalog, ModelSpec
from wiki_embeddings.devtools.ollama_dev.profiles import Profile
from wiki_embeddings.devtools.ollama_dev.replies import Stopping
from wiki_embeddings.devtools.ollama_dev.vectors import Vectorizer

_RECORDED = ("model", "keep_alive", "options", "truncate", "dimensions")  # an embed request's fields in the stats
FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)  # Go's time.Duration(math.MaxInt64): keep_alive < 0


class Counters:
    """Request counters since start or the last reset; control requests (``/_control/...``) are not counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_request: dict[str, Any] = {}
        self._reset_locked()

    def _reset_locked(self) -> None:
        self._requests = 0
        self._embed_requests = 0
        self._texts_embedded = 0
        self._status_counts: dict[int, int] = {}
        self._in_flight = 0
        self._max_in_flight = 0

    def reset(self) -> None:
        """Zero the counters (``POST /_control/stats/reset``); the last request is kept."""
        with self._lock:
            self._reset_locked()

    def count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def count_status(self, status: int) -> None:
        with self._lock:
            self._status_counts[status] = self._status_counts.get(status, 0) + 1

    def count_embedded(self, texts: int) -> None:
        with self._lock:
            self._texts_embedded += texts

    def record_last(self, body: dict[str, Any]) -> None:
        """Keep an embed request's model and options as sent, for ``last_*`` in the stats."""
        with self._lock:
            self._last_request = {key: body.get(key) for key in _RECORDED}

    @contextlib.contextmanager
    def embed_request(self) -> Iterator[None]:
        """Count an embed request (both endpoints) and hold it as in flight until it is answered."""
        with self._lock:
            self._embed_requests += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def snapshot(self) -> dict[str, Any]:
        """The counters; ``status_counts`` has int keys."""
        with self._lock:
            return {
                "requests": self._requests,
                "embed_requests": self._embed_requests,
                "texts_embedded": self._texts_embedded,
                "status_counts": dict(self._status_counts),
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
            }

    def last_request(self) -> dict[str, Any]:
        """The last embed request's model, ``keep_alive``, ``options``, ``truncate`` and ``dimensions``."""
        with self._lock:
            last = self._last_request
        return {f"last_{key}": last.get(key) for key in _RECORDED}


class Residency:
    """Which models are loaded, for how long, and with what context (``load_ms``, ``keep_alive``, ``/api/ps``)."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # Ollama loads one model at a time
        # name -> [requests using it, expiry (monotonic), expires_at (wall), context it was loaded with]
        self._loaded: dict[str, list[Any]] = {}
        self._ready_at: dict[str, float] = {}  # name -> when its reload after a runner crash ends (monotonic)
        self._crashes = 0

    @property
    def crashes(self) -> int:
        """Runner crashes since start."""
        with self._lock:
            return self._crashes

    def crash(self, spec: ModelSpec, reload_s: float) -> None:
        """The runner serving ``spec`` aborted: the model reloads for ``reload_s`` seconds from now."""
        with self._lock:
            self._crashes += 1
            self._ready_at[spec.name] = max(self._ready_at.get(spec.name, 0.0), time.monotonic() + reload_s)

    def wait_ready(self, spec: ModelSpec) -> None:
        """Wait while ``spec`` reloads after a runner crash, as a load is waited for (raises Stopping)."""
        with self._lock:
            delay = self._ready_at.get(spec.name, 0.0) - time.monotonic()
        if delay > 0 and self._stop.wait(delay):
            raise Stopping

    def _names_locked(self) -> list[str]:
        now = time.monotonic()
        return [name for name, entry in self._loaded.items() if entry[0] or entry[1] > now]

    def names(self) -> list[str]:
        """The models loaded now."""
        with self._lock:
            return self._names_locked()

    def entries(self) -> dict[str, tuple[datetime | None, int]]:
        """Each loaded model's wall-clock expiry (None while never released) and the context it was loaded with."""
        with self._lock:
            return {name: (self._loaded[name][2], self._loaded[name][3]) for name in self._names_locked()}

    def acquire(self, spec: ModelSpec, context: int, load_ms: float) -> None:
        """Mark ``spec`` in use; pay ``load_ms`` first when it is not loaded (raises Stopping if the server stops)."""
        with self._load_lock:
            with self._lock:
                entry = self._loaded.get(spec.name)
                loaded = entry is not None and (entry[0] or entry[1] > time.monotonic())
            if not loaded and load_ms and self._stop.wait(load_ms / 1000):
                raise Stopping
            with self._lock:
                entry = self._loaded.get(spec.name)  # again: a keep_alive 0 request may have unloaded it since
                if entry is None or not (entry[0] or entry[1] > time.monotonic()):
                    entry = self._loaded[spec.name] = [0, 0.0, None, context]
                entry[0] += 1

    def release(self, spec: ModelSpec, keep_alive: float) -> None:
        """The request is done: the model stays loaded for ``keep_alive`` seconds idle (0: unload now)."""
        with self._lock:
            entry = self._loaded.get(spec.name)
            if entry is None:
                return
            entry[0] -= 1
            entry[1] = time.monotonic() + keep_alive
            wall = FOREVER if math.isinf(keep_alive) else timedelta(seconds=keep_alive)
            entry[2] = datetime.now().astimezone() + wall
            if not entry[0] and keep_alive <= 0:
                del self._loaded[spec.name]


@dataclasses.dataclass(frozen=True)
class ServerState:
    """Every part a request is served from, built once per server and shared by the routes and the pipeline.

    ``profile`` is the Ollama generation whose rules apply; ``context_chars`` an extra context in characters
    (``--context-chars``); ``stop`` is set when the server stops, ending every wait.
    """

    catalog: Catalog
    control: FaultControl
    counters: Counters
    residency: Residency
    vectorizer: Vectorizer
    profile: Profile
    stop: threading.Event
    started_at: str  # ISO time, reported as the models' modified_at
    context_chars: int | None = None
