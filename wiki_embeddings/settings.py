"""One typed settings object, built from the environment and then overridden by CLI flags or run config.

Every runbook knob lives here once, so the CLI, the Dagster resources and the tests agree on names,
defaults and environment variables.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from wiki_embeddings.checks import (
    AT_LEAST_ONE,
    BIGINT,
    NOT_NEGATIVE,
    POSITIVE_SECONDS,
    SECONDS,
    Range,
    check_header_secret,
    check_number,
    choice_word,
    keep_alive_problem,
    parse_bool,
    parse_number,
)
from wiki_embeddings.redaction import mask_url as mask_url  # re-exported: the CLI, the run and Dagster use them
from wiki_embeddings.redaction import redact as redact
from wiki_embeddings.redaction import url_secrets as url_secrets

DEFAULT_OLLAMA_URL = "http://ollama:11434"
DEFAULT_MODEL = "nomic-embed-text"
LOCAL_SERVER_MODEL = "all-minilm"
DEFAULT_STOP_FILE = "/tmp/wiki-embed.stop"
# One request embeds at most this many chunks: a batch is one HTTP body, one claim and one write transaction
# (an absurd value used to end deep in SQL as `bigint out of range`).
MAX_BATCH_SIZE = 4096
LONG_TEXT_CHOICES = ("pool", "cut")
# Polite mode's default target request duration: a live query waits behind about this much of a batch.
DEFAULT_TARGET_REQUEST_SEC = 0.5
# The model servers' APIs (WIKI_EMBED_API): Ollama's own, or the OpenAI-compatible `/v1/embeddings` (TEI, vLLM,
# infinity-emb, llama.cpp, Ollama's /v1, hosted APIs). OLLAMA_URL holds the server URLs for either.
APIS = ("ollama", "openai")
DEFAULT_KEEP_ALIVE = "30m"

# The smallest context window (tokens) a run accepts: below it a chunk is embedded from a few characters
# (WIKI_EMBED_NUM_CTX=1 embedded every chunk from one character and reported `completed`).
MIN_NUM_CTX = 64


_TRUE = {"1", "true", "yes", "on"}


def is_true(raw: str | None) -> bool:
    """A lenient reading of a value in a file the operators edit (the readiness flag): 1/true/yes/on, any case and
    spacing. A setting is read strictly instead (`checks.parse_bool`: anything else is refused, naming it)."""
    return raw is not None and raw.strip().lower() in _TRUE


def parse_concurrency(raw: str) -> int:
    """`auto` (0: self-tuning, any case and spacing) or a number of requests in flight per server."""
    return 0 if choice_word(raw) == "auto" else parse_number(int, raw)


@dataclass(frozen=True)
class Option:
    """How a setting is set from outside, kept beside the field: the one list the environment, the CLI's flags
    (cli/parser.py), `resume` and the Dagster config/resources (defs/) derive theirs from."""

    env: str | None = None  # environment variable (the runbook's spellings where it has them)
    group: str | None = None  # the CLI's argument group (`FLAG_GROUPS`); None: no flag
    help: str | None = None  # the flag's help text
    flag: str | None = None  # None: --field-name
    negative: str | None = None  # a flag that sets it False (tri-state booleans: None means "decide for me")
    negative_help: str | None = None
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # text -> value, for the flag and the environment variable
    choices: tuple[str, ...] | None = None  # the flag's allowed values (after `parse`)
    resume: bool = False  # replayed by `resume` (core/db runs.options)
    range: Range | None = None  # the values a number may take (checks.Range: finite, bounds): CLI, env, Dagster


#: The CLI's argument groups, keyed by `Option.group`.
FLAG_GROUPS = {
    "common": "database and model (environment variables in brackets)",
    "runbook": "runbook flags",
    "more": "more",
    "server": "model server (real Ollama's knobs)",
}


def _setting(default: Any, **option: Any) -> Any:
    return field(default=default, metadata={"option": Option(**option)})


@dataclass(frozen=True)
class Settings:
    """Everything a backfill needs to know; immutable so a run's options can be saved and replayed. Each field's
    environment variable, flag and help live in its `Option` (fields listed once: everything else derives)."""

    database_url: str | None = _setting(
        None, env="DATABASE_URL", group="common", help="libpq URL [DATABASE_URL]; unset: the embedded PostgreSQL"
    )
    table: str = _setting(
        "public.wiki_chunks",
        env="WIKI_EMBED_TABLE",
        group="common",
        help="chunk table, schema-qualified allowed [WIKI_EMBED_TABLE] (public.wiki_chunks)",
        resume=True,
    )
    id_column: str = _setting(
        "id", env="WIKI_EMBED_ID_COLUMN", group="common", help="[WIKI_EMBED_ID_COLUMN] (id)", resume=True
    )
    text_column: str = _setting(
        "content", env="WIKI_EMBED_TEXT_COLUMN", group="common", help="[WIKI_EMBED_TEXT_COLUMN] (content)", resume=True
    )
    embedding_column: str = _setting(
        "embedding",
        env="WIKI_EMBED_EMBEDDING_COLUMN",
        group="common",
        help="[WIKI_EMBED_EMBEDDING_COLUMN] (embedding)",
        resume=True,
    )
    state_schema: str = _setting("wiki_embeddings", env="WIKI_EMBED_STATE_SCHEMA")
    # comma-separated: several servers are used round-robin
    ollama_url: str = _setting(
        DEFAULT_OLLAMA_URL,
        env="OLLAMA_URL",
        group="common",
        help="comma-separated for several servers [OLLAMA_URL] (http://ollama:11434)",
        resume=True,
    )
    # None: the model recorded for the table, else DEFAULT_MODEL
    ollama_model: str | None = _setting(
        None,
        env="OLLAMA_MODEL",
        group="common",
        flag="--model",
        help="[OLLAMA_MODEL]; unset: the model of the last run",
        resume=True,
    )
    # Which API the model servers speak (APIS); under `openai`, --num-ctx is the window in tokens when the server
    # publishes none, --keep-alive is ignored, --with-ollama refused.
    api: str = _setting(
        "ollama",
        env="WIKI_EMBED_API",
        group="common",
        parse=choice_word,
        choices=APIS,
        help="the servers' API: ollama, or openai (OpenAI-compatible /v1/embeddings: TEI, vLLM, infinity-emb, "
        "llama.cpp; URLs still in OLLAMA_URL, bearer key in WIKI_EMBED_API_KEY) [WIKI_EMBED_API] (ollama)",
        resume=True,
    )
    # The bearer key of an OpenAI-compatible server: environment only (never a flag), never printed or stored.
    api_key: str | None = field(default=None, repr=False, metadata={"option": Option(env="WIKI_EMBED_API_KEY")})
    text_prefix: str = _setting(
        "",
        env="WIKI_EMBED_TEXT_PREFIX",
        group="common",
        help="prepended to every text, e.g. 'search_document: ' [WIKI_EMBED_TEXT_PREFIX]",
        resume=True,
    )
    # prepended to queries (retrieval self-test before a swap), e.g. 'search_query: '
    query_prefix: str = _setting(
        "",
        env="WIKI_EMBED_QUERY_PREFIX",
        group="common",
        help="the model's query prefix, e.g. 'search_query: ' (swap self-test) [WIKI_EMBED_QUERY_PREFIX]",
    )
    max_attempts: int = _setting(
        3,
        env="WIKI_EMBED_MAX_ATTEMPTS",
        group="common",
        help="failures of the same text before quarantine (3)",
        resume=True,
        range=Range(1, 1000),
    )
    # The runbook's flags.
    batch_size: int = _setting(
        64,
        group="runbook",
        help="most chunks per request (64); trouble (503, timeouts) shrinks batches, success grows them back",
        resume=True,
        range=Range(1, MAX_BATCH_SIZE),
    )
    report_every: int = _setting(
        10, group="runbook", help="a progress line every N batches (10)", resume=True, range=AT_LEAST_ONE
    )
    timeout_sec: float = _setting(
        120.0,
        group="runbook",
        help="deadline for one whole embedding request (120)",
        resume=True,
        range=POSITIVE_SECONDS,
    )
    sleep_ms: int = _setting(
        0,
        group="runbook",
        help="pause after each request (0); > 0 means one request in flight",
        resume=True,
        range=Range(0, 3_600_000),
    )
    max_chars: int = _setting(
        2000,
        group="runbook",
        help="text cut to this many characters before sending (2000)",
        resume=True,
        range=Range(1, 2**31 - 1),
    )
    failure_log: str | None = _setting(
        None,
        env="WIKI_EMBED_FAILURE_LOG",
        group="runbook",
        help="JSONL file for chunks that could not be embedded",
        resume=True,
    )
    max_chunks: int | None = _setting(
        None, group="runbook", help="stop after this many chunks (maintenance)", resume=True, range=NOT_NEGATIVE
    )
    # Run window (core/window.py): the run ends safely, as on the stop file, at `until` (HH:MM local time, or
    # HH:MM+09:00 / HH:MMZ with an explicit offset: its next occurrence) or after `max_minutes`.
    until: str | None = _setting(
        None,
        group="runbook",
        metavar="HH:MM",
        help="end the run safely at this time (local, or with an offset: 06:00+09:00)",
    )
    max_minutes: float | None = _setting(
        None, group="runbook", help="end the run safely after this many minutes", range=Range(0, 525_600, low_open=True)
    )
    with_ollama: bool = _setting(
        False,
        env="OLALA_START_OLLAMA",
        group="runbook",
        help="start a local embedding service when OLLAMA_URL does not answer (refused under --api openai) "
        "[OLALA_START_OLLAMA=1]",
        resume=True,
    )
    stop_file: str = _setting(DEFAULT_STOP_FILE, env="EMBED_STOP_FILE", resume=True)
    # Beyond the runbook.
    # Requests in flight per server: 0 = self-tuning (core/tuning.py; "auto"), N = pinned at N.
    concurrency: int = _setting(
        0,
        env="WIKI_EMBED_CONCURRENCY",
        group="more",
        parse=parse_concurrency,
        help="requests in flight per Ollama server: N pins it; auto (default) starts at 1 and adds a queued request "
        "while the server idles between requests, backing off on 503/429/timeouts and latency growth",
        resume=True,
        range=Range(0, 1024),
    )
    # Polite mode (live queries share the server): batches sized to `target_request_sec` at depth 1.
    # None: on for maintenance runs (--max-chunks) once the readiness flag is set, or when a target is given.
    polite: bool | None = _setting(
        None,
        env="WIKI_EMBED_POLITE",
        group="more",
        help="live queries share the server: one request in flight, batches sized to --target-request-sec "
        "(default: on in maintenance runs once the readiness flag is set) [WIKI_EMBED_POLITE]",
        negative="--no-polite",
        negative_help="never polite",
        resume=True,
    )
    # None: DEFAULT_TARGET_REQUEST_SEC
    target_request_sec: float | None = _setting(
        None,
        env="WIKI_EMBED_TARGET_REQUEST_SEC",
        group="more",
        help="polite mode: the longest a request of ours should hold the server, so a user's query waits about "
        "that long at most (0.5; giving it turns polite mode on) [WIKI_EMBED_TARGET_REQUEST_SEC]",
        resume=True,
        range=Range(0, 3600, low_open=True),
    )
    retries: int = _setting(
        5,
        env="WIKI_EMBED_RETRIES",
        group="more",
        help="retries of transport errors / overload before stopping (5)",
        resume=True,
        range=Range(0, 100),
    )
    id_min: int | None = _setting(
        None, group="more", help="only chunks with id >= this", resume=True, range=BIGINT
    )  # inclusive
    id_max: int | None = _setting(
        None, group="more", help="only chunks with id <= this", resume=True, range=BIGINT
    )  # inclusive
    retry_failed: bool = _setting(
        False, group="more", help="only the recorded failures, quarantined included (re-run from the failure log)"
    )
    drop_vector_index: bool = _setting(
        False,
        group="more",
        help="bootstrap: drop an HNSW/IVFFlat index on the column for the run and rebuild it after",
    )
    # Re-embed chunks whose text changed since they were embedded, after the missing ones. None: only in
    # maintenance runs (the runbook's maintenance is the run with --max-chunks); a bootstrap skips the scan.
    refresh_changed: bool | None = _setting(
        None,
        group="more",
        help="after the missing chunks, re-embed chunks whose text changed since they were embedded "
        "(default: on in maintenance runs, i.e. with --max-chunks)",
        negative="--no-refresh-changed",
        negative_help="skip that pass",
        resume=True,
    )
    backoff_base_sec: float = _setting(0.5, env="WIKI_EMBED_BACKOFF_BASE_SEC", range=Range(0, 3600))
    backoff_max_sec: float = _setting(30.0, env="WIKI_EMBED_BACKOFF_MAX_SEC", range=Range(0, 3600))
    include_quarantined: bool = False
    maintenance_work_mem: str = "512MB"  # for rebuilding a dropped vector index
    # how long a run waits for a lost database before stopping
    db_reconnect_sec: float = _setting(60.0, env="WIKI_EMBED_DB_RECONNECT_SEC", range=SECONDS)
    # how long a run retries chunks another session holds before ending `locked`
    busy_wait_sec: float = _setting(30.0, env="WIKI_EMBED_BUSY_WAIT_SEC", range=SECONDS)
    # server-side bound of a pipeline statement; the client adds 5 s
    db_statement_timeout_sec: float = _setting(60.0, env="WIKI_EMBED_DB_STATEMENT_TIMEOUT_SEC", range=POSITIVE_SECONDS)
    # How long a run waits while every model server is out of the rotation (core/health.py) before exit 3.
    server_wait_sec: float = _setting(300.0, env="WIKI_EMBED_SERVER_WAIT_SEC", range=POSITIVE_SECONDS)
    # The model server (real Ollama's knobs).
    # sent with every request so the model stays loaded between batches ("-1": forever)
    keep_alive: str = _setting(
        DEFAULT_KEEP_ALIVE,
        env="WIKI_EMBED_KEEP_ALIVE",
        group="server",
        help="sent with every request so the model stays loaded between batches (ignored, with a note, under "
        "--api openai) [WIKI_EMBED_KEEP_ALIVE] (30m)",
        resume=True,
    )
    # options.num_ctx: raise the window up to the model's own maximum
    num_ctx: int | None = _setting(
        None,
        env="WIKI_EMBED_NUM_CTX",
        group="server",
        help="options.num_ctx: the context window in tokens, up to the model's maximum; under --api openai the "
        "model's window in tokens where the server publishes none (a cap where it does) [WIKI_EMBED_NUM_CTX] "
        "(the modelfile's default)",
        resume=True,
        range=Range(MIN_NUM_CTX, 2**22),
    )
    # ask a Matryoshka model for `dimensions: D` when the column is narrower
    request_dimensions: bool = _setting(
        False,
        env="WIKI_EMBED_REQUEST_DIMENSIONS",
        group="server",
        help="ask a Matryoshka model for `dimensions: D` when the column's vector(D) is narrower than its output "
        "(either API) [WIKI_EMBED_REQUEST_DIMENSIONS]",
        resume=True,
    )
    # allowance for the run's first request, which may pay the model's load
    load_timeout_sec: float = _setting(
        300.0,
        env="WIKI_EMBED_LOAD_TIMEOUT_SEC",
        group="server",
        help="allowance for the first request, which may pay the model's load time [WIKI_EMBED_LOAD_TIMEOUT_SEC] (300)",
        resume=True,
        range=POSITIVE_SECONDS,
    )
    # also re-embed chunks embedded from a cut (context) or truncated by the server
    reembed_cut: bool = _setting(
        False,
        group="server",
        help="also re-embed chunks that were cut to fit the context or truncated by the server (e.g. after "
        "raising --num-ctx)",
    )

    # Texts longer than the model's window (issue 23): "pool" embeds them whole in window-sized pieces and stores the
    # pieces' mean (core/pooling.py; chosen by benchmarks/bench_long_text.py); "cut" embeds the first window only.
    long_text: str = _setting(
        "pool",
        env="WIKI_EMBED_LONG_TEXT",
        group="server",
        help="texts longer than the model's window: pool (embedded whole in window-sized pieces, their mean stored) "
        "or cut (the first window only) [WIKI_EMBED_LONG_TEXT] (pool)",
        metavar="pool|cut",
        parse=choice_word,
        choices=LONG_TEXT_CHOICES,
        resume=True,
    )

    def __post_init__(self) -> None:
        for name in ("api", "long_text"):  # a choice is read in any case, however it came (env, flag, Dagster)
            object.__setattr__(self, name, choice_word(getattr(self, name)))

    @property
    def ollama_urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.ollama_url.split(",") if u.strip()]

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed; None values are ignored so unset flags keep the defaults."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def validate(self) -> Settings:
        """Refuse what cannot be meant, before anything is written (`check_settings`); returns self."""
        check_settings(self)
        return self

    def run_deadline(self, now: float | None = None) -> tuple[float, str] | None:
        """(epoch seconds, reason) of the run window's end, or None without --until / --max-minutes."""
        from wiki_embeddings.core.window import run_deadline

        return run_deadline(self.until, self.max_minutes, now)

    def options_for_resume(self) -> dict[str, Any]:
        """The run options worth replaying on `resume` (never the database URL: it may hold a password)."""
        options = {name: getattr(self, name) for name, option in OPTIONS.items() if option.resume}
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


def check_settings(s: Settings) -> None:
    """Every number finite and inside the range on its `Option` (named by its flag and environment variable, for the
    CLI, the environment and Dagster alike), the API and the model name it allows, the URLs, the run window."""
    if s.batch_size > MAX_BATCH_SIZE:
        raise ValueError(
            f"batch-size must be at most {MAX_BATCH_SIZE} chunks per request, got {s.batch_size} "
            "(64 to 256 is typical; use --concurrency for more throughput)"
        )
    if s.api not in APIS:
        raise ValueError(f"WIKI_EMBED_API (--api) must be one of {', '.join(APIS)}, got {s.api!r}")
    if s.api == "openai" and s.api_key:  # sent only under openai
        check_header_secret("WIKI_EMBED_API_KEY", s.api_key)
    if s.api == "openai" and s.with_ollama:
        raise ValueError(
            "--with-ollama (OLALA_START_OLLAMA) starts a local Ollama-protocol server: it cannot stand in for "
            "an OpenAI-compatible server (WIKI_EMBED_API=openai); start that server and set OLLAMA_URL to it"
        )
    for name, option in OPTIONS.items():
        if option.range is not None:
            check_number(setting_label(name), getattr(s, name), option.range)
    if s.ollama_model is not None:
        from wiki_embeddings.core.modelname import check_model_name

        check_model_name(s.ollama_model, s.api, setting_label("ollama_model"))
    if not s.ollama_urls:
        raise ValueError("OLLAMA_URL is empty")
    for url in s.ollama_urls:
        check_http_url(url)
    if keep_alive_problem(s.keep_alive):
        raise ValueError(f"{setting_label('keep_alive')}: {keep_alive_problem(s.keep_alive)}")
    if s.long_text not in LONG_TEXT_CHOICES:
        raise ValueError(
            f"{setting_label('long_text')} must be one of {', '.join(LONG_TEXT_CHOICES)}, got {s.long_text!r}"
        )
    if s.until is not None:
        from wiki_embeddings.core.window import parse_until

        parse_until(s.until)  # a clear ValueError for a malformed time


#: Each field's `Option` (an empty one where the field has none).
OPTIONS: dict[str, Option] = {f.name: f.metadata.get("option") or Option() for f in dataclasses.fields(Settings)}
#: Environment variable for each setting that has one.
ENV_VARS: dict[str, str] = {name: option.env for name, option in OPTIONS.items() if option.env}


def value_type(name: str) -> type:
    """The type of the setting's value (bool, int, float or str), read from its annotation."""
    kind = str({f.name: f.type for f in dataclasses.fields(Settings)}[name])
    if "bool" in kind:
        return bool
    if "int" in kind and "float" not in kind:
        return int
    return float if "float" in kind else str


def setting_label(name: str) -> str:
    """How an error names a setting: its flag and environment variable (`--retries / WIKI_EMBED_RETRIES`), or the
    field's name where it has neither (Dagster's run config and resources use the field names)."""
    option = OPTIONS[name]
    flag = option.flag or ("--" + name.replace("_", "-") if option.group else None)
    return " / ".join(x for x in (flag, option.env) if x) or name


def parse_value(name: str, raw: str) -> Any:
    """A setting's value from text (an environment variable, a flag), the same way for both: a boolean strictly
    (`checks.parse_bool`; empty: None, the default), numbers as `int` / `float` (ranges: `Settings.validate`)."""
    parse = OPTIONS[name].parse
    if parse is not None:
        return parse(raw)
    kind = value_type(name)
    return parse_bool(raw) if kind is bool else parse_number(kind, raw) if kind is not str else raw


def only_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `values` that name a setting (parsed arguments, a run config hold others too)."""
    return {k: v for k, v in values.items() if k in OPTIONS}


def from_env(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from environment variables, then `overrides` (CLI flags / run config) on top."""
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    for name, var in ENV_VARS.items():
        raw = env.get(var)
        if raw is None or raw == "" or (raw.strip() == "" and value_type(name) is not str):
            continue  # empty: the default
        try:
            values[name] = parse_value(name, raw)
        except ValueError as exc:
            raise ValueError(f"{var}={raw!r} is not a valid value: {exc}") from None
    values = {k: v for k, v in values.items() if v is not None}
    settings = Settings(**values)
    return settings.replace(**overrides)


def check_http_url(url: str) -> None:
    """A model-server URL must be `http(s)://host[:port]`: anything else is a configuration error, said plainly
    (masked), instead of a traceback or six retries against an address that cannot exist."""
    shown = mask_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port out of range or not a number
        if "@" in url and "@" not in parts.netloc:  # `http://op:1234/pw@host` read as host op, port 1234: refused
            raise ValueError("user-info misread as a host")
    except ValueError as exc:
        if "@" in url:  # the parser's reason would quote the password as a port
            raise ValueError(
                f"OLLAMA_URL {shown!r} is not a valid URL: a /, ?, # or @ in its user name or password must be "
                "percent-encoded (%2F, %3F, %23, %40)"
            ) from None
        raise ValueError(f"OLLAMA_URL {shown!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"OLLAMA_URL {shown!r} needs a scheme: write it as http://HOST:PORT (e.g. http://ollama:11434)"
        )
    if not parts.hostname:
        raise ValueError(f"OLLAMA_URL {shown!r} has no host name")
    if port == 0:
        raise ValueError(f"OLLAMA_URL {shown!r}: port 0 is not a port a server can listen on")
