"""Faults: the injectable misbehaviour (:class:`Faults`) and the live state it acts on (:class:`FaultControl`).

Faults can be set at start (CLI flags, one per field) or at runtime (``POST /_control/faults``,
:meth:`FaultControl.set`), so client resilience is tested against real HTTP. A change wakes every waiting
request, so clearing a hang or raising ``slots`` takes effect at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import threading
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from wiki_embeddings.devtools.ollama_dev.replies import Stopping


@dataclasses.dataclass(frozen=True)
class Faults:
    """Injectable misbehaviour; all off by default (except ``slots=1``, which is Ollama's behaviour).

    Periodic faults (``fail_every_n``, ``hang_after_n``) count embed requests (every embed endpoint) since
    the faults were last set, so a pattern set at runtime starts from its first request. ``fail_rate`` fails
    that share of them, chosen by a hash of (``fail_seed``, request number): the same seed fails the same
    request numbers, whatever the timing.
    Marker faults trigger when any input text *contains* the marker string.
    """

    latency_ms: float = 0.0  # extra latency per embed request, spent while holding a slot
    per_text_ms: float = 0.0  # extra latency per input text of an embed request, spent while holding a slot
    load_ms: float = 0.0  # model load time, paid by the first request and again after the model unloaded
    slots: int = 1  # embed requests processed at once (0 = unlimited); Ollama runs one per model
    serial_inputs: bool = False  # a request's inputs evaluated one after another, none cached (Ollama's cost)
    fail_every_n: int = 0  # every Nth embed request answers fail_status
    fail_status: int = 503  # the status of fail_every_n and fail_rate
    fail_rate: float = 0.0  # this share of embed requests (0-1, seeded, reproducible) answers fail_status
    fail_seed: int = 0
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
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
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


def draw(seed: int, seq: int) -> float:
    """A number in [0, 1) fixed by (seed, request number): the seeded failure rate's die."""
    digest = hashlib.blake2b(f"{seed}:{seq}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


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


class FaultControl:
    """The faults in force and the request state they act on: the request sequence, slots and hung requests.

    Periodic faults count embed requests since the faults were last set (:meth:`next_request`); a change
    restarts the count and wakes every waiting request, which re-reads the faults (one condition for
    hangs and slots). ``stop`` is the server's stop event: a waiting request raises :class:`Stopping`.
    """

    def __init__(self, faults: Faults, stop: threading.Event) -> None:
        self._faults = faults
        self._stop = stop
        self._cond = threading.Condition()
        self._seq = 0
        self._active = 0
        self._max_active = 0
        self._hung = 0

    @property
    def current(self) -> Faults:
        return self._faults

    def set(self, changes: Mapping[str, Any]) -> Faults:
        """Merge ``changes`` into the current faults (``reset: True`` starts from defaults); restarts the count."""
        with self._cond:
            self._faults = self._faults.merged(changes)
            self._seq = 0
            self._cond.notify_all()
            return self._faults

    def wake_all(self) -> None:
        """Wake every waiting request (the server is stopping: they raise :class:`Stopping`)."""
        with self._cond:
            self._cond.notify_all()

    def next_request(self) -> int:
        """Count an embed request; its sequence number since the last fault change (1 for the first)."""
        with self._cond:
            self._seq += 1
            return self._seq

    @staticmethod
    def failure_status(faults: Faults, seq: int) -> int | None:
        """The status an injected failure answers for the ``seq``th request, or None (no failure due)."""
        if faults.fail_every_n and seq % faults.fail_every_n == 0:
            return faults.fail_status
        if faults.fail_rate and draw(faults.fail_seed, seq) < faults.fail_rate:
            return faults.fail_status
        return None

    @staticmethod
    def hangs(faults: Faults, seq: int) -> bool:
        return faults.hang or (faults.hang_after_n is not None and seq > faults.hang_after_n)

    def wait_while_hung(self) -> None:
        """Block (without spinning) until hang faults are cleared; raise Stopping if the server stops."""
        with self._cond:
            self._hung += 1
            try:
                while self._faults.hang or self._faults.hang_after_n is not None:
                    if self._stop.is_set():
                        raise Stopping
                    self._cond.wait()
            finally:
                self._hung -= 1

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of ``faults.slots`` processing slots (re-read on every wake, so it can change live)."""
        with self._cond:
            while self._faults.slots and self._active >= self._faults.slots:
                if self._stop.is_set():
                    raise Stopping
                self._cond.wait()
            self._active += 1
            self._max_active = max(self._max_active, self._active)
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()  # the condition is shared with hung requests: wake everyone

    def counters(self) -> dict[str, int]:
        """``active``, ``max_active`` and ``hung`` for the stats."""
        with self._cond:
            return {"active": self._active, "max_active": self._max_active, "hung": self._hung}

    def reset_counters(self) -> None:
        with self._cond:
            self._max_active = self._active
            self._hung = 0
