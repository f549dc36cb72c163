"""The JSONL failure log the runbook reads (`cat /tmp/wiki-embed-failures-*.jsonl`): one line per isolated chunk.

A line never holds the chunk's text (it may be large or sensitive): id, error class, message, HTTP status,
attempts, text length and time are enough to classify and act. The file is opened without following a
symlink planted at its path, and created readable by its owner only.

The log holds whole lines or nothing: an append that fails part-way (disk full, file size limit) is cut back
to where it started, and an append onto a file that still ends in half a line (a crash, a cut that failed)
starts on a fresh line, so one bad line never glues onto the next record. The reader skips and counts a line
that is not a JSON object instead of raising.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson


class FailureLogError(RuntimeError):
    """The failure log cannot be written safely (a symlink or something else than a file at its path)."""


#: errno -> what an operator reads (and the errno's name, to search for).
_REASONS = {
    errno.ENOSPC: "no space left on device (ENOSPC)",
    errno.EDQUOT: "disk quota exceeded (EDQUOT)",
    errno.EFBIG: "file too large for the file size limit (EFBIG)",
    errno.EACCES: "permission denied (EACCES)",
    errno.EPERM: "operation not permitted (EPERM)",
    errno.EROFS: "read-only file system (EROFS)",
    errno.EIO: "input/output error (EIO)",
}


class FailureLogWriteError(OSError):
    """An append to the failure log failed; nothing of the record is left in the file.

    An `OSError` (errno, strerror and filename are the cause's), whose `str()` is one line that names the
    path and the real reason: "no space left on device (ENOSPC) writing the failure log PATH", or
    "the failure log PATH is a symbolic link: refused (give the real file's path)".
    """

    def __init__(self, path: str | os.PathLike[str], cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause), os.fspath(path))
        self.message = describe_write_error(path, cause)

    def __str__(self) -> str:
        return self.message


def describe_write_error(path: str | os.PathLike[str], cause: OSError) -> str:
    """One line saying why appending to the failure log at `path` failed, naming the path."""
    if cause.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
        return f"the failure log {os.fspath(path)} is a symbolic link: refused (give the real file's path)"
    if cause.errno in _REASONS:
        reason = _REASONS[cause.errno]
    else:
        name = errno.errorcode.get(cause.errno or 0, "")
        reason = f"{(cause.strerror or str(cause)).lower()}" + (f" ({name})" if name else "")
    return f"{reason} writing the failure log {os.fspath(path)}"


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
                try:
                    append_no_follow(self.path, line)
                except OSError as exc:
                    raise FailureLogWriteError(self.path, exc) from exc
        return entry


def append_no_follow(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Append `data` (whole lines) to `path`: all of it or nothing, on a line of its own.

    A symlink at the path is refused (O_NOFOLLOW) so a planted link cannot redirect the write. Appenders
    take an exclusive `flock` on the file, so the length read before writing is still the end of the file
    when the append fails: a short write (disk full, file size limit) is then cut back to that length
    (`ftruncate`) before the error is raised. If the file already ends in half a line (a crash mid-write,
    or a cut that failed too), a newline is written first, so the new record is never glued onto it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd, readable = os.open(path, os.O_RDWR | flags, mode), True
    except PermissionError:  # writable but not readable: append without looking at the last byte
        fd, readable = os.open(path, os.O_WRONLY | flags, mode), False
    try:
        with contextlib.suppress(OSError):  # no flock on this file system (ENOLCK): one writer is assumed
            fcntl.flock(fd, fcntl.LOCK_EX)
        start = os.fstat(fd).st_size
        if readable and start > 0 and os.pread(fd, 1, start - 1) != b"\n":
            data = b"\n" + data
        try:
            _write_all(fd, data)
        except OSError:
            with contextlib.suppress(OSError):  # if the cut fails too, the next append starts a fresh line
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)  # also releases the flock


def _write_all(fd: int, data: bytes) -> None:
    """`os.write` until every byte is written; a write that makes no progress is an error, not a loop."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, f"write made no progress ({len(view)} bytes left)")
        view = view[written:]


@dataclass(frozen=True)
class LogContents:
    """What `read_log` found: the records, and the lines it skipped because they are not a JSON object."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # 1-based line numbers (a torn or garbage line)


def read_log(path: str | os.PathLike[str]) -> LogContents:
    """Every record of the failure log; a torn or garbage line is skipped and counted, never raised."""
    p = Path(path)
    if not p.exists():
        return LogContents()
    contents = LogContents()
    for number, line in enumerate(p.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            entry = None
        if isinstance(entry, dict):
            contents.entries.append(entry)
        else:
            contents.skipped.append(number)
    return contents


def read_entries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of the failure log (see `read_log` for the lines it skipped)."""
    return read_log(path).entries
