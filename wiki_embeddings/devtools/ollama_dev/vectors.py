"""Vectors as the answer carries them: serialised once per (model, text), cached, then shaped by faults.

Serialising a vector is most of a cheap request's cost, so the JSON bytes are what is cached; the
``dimensions`` cut and the vector marker faults (NaN, Infinity, a wrong length, an empty vector) act on
those bytes, since orjson cannot emit NaN or Infinity.
"""

from __future__ import annotations

import threading
import typing
from collections import OrderedDict

import numpy as np
import orjson

from wiki_embeddings.devtools.ollama_dev.backends import Backend, hash_vector
from wiki_embeddings.devtools.ollama_dev.models import ModelSpec

_NUMPY = orjson.OPT_SERIALIZE_NUMPY
VECTOR_MARKERS = frozenset({"nan_json_marker", "inf_marker", "wrong_dim_marker", "empty_vector_marker"})


class VectorCache:
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


class Vectorizer:
    """The backend behind the cache: serialised vectors for a request's inputs."""

    def __init__(self, backend: Backend, cache: VectorCache) -> None:
        self.backend = backend
        self.cache = cache

    def vectors(
        self,
        spec: ModelSpec,
        inputs: list[str],
        originals: list[str],
        markers: dict[str, str],
        dims: int | None = None,
        salt: str | None = None,
        serial: bool = False,
    ) -> list[bytes]:
        """JSON arrays for ``inputs`` (as evaluated); vector marker faults are checked on ``originals``.

        ``dims``: Matryoshka truncation to the first ``dims`` values, re-normalised to unit length.
        ``salt`` (fault ``model_salt``): other weights behind the name, so other vectors. ``serial`` (fault
        ``serial_inputs``): every input computed on its own, one after another, and the cache neither read
        nor filled, as Ollama evaluates a request's inputs.
        """
        special = VECTOR_MARKERS & markers.keys()
        keys = [(spec.name if salt is None else f"{spec.name}#{salt}", t) for t in inputs]
        if serial:
            parts: list[bytes | None] = [self._serialised(spec, [text], salt)[0] for text in inputs]
        else:
            parts = self.cache.get_many(keys)
        missing = [i for i, p in enumerate(parts) if p is None]
        if missing:
            computed = self._serialised(spec, [inputs[i] for i in missing], salt)
            fresh = list(zip([keys[i] for i in missing], computed, strict=True))
            self.cache.put_many(fresh)
            for i, (_, value) in zip(missing, fresh, strict=True):
                parts[i] = value
        out = typing.cast(list[bytes], parts)
        if dims:
            out = [shorten(part, dims) for part in out]
        if special:
            out = [faulty_vector(part, text, markers) for part, text in zip(out, originals, strict=True)]
        return out

    def _serialised(self, spec: ModelSpec, texts: list[str], salt: str | None) -> list[bytes]:
        """The vectors of ``texts`` computed now, as JSON arrays."""
        if salt is None and not spec.is_hash_model:
            vectors = self.backend.embed(spec, texts)
        elif salt is None:  # a `hash-*` model: random vectors beside the real one (retrieval tests)
            vectors = [hash_vector(spec.name, t, spec.dim) for t in texts]
        else:  # fault model_salt: the weights behind the name changed
            vectors = [hash_vector(f"{spec.name}#{salt}", t, spec.dim) for t in texts]
        return [orjson.dumps(v, option=_NUMPY) for v in vectors]


def shorten(part: bytes, dims: int) -> bytes:
    """A serialised unit vector cut to its first ``dims`` values and re-normalised, as Ollama's ``dimensions``."""
    vec = np.asarray(orjson.loads(part)[:dims], dtype=np.float32)
    vec /= max(float(np.sqrt(np.dot(vec, vec))), 1e-12)
    return orjson.dumps(vec, option=_NUMPY)


def faulty_vector(part: bytes, text: str, markers: dict[str, str]) -> bytes:
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
