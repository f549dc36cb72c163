"""Request binding: request bodies read as strictly as real Ollama reads them.

Ollama's gin router binds a body with Go's ``encoding/json``: a field of the wrong type is a 400 in Go's
own words, ``keep_alive`` follows ``api.Duration`` (seconds or a Go duration string, negative = forever).
Every route binds its body here, so an answer to a malformed request is written once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import orjson

from wiki_embeddings.devtools.ollama_dev.replies import Reply, error

DEFAULT_KEEP_ALIVE = 300.0  # seconds (5m)

_GO_KINDS = {str: "string", bool: "bool", int: "number", float: "number", list: "array", dict: "object"}
_OPTIONS = "map[string]interface {}"
EMBED_FIELDS = {"model": "string", "truncate": "bool", "dimensions": "int", "options": _OPTIONS}
LEGACY_FIELDS = {"model": "string", "prompt": "string", "options": _OPTIONS}
SHOW_FIELDS = {"model": "string", "name": "string"}
PULL_FIELDS = {"model": "string", "name": "string", "stream": "bool", "insecure": "bool"}


def parse_json(body: bytes) -> dict[str, Any] | Reply:
    """The body as a JSON object, or the 400 that explains why it is not one."""
    if not body.strip():
        return error(400, "missing request body")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return error(400, f"invalid JSON body: {exc}")
    if not isinstance(data, dict):
        return error(400, "request body must be a JSON object")
    return data


def bind(data: dict[str, Any], struct: str, fields: Mapping[str, str]) -> Reply | None:
    """Check field types as Go's encoding/json does when gin binds a request (400 with Go's wording)."""
    for name, go_type in fields.items():
        value = data.get(name)
        if value is None:
            continue
        ok = {
            "string": isinstance(value, str),
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            _OPTIONS: isinstance(value, dict),
        }[go_type]
        if not ok:
            kind = _GO_KINDS.get(type(value), "value")
            if kind == "number" and go_type == "int":
                kind += " " + orjson.dumps(value).decode()
            return error(400, f"json: cannot unmarshal {kind} into Go struct field {struct}.{name} of type {go_type}")
    return None


def parse_and_bind(body: bytes, struct: str, fields: Mapping[str, str]) -> dict[str, Any] | Reply:
    """:func:`parse_json` then :func:`bind`: the body's fields, or the 400 real Ollama answers."""
    data = parse_json(body)
    if isinstance(data, Reply):
        return data
    bad = bind(data, struct, fields)
    return data if bad is None else bad


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_DURATION_UNITS["h"] = 3600.0
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)([^0-9.]*)")


def go_duration(text: str) -> float:
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


def keep_alive_seconds(value: Any) -> float:
    """api.Duration's JSON rules: seconds as a number or a Go duration string; negative = forever (inf)."""
    if value is None:
        return DEFAULT_KEEP_ALIVE
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        go_type = {bool: "bool", list: "[]interface {}", dict: "map[string]interface {}"}.get(type(value), "?")
        raise ValueError(f"Unsupported type: '{go_type}'")
    seconds = float(value) if not isinstance(value, str) else go_duration(value)
    return math.inf if seconds < 0 else seconds


@dataclasses.dataclass(frozen=True)
class EmbedJob:
    """An embed request once bound, whatever its wire format: what the embedding pipeline is asked to do.

    ``data`` is the body as sent: the model name is answered back as sent, and the control stats show
    the request's own ``keep_alive``, ``options``, ``truncate`` and ``dimensions``.
    """

    data: dict[str, Any]
    texts: list[str]
    keep_alive: float  # seconds the model stays loaded once idle (inf: forever)

    @property
    def model(self) -> Any:
        return self.data.get("model")

    @property
    def options(self) -> Any:
        return self.data.get("options")

    @property
    def truncate(self) -> bool:
        """Whether the client allows cutting an over-long input (Ollama's default: yes)."""
        return self.data.get("truncate") is not False


def _keep_alive(data: dict[str, Any]) -> float | Reply:
    try:
        return keep_alive_seconds(data.get("keep_alive"))
    except ValueError as exc:
        return error(400, str(exc))


def bind_embed(data: dict[str, Any]) -> EmbedJob | Reply:
    """``POST /api/embed`` (``EmbedRequest``): ``input`` a string or a list of strings."""
    if (bad := bind(data, "EmbedRequest", EMBED_FIELDS)) is not None:
        return bad
    if isinstance(keep_alive := _keep_alive(data), Reply):
        return keep_alive
    raw = data.get("input")
    if isinstance(raw, str):
        texts = [raw] if raw else []  # Ollama drops an empty string input
    elif isinstance(raw, list) and all(isinstance(t, str) for t in raw):
        texts = raw
    elif raw is None:
        texts = []
    else:
        return error(400, "invalid input type")
    return EmbedJob(data, texts, keep_alive)


def bind_legacy(data: dict[str, Any]) -> EmbedJob | Reply:
    """Legacy ``POST /api/embeddings`` (``EmbeddingRequest``): one ``prompt``."""
    if (bad := bind(data, "EmbeddingRequest", LEGACY_FIELDS)) is not None:
        return bad
    if isinstance(keep_alive := _keep_alive(data), Reply):
        return keep_alive
    return EmbedJob(data, [data["prompt"]] if data.get("prompt") else [], keep_alive)
