"""The embedding pipeline behind every embed route, and the wire formats it is spoken in.

One request goes: faults that answer before reading (``down``) -> bind the body (the wire's format) ->
find the model -> the limits (the profile: window and batch) -> injected failures and input markers ->
load the model (``load_ms``) -> fit the inputs to the limits (the profile) -> hang faults -> hold a slot,
wait out a reload after a runner crash, and evaluate (latency, the crash mode, runner-side marker faults,
vectors: one batch, or one input after another with fault ``serial_inputs``) -> release the model -> the
answer (the wire's format). A wire (:class:`Wire`) is what differs between ``/api/embed``, the legacy
``/api/embeddings`` and ``/v1/embeddings`` (module ``openai``): how the body binds, whether the handler's
cutting applies, the answers to an over-long input and a crash, which faults apply, the answer's shape.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson

from wiki_embeddings.devtools.ollama_dev.binding import EmbedJob, bind_embed, bind_legacy, parse_json
from wiki_embeddings.devtools.ollama_dev.faults import Faults
from wiki_embeddings.devtools.ollama_dev.models import ModelSpec
from wiki_embeddings.devtools.ollama_dev.profiles import Fitted, Profile
from wiki_embeddings.devtools.ollama_dev.replies import (
    BUSY,
    HTML,
    HTML_ERROR,
    JSON,
    NAN_ERROR,
    RUNNER_TERMINATED,
    TOO_LONG,
    Reply,
    Stopping,
    error,
    runner_crashed,
)
from wiki_embeddings.devtools.ollama_dev.state import ServerState


class Wire:
    """An embed route's format: ``/api/embed`` (this base) and its differences for other routes."""

    handler = True  # the request goes through /api/embed's handler, which cuts where the generation cuts
    endless_body = True  # fault endless_body applies
    count_fault = True  # fault wrong_count_marker applies

    def bind(self, data: dict[str, Any]) -> EmbedJob | Reply:
        return bind_embed(data)

    def too_long(self, profile: Profile) -> Reply:
        """The refusal of an input over the limits, in the generation's words."""
        return error(400, profile.rules.too_long)

    def crashed(self, profile: Profile, port: int) -> Reply:
        """The answer when the runner aborts (the crash mode)."""
        return error(profile.crash_status, runner_crashed(port))

    def wrap(self, reply: Reply) -> Reply:
        """The reply as this route sends it (another API's error shape, say)."""
        return reply

    def dimensions(self, job: EmbedJob, spec: ModelSpec) -> int | None:
        """Matryoshka truncation asked for, when it shortens the vector."""
        dims = job.data.get("dimensions")
        return dims if dims and 0 < dims < spec.dim else None

    def empty(self, job: EmbedJob) -> Reply:
        """The answer to a request without inputs."""
        return Reply(200, b'{"model":' + orjson.dumps(job.model) + b',"embeddings":[]}')

    def answer(
        self, job: EmbedJob, parts: list[bytes], tokens: int, load_ns: int, start_ns: int, faults: Faults
    ) -> Reply:
        tail = f',"total_duration":{time.perf_counter_ns() - start_ns},"load_duration":{load_ns},'
        tail += f'"prompt_eval_count":{tokens}}}'
        head = b'{"model":' + orjson.dumps(job.model) + b","
        if faults.oversize_body_mb:
            size = int(faults.oversize_body_mb * 1024 * 1024)
            fixed = len(head) + sum(len(p) + 1 for p in parts) + len(tail) + 32
            head += b'"padding":"' + b" " * max(size - fixed, 0) + b'",'
        return Reply(200, head + b'"embeddings":[' + b",".join(parts) + b"]" + tail.encode())


class LegacyWire(Wire):
    """Legacy ``/api/embeddings``: one ``prompt``, one ``embedding``; straight to the runner, so it never cuts
    (unless fault ``silent_truncate``), and every error is a 500."""

    handler = False
    endless_body = False
    count_fault = False

    def bind(self, data: dict[str, Any]) -> EmbedJob | Reply:
        return bind_legacy(data)

    def too_long(self, profile: Profile) -> Reply:
        return error(500, TOO_LONG)

    def crashed(self, profile: Profile, port: int) -> Reply:
        return error(500, runner_crashed(port))

    def dimensions(self, job: EmbedJob, spec: ModelSpec) -> int | None:
        return None

    def empty(self, job: EmbedJob) -> Reply:
        return Reply(200, b'{"embedding":[]}')  # what Ollama answers for an empty prompt

    def answer(
        self, job: EmbedJob, parts: list[bytes], tokens: int, load_ns: int, start_ns: int, faults: Faults
    ) -> Reply:
        return Reply(200, b'{"embedding":' + parts[0] + b"}")


EMBED = Wire()
LEGACY = LegacyWire()


def endless_reply(model: Any, stop: threading.Event) -> Reply:
    """A 200 whose JSON body never ends: 64 KiB chunks of numbers until the client or the server stops."""
    number = b"0.0123456789,"
    chunk = number * ((1 << 16) // len(number))

    def forever() -> Iterator[bytes]:
        while not stop.wait(0.002):  # ~30 MB/s at most, and a sleeping thread, not a spinning one
            yield chunk

    head = b'{"model":' + orjson.dumps(model) + b',"embeddings":[['
    return Reply(200, head, JSON, chunks=forever())


class EmbedPipeline:
    """Runs one embed request through the faults, the profile and the backend (see the module docstring)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._ports = random.Random()  # the port of a fresh runner, named in a crash's error

    def find_model(self, name: Any) -> ModelSpec | Reply:
        if not isinstance(name, str) or not name:
            return error(400, "model is required")
        spec = self.state.catalog.find(name)
        if spec is None:
            return error(404, f"model {orjson.dumps(name).decode()} not found, try pulling it first")
        return spec

    def run(self, body: bytes, wire: Wire) -> Reply:
        return wire.wrap(self._run(body, wire))

    def _run(self, body: bytes, wire: Wire) -> Reply:
        start_ns = time.perf_counter_ns()
        state, control = self.state, self.state.control
        with state.counters.embed_request():
            seq = control.next_request()
            faults = control.current
            if faults.down:
                return error(503, BUSY)
            data = parse_json(body)
            if isinstance(data, Reply):
                return data
            job = wire.bind(data)
            if isinstance(job, Reply):
                return job
            spec = self.find_model(job.model)
            if isinstance(spec, Reply):
                return spec
            state.counters.record_last(job.data)
            limits = state.profile.limits(spec, job.options, faults)
            if isinstance(limits, Reply):
                return limits
            if (status := control.failure_status(faults, seq)) is not None:
                return error(status, "server overloaded")
            hits = {name: any(m in t for t in job.texts) for name, m in faults.markers.items()}
            if hits.get("bad_request_marker"):
                return error(400, "invalid input")
            state.residency.acquire(spec, limits.window, faults.load_ms)
            try:
                load_ns = time.perf_counter_ns() - start_ns
                if not job.texts:
                    return wire.empty(job)
                backend, chars = state.vectorizer.backend, self._char_limit(faults)
                fitted = state.profile.fit(job.texts, limits, job.truncate, wire.handler, faults, backend, chars)
                if fitted is None:
                    return wire.too_long(state.profile)
                if control.hangs(faults, seq):
                    control.wait_while_hung()
                with control.slot():
                    state.residency.wait_ready(spec)
                    parts = self._evaluate(job, spec, fitted, wire, faults, hits)
                if isinstance(parts, Reply):
                    return parts
            finally:
                state.residency.release(spec, job.keep_alive)
            if wire.count_fault and hits.get("wrong_count_marker") and parts:
                parts = parts[:-1]
            state.counters.count_embedded(len(parts))
            return wire.answer(job, parts, fitted.tokens, load_ns, start_ns, faults)

    def _char_limit(self, faults: Faults) -> int | None:
        """The context in characters, if any: the tighter of ``--context-chars`` and fault ``max_input_chars``."""
        limits = [n for n in (faults.max_input_chars, self.state.context_chars) if n]
        return min(limits) if limits else None

    def _evaluate(
        self, job: EmbedJob, spec: ModelSpec, fitted: Fitted, wire: Wire, faults: Faults, hits: dict[str, bool]
    ) -> list[bytes] | Reply:
        """The work done while holding a slot: the service time, the runner's marker faults, the vectors."""
        delay = faults.latency_ms + faults.per_text_ms * len(job.texts)
        if delay and self.state.stop.wait(delay / 1000):
            raise Stopping
        if fitted.crash:  # llama-server aborts; the model reloads before anything else is evaluated
            self.state.residency.crash(spec, self.state.profile.reload_ms / 1000)
            return wire.crashed(self.state.profile, self._ports.randint(32768, 60999))
        if hits.get("error_marker"):
            return error(500, RUNNER_TERMINATED)
        if hits.get("non_json_marker"):
            return Reply(200, b"not json{", JSON)
        if hits.get("html_marker"):
            return Reply(200, HTML_ERROR, HTML)
        if hits.get("nan_marker"):
            return error(500, NAN_ERROR)  # Go's JSON encoder refuses the NaN in the vector
        if faults.endless_body and wire.endless_body:
            return endless_reply(job.model, self.state.stop)
        dims = wire.dimensions(job, spec)
        salt = self.state.control.current.model_salt
        serial = faults.serial_inputs
        return self.state.vectorizer.vectors(spec, fitted.inputs, job.texts, faults.markers, dims, salt, serial)
