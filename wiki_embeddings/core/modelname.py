"""Model identity by name, the one rule everywhere a model is compared (Python and SQL alike). A leaf: no imports
from the project, so the store, the engine, the client and the front-ends can all use it.

Ollama resolves a name the way `canonical` does: surrounding whitespace is not part of it, letters compare without
case, the default registry (`registry.ollama.ai/`) and namespace (`library/`) may be left out, and a missing tag is
`latest` (`all-minilm` = `all-minilm:latest` = `library/all-minilm` = `All-MiniLM:latest`). Names are recorded as the
operator wrote them and compared by their canonical form; `canonical_sql` is the same rule as a PostgreSQL
expression, for comparisons that must happen inside a statement (tested against `canonical` on a real server).

A column's identity is model + dimensions + text prefix (core/identity.py records it); a prefix compares as written,
None and '' being the same absent prefix (`same_prefix`).
"""

from __future__ import annotations

import re

_WHITESPACE = " \t\n\r\f\v"
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER = _UPPER.lower()
_ASCII_LOWER = str.maketrans(_UPPER, _LOWER)  # ASCII only: PostgreSQL's lower() depends on the database's locale
# (pattern, replacement) in order; each is read the same by Python's `re` and PostgreSQL's regular expressions.
_STEPS = (
    (r"^registry\.ollama\.ai/([^/]+/[^/]+)$", r"\1"),  # the default registry of a host/namespace/model name
    (r"^library/([^/]+)$", r"\1"),  # the default namespace
    (r":(latest)?$", ""),  # the default tag (an empty tag is the default too)
)
_COMPILED = tuple((re.compile(pattern), replacement) for pattern, replacement in _STEPS)


def canonical(name: str | None) -> str:
    """The form two names of one model share (None: ''); for comparing, never for display or requests."""
    text = (name or "").strip(_WHITESPACE).translate(_ASCII_LOWER)
    for pattern, replacement in _COMPILED:
        text = pattern.sub(replacement, text, count=1)
    return text


def same_model(a: str | None, b: str | None) -> bool:
    """Do two names name one model (as Ollama resolves them)?"""
    return canonical(a) == canonical(b)


def canonical_sql(expr: str) -> str:
    """`canonical` as a PostgreSQL expression over the SQL expression `expr` (a column, a sub-select, a
    placeholder): for a comparison made inside a statement. No braces or percent signs, so it can be composed
    into `psycopg.sql.SQL(...).format(...)` text."""
    out = f"translate(btrim({expr}, E' \\t\\n\\r\\f\\x0b'), '{_UPPER}', '{_LOWER}')"
    for pattern, replacement in _STEPS:
        out = f"regexp_replace({out}, '{pattern}', '{replacement}')"
    return out


def same_prefix(a: str | None, b: str | None) -> bool:
    """Text (or query) prefixes compare as written; None and '' are both no prefix."""
    return (a or "") == (b or "")
