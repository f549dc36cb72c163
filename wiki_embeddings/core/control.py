"""The runbook's safe stop and its undo, shared by the CLI and the Dagster stop/resume jobs.

A stop is recorded in the database first (it reaches runs on every machine, and works even when the stop
file cannot be written), then in the stop file (`EMBED_STOP_FILE`, written without following a symlink).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from wiki_embeddings.core.db import Store
from wiki_embeddings.core.failure_log import append_no_follow


class StopFileError(OSError):
    """The stop request is in the database, but the stop file could not be written."""


def request_stop(store: Store, stop_file: str, reason: str) -> None:
    store.migrate()
    store.request_stop(reason)
    try:
        append_no_follow(Path(stop_file), f"stop requested: {reason}\n".encode(), 0o644)
    except OSError as exc:
        hint = " (a symbolic link there is refused)" if os.path.islink(stop_file) else ""
        raise StopFileError(
            f"stop requested in the database, but the stop file {stop_file} was not written: "
            f"{exc.strerror or exc}{hint}; runs of this table still stop after their current batch"
        ) from exc


def clear_stop(store: Store, stop_file: str) -> bool:
    """Clear the database request and remove the stop file (a symlink there itself, never its target).

    Returns whether a stop file was there.
    """
    store.migrate()
    store.clear_stop()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stop_file)
        return True
    return False
