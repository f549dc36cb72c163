"""One typed settings object, built from the environment and then overridden by CLI flags or run config.

Every runbook knob lives here once, so the CLI, the Dagster resources and the tests agree on names,
defaults and environment variables.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

DEFAULT_OLLAMA_URL = "http://ollama:11434"
DEFAULT_MODEL = "nomic-embed-text"
LOCAL_SERVER_MODEL = "all-minilm"
DEFAULT_STOP_FILE = "/tmp/wiki-embed.stop"
# One request embeds at most this many chunks: a batch is one HTTP body, one claim and one write transaction
# (an absurd value used to end deep in SQL as `bigint out of range`).
MAX_BATCH_SIZE = 4096
# Polite mode's default target request duration: a live query waits behind about this much of a batch.
DEFAULT_TARGET_REQUEST_SEC = 0.5

# Environment variable for each setting that has one (the runbook's spellings where it has them).
ENV_VARS: dict[str, str] = {
    "database_url": "DATABASE_URL",
    "ollama_url": "OLLAMA_URL",
    "ollama_model": "OLLAMA_MODEL",
    "table": "WIKI_EMBED_TABLE",
    "id_column": "WIKI_EMBED_ID_COLUMN",
    "text_column": "WIKI_EMBED_TEXT_COLUMN",
    "embedding_column": "WIKI_EMBED_EMBEDDING_COLUMN",
    "state_schema": "WIKI_EMBED_STATE_SCHEMA",
    "text_prefix": "WIKI_EMBED_TEXT_PREFIX",
    "query_prefix": "WIKI_EMBED_QUERY_PREFIX",
    "stop_file": "EMBED_STOP_FILE",
    "failure_log": "WIKI_EMBED_FAILURE_LOG",
    "max_attempts": "WIKI_EMBED_MAX_ATTEMPTS",
    "retries": "WIKI_EMBED_RETRIES",
    "backoff_base_sec": "WIKI_EMBED_BACKOFF_BASE_SEC",
    "backoff_max_sec": "WIKI_EMBED_BACKOFF_MAX_SEC",
    "concurrency": "WIKI_EMBED_CONCURRENCY",
    "polite": "WIKI_EMBED_POLITE",
    "target_request_sec": "WIKI_EMBED_TARGET_REQUEST_SEC",
    "with_ollama": "OLALA_START_OLLAMA",
    "db_reconnect_sec": "WIKI_EMBED_DB_RECONNECT_SEC",
    "keep_alive": "WIKI_EMBED_KEEP_ALIVE",
    "num_ctx": "WIKI_EMBED_NUM_CTX",
    "request_dimensions": "WIKI_EMBED_REQUEST_DIMENSIONS",
    "load_timeout_sec": "WIKI_EMBED_LOAD_TIMEOUT_SEC",
    "busy_wait_sec": "WIKI_EMBED_BUSY_WAIT_SEC",
    "db_statement_timeout_sec": "WIKI_EMBED_DB_STATEMENT_TIMEOUT_SEC",
    "server_wait_sec": "WIKI_EMBED_SERVER_WAIT_SEC",
    "api": "WIKI_EMBED_API",
    "api_key": "WIKI_EMBED_API_KEY",
}
# The model servers' APIs (WIKI_EMBED_API): Ollama's own, or the OpenAI-compatible `/v1/embeddings` (TEI, vLLM,
# infinity-emb, llama.cpp, Ollama's /v1, hosted APIs). OLLAMA_URL holds the server URLs for either.
APIS = ("ollama", "openai")
DEFAULT_KEEP_ALIVE = "30m"

_TRUE = {"1", "true", "yes", "on"}


def is_true(raw: str | None) -> bool:
    """How every boolean setting and flag value is read: 1/true/yes/on, any case and spacing."""
    return raw is not None and raw.strip().lower() in _TRUE


@dataclass(frozen=True)
class Settings:
    """Everything a backfill needs to know; immutable so a run's options can be saved and replayed."""

    database_url: str | None = None
    ollama_url: str = DEFAULT_OLLAMA_URL  # comma-separated: several servers are used round-robin
    ollama_model: str | None = None  # None: the model recorded for the table, else DEFAULT_MODEL
    table: str = "public.wiki_chunks"
    id_column: str = "id"
    text_column: str = "content"
    embedding_column: str = "embedding"
    state_schema: str = "wiki_embeddings"
    text_prefix: str = ""
    query_prefix: str = ""  # prepended to queries (retrieval self-test before a swap), e.g. 'search_query: '
    # The runbook's flags.
    batch_size: int = 64
    report_every: int = 10
    timeout_sec: float = 120.0
    sleep_ms: int = 0
    max_chars: int = 2000
    failure_log: str | None = None
    max_chunks: int | None = None
    stop_file: str = DEFAULT_STOP_FILE
    with_ollama: bool = False
    # Beyond the runbook.
    # Requests in flight per server: 0 = self-tuning (core/tuning.py; "auto"), N = pinned at N.
    concurrency: int = 0
    # Polite mode (live queries share the server): batches sized to `target_request_sec` at depth 1.
    # None: on for maintenance runs (--max-chunks) once the readiness flag is set, or when a target is given.
    polite: bool | None = None
    target_request_sec: float | None = None  # None: DEFAULT_TARGET_REQUEST_SEC
    max_attempts: int = 3
    retries: int = 5
    backoff_base_sec: float = 0.5
    backoff_max_sec: float = 30.0
    retry_failed: bool = False
    include_quarantined: bool = False
    id_min: int | None = None  # inclusive
    id_max: int | None = None  # inclusive
    drop_vector_index: bool = False
    # Re-embed chunks whose text changed since they were embedded, after the missing ones. None: only in
    # maintenance runs (the runbook's maintenance is the run with --max-chunks); a bootstrap skips the scan.
    refresh_changed: bool | None = None
    maintenance_work_mem: str = "512MB"  # for rebuilding a dropped vector index
    db_reconnect_sec: float = 60.0  # how long a run waits for a lost database before stopping
    # The model server (real Ollama's knobs).
    keep_alive: str = (
        DEFAULT_KEEP_ALIVE  # sent with every request so the model stays loaded between batches ("-1": forever)
    )
    num_ctx: int | None = None  # options.num_ctx: raise the window up to the model's own maximum
    request_dimensions: bool = False  # ask a Matryoshka model for `dimensions: D` when the column is narrower
    load_timeout_sec: float = 300.0  # allowance for the run's first request, which may pay the model's load
    reembed_cut: bool = False  # also re-embed chunks embedded from a cut (context) or truncated by the server
    busy_wait_sec: float = 30.0  # how long a run retries chunks another session holds before ending `locked`
    db_statement_timeout_sec: float = 60.0  # server-side bound of a pipeline statement; the client adds 5 s
    # How long a run waits while every model server is out of the rotation (core/health.py) before exit 3.
    server_wait_sec: float = 300.0
    # Which API the model servers speak (APIS); under `openai`, --num-ctx is the window in tokens when the server
    # publishes none, --keep-alive is ignored, --with-ollama refused. The bearer key is never printed or stored.
    api: str = "ollama"
    api_key: str | None = field(default=None, repr=False)
    # Run window (core/window.py): the run ends safely, as on the stop file, at `until` (HH:MM local time, or
    # HH:MM+09:00 / HH:MMZ with an explicit offset: its next occurrence) or after `max_minutes`.
    until: str | None = None
    max_minutes: float | None = None

    @property
    def ollama_urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.ollama_url.split(",") if u.strip()]

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed; None values are ignored so unset flags keep the defaults."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def validate(self) -> Settings:
        if self.concurrency < 0:
            raise ValueError(f"concurrency must be 'auto' (0) or at least 1, got {self.concurrency}")
        if self.target_request_sec is not None and self.target_request_sec <= 0:
            raise ValueError(f"target-request-sec must be positive, got {self.target_request_sec}")
        for name in ("batch_size", "report_every", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.batch_size > MAX_BATCH_SIZE:
            raise ValueError(
                f"batch-size must be at most {MAX_BATCH_SIZE} chunks per request, got {self.batch_size} "
                "(64 to 256 is typical; use --concurrency for more throughput)"
            )
        for name in ("timeout_sec", "max_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.sleep_ms < 0:
            raise ValueError(f"sleep-ms must not be negative, got {self.sleep_ms}")
        if self.max_chunks is not None and self.max_chunks < 0:
            raise ValueError(f"max-chunks must not be negative, got {self.max_chunks}")
        if self.api not in APIS:
            raise ValueError(f"WIKI_EMBED_API (--api) must be one of {', '.join(APIS)}, got {self.api!r}")
        if self.api == "openai" and self.with_ollama:
            raise ValueError(
                "--with-ollama (OLALA_START_OLLAMA) starts a local Ollama-protocol server: it cannot stand in for "
                "an OpenAI-compatible server (WIKI_EMBED_API=openai); start that server and set OLLAMA_URL to it"
            )
        if not self.ollama_urls:
            raise ValueError("OLLAMA_URL is empty")
        for url in self.ollama_urls:
            check_http_url(url)
        if self.num_ctx is not None and self.num_ctx < 1:
            raise ValueError(f"num-ctx must be at least 1, got {self.num_ctx}")
        if self.load_timeout_sec <= 0:
            raise ValueError(f"load-timeout-sec must be positive, got {self.load_timeout_sec}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max-minutes must be positive, got {self.max_minutes}")
        if self.until is not None:
            from wiki_embeddings.core.window import parse_until

            parse_until(self.until)  # a clear ValueError for a malformed time
        return self

    def run_deadline(self, now: float | None = None) -> tuple[float, str] | None:
        """(epoch seconds, reason) of the run window's end, or None without --until / --max-minutes."""
        from wiki_embeddings.core.window import run_deadline

        return run_deadline(self.until, self.max_minutes, now)

    def options_for_resume(self) -> dict[str, Any]:
        """The run options worth replaying on `resume` (never the database URL: it may hold a password)."""
        keep = [
            "ollama_url",
            "ollama_model",
            "table",
            "id_column",
            "text_column",
            "embedding_column",
            "text_prefix",
            "batch_size",
            "report_every",
            "timeout_sec",
            "sleep_ms",
            "max_chars",
            "failure_log",
            "max_chunks",
            "stop_file",
            "with_ollama",
            "concurrency",
            "polite",
            "target_request_sec",
            "max_attempts",
            "retries",
            "id_min",
            "id_max",
            "refresh_changed",
            "keep_alive",
            "num_ctx",
            "request_dimensions",
            "load_timeout_sec",
            "api",  # never the key: `resume` reads WIKI_EMBED_API_KEY from the environment
        ]
        options = {k: getattr(self, k) for k in keep}
        # Credentials in OLLAMA_URL are never written to the bookkeeping: `resume` takes the URL from the
        # environment then (options["ollama_url"] is None).
        if any(url_secrets(u) for u in self.ollama_urls):
            options["ollama_url"] = None
        return options

    def masked(self) -> dict[str, Any]:
        """Effective settings for printing, with secrets masked."""
        out = dataclasses.asdict(self)
        out["database_url"] = mask_url(self.database_url) if self.database_url else None
        out["ollama_url"] = ",".join(mask_url(u) for u in self.ollama_urls)
        out["api_key"] = "***" if self.api_key else None
        return out

    def api_warnings(self) -> list[str]:
        """What the settings ask that the chosen API cannot do (said once at a run's start)."""
        if self.api == "openai" and self.keep_alive != DEFAULT_KEEP_ALIVE:
            return [
                "note: --keep-alive (WIKI_EMBED_KEEP_ALIVE) is Ollama's and is ignored under WIKI_EMBED_API=openai "
                "(the server keeps its model loaded)"
            ]
        return []


def _coerce(name: str, raw: str) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(Settings)}[name]
    if name == "concurrency" and raw.strip().lower() == "auto":
        return 0
    if name == "api":
        return raw.strip().lower()
    if "bool" in str(kind):
        return is_true(raw)
    if "int" in str(kind) and "float" not in str(kind):
        return int(raw)
    if "float" in str(kind):
        return float(raw)
    return raw


def from_env(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from environment variables, then `overrides` (CLI flags / run config) on top."""
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    for name, var in ENV_VARS.items():
        raw = env.get(var)
        if raw is not None and raw != "":
            values[name] = _coerce(name, raw)
    settings = Settings(**values)
    return settings.replace(**overrides)


_PASSWORD_IN_URL = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """Hide a password in a libpq/HTTP URL (userinfo or `password=` parameter)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            user, _ = userinfo.split(":", 1)
            userinfo = f"{user}:***"
        netloc = f"{userinfo}@{host}"
    masked = urlunsplit((parts.scheme, netloc, parts.path, _PASSWORD_IN_URL.sub(r"\1***", parts.query), ""))
    return masked


def check_http_url(url: str) -> None:
    """A model-server URL must be `http(s)://host[:port]`: anything else is a configuration error, said plainly
    (masked), instead of a traceback or six retries against an address that cannot exist."""
    shown = mask_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"OLLAMA_URL {shown!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"OLLAMA_URL {shown!r} needs a scheme: write it as http://HOST:PORT (e.g. http://ollama:11434)"
        )
    if not parts.hostname:
        raise ValueError(f"OLLAMA_URL {shown!r} has no host name")
    if port == 0:
        raise ValueError(f"OLLAMA_URL {shown!r}: port 0 is not a port a server can listen on")


def redact(text: str, secrets: Sequence[str | None]) -> str:
    """Remove known secret strings (e.g. the database password) from a message before it is shown."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


_URL_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)@")
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
    found += _URL_PASSWORD_PARAM.findall(url)
    for value in _KEYWORD_PASSWORD.findall(url):
        found.append(value[1:-1] if value.startswith("'") and value.endswith("'") and len(value) > 1 else value)
    out: list[str] = []
    for secret in found:
        for spelling in (secret, unquote(secret)):
            if spelling and spelling not in out:
                out.append(spelling)
    return out
