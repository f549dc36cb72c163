"""The project's database errors: nothing outside core/db sees a driver exception.

`Store`'s methods translate psycopg's errors at their outermost call: `DatabaseUnavailable` for a connection or
server that went away, a statement or lock timeout (the engine reconnects and retries), `DataRefused` for
anything the database refused of this data or statement (a trigger, a constraint, a privilege: the engine
isolates the row, the CLI prints one line). Errors of the store's own making (`StoreError`, `ModelMismatch`)
pass as they are.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from wiki_embeddings.core.errors import first_line


class StoreError(RuntimeError):
    """A problem with the database that the operator must fix (missing table, wrong column type...)."""


class ModelMismatch(StoreError):
    """A batch of one model's vectors met a column that now takes another model (a swap during the run)."""


class RunReleased(StoreError):
    """An operator released this run (`wiki-embeddings runs release`): nothing of it may be written any more."""


class DatabaseError(StoreError):
    """A driver error, translated; `sqlstate` says which (None when the connection itself failed)."""

    def __init__(self, message: str, sqlstate: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate

    @property
    def first_line(self) -> str:
        return first_line(self)


class DatabaseUnavailable(DatabaseError):
    """The connection or the server went away, or a statement/lock timeout ended the wait: worth a retry."""


class DataRefused(DatabaseError):
    """The database refused this statement or data (a trigger, a constraint, a privilege, a missing table)."""


_depth = threading.local()
C = TypeVar("C", bound=type)


def _translating(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        depth = getattr(_depth, "n", 0)
        _depth.n = depth + 1
        try:
            return fn(*args, **kwargs)
        except psycopg.OperationalError as exc:
            if depth:
                raise  # an inner call: the outermost one translates (inner code may handle driver errors)
            raise DatabaseUnavailable(str(exc), exc.sqlstate) from exc
        except psycopg.Error as exc:
            if depth:
                raise
            raise DataRefused(str(exc), exc.sqlstate) from exc
        finally:
            _depth.n = depth

    return call


def translate_driver_errors(cls: C) -> C:
    """Wrap every method the class and its bases define (not dunders, properties or static methods)."""
    for klass in reversed(cls.__mro__[:-1]):
        for name, member in vars(klass).items():
            if name.startswith("__") or not callable(member) or isinstance(member, staticmethod | classmethod | type):
                continue
            setattr(cls, name, _translating(member))
    return cls


def driver_error(exc: BaseException) -> BaseException:
    """The driver's own exception behind a translated one (for the store's own diagnosis)."""
    return exc.__cause__ if isinstance(exc, DatabaseError) and exc.__cause__ is not None else exc
