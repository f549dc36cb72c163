"""Model identity by name, the one rule everywhere a model is compared (Python and SQL alike). A leaf: no imports
from the project, so the store, the engine, the client and the front-ends can all use it.

Ollama resolves a name the way `canonical` does: surrounding whitespace is not part of it, letters compare without
case, the default registry (`registry.ollama.ai/`) and namespace (`library/`) may be left out, and a missing tag is
`latest` (`all-minilm` = `all-minilm:latest` = `library/all-minilm` = `All-MiniLM:latest`). Names are recorded as the
operator wrote them and compared by their canonical form; core/db/modelnames.py builds the same rule, from the
same pieces, as a PostgreSQL expression for comparisons made inside a statement (tested against `canonical`).

A column's identity is model + dimensions + text prefix (core/identity.py records it); a prefix compares as written,
None and '' being the same absent prefix (`same_prefix`).
"""

from __future__ import annotations

import re

#: What `canonical` strips, lowers and rewrites, in order: the same pieces make its SQL form (core/db/modelnames.py).
WHITESPACE = " \t\n\r\f\v"
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # ASCII only: PostgreSQL's lower() depends on the database's locale
LOWER = UPPER.lower()
#: (pattern, replacement), applied once each in order; read the same by Python's `re` and PostgreSQL's regexes.
STEPS = (
    (r"^registry\.ollama\.ai/([^/]+/[^/]+)$", r"\1"),  # the default registry of a host/namespace/model name
    (r"^library/([^/]+)$", r"\1"),  # the default namespace
    (r":(latest)?$", ""),  # the default tag (an empty tag is the default too)
)
_ASCII_LOWER = str.maketrans(UPPER, LOWER)
_COMPILED = tuple((re.compile(pattern), replacement) for pattern, replacement in STEPS)


def canonical(name: str | None) -> str:
    """The form two names of one model share (None: ''); for comparing, never for display or requests."""
    text = (name or "").strip(WHITESPACE).translate(_ASCII_LOWER)
    for pattern, replacement in _COMPILED:
        text = pattern.sub(replacement, text, count=1)
    return text


def same_model(a: str | None, b: str | None) -> bool:
    """Do two names name one model (as Ollama resolves them)?"""
    return canonical(a) == canonical(b)


def same_prefix(a: str | None, b: str | None) -> bool:
    """Text (or query) prefixes compare as written; None and '' are both no prefix."""
    return (a or "") == (b or "")
