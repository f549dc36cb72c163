"""How a run's progress reaches the operator: the core reports figures, the front end renders them.

The engine never writes to a terminal itself: the CLI renders a bar on a terminal (`cli.BarReporter`), Dagster
and every other caller get the runbook's progress lines (`LineReporter`), one every `--report-every` batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Progress:
    embedded: int
    failed: int
    total: int
    chunks_per_s: float
    eta_sec: float  # inf when unknown
    note: str = ""  # e.g. which model servers are out of the rotation

    @property
    def eta(self) -> str:
        if self.eta_sec == float("inf"):
            return "?"
        seconds = int(self.eta_sec)
        if seconds >= 3600:
            return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 60:
            return f"{seconds // 60}m{seconds % 60:02d}s"
        return f"{seconds}s"

    def line(self) -> str:
        return (
            f"progress: {self.embedded}/{self.total} embedded, failed={self.failed}, "
            f"{self.chunks_per_s:.1f} chunks/s, eta {self.eta}" + (f"; {self.note}" if self.note else "")
        )


class Reporter(Protocol):
    def progress(self, figures: Progress, report_line: bool) -> None:
        """After every written batch; `report_line` on every `--report-every`-th."""

    def finish(self) -> None:
        """The run ended (a bar ends its line)."""


class LineReporter:
    """The runbook's progress lines through the run's log callable."""

    def __init__(self, log: Callable[[str], None]):
        self._log = log

    def progress(self, figures: Progress, report_line: bool) -> None:
        if report_line:
            self._log(figures.line())

    def finish(self) -> None:
        pass


def servers_note(servers: list[dict[str, object]]) -> str:
    """A word on the model servers when not all are in the rotation ("" when all are): for progress lines."""
    out = [s for s in servers if s.get("state") != "in"]
    if not out:
        return ""
    named = ", ".join(f"{s.get('url')} {s.get('state')}" for s in out)
    return f"servers {len(servers) - len(out)} of {len(servers)} in the rotation ({named})"


def describe_servers(servers: object) -> str:
    """A run's recorded server states on one line (status): `url state (why); …`, control characters removed."""
    if not isinstance(servers, list):
        return ""
    parts = []
    for s in servers:
        if not isinstance(s, dict):
            continue
        why = f" ({s.get('reason')})" if s.get("reason") else ""
        parts.append(f"{s.get('url')} {s.get('state')}{why}")
    return "".join(ch if ch.isprintable() else " " for ch in "; ".join(parts))
