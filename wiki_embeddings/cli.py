"""`wiki-embeddings`: the operators' commands (the runbook's scripts call these). Parsing and printing only."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from wiki_embeddings import __version__
from wiki_embeddings.core import control, identity, importer, migration, operations, quality, verify
from wiki_embeddings.core.backfill import DimensionMismatch
from wiki_embeddings.core.context import format_preflight
from wiki_embeddings.core.db import DatabaseError, StoreError
from wiki_embeddings.core.embedders import EmbedFailure
from wiki_embeddings.core.factories import (
    build_client,
    build_store,
    preflight_estimate,
    probe_model_dimensions,
    resolve_model,
)
from wiki_embeddings.core.progress import LineReporter, Progress
from wiki_embeddings.core.status import collect_status, format_status, readiness_of
from wiki_embeddings.local_services import answers, database_url, local_ollama
from wiki_embeddings.settings import APIS, Settings, from_env, redact, url_secrets

# Vector lengths of well-known embedding models, used by `import` only when the server cannot be asked.
KNOWN_DIMENSIONS = {"all-minilm": 384, "nomic-embed-text": 768, "mxbai-embed-large": 1024, "bge-m3": 1024}

EXIT_ERROR = 2


class CliError(Exception):
    """A one-line error for the operator; exit code 2."""


# ---------------------------------------------------------------------------- argument parsing
def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("database and model (environment variables in brackets)")
    g.add_argument("--database-url", help="libpq URL [DATABASE_URL]; unset: the embedded PostgreSQL")
    g.add_argument("--table", help="chunk table, schema-qualified allowed [WIKI_EMBED_TABLE] (public.wiki_chunks)")
    g.add_argument("--id-column", help="[WIKI_EMBED_ID_COLUMN] (id)")
    g.add_argument("--text-column", help="[WIKI_EMBED_TEXT_COLUMN] (content)")
    g.add_argument("--embedding-column", help="[WIKI_EMBED_EMBEDDING_COLUMN] (embedding)")
    g.add_argument("--ollama-url", help="comma-separated for several servers [OLLAMA_URL] (http://ollama:11434)")
    g.add_argument("--model", dest="ollama_model", help="[OLLAMA_MODEL]; unset: the model of the last run")
    g.add_argument(
        "--api",
        choices=APIS,
        help="the servers' API: ollama, or openai (OpenAI-compatible /v1/embeddings: TEI, vLLM, infinity-emb, "
        "llama.cpp; URLs still in OLLAMA_URL, bearer key in WIKI_EMBED_API_KEY) [WIKI_EMBED_API] (ollama)",
    )
    g.add_argument("--text-prefix", help="prepended to every text, e.g. 'search_document: ' [WIKI_EMBED_TEXT_PREFIX]")
    g.add_argument(
        "--query-prefix",
        help="the model's query prefix, e.g. 'search_query: ' (swap self-test) [WIKI_EMBED_QUERY_PREFIX]",
    )
    g.add_argument("--max-attempts", type=int, help="failures of the same text before quarantine (3)")


def _concurrency(raw: str) -> int:
    """`--concurrency auto` (0: self-tuning) or a number of requests in flight per server."""
    if raw.strip().lower() == "auto":
        return 0
    return int(raw)


def _backfill_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runbook flags")
    g.add_argument(
        "--batch-size",
        type=int,
        help="most chunks per request (64); trouble (503, timeouts) shrinks batches, success grows them back",
    )
    g.add_argument("--report-every", type=int, help="a progress line every N batches (10)")
    g.add_argument("--timeout-sec", type=float, help="deadline for one whole embedding request (120)")
    g.add_argument("--sleep-ms", type=int, help="pause after each request (0); > 0 means one request in flight")
    g.add_argument("--max-chars", type=int, help="text cut to this many characters before sending (2000)")
    g.add_argument("--failure-log", help="JSONL file for chunks that could not be embedded")
    g.add_argument("--max-chunks", type=int, help="stop after this many chunks (maintenance)")
    g.add_argument(
        "--until", metavar="HH:MM", help="end the run safely at this time (local, or with an offset: 06:00+09:00)"
    )
    g.add_argument("--max-minutes", type=float, help="end the run safely after this many minutes")
    g.add_argument(
        "--with-ollama",
        action="store_true",
        default=None,
        help="start a local embedding service when OLLAMA_URL does not answer (refused under --api openai) "
        "[OLALA_START_OLLAMA=1]",
    )
    g2 = p.add_argument_group("more")
    g2.add_argument(
        "--concurrency",
        type=_concurrency,
        help="requests in flight per Ollama server: N pins it; auto (default) starts at 1 and adds a queued request "
        "while the server idles between requests, backing off on 503/429/timeouts and latency growth",
    )
    g2.add_argument(
        "--polite",
        dest="polite",
        action="store_true",
        default=None,
        help="live queries share the server: one request in flight, batches sized to --target-request-sec "
        "(default: on in maintenance runs once the readiness flag is set) [WIKI_EMBED_POLITE]",
    )
    g2.add_argument("--no-polite", dest="polite", action="store_false", default=None, help="never polite")
    g2.add_argument(
        "--target-request-sec",
        type=float,
        help="polite mode: the longest a request of ours should hold the server, so a user's query waits about "
        "that long at most (0.5; giving it turns polite mode on) [WIKI_EMBED_TARGET_REQUEST_SEC]",
    )
    g2.add_argument("--retries", type=int, help="retries of transport errors / overload before stopping (5)")
    g2.add_argument("--id-min", type=int, help="only chunks with id >= this")
    g2.add_argument("--id-max", type=int, help="only chunks with id <= this")
    g2.add_argument(
        "--retry-failed",
        action="store_true",
        default=None,
        help="only the recorded failures, quarantined included (re-run from the failure log)",
    )
    g2.add_argument(
        "--drop-vector-index",
        action="store_true",
        default=None,
        help="bootstrap: drop an HNSW/IVFFlat index on the column for the run and rebuild it after",
    )
    g2.add_argument(
        "--refresh-changed",
        dest="refresh_changed",
        action="store_true",
        default=None,
        help="after the missing chunks, re-embed chunks whose text changed since they were embedded "
        "(default: on in maintenance runs, i.e. with --max-chunks)",
    )
    g2.add_argument(
        "--no-refresh-changed",
        dest="refresh_changed",
        action="store_false",
        default=None,
        help="skip that pass",
    )
    g2.add_argument("--dry-run", action="store_true", help="say what would be embedded and exit")
    g3 = p.add_argument_group("model server (real Ollama's knobs)")
    g3.add_argument(
        "--keep-alive",
        help="sent with every request so the model stays loaded between batches (ignored, with a note, under "
        "--api openai) [WIKI_EMBED_KEEP_ALIVE] (30m)",
    )
    g3.add_argument(
        "--num-ctx",
        type=int,
        help="options.num_ctx: the context window in tokens, up to the model's maximum; under --api openai the "
        "model's window in tokens where the server publishes none (a cap where it does) [WIKI_EMBED_NUM_CTX] "
        "(the modelfile's default)",
    )
    g3.add_argument(
        "--request-dimensions",
        action="store_true",
        default=None,
        help="ask a Matryoshka model for `dimensions: D` when the column's vector(D) is narrower than its output "
        "(either API) [WIKI_EMBED_REQUEST_DIMENSIONS]",
    )
    g3.add_argument(
        "--load-timeout-sec",
        type=float,
        help="allowance for the first request, which may pay the model's load time [WIKI_EMBED_LOAD_TIMEOUT_SEC] (300)",
    )
    g3.add_argument(
        "--reembed-cut",
        action="store_true",
        default=None,
        help="also re-embed chunks that were cut to fit the context or truncated by the server (e.g. after "
        "raising --num-ctx)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wiki-embeddings",
        description="Fill missing vectors in public.wiki_chunks.embedding from an Ollama embedding model.",
    )
    parser.add_argument("--version", action="version", version=f"wiki-embeddings {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backfill", help="embed every missing chunk (bootstrap and maintenance)")
    _common(p)
    _backfill_flags(p)

    p = sub.add_parser("status", help="key=value status: total, embedded, missing, coverage_pct, ...")
    _common(p)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--check", action="store_true", help="exit 0 only when ready (missing=0, ..., no drift); say why")
    p.add_argument(
        "--scan-changed",
        action="store_true",
        help="first scan the whole table for chunks whose text changed since they were embedded (stale_text)",
    )

    p = sub.add_parser("stop", help="ask running backfills to stop after their current batch")
    _common(p)
    p.add_argument("--reason", default="operator")

    p = sub.add_parser("resume", help="clear the stop request and run the last backfill's options again")
    _common(p)
    p.add_argument("--no-run", action="store_true", help="only clear the stop request")

    p = sub.add_parser("import", help="create the table if absent and load the wiki sample (idempotent)")
    _common(p)
    p.add_argument("--wiki-dir", help="folder with kowiki/enwiki_sample.jsonl.gz [WIKI_DATA_DIR]")
    p.add_argument("--limit", type=int, default=2000, help="about this many chunks (2000); --all for all")
    p.add_argument("--all", action="store_true", help="the whole sample")
    p.add_argument("--dimensions", type=int, help="vector(D) for a new table; default: asked of the model")
    p.add_argument("--chunk-chars", type=int, default=importer.DEFAULT_MAX_CHARS, help="max chunk size")
    p.add_argument("--with-ollama", action="store_true", default=None)

    p = sub.add_parser("failures", help="list recorded failures, or `failures clear [ids]`")
    _common(p)
    p.add_argument("action", nargs="?", choices=["list", "clear"], default="list")
    p.add_argument("ids", nargs="*", type=int)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "migrate-model",
        help="change the embedding model without downtime: fill a shadow column, then swap it in",
        description="--to MODEL fills the shadow column <embedding>_next with MODEL (stop/resume like backfill); "
        "--status shows its coverage; --swap makes it the live column in one transaction (the old one is kept as "
        "<embedding>_prev); --rollback swaps back; --abort drops the shadow column.",
    )
    _common(p)
    _backfill_flags(p)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--to", dest="target_model", metavar="MODEL", help="start or continue filling the shadow")
    action.add_argument("--status", dest="migration_status", action="store_true", help="shadow coverage")
    action.add_argument("--swap", action="store_true", help="make the complete shadow column the live one")
    action.add_argument("--rollback", action="store_true", help="swap the previous column back in")
    action.add_argument("--abort", action="store_true", help="drop the shadow column and forget the migration")
    action.add_argument(
        "--check-quality", action="store_true", help="run the swap's retrieval self-test only (exit 1: it would refuse)"
    )
    p.add_argument("--json", action="store_true", help="--status as one JSON object")
    p.add_argument("--force", action="store_true", help="--swap even when the retrieval self-test refuses (recorded)")
    p.add_argument("--quality-sample", type=int, default=quality.DEFAULT_SAMPLE, help="chunks in the self-test (2000)")
    p.add_argument(
        "--quality-margin",
        type=float,
        default=quality.DEFAULT_MARGIN,
        help="refuse the swap when the shadow's recall@10 or MRR is lower than the live one's by more (0.02)",
    )

    p = sub.add_parser(
        "verify",
        help="re-embed a sample of stored vectors and compare: did the model change under its name?",
        description="Exit 0: the stored vectors match the live model; 1: they do not (model changed, or some "
        "vectors differ / have norm 0); 3: not evaluated (the model server did not answer).",
    )
    _common(p)
    p.add_argument("--sample", type=int, default=verify.DEFAULT_SAMPLE, help="vectors re-embedded (200)")
    p.add_argument("--full", action="store_true", help="every embedded chunk instead of a sample (a full scan)")
    p.add_argument(
        "--min-cosine", type=float, default=verify.MIN_COSINE, help=f"threshold per vector ({verify.MIN_COSINE})"
    )
    p.add_argument("--batch-size", type=int, help="texts per request (64)")
    p.add_argument("--timeout-sec", type=float, help="deadline for one request (120)")
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    _common(p)
    _backfill_flags(p)
    return parser


_NOT_SETTINGS = {
    "command",
    "json",
    "check",
    "reason",
    "no_run",
    "wiki_dir",
    "limit",
    "all",
    "dimensions",
    "chunk_chars",
    "action",
    "ids",
    "dry_run",
    "scan_changed",
    "target_model",
    "migration_status",
    "swap",
    "rollback",
    "abort",
    "check_quality",
    "force",
    "quality_sample",
    "quality_margin",
    "sample",
    "full",
    "min_cosine",
}


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    return from_env(**overrides).validate()


class BarReporter:
    """A progress bar on a terminal (redrawn after every batch), plus the runbook's progress lines."""

    WIDTH = 30

    def __init__(self, out: Any, log: Callable[[str], None]):
        self._out = out
        self._lines = LineReporter(log)
        self._bar = bool(getattr(out, "isatty", lambda: False)())

    def progress(self, figures: Progress, report_line: bool) -> None:
        if self._bar:
            done = figures.embedded + figures.failed
            filled = int(self.WIDTH * done / figures.total) if figures.total else self.WIDTH
            self._out.write(
                f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {figures.embedded}/{figures.total} "
                f"{figures.chunks_per_s:.1f} chunks/s eta {figures.eta}   "
            )
            if report_line:
                self._out.write("\n")
            self._out.flush()
        self._lines.progress(figures, report_line)

    def finish(self) -> None:
        if self._bar:
            self._out.write("\n")
            self._out.flush()


# ---------------------------------------------------------------------------- commands
def cmd_backfill(s: Settings, args: argparse.Namespace, out: Any) -> int:
    db_url = database_url(s)
    s = s.replace(database_url=db_url)
    store = build_store(s, db_url)
    try:
        if args.dry_run:
            return _dry_run(s, store, out)
        model = resolve_model(s, store, local_default=s.with_ollama and not answers(s.ollama_urls[0]))
        with local_ollama(s, model, log=lambda m: print(m, file=out, flush=True)) as local_url:
            urls = [local_url] if local_url else s.ollama_urls
            if local_url:
                s = s.replace(ollama_url=local_url)
            log = lambda m: print(m, file=out, flush=True)  # noqa: E731
            report = operations.run_backfill(
                s,
                mode="retry_failed" if s.retry_failed else "backfill",
                log=log,
                client=lambda settings, _store: build_client(settings, model, urls),
                handle_signals=True,
                reporter=BarReporter(out, log),
            )
            if report.exit_code == 0 and s.max_chunks is not None and not s.retry_failed:
                mode = "migrate (maintenance)"
                shadow = operations.maintain_shadow(
                    s, store, mode=mode, log=log, urls=urls, handle_signals=True, reporter=BarReporter(out, log)
                )
                report = shadow or report
        if report.exit_code:
            print(f"error: {report.message}", file=sys.stderr)
        return report.exit_code
    finally:
        store.close()


def _dry_run(s: Settings, store: Any, out: Any) -> int:
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
    print(f"check: {'ready' if ready.ready else 'not ready'}: {ready.reason}", file=sys.stderr if args.json else out)
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
    explicit = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and v is not None}
    resumed = from_env(**{**saved, **explicit, "database_url": s.database_url}).validate()
    ns = argparse.Namespace(dry_run=False)
    return cmd_backfill(resumed, ns, out)


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


def _dimensions_for_new_table(s: Settings, store: Any) -> int:
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
        f"cannot learn the vector length of model {model!r}: OLLAMA_URL does not answer; pass --dimensions D"
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
        state = "quarantined" if r["quarantined"] else ("open" if r["still_missing"] else "embedded since")
        print(
            f"{r['chunk_id']}\t{r['error']}\tattempts={r['attempts']}\tlast_seen={r['last_seen']:%Y-%m-%d %H:%M:%S}"
            f"\t{state}\t{r['message'][:120]}",
            file=out,
        )
    return 0


def cmd_migrate_model(s: Settings, args: argparse.Namespace, out: Any) -> int:
    db_url = database_url(s)
    s = s.replace(database_url=db_url)
    live_column = s.embedding_column
    with build_store(s, db_url) as store:
        store.migrate()
        store.column_dimensions()  # a clear error when the table or column is absent
        if args.migration_status:
            info = {**migration.shadow_status(store), **quality.latest_figures(store)}
            if args.json:
                print(json.dumps(info, default=str), file=out)
            else:
                if not info["target_model"]:
                    print("no model migration in progress", file=out)
                print("\n".join(f"{k}={v}" for k, v in info.items()), file=out)
            return 0
        if args.abort:
            dropped = store.abort_migration()
            print(f"migration aborted; shadow column {dropped or '-'} dropped", file=out)
            return 0
        if args.swap or args.check_quality:
            log = lambda m: print(m, file=out, flush=True)  # noqa: E731
            try:
                quality.gate(
                    store,
                    s,
                    force=args.force and args.swap,
                    sample=args.quality_sample,
                    margin=args.quality_margin,
                    log=log,
                )
            except quality.QualityRefused as exc:
                print(f"error: {exc}" if args.swap else f"the swap would be refused: {exc}", file=sys.stderr)
                return 1
            if args.swap:
                print(migration.swap(store, log=log), file=out)
            return 0
        if args.rollback:
            print(migration.rollback(store, log=lambda m: print(m, file=out, flush=True)), file=out)
            return 0
        target = args.target_model
        migration.check_target(store, target, s.text_prefix)
        shadow_now = migration.shadow_name(store.table.embedding_column)
        if not s.text_prefix and not s.query_prefix:  # continuing: the prefixes the migration was started with
            s = s.replace(**identity.shadow_prefixes(store, shadow_now))
    log = lambda m: print(m, file=out, flush=True)  # noqa: E731
    with local_ollama(s, target, log=log) as local_url:
        if local_url:
            s = s.replace(ollama_url=local_url)
        dims = probe_model_dimensions(s, target)
        with build_store(s, db_url) as store:
            started = migration.start(store, target, dims, log=log, text_prefix=s.text_prefix)
        log(started.message(live_column) + " (`migrate-model --swap`)")
        shadow = started.shadow_column
        overrides = {"embedding_column": shadow, "ollama_model": target}
        report = operations.fill_shadow(
            s, overrides, mode="migrate", log=log, handle_signals=True, reporter=BarReporter(out, log)
        )
    with build_store(s, db_url) as store:
        info = migration.shadow_status(store)
    log(
        f"shadow {shadow}: total={info.get('total')} embedded={info.get('embedded')} missing={info.get('missing')} "
        f"coverage_pct={info.get('coverage_pct')}"
    )
    if report.exit_code:
        print(f"error: {report.message}", file=sys.stderr)
    return report.exit_code


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
}


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    secrets: list[str | None] = []
    try:
        settings = settings_from_args(args)
        secrets = list(url_secrets(settings.database_url))
        secrets += [secret for url in settings.ollama_urls for secret in url_secrets(url)]
        secrets.append(settings.api_key)
        return COMMANDS[args.command](settings, args, out)
    except DatabaseError as exc:  # the driver's message may span lines: the first, without a password
        print(f"error: database: {redact(exc.first_line, secrets)}", file=sys.stderr)
        return EXIT_ERROR
    except (CliError, StoreError, DimensionMismatch, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {redact(str(exc), secrets)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
