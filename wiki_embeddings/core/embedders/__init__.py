"""The seam to a model server: one small protocol (base.py) and its implementations (ollama.py)."""

from wiki_embeddings.core.embedders.base import (
    AmbiguousFailure,
    Answer,
    ClientStats,
    ContextExceeded,
    Embedder,
    EmbedFailure,
    InputRejected,
    InvalidVectors,
    ModelNotFound,
    RunnerCrashed,
    ServerUnavailable,
)
from wiki_embeddings.core.embedders.ollama import OllamaClient

__all__ = [
    "AmbiguousFailure",
    "Answer",
    "ClientStats",
    "ContextExceeded",
    "EmbedFailure",
    "Embedder",
    "InputRejected",
    "InvalidVectors",
    "ModelNotFound",
    "OllamaClient",
    "RunnerCrashed",
    "ServerUnavailable",
]
