"""Plain values the store hands out and takes: table reference, claims, provenance, write results."""

from __future__ import annotations

from dataclasses import dataclass, field

from wiki_embeddings.core.db.errors import StoreError

# Characters never accepted in a configured identifier, even though quoting would make them harmless:
# a table name with a quote or a semicolon in it is far more likely an injection attempt than a real name.
_FORBIDDEN_IDENTIFIER_CHARS = set("\"';\\\x00") | {chr(c) for c in range(32)}


def check_identifier(name: str, what: str) -> str:
    if not name or len(name.encode()) > 63:
        raise StoreError(f"{what} {name!r} must be 1 to 63 bytes long")
    bad = sorted(set(name) & _FORBIDDEN_IDENTIFIER_CHARS)
    if bad:
        raise StoreError(f"{what} {name!r} contains forbidden characters {bad!r}; refusing it")
    return name


@dataclass(frozen=True)
class TableRef:
    """The chunk table and its three columns, validated once."""

    schema: str
    name: str
    id_column: str = "id"
    text_column: str = "content"
    embedding_column: str = "embedding"

    @classmethod
    def parse(
        cls,
        table: str,
        id_column: str = "id",
        text_column: str = "content",
        embedding_column: str = "embedding",
    ) -> TableRef:
        schema, _, name = table.rpartition(".")
        return cls(
            check_identifier(schema or "public", "schema"),
            check_identifier(name, "table"),
            check_identifier(id_column, "id column"),
            check_identifier(text_column, "text column"),
            check_identifier(embedding_column, "embedding column"),
        )

    @property
    def qualified(self) -> str:
        """The key under which the bookkeeping tables remember this table."""
        return f"{self.schema}.{self.name}"

    @property
    def lock_namespace(self) -> str:
        """Hashed with each chunk id into its advisory-lock key (see `_lock_key_sql`)."""
        return f"wiki_embeddings claim {self.qualified}:"


@dataclass(frozen=True)
class Claim:
    """Chunks locked by one claim: (id, cut text) to embed, and how far the keyset scan got."""

    rows: list[tuple[int, str]]
    last_scanned_id: int | None
    busy: int  # candidates another worker holds
    # Claimed chunks whose stored bytes are not text (SQL_ASCII databases only): (id, reason, byte length).
    invalid: list[tuple[int, str, int]] = field(default_factory=list)
    # md5 of the whole stored text of each claimed chunk (what PostgreSQL recomputes as md5(content)).
    text_md5: dict[int, str] = field(default_factory=dict)
    found: int = 0  # content-change scans: changed chunks found in the window (locked or not)
    busy_ids: list[int] = field(default_factory=list)  # candidates whose claim key another session holds


@dataclass(frozen=True)
class Provenance:
    """How a batch of vectors was made: recorded beside every vector written."""

    model: str
    dimensions: int
    max_chars: int
    text_prefix: str = ""


class WriteResult(int):
    """Rows written by one batch write; `locked` holds the ids another session held a row lock on (not waited
    for: the engine retries them at the end of its run)."""

    locked: tuple[int, ...]

    def __new__(cls, written: int, locked: tuple[int, ...] = ()) -> WriteResult:
        obj = super().__new__(cls, written)
        obj.locked = locked
        return obj


@dataclass(frozen=True)
class VectorNotes:
    """Per-vector provenance of one batch, parallel to its ids: what was actually embedded."""

    chars_sent: list[int]
    context_cut: list[bool]  # cut below --max-chars to fit the model's context
    server_truncated: list[bool]  # the server evaluated fewer tokens than the text has (silent truncation)
    # How a pooled vector was made (core/pooling.py's JSON description: pieces and weights); None: one piece.
    pooling: list[str | None] | None = None


def coverage_pct(embedded: int, total: int) -> str:
    """Two decimals, truncated so that 100.00 appears only when nothing is missing.

    An empty table reports 0.00: nothing is embedded, and readiness must not flip on an empty import.
    """
    if total == 0:
        return "0.00"
    hundredths = embedded * 10000 // total
    return f"{hundredths // 100}.{hundredths % 100:02d}"
