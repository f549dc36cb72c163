"""Per-table state: the live model, stop requests, the migration target."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from wiki_embeddings.core.db.connection import StoreBase
from wiki_embeddings.core.db.errors import ModelMismatch
from wiki_embeddings.core.db.modelnames import canonical_sql
from wiki_embeddings.core.modelname import canonical, same_model

if TYPE_CHECKING:
    from wiki_embeddings.core.db import Store


class StateMixin(StoreBase):
    """Per-table state: the live model, stop requests, the migration target."""

    def _ensure_state_row(self: Store) -> None:
        self.conn.execute(
            sql.SQL("INSERT INTO {s}.table_state (table_name) VALUES (%s) ON CONFLICT DO NOTHING").format(s=self._s),
            (self.table.qualified,),
        )

    def request_stop(self: Store, reason: str = "operator") -> None:
        self._ensure_state_row()
        self.conn.execute(
            sql.SQL(
                "UPDATE {s}.table_state SET stop_requested_at = now(), stop_reason = %s, updated_at = now()"
                " WHERE table_name = %s"
            ).format(s=self._s),
            (reason, self.table.qualified),
        )

    def clear_stop(self: Store) -> None:
        self.conn.execute(
            sql.SQL(
                "UPDATE {s}.table_state SET stop_requested_at = NULL, stop_reason = NULL, updated_at = now()"
                " WHERE table_name = %s"
            ).format(s=self._s),
            (self.table.qualified,),
        )

    def stop_requested(self: Store, conn: psycopg.Connection | None = None) -> bool:
        row = (
            (conn or self.conn)
            .execute(
                sql.SQL("SELECT stop_requested_at IS NOT NULL FROM {s}.table_state WHERE table_name = %s").format(
                    s=self._s
                ),
                (self.table.qualified,),
            )
            .fetchone()
        )
        return bool(row and row[0])

    def recorded_model(self: Store) -> tuple[str | None, int | None]:
        row = self.conn.execute(
            sql.SQL("SELECT model, dimensions FROM {s}.table_state WHERE table_name = %s").format(s=self._s),
            (self.table.qualified,),
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def record_model(self: Store, model: str, dimensions: int, replace: bool = False) -> None:
        """Record the live column's model; another recorded model is never overwritten (unless `replace`, by hand)."""
        self._ensure_state_row()
        if replace:
            self.conn.execute(
                sql.SQL("UPDATE {s}.table_state SET model = NULL WHERE table_name = %s").format(s=self._s),
                (self.table.qualified,),
            )
        self.conn.execute(
            sql.SQL(
                "UPDATE {s}.table_state SET model = %s, dimensions = %s, updated_at = now() WHERE table_name = %s"
                " AND (model IS NULL OR {model} = %s)"
            ).format(s=self._s, model=canonical_sql(sql.Identifier("model"))),
            (model, dimensions, self.table.qualified, canonical(model)),
        )
        recorded, _ = self.recorded_model()
        if recorded is not None and not same_model(recorded, model):
            # A swap committed between this run's model check and now: the column belongs to `recorded`.
            raise ModelMismatch(
                f"{self.table.qualified}.{self.table.embedding_column} holds model {recorded!r} now (swapped while "
                f"this run started); a run with model {model!r} is refused and nothing was written"
            )

    def migration_target(self: Store) -> tuple[str | None, str | None]:
        """(target model, shadow column) of the migration in progress, or (None, None)."""
        row = self.conn.execute(
            sql.SQL("SELECT migration_model, migration_column FROM {s}.table_state WHERE table_name = %s").format(
                s=self._s
            ),
            (self.table.qualified,),
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def table_state(self: Store) -> dict[str, Any]:
        row = (
            self.conn.cursor(row_factory=dict_row)
            .execute(
                sql.SQL("SELECT * FROM {s}.table_state WHERE table_name = %s").format(s=self._s),
                (self.table.qualified,),
            )
            .fetchone()
        )
        return dict(row) if row else {}
