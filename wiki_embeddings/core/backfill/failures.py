"""The failure recorder: an isolated chunk gets a row in the failures table and a line in the JSONL log.

A later run retries it, up to --max-attempts for the same text; past that it is quarantined. The log line never
holds the text. A log that cannot be written ends the run (`failure_log_error`): the failure is still in the
database, so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from wiki_embeddings.core.backfill.errors import Fatal
from wiki_embeddings.core.backfill.outcomes import Isolated
from wiki_embeddings.core.db import TableRef
from wiki_embeddings.core.failure_log import FailureLog

Call = Callable[..., Awaitable[Any]]


class FailureStore(Protocol):
    table: TableRef

    def record_failure(
        self, chunk_id: int, *, error: str, message: str, http_status: int | None, run_id: int | None
    ) -> int: ...


class FailureRecorder:
    """Records the run's isolated chunks; owns the run's failure counts."""

    def __init__(
        self,
        store: FailureStore,
        call: Call,
        failure_log: FailureLog,
        release: Callable[[list[int]], Awaitable[None]],
        *,
        model: str,
        max_attempts: int,
        clean: Callable[[str], str] = lambda text: text,
        log: Callable[[str], None] = lambda _line: None,
    ):
        self.store = store
        self.call = call
        self.failure_log = failure_log
        self.release = release
        self.model = model
        self.max_attempts = max_attempts
        self._clean = clean
        self._log = log
        self.failed = 0
        self.failed_ids: list[int] = []

    async def record(self, chunk: Isolated, run_id: int | None) -> int:
        """Record one isolated chunk (database, then JSONL), release its claim; returns its attempts so far."""
        message = self._clean(chunk.message)
        attempts: int = await self.call(
            "store",
            lambda _c: self.store.record_failure(
                chunk.chunk_id, error=chunk.error, message=message, http_status=chunk.http_status, run_id=run_id
            ),
        )
        try:
            self.failure_log.record(
                chunk_id=chunk.chunk_id,
                error=chunk.error,
                message=message,
                http_status=chunk.http_status,
                attempts=attempts,
                text_length=chunk.text_length,
                model=self.model,
                table=self.store.table.qualified,
                run_id=run_id,
            )
        except OSError as exc:
            raise Fatal(
                "failure_log_error", f"{exc}; the failure is recorded in the database (`wiki-embeddings failures`)"
            ) from exc
        self.failed += 1
        self.failed_ids.append(chunk.chunk_id)
        quarantined = " (quarantined)" if attempts >= self.max_attempts else ""
        self._log(f"chunk {chunk.chunk_id} failed{quarantined}: {chunk.error}: {message}")
        await self.release([chunk.chunk_id])
        return attempts
