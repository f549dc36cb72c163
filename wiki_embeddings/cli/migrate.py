"""`migrate-model`: a change of model without downtime, one action per call. Start, fill, swap and rollback are
core operations (core/operations.py, Dagster's migration jobs run the same); status, abort and the self-test
alone are the CLI's own."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

from wiki_embeddings.checks import one_line
from wiki_embeddings.cli.output import BarReporter, printer
from wiki_embeddings.core import migration, operations, quality
from wiki_embeddings.core.db import Store
from wiki_embeddings.core.factories import build_store
from wiki_embeddings.local_services import database_url, local_ollama
from wiki_embeddings.settings import Settings


@contextlib.contextmanager
def _checked_store(s: Settings) -> Iterator[Store]:
    assert s.database_url is not None
    with build_store(s, s.database_url) as store:
        store.migrate()
        store.column_dimensions()  # a clear error when the table or column is absent
        yield store


def cmd_migrate_model(s: Settings, args: argparse.Namespace, out: Any) -> int:
    s = s.replace(database_url=database_url(s))
    log = printer(out)
    if args.migration_status:
        with _checked_store(s) as store:
            info = {**migration.shadow_status(store), **quality.latest_figures(store)}
        if args.json:
            print(json.dumps(info, default=str), file=out)
        else:
            if not info["target_model"]:
                print("no model migration in progress", file=out)
            print("\n".join(f"{k}={one_line(str(v))}" for k, v in info.items()), file=out)
        return 0
    if args.abort:
        with _checked_store(s) as store:
            dropped = store.abort_migration()
        print(
            f"migration aborted; shadow column {dropped} dropped"
            if dropped
            else "no model migration in progress: nothing to abort",
            file=out,
        )
        return 0
    if args.check_quality:
        try:
            with _checked_store(s) as store:
                quality.gate(store, s, sample=args.quality_sample, margin=args.quality_margin, log=log)
        except quality.QualityRefused as exc:
            print(f"the swap would be refused: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.swap:
        try:
            message = operations.swap(
                s, force=args.force, sample=args.quality_sample, margin=args.quality_margin, log=log
            )
        except quality.QualityRefused as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(message, file=out)
        return 0
    if args.rollback:
        print(operations.rollback(s, log=log), file=out)
        return 0
    return _migrate_to(s, args.target_model, out)


def _migrate_to(s: Settings, target: str, out: Any) -> int:
    """Start (or continue) the migration to `target` and fill its shadow column, printing its coverage after."""
    log = printer(out)
    s = operations.migration_settings(s, target)
    live_column = s.embedding_column
    with local_ollama(s, target, log=log) as local_url:
        if local_url:
            s = s.replace(ollama_url=local_url)
        started = operations.start_migration(s, target, log=log)
        log(started.message(live_column) + " (`migrate-model --swap`)")
        shadow = started.shadow_column
        overrides = {"embedding_column": shadow, "ollama_model": target}
        report = operations.fill_shadow(
            s, overrides, mode="migrate", log=log, handle_signals=True, reporter=BarReporter(out, log)
        )
    assert s.database_url is not None
    with build_store(s, s.database_url) as store:
        info = migration.shadow_status(store)
    log(
        f"shadow {shadow}: total={info.get('total')} embedded={info.get('embedded')} missing={info.get('missing')} "
        f"coverage_pct={info.get('coverage_pct')}"
    )
    if report.exit_code:
        print(f"error: {report.message}", file=sys.stderr)
    return report.exit_code
