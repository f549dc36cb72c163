"""Model identity by Ollama's rule (a leaf: no project imports): `name` and `name:latest` are one model."""

from __future__ import annotations


def canonical(name: str | None) -> str:
    """The name as Ollama resolves it: surrounding whitespace and a `:latest` tag do not count."""
    text = (name or "").strip()
    return text[: -len(":latest")] if text.endswith(":latest") else text


def same_model(a: str | None, b: str | None) -> bool:
    return canonical(a) == canonical(b)
