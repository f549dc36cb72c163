"""Routes: every path the server answers, as Ollama answers it, and the control paths of the dev server.

Ollama's paths: ``GET|HEAD /``, ``GET|HEAD /api/version``, ``GET|HEAD /api/tags``, ``POST /api/pull``,
``POST /api/show``, ``GET /api/ps``, ``POST /api/embed``, legacy ``POST /api/embeddings``, and the
OpenAI-compatible ``POST /v1/embeddings``, ``GET /v1/models`` and ``GET /v1/models/{model}`` (module
``openai``). A known path asked with another method answers 405 ``405 method not allowed`` with an
``Allow`` header, as Ollama's gin router does; an unknown path 404 ``404 page not found``. Control paths
(``/_control/...``) set faults and read or reset the counters; they are not counted themselves.
"""

from __future__ import annotations

import hashlib
import traceback
import urllib.parse
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import orjson

from wiki_embeddings.devtools.ollama_dev.binding import (
    DEFAULT_KEEP_ALIVE,
    PULL_FIELDS,
    SHOW_FIELDS,
    parse_and_bind,
    parse_json,
)
from wiki_embeddings.devtools.ollama_dev.embed import EMBED, LEGACY, EmbedPipeline
from wiki_embeddings.devtools.ollama_dev.models import canonical_name, digest, name_parts, parameter_count
from wiki_embeddings.devtools.ollama_dev.openai import OPENAI, list_models, retrieve_model
from wiki_embeddings.devtools.ollama_dev.replies import (
    NDJSON,
    NOT_ALLOWED,
    NOT_FOUND,
    PULL_UNKNOWN,
    RUNNING,
    TEXT,
    Reply,
    Stopping,
    error,
)
from wiki_embeddings.devtools.ollama_dev.state import ServerState

TRICKLED = frozenset({"/api/embed", "/api/embeddings", "/v1/embeddings"})  # the paths fault trickle_ms slows
MODEL_PATH = "/v1/models/"  # GET /v1/models/{model}: one path segment, as gin's :model matches


class Routes:
    """The server's answers, over its parts (:class:`~.state.ServerState`) and the embedding pipeline."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.pipeline = EmbedPipeline(state)

    def respond(self, method: str, path: str, body: bytes) -> tuple[Reply, float]:
        """The reply to ``method path`` and the trickle (ms per byte) to send it with."""
        name = path[len(MODEL_PATH) :]
        if path.startswith(MODEL_PATH) and name and "/" not in name:
            # Ollama's RetrieveMiddleware hands its show handler {"name": model} as the body.
            path, body = MODEL_PATH + ":model", orjson.dumps({"name": urllib.parse.unquote(name)})
        route = ROUTES.get((method, path))
        if route is None:
            allowed = ALLOWED.get(path)
            if allowed:  # gin with HandleMethodNotAllowed, as Ollama configures it
                return Reply(405, NOT_ALLOWED, TEXT, headers=(("Allow", ", ".join(allowed)),)), 0.0
            return Reply(404, NOT_FOUND, TEXT), 0.0
        trickle = self.state.control.current.trickle_ms if path in TRICKLED else 0.0
        try:
            reply = route(self, body)
        except Stopping:
            raise
        except Exception as exc:  # a bug here must not kill the connection silently
            traceback.print_exc()
            reply = error(500, f"internal error: {exc}")
        return reply, trickle

    def count_request(self) -> None:
        self.state.counters.count_request()

    def count_status(self, status: int) -> None:
        self.state.counters.count_status(status)

    # --- control

    def stats(self) -> dict[str, Any]:
        """Counters since start (or the last reset_stats); ``status_counts`` has int keys."""
        return {
            **self.state.counters.snapshot(),
            **self.state.control.counters(),
            "cache_entries": len(self.state.vectorizer.cache),
            "faults": self.state.control.current.to_dict(),
            **self.state.counters.last_request(),
            "loaded_models": sorted(self.state.residency.names()),
            "runner_crashes": self.state.residency.crashes,
            "profile": self.state.profile.describe(),
        }

    def reset_stats(self) -> None:
        self.state.counters.reset()
        self.state.control.reset_counters()

    def get_faults(self, body: bytes) -> Reply:
        return Reply(200, orjson.dumps(self.state.control.current.to_dict()))

    def set_faults(self, body: bytes) -> Reply:
        data = parse_json(body)
        if isinstance(data, Reply):
            return data
        try:
            faults = self.state.control.set(data)
        except (TypeError, ValueError) as exc:
            return error(400, str(exc))
        return Reply(200, orjson.dumps(faults.to_dict()))

    def get_stats(self, body: bytes) -> Reply:
        return Reply(200, orjson.dumps(self.stats(), option=orjson.OPT_NON_STR_KEYS))

    def post_reset_stats(self, body: bytes) -> Reply:
        self.reset_stats()
        return self.get_stats(body)

    # --- Ollama

    def root(self, body: bytes) -> Reply:
        return Reply(200, RUNNING, TEXT)

    def version(self, body: bytes) -> Reply:
        return Reply(200, orjson.dumps({"version": self.state.profile.version}))

    def tags(self, body: bytes) -> Reply:
        entries = [spec.tag_entry(self.state.started_at) for spec in self.state.catalog.models.values()]
        salt = self.state.control.current.model_salt
        if salt is not None:  # other weights, another digest (as after an `ollama pull`)
            for entry in entries:
                entry["digest"] = hashlib.sha256(f"{entry['name']}#{salt}".encode()).hexdigest()
        return Reply(200, orjson.dumps({"models": entries}))

    def show(self, body: bytes) -> Reply:
        data = parse_and_bind(body, "ShowRequest", SHOW_FIELDS)
        if isinstance(data, Reply):
            return data
        name = data.get("model") or data.get("name")
        if not name:
            return error(400, "model is required")
        spec = self.state.catalog.find(name)
        if spec is None:
            return error(404, f"model '{canonical_name(name)}' not found")
        known = spec.known
        arch = known.arch
        info: dict[str, Any] = {
            "general.architecture": arch,
            "general.basename": name_parts(spec.name)[2],  # type: ignore[index]
            "general.file_type": 1,
            "general.parameter_count": parameter_count(known.parameter_size),
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
            "modified_at": self.state.started_at,
        }
        if spec.num_ctx:
            reply["parameters"] = f"{'num_ctx':<30} {spec.num_ctx}"
            reply["modelfile"] += f"PARAMETER num_ctx {spec.num_ctx}\n"
        return Reply(200, orjson.dumps(reply))

    def ps(self, body: bytes) -> Reply:
        now = datetime.now().astimezone()
        models: list[dict[str, Any]] = []
        for name, (expires_at, context) in self.state.residency.entries().items():
            spec = self.state.catalog.models[name]
            models.append(
                {
                    "name": name,
                    "model": name,
                    "size": spec.known.size,
                    "digest": digest(name),
                    "details": spec.details(),
                    "expires_at": (expires_at or now + timedelta(seconds=DEFAULT_KEEP_ALIVE)).isoformat(),
                    "size_vram": spec.known.size,
                    "context_length": context,
                }
            )
        models.sort(key=lambda m: m["expires_at"], reverse=True)  # longest time remaining first, as Ollama
        return Reply(200, orjson.dumps({"models": models}))

    def pull(self, body: bytes) -> Reply:
        data = parse_and_bind(body, "PullRequest", PULL_FIELDS)
        if isinstance(data, Reply):
            return data
        name = data.get("model") or data.get("name") or ""
        if name_parts(name) is None:
            return error(400, "invalid model name")
        stream = data.get("stream") is not False
        spec = self.state.catalog.find(name)
        if spec is None:  # the registry has no such manifest
            if not stream:
                return error(500, PULL_UNKNOWN)
            lines: list[dict[str, Any]] = [{"status": "pulling manifest"}, {"error": PULL_UNKNOWN}]
        else:
            sha = "sha256:" + digest(spec.name)
            size = spec.known.size
            lines = [
                {"status": "pulling manifest"},
                {"status": f"pulling {sha[7:19]}", "digest": sha, "total": size, "completed": size},
                {"status": "verifying sha256 digest"},
                {"status": "writing manifest"},
                {"status": "success"},
            ]
            if not stream:
                return Reply(200, orjson.dumps({"status": "success"}))
        return Reply(200, b"", NDJSON, chunks=iter([orjson.dumps(line) + b"\n" for line in lines]))

    def embed(self, body: bytes) -> Reply:
        if self.state.control.current.disable_embed_endpoint:
            return Reply(404, NOT_FOUND, TEXT)
        return self.pipeline.run(body, EMBED)

    def embeddings(self, body: bytes) -> Reply:
        return self.pipeline.run(body, LEGACY)

    # --- OpenAI-compatible

    def v1_embeddings(self, body: bytes) -> Reply:
        return self.pipeline.run(body, OPENAI)

    def v1_models(self, body: bytes) -> Reply:
        return list_models(self.state.catalog, self.state.started_at)

    def v1_model(self, body: bytes) -> Reply:
        return retrieve_model(self.state.catalog, self.state.started_at, body)


Route = Callable[[Routes, bytes], Reply]
ROUTES: dict[tuple[str, str], Route] = {
    ("HEAD", "/"): Routes.root,
    ("GET", "/"): Routes.root,
    ("HEAD", "/api/version"): Routes.version,
    ("GET", "/api/version"): Routes.version,
    ("HEAD", "/api/tags"): Routes.tags,
    ("GET", "/api/tags"): Routes.tags,
    ("POST", "/api/pull"): Routes.pull,
    ("POST", "/api/show"): Routes.show,
    ("GET", "/api/ps"): Routes.ps,
    ("POST", "/api/embed"): Routes.embed,
    ("POST", "/api/embeddings"): Routes.embeddings,
    ("POST", "/v1/embeddings"): Routes.v1_embeddings,
    ("GET", "/v1/models"): Routes.v1_models,
    ("GET", MODEL_PATH + ":model"): Routes.v1_model,
    ("GET", "/_control/faults"): Routes.get_faults,
    ("POST", "/_control/faults"): Routes.set_faults,
    ("GET", "/_control/stats"): Routes.get_stats,
    ("POST", "/_control/stats/reset"): Routes.post_reset_stats,
}
# Methods per known path in gin's order (its method trees in order of first registration: HEAD, GET, POST).
_METHOD_ORDER = {"HEAD": 0, "GET": 1, "POST": 2, "DELETE": 3}
ALLOWED: dict[str, list[str]] = {}
for _method, _path in sorted(ROUTES, key=lambda route: _METHOD_ORDER[route[0]]):
    ALLOWED.setdefault(_path, []).append(_method)
