"""The bookkeeping schema, as numbered migrations applied once each (schema_migrations records them)."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: bookkeeping tables.
    """
    CREATE TABLE IF NOT EXISTS {s}.failures (
        table_name  text        NOT NULL,
        chunk_id    bigint      NOT NULL,
        error       text        NOT NULL,
        message     text        NOT NULL,
        http_status integer,
        attempts    integer     NOT NULL DEFAULT 1,
        text_md5    text,
        text_length integer,
        run_id      bigint,
        first_seen  timestamptz NOT NULL DEFAULT now(),
        last_seen   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (table_name, chunk_id)
    );
    CREATE TABLE IF NOT EXISTS {s}.runs (
        run_id       bigserial PRIMARY KEY,
        table_name   text        NOT NULL,
        mode         text        NOT NULL,
        state        text        NOT NULL,
        host         text,
        pid          integer,
        model        text,
        options      jsonb       NOT NULL DEFAULT '{{}}',
        started_at   timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now(),
        finished_at  timestamptz,
        embedded     bigint      NOT NULL DEFAULT 0,
        failed       bigint      NOT NULL DEFAULT 0,
        chunks_per_s double precision,
        message      text
    );
    CREATE INDEX IF NOT EXISTS runs_table_started_idx ON {s}.runs (table_name, started_at DESC);
    CREATE TABLE IF NOT EXISTS {s}.table_state (
        table_name        text PRIMARY KEY,
        model             text,
        dimensions        integer,
        stop_requested_at timestamptz,
        stop_reason       text,
        updated_at        timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 2: provenance of every stored vector (issue 6), per column attnum so a column RENAME keeps it valid;
    #    model migration and content-change scan state in table_state.
    """
    CREATE TABLE IF NOT EXISTS {s}.embedding_provenance (
        table_name    text        NOT NULL,
        column_attnum smallint    NOT NULL,
        chunk_id      bigint      NOT NULL,
        model         text        NOT NULL,
        dimensions    integer     NOT NULL,
        text_md5      text        NOT NULL,
        max_chars     integer     NOT NULL,
        text_prefix   text        NOT NULL DEFAULT '',
        embedded_at   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (table_name, column_attnum, chunk_id)
    );
    CREATE INDEX IF NOT EXISTS embedding_provenance_model_idx
        ON {s}.embedding_provenance (table_name, column_attnum, model);
    ALTER TABLE {s}.table_state
        ADD COLUMN IF NOT EXISTS previous_model        text,
        ADD COLUMN IF NOT EXISTS previous_dimensions   integer,
        ADD COLUMN IF NOT EXISTS migration_model       text,
        ADD COLUMN IF NOT EXISTS migration_dimensions  integer,
        ADD COLUMN IF NOT EXISTS migration_column      text,
        ADD COLUMN IF NOT EXISTS migration_started_at  timestamptz,
        ADD COLUMN IF NOT EXISTS swapped_at            timestamptz,
        ADD COLUMN IF NOT EXISTS stale_text            bigint,
        ADD COLUMN IF NOT EXISTS stale_text_scanned_at timestamptz;
    """,
    # 3: the chunk table's oid (a dropped and recreated table must not inherit provenance or failures) and the
    #    count of vectors without provenance (written before this tool, or by another writer), from the scan.
    """
    ALTER TABLE {s}.table_state
        ADD COLUMN IF NOT EXISTS table_oid  oid,
        ADD COLUMN IF NOT EXISTS unverified bigint;
    """,
    # 4: what was actually embedded (issue 10): characters sent, whether the text was cut below --max-chars
    #    to fit the model's context, and whether the server was caught truncating it silently. Provenance, not
    #    identity: text_md5 stays md5 of the whole stored text. A partial index keeps their counts cheap.
    """
    ALTER TABLE {s}.embedding_provenance
        ADD COLUMN IF NOT EXISTS chars_sent       integer,
        ADD COLUMN IF NOT EXISTS context_cut      boolean NOT NULL DEFAULT false,
        ADD COLUMN IF NOT EXISTS server_truncated boolean NOT NULL DEFAULT false;
    CREATE INDEX IF NOT EXISTS embedding_provenance_cut_idx
        ON {s}.embedding_provenance (table_name, column_attnum, chunk_id) WHERE context_cut OR server_truncated;
    """,
    # 5: chunks another session still held when a run ended (state `locked`), for `status`.
    """
    ALTER TABLE {s}.runs ADD COLUMN IF NOT EXISTS locked bigint NOT NULL DEFAULT 0;
    """,
    # 6: trust in the vectors (issue 15): each column's identity (model, dimensions, prefixes) and the log of
    #    verifications, quality gates and model digests. A numbered migration, so the documented grants (ON ALL
    #    TABLES IN SCHEMA) cover them and no run needs CREATE later.
    """
    CREATE TABLE IF NOT EXISTS {s}.column_identity (
        table_name    text        NOT NULL,
        column_attnum smallint    NOT NULL,
        model         text        NOT NULL,
        dimensions    integer     NOT NULL,
        text_prefix   text        NOT NULL DEFAULT '',
        query_prefix  text        NOT NULL DEFAULT '',
        recorded_at   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (table_name, column_attnum)
    );
    CREATE TABLE IF NOT EXISTS {s}.trust_log (
        id          bigserial   PRIMARY KEY,
        table_name  text        NOT NULL,
        kind        text        NOT NULL,
        run_id      bigint,
        model       text,
        recorded_at timestamptz NOT NULL DEFAULT now(),
        result      jsonb       NOT NULL DEFAULT '{{}}'
    );
    CREATE INDEX IF NOT EXISTS trust_log_kind_idx ON {s}.trust_log (table_name, kind, id DESC);
    """,
    # 7: each run's model servers as its heartbeat last saw them (issue 20): in the rotation or out, and why;
    #    URLs masked. `status` shows them without asking any server.
    """
    ALTER TABLE {s}.runs ADD COLUMN IF NOT EXISTS servers jsonb;
    """,
    # 8: the API the column's vectors were made through (issue 22: `ollama` or `openai`; NULL: recorded before,
    #    which was Ollama's). Another API for the same model name is refused until `verify` shows a match.
    """
    ALTER TABLE {s}.column_identity ADD COLUMN IF NOT EXISTS api text;
    """,
    # 9: how a pooled vector was made (issue 23): the pieces of a text longer than the model's window and their
    #    weights (core/pooling.py), so verify rebuilds it exactly; NULL for a vector of one piece.
    """
    ALTER TABLE {s}.embedding_provenance ADD COLUMN IF NOT EXISTS pooling jsonb;
    CREATE INDEX IF NOT EXISTS embedding_provenance_pooled_idx
        ON {s}.embedding_provenance (table_name, column_attnum, chunk_id) WHERE pooling IS NOT NULL;
    """,
    # 10: the model's answer to a fixed probe text, per column (issue 22, core/fingerprint.py): the vectors its
    #    servers gave it, so a run tells a server serving other weights under the same name before it writes.
    """
    ALTER TABLE {s}.column_identity ADD COLUMN IF NOT EXISTS fingerprint jsonb;
    """,
]
