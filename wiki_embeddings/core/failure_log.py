"""The JSONL failure log the runbook reads (`cat /tmp/wiki-embed-failures-*.jsonl`): one line per isolated chunk.

A line never holds the chunk's text (it may be large or sensitive): id, error class, message, HTTP status,
attempts, text length and time are enough to classify and act. The file is opened without following a
symlink planted at its path, and created readable by its owner only.
"""

from __future__ import annotations

import os
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson


class FailureLogError(RuntimeError):
    """The failure log cannot be written safely (a symlink or something else than a file at its path)."""


class FailureLog:
    def __init__(self, path: str | os.PathLike[str] | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()

    def check(self) -> None:
        """Refuse, before a run sends anything, a path where appending would not reach a plain file of ours.

        The file itself is still created lazily (a run without failures leaves no file), and every append
        opens it with O_NOFOLLOW, so a link planted after this check is refused too.
        """
        if self.path is None:
            return
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise FailureLogError(
                f"refusing the failure log {self.path}: it is a symbolic link (give the real file's path)"
            )
        if not stat.S_ISREG(st.st_mode):
            raise FailureLogError(f"refusing the failure log {self.path}: not a regular file")

    def record(
        self,
        *,
        chunk_id: int,
        error: str,
        message: str,
        http_status: int | None,
        attempts: int,
        text_length: int,
        **extra: Any,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "chunk_id": chunk_id,
            "error": error,
            "message": message,
            "http_status": http_status,
            "attempts": attempts,
            "text_length": text_length,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            **extra,
        }
        if self.path is not None:
            line = orjson.dumps(entry) + b"\n"
            with self._lock:
                append_no_follow(self.path, line)
        return entry


def append_no_follow(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Append to `path`, refusing a symlink there (O_NOFOLLOW) so a planted link cannot redirect the write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_entries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [orjson.loads(line) for line in p.read_bytes().splitlines() if line.strip()]
