"""The served models: Ollama's name rules, the table of well-known embedding models, and what one model is.

Ollama matches a request's model name with defaults filled in and case ignored (``X``,
``library/x:latest`` and ``x`` are one model); the table lets a bare name need no ``:dim`` and makes
``/api/show``, ``/api/ps`` and ``/api/tags`` answer with the real model's architecture, sizes and context.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from collections.abc import Iterable
from typing import Any

DEFAULT_HASH_MODELS: tuple[str, ...] = ("all-minilm:384", "nomic-embed-text:768")
DEFAULT_MINILM_MODELS: tuple[str, ...] = ("all-minilm:384",)
MINILM_DIM = 384
MINILM_CONTEXT_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2, [CLS] and [SEP] included
DEFAULT_NUM_CTX = 4096  # Ollama's default num_ctx (OLLAMA_CONTEXT_LENGTH) for a model without its own
UNKNOWN_CONTEXT = 512  # trained context assumed for a model name not in KNOWN_MODELS


class Known(typing.NamedTuple):
    dim: int
    arch: str  # general.architecture; /api/show keys are "<arch>.context_length" etc.
    family: str
    parameter_size: str
    size: int  # bytes, as /api/tags reports
    context_length: int  # trained context in tokens (<arch>.context_length)
    num_ctx: int | None  # the library modelfile's default num_ctx (PARAMETER num_ctx), if it sets one


# Well-known embedding models, so a bare name needs no ":dim" and /api/show, /api/ps answer like Ollama.
KNOWN_MODELS: dict[str, Known] = {
    "all-minilm": Known(384, "bert", "bert", "23M", 45_960_996, 512, None),
    "nomic-embed-text": Known(768, "nomic-bert", "nomic-bert", "137M", 274_302_450, 8192, 2048),
    "mxbai-embed-large": Known(1024, "bert", "bert", "334M", 669_615_493, 512, None),
    "bge-m3": Known(1024, "bert", "bert", "567M", 1_157_672_605, 8192, None),
    "bge-large": Known(1024, "bert", "bert", "335M", 670_000_000, 512, None),
    "snowflake-arctic-embed": Known(1024, "bert", "bert", "335M", 669_000_000, 512, None),
    "snowflake-arctic-embed2": Known(1024, "bert", "bert", "566M", 1_160_000_000, 8192, None),
    "paraphrase-multilingual": Known(768, "bert", "bert", "278M", 562_000_000, 512, None),
    "granite-embedding": Known(384, "bert", "bert", "30M", 62_000_000, 512, None),
    "embeddinggemma": Known(768, "gemma3", "gemma3", "307M", 621_000_000, 2048, None),
    "qwen3-embedding": Known(4096, "qwen3", "qwen3", "7.6B", 4_700_000_000, 40960, None),
}

_DEFAULT_HOST = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"


def name_parts(name: str) -> tuple[str, str, str, str] | None:
    """``[host/][namespace/]model[:tag][@digest]`` with Ollama's defaults, or None when not a valid name."""
    name = name.split("@", 1)[0]
    parts = name.split("/")
    model, _, tag = parts[-1].partition(":")
    if len(parts) > 3 or not model or any(not p for p in parts):
        return None
    namespace = parts[-2] if len(parts) >= 2 else _DEFAULT_NAMESPACE
    host = parts[0] if len(parts) == 3 else _DEFAULT_HOST
    return host, namespace, model, tag or "latest"


def name_key(name: str) -> tuple[str, ...] | None:
    """How Ollama matches names: defaults filled in, case-insensitive (``X``, ``library/x:latest`` == ``x``)."""
    parts = name_parts(name)
    return None if parts is None else tuple(p.lower() for p in parts)


def canonical_name(name: str) -> str:
    """Ollama's shortest display form: ``registry.ollama.ai/library/x`` -> ``x:latest`` (case kept)."""
    parts = name_parts(name)
    if parts is None:
        return name if ":" in name else f"{name}:latest"
    host, namespace, model, tag = parts
    if host.lower() != _DEFAULT_HOST:
        return f"{host}/{namespace}/{model}:{tag}"
    if namespace.lower() != _DEFAULT_NAMESPACE:
        return f"{namespace}/{model}:{tag}"
    return f"{model}:{tag}"


def parameter_count(size: str) -> int:
    """``general.parameter_count`` from the table's ``parameter_size`` (``23M`` -> 23000000; 0 when unknown)."""
    units = {"K": 1e3, "M": 1e6, "B": 1e9}
    try:
        return int(float(size[:-1]) * units[size[-1]])
    except (KeyError, ValueError, IndexError):
        return 0


def digest(name: str) -> str:
    """The model's weights digest as /api/tags, /api/ps and /api/pull report it (hex, without ``sha256:``)."""
    return hashlib.sha256(name.encode()).hexdigest()


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
        if not name or name_parts(name) is None:
            raise ValueError(f"invalid model spec {spec!r}")
        if dim is None:
            known = KNOWN_MODELS.get(name_parts(name)[2].lower())  # type: ignore[index]
            dim = known.dim if known else MINILM_DIM
        if dim < 1:
            raise ValueError(f"model {spec!r}: dimension must be >= 1")
        return cls(canonical_name(name), dim)

    @property
    def known(self) -> Known:
        """The model's entry in the table of well-known models, or a generic BERT-like one."""
        parts = name_parts(self.name)
        known = KNOWN_MODELS.get(parts[2].lower()) if parts else None
        return known or Known(self.dim, "bert", "bert", "unknown", self.dim * 120_000, UNKNOWN_CONTEXT, None)

    @property
    def is_hash_model(self) -> bool:
        """A model named ``hash-*`` is embedded by the hash backend on any server: with ``--backend minilm`` it
        serves a random-vector model beside the real one (a retrieval self-test must refuse it)."""
        return self.name.startswith("hash-")

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
            "digest": digest(self.name),
            "details": self.details(),
        }


class Catalog:
    """The models one server serves, found by name as Ollama matches names."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        specs = list(specs)
        self.models: dict[str, ModelSpec] = {s.name: s for s in specs}
        self._by_key: dict[tuple[str, ...] | None, ModelSpec] = {name_key(s.name): s for s in specs}

    def find(self, name: str) -> ModelSpec | None:
        return self._by_key.get(name_key(name))
