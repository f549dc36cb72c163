"""All SQL of the project, by concern (see each module); `Store` is the facade callers use.

Identifiers (table, columns, the bookkeeping schema) are settings, so they only ever reach SQL through
`psycopg.sql.Identifier`; values always travel as parameters. Driver errors never leave this package: they
become `DatabaseUnavailable` (the connection or server is away: retry, reconnect) or `DataRefused` (this data
or statement was refused), both `DatabaseError`s.
"""

from __future__ import annotations

from wiki_embeddings.core.db.claims import ClaimsMixin
from wiki_embeddings.core.db.columns import ColumnsMixin
from wiki_embeddings.core.db.connection import LOCK_TIMEOUT_SEC, STATEMENT_TIMEOUT_SEC, StoreBase
from wiki_embeddings.core.db.content import ContentMixin
from wiki_embeddings.core.db.errors import (
    DatabaseError,
    DatabaseUnavailable,
    DataRefused,
    ModelMismatch,
    RunReleased,
    StoreError,
    translate_driver_errors,
)
from wiki_embeddings.core.db.failures import FailuresMixin
from wiki_embeddings.core.db.indexes import IndexesMixin
from wiki_embeddings.core.db.leases import LeasesMixin
from wiki_embeddings.core.db.records import (
    Claim,
    Provenance,
    TableRef,
    VectorNotes,
    WriteResult,
    check_identifier,
    coverage_pct,
)
from wiki_embeddings.core.db.runs import RunsMixin
from wiki_embeddings.core.db.schema import MIGRATIONS, SchemaMixin
from wiki_embeddings.core.db.state import StateMixin
from wiki_embeddings.core.db.stats import StatsMixin
from wiki_embeddings.core.db.trust import TrustMixin
from wiki_embeddings.core.db.writes import WritesMixin

__all__ = [
    "LOCK_TIMEOUT_SEC",
    "MIGRATIONS",
    "STATEMENT_TIMEOUT_SEC",
    "Claim",
    "DataRefused",
    "DatabaseError",
    "DatabaseUnavailable",
    "ModelMismatch",
    "Provenance",
    "RunReleased",
    "Store",
    "StoreError",
    "TableRef",
    "VectorNotes",
    "WriteResult",
    "check_identifier",
    "coverage_pct",
]


@translate_driver_errors
class Store(
    SchemaMixin,
    ClaimsMixin,
    WritesMixin,
    ContentMixin,
    FailuresMixin,
    StateMixin,
    ColumnsMixin,
    IndexesMixin,
    RunsMixin,
    StatsMixin,
    TrustMixin,
    LeasesMixin,
    StoreBase,
):
    """Owns the database side of the pipeline. One instance per process; connections are opened per role."""
