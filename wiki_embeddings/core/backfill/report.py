"""What one run did, and what its end means to a shell: the run report and the exit codes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

CLEAN_STATES = {"completed", "stopped", "max_chunks"}
EXIT_CODES = {
    "server_unavailable": 3,
    "model_not_found": 4,
    "database_unavailable": 5,
    "failure_log_error": 6,
    "locked": 7,
    "model_changed": 8,
    "released": 9,
}


@dataclass
class RunReport:
    """What one run did; `state` is completed | stopped | max_chunks | server_unavailable | model_not_found | …"""

    state: str
    mode: str
    model: str
    dimensions: int
    embedded: int = 0
    failed: int = 0
    skipped_busy: int = 0
    locked: int = 0  # chunks still held by another session when the run ended (state `locked`)
    remaining: int = 0
    seconds: float = 0.0
    requests: int = 0
    run_id: int | None = None
    message: str = ""
    failed_ids: list[int] = field(default_factory=list)
    refreshed: int = 0  # chunks re-embedded in place because their text changed (maintenance)
    changed_found: int | None = None  # changed chunks the content scan found (None: no complete scan)
    index_seconds: dict[str, Any] = field(default_factory=dict)
    context_tokens: int | None = None  # the model's window as this run understood it
    context_cut: int = 0  # chunks embedded from a cut below --max-chars, to fit the context
    server_truncated: int = 0  # chunks the server was caught truncating silently
    fit_searches: int = 0  # refused chunks whose longest fitting prefix was searched
    fit_requests: int = 0  # requests the successful searches sent (average = fit_requests / fit_found)
    pooled: int = 0  # long chunks embedded whole from pieces (--long-text pool)
    pieces: int = 0  # the pieces embedded for them
    fit_found: int = 0  # searches that found a prefix the server takes (the others are recorded failed)
    preflight: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = ""  # why a `stopped` run stopped (stop file, signal, run window: core/window.py)
    tuning: dict[str, Any] = field(default_factory=dict)  # depth per server and batch size (core/tuning.py)
    servers: list[dict[str, Any]] = field(default_factory=list)  # each server's state at the end (URLs masked)

    @property
    def chunks_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 for a clean end (done, stopped on request, max-chunks reached); non-zero for any other end."""
        return 0 if self.state in CLEAN_STATES else EXIT_CODES.get(self.state, 1)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["chunks_per_s"] = round(self.chunks_per_s, 2)
        return out

    def summary(self) -> str:
        """The run's last line: every count an operator reads, then the end state's message."""
        return (
            f"{self.mode} {self.state}: embedded={self.embedded} failed={self.failed} "
            f"remaining={self.remaining} refreshed={self.refreshed} seconds={self.seconds:.1f} "
            f"chunks/s={self.chunks_per_s:.1f} cut_for_context={self.context_cut} "
            f"server_truncated={self.server_truncated} pooled={self.pooled}{self._fit_summary()}. {self.message}"
        )

    def _fit_summary(self) -> str:
        if not self.fit_searches:
            return ""
        missed = self.fit_searches - self.fit_found
        if not self.fit_found:
            return (
                f" refused_as_too_long={self.fit_searches} (no prefix of any of them fit the model's context: "
                f"all {missed} recorded failed)"
            )
        found = (
            f"longest fitting prefix found for {self.fit_found} in "
            f"{self.fit_requests / self.fit_found:.1f} requests on average"
        )
        return f" refused_as_too_long={self.fit_searches} ({found}" + (
            f"; no prefix fit for {missed}, recorded failed)" if missed else ")"
        )
