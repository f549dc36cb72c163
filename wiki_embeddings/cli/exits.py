"""The one exit-code table of every command (the README's), and how each failure class reaches it: every error a
command meets ends as one `error:` line and one of these codes, never a traceback.

The codes of a backfill's end states are the engine's (core/backfill/report.py `EXIT_CODES`); `verify`'s verdicts
use the same numbers (core/verify.py: `model_changed` is 8 for both).
"""

from __future__ import annotations

from wiki_embeddings.core.backfill import EXIT_CODES as RUN_EXIT_CODES
from wiki_embeddings.core.backfill import DimensionMismatch
from wiki_embeddings.core.db import DatabaseError, DatabaseUnavailable, DataRefused, RunReleased, StoreError
from wiki_embeddings.core.embedders import EmbedFailure, ModelNotFound
from wiki_embeddings.core.errors import first_line

OK = 0
NO = 1
BAD_SETTING = 2
SERVER_UNAVAILABLE = RUN_EXIT_CODES["server_unavailable"]
MODEL_NOT_FOUND = RUN_EXIT_CODES["model_not_found"]
DATABASE_UNAVAILABLE = RUN_EXIT_CODES["database_unavailable"]
RELEASED = RUN_EXIT_CODES["released"]
INTERRUPTED = 130

#: Code -> meaning, for every command (README "Exit codes" holds the same table; a test compares them).
TABLE = {
    OK: "done, or nothing to do (nothing missing, nothing to verify, no migration to abort, a run already ended)",
    NO: "the answer is no: `status --check` not ready, `verify` mismatch, the swap's self-test refuses; or an "
    "unexpected error (one line), or the table dropped mid-run",
    BAD_SETTING: "a bad setting or usage (a flag, variable or run config refused, naming it), a missing table or "
    "column, a refused step (migration, release), a missing privilege, a database that refuses the login",
    SERVER_UNAVAILABLE: "the model server is unavailable (unreachable, overloaded, hung) or did not answer `verify`",
    MODEL_NOT_FOUND: "the model is not on the server (`ollama pull` it)",
    DATABASE_UNAVAILABLE: "the database is unavailable (cannot connect, or lost for longer than "
    "WIKI_EMBED_DB_RECONNECT_SEC)",
    RUN_EXIT_CODES["failure_log_error"]: "the failure log cannot be written",
    RUN_EXIT_CODES["locked"]: "chunks still held by another session after WIKI_EMBED_BUSY_WAIT_SEC",
    RUN_EXIT_CODES["model_changed"]: "model changed: the column was swapped to another model during the run "
    "(backfill), or the model answering under the live name no longer makes the stored vectors (verify)",
    RELEASED: "an operator released this run (`runs release`: a stalled run, or a running one with --force): it "
    "ended without writing",
    INTERRUPTED: "interrupted (Ctrl-C outside a run; within a run Ctrl-C is a stop: 0)",
}

#: PostgreSQL error classes of a connection the server refused for a reason no retry fixes: a wrong password or
#: role (28...), a database that does not exist (3D000).
_LOGIN_REFUSED = ("28", "3D000")


class CliError(Exception):
    """A one-line error for the operator, with its exit code (default 2: a bad setting or usage)."""

    def __init__(self, message: str, code: int = BAD_SETTING):
        super().__init__(message)
        self.code = code


def exit_of(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an error that ended a command."""
    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, DatabaseUnavailable):
        refused = exc.sqlstate is not None and exc.sqlstate.startswith(_LOGIN_REFUSED)
        return (BAD_SETTING if refused else DATABASE_UNAVAILABLE), f"database: {exc.first_line}"
    if isinstance(exc, (DataRefused, DatabaseError)):
        return BAD_SETTING, f"database: {exc.first_line}"
    if isinstance(exc, ModelNotFound):
        return MODEL_NOT_FOUND, first_line(exc)
    if isinstance(exc, EmbedFailure):
        return SERVER_UNAVAILABLE, f"the model server (OLLAMA_URL): {first_line(exc)}"
    if isinstance(exc, RunReleased):
        return RELEASED, first_line(exc)
    if isinstance(exc, (StoreError, DimensionMismatch, ValueError, OSError, RuntimeError)):
        return BAD_SETTING, str(exc).strip() or type(exc).__name__
    return NO, f"unexpected error: {type(exc).__name__}: {first_line(exc)}"
