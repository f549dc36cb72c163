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
from urllib.parse import unquote, urlsplit, urlunsplit

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


# ---------------------------------------------------------------------------- passwords in connection URLs
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_URL_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)@")
#: User-info up to the LAST `@`: (scheme://user:, password, the rest), for a password with an unescaped `/?#`.
_URL_WIDE_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/?#]*:?)(.*)@(.*)$", re.DOTALL)
_URL_PASSWORD_PARAM = re.compile(r"[?&]password=([^&#\s]*)", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def url_secrets(url: str | None) -> list[str]:
    """Every spelling of the password in a libpq URL or `key=value` string, as written and percent-decoded.

    Read with plain patterns, not a URL parser: libpq echoes a malformed URL whole in its error message
    (`invalid IPv6 host address in URI: "postgresql://u:PW@[..."`), exactly when a parser gives up.
    """
    if not url:
        return []
    found: list[str] = []
    userinfo = _URL_USERINFO.match(url)
    if userinfo and ":" in userinfo.group(1):
        found.append(userinfo.group(1).split(":", 1)[1])
    wide = _URL_WIDE_USERINFO.match(url)
    if wide and wide.group(1).endswith(":") and wide.group(2):  # a password holding an unescaped / ? # or @
        found.append(wide.group(2))
    found += _URL_PASSWORD_PARAM.findall(url)
    for value in _KEYWORD_PASSWORD.findall(url):
        found.append(value[1:-1] if value.startswith("'") and value.endswith("'") and len(value) > 1 else value)
    out: list[str] = []
    for secret in found:
        for spelling in (secret, unquote(secret)):
            if spelling and spelling not in out:
                out.append(spelling)
    return out


_PASSWORD_IN_URL = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """Hide a password in a libpq/HTTP URL (userinfo or `password=` parameter) or a libpq `key=value` string.

    A password holding an unescaped `/`, `?` or `#` (a common slip: they must be percent-encoded) ends the URL's
    authority early for a parser, so the password would show as a port or a path: everything from the user
    name's `:` to the last `@` is hidden then."""
    if not _URL_SCHEME.match(url):
        return _KEYWORD_PASSWORD.sub(lambda m: m.group(0)[: m.start(1) - m.start(0)] + "***", url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    wide = _URL_WIDE_USERINFO.match(url) if "@" not in netloc else None
    if wide and wide.group(1).endswith(":"):
        return wide.group(1) + "***@" + _PASSWORD_IN_URL.sub(r"\1***", wide.group(3))
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            user, _ = userinfo.split(":", 1)
            userinfo = f"{user}:***"
        netloc = f"{userinfo}@{host}"
    masked = urlunsplit((parts.scheme, netloc, parts.path, _PASSWORD_IN_URL.sub(r"\1***", parts.query), ""))
    return masked
