"""The model-name rule of core/modelname.py as a PostgreSQL expression, for comparisons made inside a statement
(the model guard of a batch write, the recorded model, the stale-model count, the trust log). Built from the
rule's own pieces by psycopg composition; a test checks it against `canonical` on the server."""

from __future__ import annotations

from psycopg import sql

from wiki_embeddings.core.modelname import LOWER, STEPS, UPPER, WHITESPACE


def canonical_sql(expr: sql.Composable) -> sql.Composable:
    """`canonical(expr)` in SQL; compare it with a name canonicalized in Python (`canonical`) as a parameter."""
    out: sql.Composable = sql.SQL("translate(btrim({expr}, {ws}), {upper}, {lower})").format(
        expr=expr, ws=sql.Literal(WHITESPACE), upper=sql.Literal(UPPER), lower=sql.Literal(LOWER)
    )
    for pattern, replacement in STEPS:
        out = sql.SQL("regexp_replace({expr}, {pattern}, {replacement})").format(
            expr=out, pattern=sql.Literal(pattern), replacement=sql.Literal(replacement)
        )
    return out
