"""How a core operation's end becomes a Dagster outcome, for every step that runs one (assets, migration ops):
errors as one redacted line, transient ends retried, other unclean ends and stops failed without a retry, and a
run's report as metadata.
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import dagster as dg

from wiki_embeddings.core.backfill import CLEAN_STATES as ENGINE_CLEAN_STATES
from wiki_embeddings.core.backfill import DimensionMismatch, RunReport
from wiki_embeddings.core.db import DatabaseUnavailable, DataRefused, StoreError
from wiki_embeddings.core.errors import first_line
from wiki_embeddings.core.migration import MigrationError
from wiki_embeddings.core.window import WINDOW_REASON
from wiki_embeddings.settings import Settings, redact, url_secrets

#: Engine end states that are the chunks' or the operator's business, not the infrastructure's.
CLEAN_STATES = ENGINE_CLEAN_STATES
#: End states worth a retry: the server or the database was away, or another session held some chunks (a
#: concurrent run's claim, a row lock); the chunks are fine.
TRANSIENT_STATES = {"server_unavailable", "database_unavailable", "locked"}


class EmbeddingServiceUnavailable(Exception):
    """The embedding server or the database went away mid-run (after the core's own retries): the
    RetryPolicy retries the step, which resumes where the run stopped (nothing is marked failed)."""


@contextlib.contextmanager
def run_failures(mode: str, settings: Settings) -> Iterator[None]:
    """Errors a core operation raises become one redacted line (`from None`: Dagster stores an exception's whole
    chain, and a libpq message can echo the connection URL): a lost database is transient (retried), a refusal
    (the database's, a mismatched model or column, a refused migration step) needs the operator (no retry)."""
    secrets = url_secrets(settings.database_url)
    try:
        yield
    except DatabaseUnavailable as exc:  # the database is away: transient
        raise EmbeddingServiceUnavailable(f"{mode}: database unavailable: {_line(exc, secrets)}") from None
    except DataRefused as exc:
        raise dg.Failure(description=f"{mode}: database: {_line(exc, secrets)}", allow_retries=False) from None
    except (DimensionMismatch, StoreError, MigrationError, ValueError) as exc:  # configuration: retrying cannot help
        raise dg.Failure(description=redact(str(exc), secrets), allow_retries=False) from None


def _line(exc: BaseException, secrets: list[str]) -> str:
    return redact(first_line(exc), secrets)


def raise_on_trouble(report: RunReport, metadata: dict[str, Any], what: str) -> None:
    """Transient ends (server or database away) are retried; other unclean ends (model not found, failure log
    not writable...) need the operator: no retry."""
    if report.state in TRANSIENT_STATES:
        raise EmbeddingServiceUnavailable(
            f"{what}: {report.state}: {report.message} ({report.embedded} chunks written before)"
        )
    if report.state not in CLEAN_STATES:
        raise dg.Failure(
            description=f"{what}: {report.state}: {report.message}", metadata=metadata, allow_retries=False
        )


def window_ended(report: RunReport) -> bool:
    """The run stopped because its window (until / max_minutes, core/window.py) closed."""
    return report.state == "stopped" and report.stop_reason.startswith(WINDOW_REASON)


def raise_if_stopped(report: RunReport, metadata: dict[str, Any], what: str) -> None:
    if report.state == "stopped":
        raise dg.Failure(
            description=(
                f"{what} stopped on request after its current batch ({report.embedded} chunks written, "
                f"{report.remaining} still missing); not marked complete. Run `resume_job` to clear the stop "
                "request, then materialize it again."
            ),
            metadata=metadata,
            allow_retries=False,
        )


def report_metadata(report: RunReport, settings: Settings) -> dict[str, Any]:
    return {
        "dagster/row_count": report.embedded,
        "embedded": report.embedded,
        "failed": report.failed,
        "skipped": report.skipped_busy,
        "refreshed": report.refreshed,
        "remaining": report.remaining,
        "chunks_per_s": dg.MetadataValue.float(round(report.chunks_per_s, 2)),
        "seconds": dg.MetadataValue.float(round(report.seconds, 2)),
        "model": report.model,
        "state": report.state,
        "failure_log": dg.MetadataValue.path(settings.failure_log or ""),
        "failed_ids": dg.MetadataValue.json(report.failed_ids[:100]),
        # Each model server as the run ended: in the rotation or out (and why), depth, batch size (URLs masked).
        "servers": dg.MetadataValue.json(report.servers),
        "server_truncated": report.server_truncated,
    }
