"""`wiki-embeddings`: the operators' commands (the runbook's scripts call these). Parsing (cli/parser.py) and
printing (cli/output.py) only: each command (cli/commands.py, cli/migrate.py) calls the core."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from wiki_embeddings.cli.commands import COMMANDS
from wiki_embeddings.cli.output import EXIT_ERROR, CliError
from wiki_embeddings.cli.parser import build_parser, settings_from_args
from wiki_embeddings.core.backfill import DimensionMismatch
from wiki_embeddings.core.db import DatabaseError, StoreError
from wiki_embeddings.settings import redact, url_secrets

__all__ = ["COMMANDS", "build_parser", "main", "settings_from_args"]


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
