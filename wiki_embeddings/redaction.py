"""Secrets (the database password, the OpenAI-compatible server's API key) taken out of a message before it is shown,
logged or stored, without mangling the message around them. A leaf: no project imports.

The rule (README "Secrets in messages"):
- A secret is replaced by `***` only where it stands as a whole token: not inside a run of letters and digits (a
  percent escape such as `%3D` before it counts as a boundary). With the key `k`, `wiki-embeddings verify` stays as
  it is; `Bearer sk-...`, `:pw@`, `password=pw`, `"KEY"` are redacted.
- A secret shorter than `MIN_FREE_TEXT` (8) characters - a placeholder such as `ollama` (Ollama's own OpenAI docs)
  or `EMPTY` (vLLM's), or a toy password - is common text: it is redacted only where a credential is written, a
  URL's user-info (`://user:SECRET@`), a `password=` / `api_key=` / `key=` / `token=` parameter and an
  `Authorization` / `Bearer` / `Basic` header value, never as a word of ordinary text (`--api ollama` stays).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MIN_FREE_TEXT = 8
_EDGE = r"[A-Za-z0-9]"
#: Where a credential is written, whatever its length: the text just before the secret.
_CREDENTIAL_LEAD = (
    r"(?P<lead>(?i:://[^/\s@:]*:"
    r"|(?:password|passwd|api_?key|key|token|secret)[\"']?\s*[=:]\s*[\"']?"
    r"|authorization[\"']?\s*[=:]\s*[\"']?(?:(?:bearer|basic|token)\s+)?"
    r"|\b(?:bearer|basic)\s+))"
)


def _pattern(secret: str) -> re.Pattern[str]:
    escaped = re.escape(secret)
    after = f"(?!{_EDGE})" if re.match(_EDGE, secret[-1]) else ""
    if len(secret) < MIN_FREE_TEXT:
        return re.compile(f"{_CREDENTIAL_LEAD}{escaped}{after}")
    before = f"(?:(?<!{_EDGE})|(?<=%[0-9A-Fa-f]{{2}}))" if re.match(_EDGE, secret[0]) else ""
    return re.compile(f"(?P<lead>){before}{escaped}{after}")


def redact(text: str, secrets: Sequence[str | None]) -> str:
    """`text` with every known secret replaced by `***` where it stands as a secret (see the module's rule)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = _pattern(secret).sub(lambda m: m.group("lead") + "***", text)
    return text
