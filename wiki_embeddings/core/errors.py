"""Small rules about errors shared by every layer (a leaf: no project imports)."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An error's first non-empty line, or its class name when it says nothing: what one-line messages show."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
