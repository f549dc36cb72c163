"""What the CLI prints besides the core's own lines: the one-line operator error, a progress bar, failure rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wiki_embeddings.cli.exits import BAD_SETTING, CliError
from wiki_embeddings.core.progress import LineReporter, Progress

EXIT_ERROR = BAD_SETTING
__all__ = ["EXIT_ERROR", "BarReporter", "CliError", "failure_row", "printer"]


def printer(out: Any) -> Callable[[str], None]:
    """A log function that prints each line to `out` at once (progress shows while a run goes on)."""
    return lambda message: print(message, file=out, flush=True)


class BarReporter:
    """A progress bar on a terminal (redrawn after every batch), plus the runbook's progress lines."""

    WIDTH = 30

    def __init__(self, out: Any, log: Callable[[str], None]):
        self._out = out
        self._lines = LineReporter(log)
        self._bar = bool(getattr(out, "isatty", lambda: False)())

    def progress(self, figures: Progress, report_line: bool) -> None:
        if self._bar:
            done = figures.embedded + figures.failed
            filled = int(self.WIDTH * done / figures.total) if figures.total else self.WIDTH
            self._out.write(
                f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {figures.embedded}/{figures.total} "
                f"{figures.chunks_per_s:.1f} chunks/s eta {figures.eta}   "
            )
            if report_line:
                self._out.write("\n")
            self._out.flush()
        self._lines.progress(figures, report_line)

    def finish(self) -> None:
        if self._bar:
            self._out.write("\n")
            self._out.flush()


def failure_row(r: dict[str, Any]) -> str:
    """One recorded failure as the tab-separated line `failures` prints."""
    state = "quarantined" if r["quarantined"] else ("open" if r["still_missing"] else "embedded since")
    return (
        f"{r['chunk_id']}\t{r['error']}\tattempts={r['attempts']}\tlast_seen={r['last_seen']:%Y-%m-%d %H:%M:%S}"
        f"\t{state}\t{r['message'][:120]}"
    )
