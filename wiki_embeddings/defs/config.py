"""Run config of the steps that embed (a range, maintenance, a range of a migration) and where they run: the
pool that bounds the requests to Ollama, the retry policy for transient ends, the failure-log defaults.

A config field named like a setting (`wiki_embeddings.settings.Settings`) is that setting for the run; the one
config field named otherwise (`retry_quarantined`) is translated in `engine_settings`.
"""

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg
from pydantic import Field

from wiki_embeddings.settings import only_settings

#: Concurrency pool of every step that calls Ollama; its limit (dagster.yaml `concurrency.pools`, or
#: `dagster instance concurrency set ollama N`) is how many ranges embed at once.
OLLAMA_POOL = "ollama"
FAILURE_LOG_DIR_ENV = "WIKI_EMBED_FAILURE_LOG_DIR"

#: Transient trouble only (server unavailable, database connection lost): a chunk-level failure or a stop
#: request raises `dg.Failure(allow_retries=False)`, which this policy does not retry.
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


def default_failure_log(kind: str, env: Mapping[str, str] = os.environ) -> str:
    """The run config's failure-log default: the runbook's `/tmp/wiki-embed-failures-<kind>.jsonl`, or the same
    name in `WIKI_EMBED_FAILURE_LOG_DIR` (read when the definitions load)."""
    directory = env.get(FAILURE_LOG_DIR_ENV, "").strip() or "/tmp"
    return os.path.join(directory, f"wiki-embed-failures-{kind}.jsonl")


BOOTSTRAP_FAILURE_LOG = default_failure_log("bootstrap")
MAINTENANCE_FAILURE_LOG = default_failure_log("maintenance")


class RangeRunConfig(dg.Config):
    """One range run; defaults are the runbook's bootstrap command."""

    batch_size: int = Field(
        default=64, description="most chunks per request; trouble (503, timeouts) shrinks batches, success grows them"
    )
    report_every: int = Field(default=10, description="a progress line every N batches")
    timeout_sec: float | None = Field(default=120.0, description="deadline of one request; null: the ollama resource's")
    sleep_ms: int = Field(
        default=0,
        description="pause after each request; > 0 means one request in flight (0: the depth tunes itself; for "
        "live traffic use polite instead)",
    )
    polite: bool | None = Field(
        default=None,
        description="live queries share Ollama: one request in flight, batches sized to target_request_sec; "
        "null: on for maintenance once the readiness flag is set (WIKI_EMBEDDINGS_ENV_FILE)",
    )
    target_request_sec: float | None = Field(
        default=None, description="polite mode's longest request in seconds (0.5); setting it turns polite mode on"
    )
    max_chars: int | None = Field(default=2000, description="text cut before sending; null: the ollama resource's")
    failure_log: str = Field(default=BOOTSTRAP_FAILURE_LOG, description="JSONL of chunks that could not be embedded")
    retry_quarantined: bool = Field(
        default=False, description="also claim chunks quarantined by earlier failures (a deliberate re-run)"
    )
    until: str | None = Field(
        default=None,
        description="run window: end safely at HH:MM (the worker's local time, or with an offset: 06:00+09:00); "
        "the range is left resumable (not materialized, not failed)",
    )
    max_minutes: float | None = Field(default=None, description="run window: end safely after this many minutes")
    long_text: str | None = Field(
        default=None,
        description="texts longer than the model's window: pool (embedded whole in pieces, their mean stored) or "
        "cut (the first window only); null: WIKI_EMBED_LONG_TEXT (pool)",
    )

    def engine_settings(self) -> dict[str, Any]:
        """The run's settings: every field named like a setting, and `retry_quarantined` (include_quarantined)."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return {**only_settings(fields), "include_quarantined": self.retry_quarantined}


class MaintenanceConfig(RangeRunConfig):
    """One maintenance run; defaults are the runbook's maintenance command."""

    report_every: int = Field(default=20, description="a progress line every N batches")
    max_chunks: int | None = Field(default=20000, description="stop after this many chunks; null: no cap")
    failure_log: str = Field(default=MAINTENANCE_FAILURE_LOG, description="JSONL of chunks that could not be embedded")

    def engine_settings(self) -> dict[str, Any]:
        # Maintenance re-embeds chunks whose text changed since they were embedded (range runs do not).
        return {**super().engine_settings(), "refresh_changed": True}
