"""The command line: subcommands and their flags. A flag that sets a setting is built from the setting's `Option`
(wiki_embeddings/settings.py: its flag, help, type, environment variable), so the flags, the environment and
`resume` agree on one list; the other flags say what a command does with the settings."""

from __future__ import annotations

import argparse
from typing import Any

from wiki_embeddings import __version__
from wiki_embeddings.checks import AT_LEAST_ONE, BIGINT, Range, number_type, parse_number
from wiki_embeddings.core import importer, quality, verify
from wiki_embeddings.settings import FLAG_GROUPS, OPTIONS, Settings, from_env, only_settings, value_type

#: Flags of one command (not settings) that take numbers: parsed and range-checked by argparse (exit 2 naming them).
COUNT = number_type(int, AT_LEAST_ONE)
DIMENSIONS = number_type(int, Range(1, 16_000))  # pgvector's vector(D) takes at most 16,000 dimensions


def _ascii_number(kind: type) -> Any:
    """int/float from ASCII digits only (`checks.parse_number`); ranges are checked by `Settings.validate`."""

    def parse(raw: str) -> Any:
        return parse_number(kind, raw)

    parse.__name__ = kind.__name__  # argparse's "invalid int value"
    return parse


def add_setting(group: Any, name: str, **changes: Any) -> None:
    """The flag of setting `name` (and its negative, for a tri-state boolean); `changes` adjust it for a command."""
    option = OPTIONS[name]
    kind = value_type(name)
    kwargs: dict[str, Any] = {"dest": name, "help": option.help}
    if kind is bool:
        kwargs.update(action="store_true", default=None)
    elif option.parse is not None or kind is not str:
        kwargs["type"] = option.parse or _ascii_number(kind)
    if option.metavar:
        kwargs["metavar"] = option.metavar
    if option.choices:
        kwargs["choices"] = option.choices
    group.add_argument(option.flag or "--" + name.replace("_", "-"), **{**kwargs, **changes})
    if option.negative:
        group.add_argument(option.negative, dest=name, action="store_false", default=None, help=option.negative_help)


def _settings_group(p: argparse.ArgumentParser, group: str) -> Any:
    g = p.add_argument_group(FLAG_GROUPS[group])
    for name, option in OPTIONS.items():
        if option.group == group:
            add_setting(g, name)
    return g


def _common(p: argparse.ArgumentParser) -> None:
    _settings_group(p, "common")


def _backfill_flags(p: argparse.ArgumentParser) -> None:
    _settings_group(p, "runbook")
    more = _settings_group(p, "more")
    more.add_argument("--dry-run", action="store_true", help="say what would be embedded and exit")
    _settings_group(p, "server")


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
    p.add_argument("--limit", type=COUNT, default=2000, help="about this many chunks (2000); --all for all")
    p.add_argument("--all", action="store_true", help="the whole sample")
    p.add_argument("--dimensions", type=DIMENSIONS, help="vector(D) for a new table; default: asked of the model")
    p.add_argument("--chunk-chars", type=COUNT, default=importer.DEFAULT_MAX_CHARS, help="max chunk size")
    add_setting(p, "with_ollama", help=None)

    p = sub.add_parser("failures", help="list recorded failures, or `failures clear [ids]`")
    _common(p)
    p.add_argument("action", nargs="?", choices=["list", "clear"], default="list")
    p.add_argument("ids", nargs="*", type=number_type(int, BIGINT))
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
    p.add_argument(
        "--quality-sample", type=COUNT, default=quality.DEFAULT_SAMPLE, help="chunks in the self-test (2000)"
    )
    p.add_argument(
        "--quality-margin",
        type=number_type(float, Range(0, 1)),
        default=quality.DEFAULT_MARGIN,
        help="refuse the swap when the shadow's recall@10 or MRR is lower than the live one's by more (0.02)",
    )

    p = sub.add_parser(
        "verify",
        help="re-embed a sample of stored vectors and compare: did the model change under its name?",
        description="Exit 0: the stored vectors match the live model (or there is none yet); 8: the model changed "
        "under its name; 1: some vectors differ or have norm 0; 3: not evaluated (the model server did not answer; "
        "4: it lacks the model).",
    )
    _common(p)
    p.add_argument("--sample", type=COUNT, default=verify.DEFAULT_SAMPLE, help="vectors re-embedded (200)")
    p.add_argument("--full", action="store_true", help="every embedded chunk instead of a sample (a full scan)")
    p.add_argument(
        "--min-cosine",
        type=number_type(float, Range(-1, 1)),
        default=verify.MIN_COSINE,
        help=f"threshold per vector ({verify.MIN_COSINE})",
    )
    add_setting(p, "batch_size", help="texts per request (64)")
    add_setting(p, "timeout_sec", help="deadline for one request (120)")
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = sub.add_parser(
        "runs",
        help="the table's runs, newest first (state, host, pid, heartbeat age), or `runs release RUN_ID`",
        description="`runs` lists the table's runs; `runs release RUN_ID` releases a stalled one: marks it released "
        "(a process that wakes ends without writing) and ends its database sessions so its claims are free "
        "(pg_terminate_backend: superuser, membership in the sessions' role, or pg_signal_backend).",
    )
    _common(p)
    p.add_argument("action", nargs="?", choices=["list", "release"], default="list")
    p.add_argument("run_id", nargs="?", type=number_type(int, BIGINT), metavar="RUN_ID")
    p.add_argument("--limit", type=COUNT, default=20, help="runs listed (20)")
    p.add_argument("--force", action="store_true", help="release a run even while its heartbeat is fresh")
    p.add_argument("--json", action="store_true", help="one JSON list")

    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    _common(p)
    _backfill_flags(p)
    return parser


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line gave (flags left out are None there, and are left out here)."""
    return {k: v for k, v in only_settings(vars(args)).items() if v is not None}


def settings_from_args(args: argparse.Namespace) -> Settings:
    return from_env(**only_settings(vars(args))).validate()
