"""The subcommands: each turns the parsed flags into a core call (core/operations.py for what Dagster offers
too) and prints the answer. `migrate-model` is in cli/migrate.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from wiki_embeddings.checks import one_line
from wiki_embeddings.cli.exits import SERVER_UNAVAILABLE
from wiki_embeddings.cli.migrate import cmd_migrate_model
from wiki_embeddings.cli.output import BarReporter, CliError, failure_row, printer
from wiki_embeddings.cli.parser import given_settings
from wiki_embeddings.cli.runs import cmd_runs
from wiki_embeddings.core import control, importer, operations, verify
from wiki_embeddings.core.context import format_preflight
from wiki_embeddings.core.db import Store
from wiki_embeddings.core.embedders import EmbedFailure
from wiki_embeddings.core.factories import (
    build_client,
    build_store,
    preflight_estimate,
    probe_model_dimensions,
    resolve_model,
)
from wiki_embeddings.core.status import collect_status, format_status, readiness_of
from wiki_embeddings.local_services import answers, database_url, local_ollama
from wiki_embeddings.settings import Settings, from_env

# Vector lengths of well-known embedding models, used by `import` only when the server cannot be asked.
KNOWN_DIMENSIONS = {"all-minilm": 384, "nomic-embed-text": 768, "mxbai-embed-large": 1024, "bge-m3": 1024}


def cmd_backfill(s: Settings, args: argparse.Namespace, out: Any) -> int:
    s = s.replace(database_url=database_url(s))
    assert s.database_url is not None
    if args.dry_run:
        return _dry_run(s, out)
    log = printer(out)
    with build_store(s, s.database_url) as store:
        model = resolve_model(s, store, local_default=s.with_ollama and not answers(s.ollama_urls[0]))
    with local_ollama(s, model, log=log) as local_url:
        urls = [local_url] if local_url else s.ollama_urls
        if local_url:
            s = s.replace(ollama_url=local_url)
        outcome = operations.backfill(
            s,
            mode="retry_failed" if s.retry_failed else "backfill",
            log=log,
            maintenance=operations.is_maintenance(s),
            client=lambda settings, _store: build_client(settings, model, urls),
            urls=urls,
            handle_signals=True,
            reporter=lambda: BarReporter(out, log),
        )
    report = outcome.last
    if report.exit_code:
        print(f"error: {one_line(report.message)}", file=sys.stderr)
    return report.exit_code


def _dry_run(s: Settings, out: Any) -> int:
    assert s.database_url is not None
    with build_store(s, s.database_url) as store:
        store.migrate()
        missing = store.count_missing(s.id_min, s.id_max)
        todo = missing if s.max_chunks is None else min(missing, s.max_chunks)
        first, last = store.missing_id_bounds(s.id_min, s.id_max)
        ids = f"ids {first}..{last}" if first is not None else "no ids"
        model = resolve_model(s, store, local_default=s.with_ollama)
        print(
            f"dry run: would embed {todo} of {missing} missing chunks in {store.table.qualified} ({ids}) "
            f"with model {model!r}, batch {s.batch_size}, max-chars {s.max_chars}; nothing was embedded or written",
            file=out,
        )
        if todo:
            print(format_preflight(preflight_estimate(s, store, model)), file=out)
    return 0


def cmd_status(s: Settings, args: argparse.Namespace, out: Any) -> int:
    with build_store(s, database_url(s)) as store:
        if args.scan_changed:
            store.migrate()
            store.scan_changed()
        status = collect_status(store, s)
        ready = readiness_of(store, status) if args.check else None
    if args.json:
        print(json.dumps(status, default=str), file=out)
    else:
        print(format_status(status), file=out)
    if ready is None:
        return 0
    # The one readiness decision (core/readiness.py), as the Dagster check and the readiness sensor make it.
    reason = one_line(ready.reason)
    print(f"check: {'ready' if ready.ready else 'not ready'}: {reason}", file=sys.stderr if args.json else out)
    return 0 if ready.ready else 1


def cmd_stop(s: Settings, args: argparse.Namespace, out: Any) -> int:
    with build_store(s, database_url(s)) as store:
        try:
            control.request_stop(store, s.stop_file, f"{args.reason} ({os.environ.get('USER', 'operator')})")
        except control.StopFileError as exc:
            raise CliError(str(exc)) from exc
    print(
        f"stop requested: stop file {s.stop_file} created and recorded in the database; running backfills "
        "end after their current batch",
        file=out,
    )
    return 0


def cmd_resume(s: Settings, args: argparse.Namespace, out: Any) -> int:
    db_url = database_url(s)
    with build_store(s, db_url) as store:
        control.clear_stop(store, s.stop_file)
        last = store.last_run()
    print(f"stop request cleared (stop file {s.stop_file} removed)", file=out)
    if args.no_run:
        return 0
    saved: dict[str, Any] = dict(last["options"]) if last and last.get("options") else {}
    if not saved or last is None:
        print("no earlier run recorded: starting a backfill with the defaults", file=out)
    else:
        print(f"resuming with the options of run {last['run_id']} ({last['state']})", file=out)
    resumed = from_env(**{**saved, **given_settings(args), "database_url": s.database_url}).validate()
    return cmd_backfill(resumed, argparse.Namespace(dry_run=False), out)


def cmd_import(s: Settings, args: argparse.Namespace, out: Any) -> int:
    db_url = database_url(s)
    limit = None if args.all else args.limit
    with build_store(s, db_url) as store:
        store.migrate()
        if not store.table_exists():
            dims = args.dimensions or _dimensions_for_new_table(s, store)
            store.ensure_table(dims)
            print(f"created {store.table.qualified} with {s.embedding_column} vector({dims})", file=out)
        else:
            store.ensure_missing_index()
        chunks = importer.iter_chunks(Path(args.wiki_dir) if args.wiki_dir else None, limit, args.chunk_chars)
        rows = ((c.id, c.title, c.chunk_index, c.content) for c in chunks)
        added = store.insert_chunks(rows)
        _, _, total = store.id_bounds()
    print(
        f"imported {added} new chunks ({total} in {store.table.qualified}); Wikipedia text, CC BY-SA",
        file=out,
    )
    return 0


def _dimensions_for_new_table(s: Settings, store: Store) -> int:
    model = resolve_model(s, store, local_default=s.with_ollama)
    if s.api != "ollama":  # no cheap "are you there" in that API: ask the model; unreachable falls through
        try:
            return probe_model_dimensions(s, model)
        except EmbedFailure:
            pass
    elif answers(s.ollama_urls[0]):
        return probe_model_dimensions(s, model)
    base = model.split(":")[0]
    if base in KNOWN_DIMENSIONS:
        return KNOWN_DIMENSIONS[base]
    raise CliError(
        f"cannot learn the vector length of model {model!r}: OLLAMA_URL does not answer; pass --dimensions D",
        SERVER_UNAVAILABLE,
    )


def cmd_failures(s: Settings, args: argparse.Namespace, out: Any) -> int:
    with build_store(s, database_url(s)) as store:
        store.migrate()
        if args.action == "clear":
            n = store.clear_failures(args.ids or None)
            print(f"forgot {n} failure records", file=out)
            return 0
        rows = store.list_failures(s.max_attempts)
    if args.json:
        print(json.dumps(rows, default=str), file=out)
        return 0
    if not rows:
        print("no recorded failures", file=out)
    for r in rows:
        print(failure_row(r), file=out)
    return 0


def cmd_verify(s: Settings, args: argparse.Namespace, out: Any) -> int:
    """Exit 0 match, 1 model changed / mismatch, 3 not evaluated (core/verify.py)."""
    db_url = database_url(s)
    with build_store(s, db_url) as store:
        store.migrate()
        store.column_dimensions()  # a clear error when the table or column is absent
        model = resolve_model(s, store)
        report = verify.verify(store, s, model, sample=args.sample, full=args.full, threshold=args.min_cosine)
    if args.json:
        print(json.dumps(report.as_dict(), default=str), file=out)
    else:
        print(verify.format_report(report), file=out)
    return report.exit_code


def cmd_config(s: Settings, args: argparse.Namespace, out: Any) -> int:
    for key, value in s.masked().items():
        print(f"{key}={'' if value is None else value}", file=out)
    return 0


COMMANDS = {
    "backfill": cmd_backfill,
    "status": cmd_status,
    "stop": cmd_stop,
    "resume": cmd_resume,
    "import": cmd_import,
    "failures": cmd_failures,
    "config": cmd_config,
    "migrate-model": cmd_migrate_model,
    "verify": cmd_verify,
    "runs": cmd_runs,
}
