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
import unicodedata

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


# ---------------------------------------------------------------------------- names checked at every entry
#: Never in a model name, for any server: a quote or a character that is no printable text (controls, newlines,
#: format characters such as bidi overrides or zero-width ones, line separators). Such a name would print as
#: several lines of `status`, or break out of a quoted value in the env file.
QUOTES = "'\"`"
MAX_NAME_LENGTH = 512
_UNPRINTABLE = ("Cc", "Cf", "Zl", "Zp")
#: Ollama's name grammar (ollama/ollama types/model/name.go, `isValidPart`): each part starts with a letter, a
#: digit or `_`, then letters, digits, `_`, `-`, and `.` (not in a namespace) or `:` (host and digest only).
_PART_LIMITS = {"host": 350, "namespace": 80, "model": 80, "tag": 80, "digest": 80}
_PART_EXTRA = {"host": "-_.:", "namespace": "-_", "model": "-_.", "tag": "-_.", "digest": "-_:"}
_PART_WORDS = {
    "host": "letters, digits, '_', '-', '.' and ':'",
    "namespace": "letters, digits, '_' and '-'",
    "model": "letters, digits, '_', '-' and '.'",
    "tag": "letters, digits, '_', '-' and '.'",
    "digest": "letters, digits, '_', '-' and ':'",
}


class InvalidModelName(ValueError):
    """A model name no server could mean (or, for Ollama, outside its name grammar)."""


def _valid_part(kind: str, text: str) -> bool:
    if not 1 <= len(text) <= _PART_LIMITS[kind]:
        return False
    first, rest = text[0], text[1:]
    return _alnum_(first) and all(_alnum_(c) or c in _PART_EXTRA[kind] for c in rest)


def _alnum_(char: str) -> bool:
    return char.isascii() and (char.isalnum() or char == "_")


def _cut_last(text: str, sep: str) -> tuple[str, str, bool]:
    """Ollama's `cutPromised`: cut at the last `sep`; an empty side is a missing part (never valid)."""
    before, found, after = text.rpartition(sep)
    if not found:
        return text, "", False
    return before or "\0", after or "\0", True


def ollama_name_problem(name: str) -> str | None:
    """Why Ollama would refuse `name`, or None. Cut as Ollama's `ParseNameBare` cuts it - `@digest` last, then the
    tag after the last `:` that follows the last `/`, the model after the last `/`, the namespace after the one
    before, the host (a `scheme://` before it dropped) - and each part checked by `isValidPart`."""
    rest, parts = name, []
    if "@" in rest:
        rest, digest, _ = _cut_last(rest, "@")
        parts.append(("digest", digest))
    if rest.rfind(":") > rest.rfind("/"):
        rest, tag, _ = _cut_last(rest, ":")
        parts.append(("tag", tag))
    for kind in ("model", "namespace"):
        rest, part, promised = _cut_last(rest, "/")
        if not promised:
            parts.append((kind, rest))
            break
        parts.append((kind, part))
    else:
        parts.append(("host", rest.split("://", 1)[-1]))
    for kind, part in reversed(parts):
        if not _valid_part(kind, part):
            allowed = _PART_WORDS[kind]
            shown = "nothing" if part == "\0" else repr(part)
            return (
                f"its {kind} is {shown}: Ollama takes 1 to {_PART_LIMITS[kind]} of {allowed}, starting with a letter, "
                "a digit or '_'"
            )
    return None


def check_model_name(name: str, api: str = "ollama", label: str = "model") -> str:
    """`name` when a server of `api` could mean it; else InvalidModelName naming `label` (the flag, variable or
    field) and what is wrong. Every server: not empty, no quote, no control, newline or format character, at most
    MAX_NAME_LENGTH characters. Ollama (`api` "ollama"): its name grammar too (`ollama_name_problem`); surrounding
    blanks are not part of the name (`canonical` strips them)."""
    shown = name.encode("unicode_escape").decode("ascii")
    if not name.strip(" "):
        raise InvalidModelName(f"{label}: the model name is empty")
    bad = [c for c in name if c in QUOTES or unicodedata.category(c) in _UNPRINTABLE]
    if bad:
        what = "a quote" if bad[0] in QUOTES else "a control, newline or format character"
        raise InvalidModelName(
            f"{label}: the model name '{shown}' holds {what} ({bad[0].encode('unicode_escape').decode('ascii')!s}); "
            "no model server names a model so"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidModelName(f"{label}: the model name is longer than {MAX_NAME_LENGTH} characters")
    if api == "ollama":
        problem = ollama_name_problem(name.strip(" "))
        if problem:
            raise InvalidModelName(
                f"{label}: {name!r} is not an Ollama model name: {problem} (e.g. nomic-embed-text, "
                "all-minilm:l6-v2, namespace/model:tag)"
            )
    return name
