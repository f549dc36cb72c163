"""`runs`: the table's runs, newest first, and `runs release RUN_ID` for a stalled one (core/runs.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from wiki_embeddings.checks import one_line
from wiki_embeddings.cli.output import CliError
from wiki_embeddings.core.factories import build_store
from wiki_embeddings.core.runs import ReleaseRefused, release_run, run_summary
from wiki_embeddings.local_services import database_url
from wiki_embeddings.settings import Settings

COLUMNS = ("run_id", "state", "mode", "host", "pid", "started", "heartbeat_age_s", "embedded")


def cmd_runs(s: Settings, args: argparse.Namespace, out: Any) -> int:
    with build_store(s, database_url(s)) as store:
        if args.action == "release":
            if args.run_id is None:
                raise CliError("runs release needs the RUN_ID of a stalled run (`wiki-embeddings runs` lists them)")
            try:
                done = release_run(store, args.run_id, force=args.force)
            except ReleaseRefused as exc:
                raise CliError(str(exc)) from None
            return _say_released(done, out)
        store.migrate(record=False)
        runs = [run_summary(run) for run in store.recent_runs(args.limit)]
    if args.json:
        print(json.dumps(runs, default=str), file=out)
        return 0
    if not runs:
        print(f"no runs recorded for {store.table.qualified}", file=out)
        return 0
    print("\t".join(COLUMNS), file=out)
    for run in runs:
        print("\t".join(one_line("" if run[c] is None else str(run[c])) for c in COLUMNS), file=out)
    return 0


def _say_released(done: Any, out: Any) -> int:
    if not done.released:
        print(done.why, file=out)
        return 0
    ended = ", ".join(map(str, done.ended)) or "none left"
    print(
        f"run {done.run_id} released: marked released (if its process wakes it ends without writing, exit code 9); "
        f"its database sessions ended (pids {ended}), so its claims are free for other runs",
        file=out,
    )
    if done.refused:
        why = "; ".join(f"pid {pid}: {reason}" for pid, reason in done.refused.items())
        raise CliError(
            f"run {done.run_id} is marked released, but these sessions of it could not be ended: {why}. Ending "
            "another role's session takes superuser, membership in that role, or pg_signal_backend: ask an "
            "administrator to run SELECT pg_terminate_backend(PID) for each; until then they hold their claims"
        )
    return 0
