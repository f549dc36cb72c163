"""The end state of a run: a pure function of what the run saw, so every rule of it is tested in microseconds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunCounts:
    """What decides a run's end state, gathered when its pipeline has finished."""

    remaining: int
    failed: int
    claimed: int
    busy: int  # chunks still held by another session after the busy retry
    max_chunks: int | None
    busy_wait_sec: float
    fatal_state: str | None = None  # the first error that ended the run (errors.Fatal), if any
    fatal_message: str = ""
    stopped: bool = False  # a stop was requested (stop file, database, signal, run window)
    stop_reason: str = ""


@dataclass(frozen=True)
class EndState:
    state: str
    message: str
    locked: int = 0
    stop_reason: str = ""


def end_state(c: RunCounts) -> EndState:
    """An error wins over a stop, a stop over chunks still locked, those over the --max-chunks cap; else done."""
    if c.fatal_state is not None:
        return EndState(c.fatal_state, c.fatal_message)
    if c.stopped:
        return EndState(
            "stopped", f"stopped on request ({c.stop_reason}); {c.remaining} chunks remain", stop_reason=c.stop_reason
        )
    if c.busy:
        return EndState(
            "locked",
            f"{c.busy} chunks locked by another session (a concurrent run holds their claim, or a "
            f"transaction holds their row) for over {c.busy_wait_sec:g} s; run again later; "
            f"{c.remaining} chunks remain",
            locked=c.busy,
        )
    if c.max_chunks is not None and c.claimed >= c.max_chunks and c.remaining > 0:
        return EndState("max_chunks", f"--max-chunks {c.max_chunks} reached; {c.remaining} chunks remain")
    return EndState("completed", f"done; {c.remaining} chunks remain missing ({c.failed} failed this run)")
