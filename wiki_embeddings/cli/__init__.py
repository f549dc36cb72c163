"""`wiki-embeddings`: the operators' commands (the runbook's scripts call these). Parsing (cli/parser.py) and
printing (cli/output.py) only: each command (cli/commands.py, cli/migrate.py) calls the core."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from wiki_embeddings.checks import one_line
from wiki_embeddings.cli.commands import COMMANDS
from wiki_embeddings.cli.exits import INTERRUPTED, exit_of
from wiki_embeddings.cli.parser import build_parser, settings_from_args
from wiki_embeddings.settings import redact, url_secrets

__all__ = ["COMMANDS", "build_parser", "main", "settings_from_args"]


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    """Run one command: its exit code (cli/exits.py `TABLE`); any error it meets is one `error:` line on stderr,
    with no password in it, never a traceback."""
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    secrets: list[str | None] = []
    try:
        settings = settings_from_args(args)
        secrets = list(url_secrets(settings.database_url))
        secrets += [secret for url in settings.ollama_urls for secret in url_secrets(url)]
        secrets.append(settings.api_key)
        return COMMANDS[args.command](settings, args, out)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every failure class ends as one line and its documented code
        code, line = exit_of(exc)
        print(f"error: {one_line(redact(line, secrets))}", file=sys.stderr)
        return code
