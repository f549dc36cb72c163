"""The seam to a model server: one small protocol (base.py), the pooled HTTP client both implementations share
(pooled.py), and the implementations: Ollama's API (ollama.py) and the OpenAI-compatible API (openai.py)."""

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
from wiki_embeddings.core.embedders.openai import OpenAIClient
from wiki_embeddings.core.embedders.pooled import PooledClient

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
    "OpenAIClient",
    "PooledClient",
    "RunnerCrashed",
    "ServerUnavailable",
]
