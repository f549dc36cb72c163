"""How a run ends early: refusals before anything is written, and the one error that ends a running pipeline."""

from __future__ import annotations


class DimensionMismatch(RuntimeError):
    """The model's vectors do not fit the column: refused before anything is written."""


class ModelChanged(DimensionMismatch):
    """A run with another model than the one recorded for the column: refused before anything is written."""


class BadSetting(ValueError):
    """A setting of ours the model server refused at the start probe (exit 2, naming it): nothing was written."""


class Fatal(RuntimeError):
    """Ends the run with `state` (a RunReport state: server_unavailable, database_unavailable, …)."""

    def __init__(self, state: str, message: str):
        super().__init__(message)
        self.state = state


class NoAnswer(Exception):
    """A database call passed its client-side deadline."""
