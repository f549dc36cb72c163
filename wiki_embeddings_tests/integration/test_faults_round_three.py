"""Reliability, round three (issue 21): a frozen swap must not lock readers out, `--until` on daylight-saving days,
one readiness decision that sees drift, `verify` on another vector length or on nothing. Each test failed on the
code before its fix."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest

from wiki_embeddings.core.factories import build_store
from wiki_embeddings.core.window import next_occurrence, run_deadline
from wiki_embeddings.defs.config import RangeRunConfig
from wiki_embeddings.devtools.ollama_server import OllamaServer
from wiki_embeddings.settings import Settings
from wiki_embeddings_tests.integration.test_faults_privileges import _state_schema, grant_as_documented, make_role  # noqa: F401
from wiki_embeddings_tests.integration.test_faults_support import cli_env, run_cli, start_cli, wait_until

BERLIN = ZoneInfo("Europe/Berlin")


# ------------------------------------------------------------------------------ 1. a frozen swap or rollback
def _cli_ok(table, *args: str) -> str:
    done = run_cli(table, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _dropped_provenance(table) -> int:
    """Provenance rows of the table's dropped columns (an attnum PostgreSQL never gives out again)."""
    return table.sql(
        f"SELECT count(*) FROM {table.settings.state_schema}.embedding_provenance p JOIN pg_attribute a"
        " ON a.attrelid = %s::regclass AND a.attnum = p.column_attnum WHERE p.table_name = %s AND a.attisdropped",
        (table.settings.table, table.store.table.qualified),
    )[0][0]


def _waiting_behind(table, holder_pid: int) -> bool:
    """A wiki-embeddings session waits for a row lock the holder's transaction has."""
    return bool(
        table.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'wiki-embeddings'"
            " AND wait_event_type = 'Lock' AND %s = ANY(pg_blocking_pids(pid))",
            (holder_pid,),
        )[0][0]
    )


@pytest.mark.parametrize("step", ["swap", "rollback"])
def test_a_client_frozen_inside_a_swap_or_rollback_never_locks_readers_out(make_table, step, tmp_path):
    """SIGSTOP of `migrate-model --swap/--rollback` at the last write of its locked step: the server finishes the
    step alone, so a reader of the live table answers at once. Before: ~10 client round trips inside one
    transaction holding ACCESS EXCLUSIVE; the frozen client sat `idle in transaction` and readers waited forever."""
    table = make_table()
    name, state = table.settings.table, table.settings.state_schema
    table.load([(i, f"section {i} of the article") for i in range(1, 41)])
    assert table.backfill().state == "completed"
    _cli_ok(table, "migrate-model", "--to", "tiny")
    _cli_ok(table, "migrate-model", "--swap", "--force")  # live: tiny; previous: all-minilm in embedding_prev
    if step == "swap":
        _cli_ok(table, "migrate-model", "--to", "nomic-embed-text")  # this swap drops embedding_prev (all-minilm)
        args, live_model, live_type = ["--swap", "--force"], "nomic-embed-text", "vector(768)"
    else:
        args, live_model, live_type = ["--rollback"], "all-minilm", "vector(384)"
    assert _dropped_provenance(table) == 0

    # The locked step's last statement records the model in table_state: holding that row holds the step there.
    holder = psycopg.connect(table.url)
    holder.execute(
        f"SELECT 1 FROM {state}.table_state WHERE table_name = %s FOR UPDATE", (table.store.table.qualified,)
    )
    proc = start_cli(table, "migrate-model", *args, log=tmp_path / f"{step}.log")
    try:
        wait_until(lambda: _waiting_behind(table, holder.info.backend_pid), 60, f"the {step} to reach table_state")
        os.kill(proc.pid, signal.SIGSTOP)  # a paused VM, a partition, a debugger: the client says nothing more
        holder.rollback()
        started = time.monotonic()
        with psycopg.connect(table.url, options="-c statement_timeout=20000") as reader:
            total, filled = reader.execute(f"SELECT count(*), count(embedding) FROM {name}").fetchone()
        assert time.monotonic() - started < 20, "a reader of the live table gets its answer"
        assert (total, filled) == (40, 40), "the live column is complete, old or new, never a gap"
        live = table.sql(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass"
            " AND attname = 'embedding' AND NOT attisdropped",
            (name,),
        )
        assert live == [(live_type,)] and table.store.recorded_model()[0] == live_model, "the step committed whole"
        assert not table.sql("SELECT 1 FROM pg_stat_activity WHERE state = 'idle in transaction'")
    finally:
        holder.close()
        os.kill(proc.pid, signal.SIGKILL)  # it dies before its clean-up
        proc.wait(10)
    if step == "swap":
        assert _dropped_provenance(table) == 40, "the dropped column's provenance is removed after the lock"
    status = json.loads(_cli_ok(table, "status", "--json"))  # the next command cleans what the dead one left
    assert _dropped_provenance(table) == 0
    assert status["model"] == live_model and status["missing"] == 0 and status["stale_model"] == 0


def test_provenance_left_by_a_dead_swap_is_tolerated_by_a_read_only_status_and_purged_in_batches(make_table, request):
    new_role = request.getfixturevalue("make_role")  # test_faults_privileges' roles, dropped at the end
    state = _state_schema()
    table = make_table(state_schema=state)
    name, qualified = table.settings.table, table.store.table.qualified
    table.load([(i, f"paragraph {i}") for i in range(1, 31)])
    assert table.backfill().state == "completed"
    # What a swap whose process died after its locked step leaves: provenance of a column that is gone.
    table.sql(f"ALTER TABLE {name} ADD COLUMN embedding_prev vector(8)")
    attnum = table.sql(
        "SELECT attnum FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s", (name, "embedding_prev")
    )[0][0]
    table.sql(
        f"INSERT INTO {state}.embedding_provenance (table_name, column_attnum, chunk_id, model, dimensions, text_md5,"
        " max_chars) SELECT %s, %s, g, 'tiny', 8, 'x', 2000 FROM generate_series(1, 25) g",
        (qualified, attnum),
    )
    table.sql(f"ALTER TABLE {name} DROP COLUMN embedding_prev")
    assert _dropped_provenance(table) == 25
    (embedder, _), (monitor, url) = new_role("fill"), new_role("mon")
    grant_as_documented(table, state, embedder, monitor)

    shown = run_cli(table, "status", "--json", env=cli_env(table, DATABASE_URL=url, WIKI_EMBED_STATE_SCHEMA=state))
    assert shown.returncode == 0, shown.stderr  # may not delete: leaves them, says nothing, fails nothing
    assert json.loads(shown.stdout)["missing"] == 0 and _dropped_provenance(table) == 25

    with build_store(table.settings, table.url) as store:
        assert store.purge_dropped_provenance(batch=10) == 25  # three statements of at most 10 rows
        assert store.dropped_provenance_columns() == []
    assert table.status()["missing"] == 0 and table.store.model_status()["stale_model"] == 0


def _at(zone: ZoneInfo, *fields: int) -> float:
    return datetime(*fields, tzinfo=zone).timestamp()  # type: ignore[misc]


def test_an_aborted_migration_drops_its_shadow_in_one_step_and_its_provenance_after(make_table):
    table = make_table()
    table.load([(i, f"part {i}") for i in range(1, 21)])
    assert table.backfill().state == "completed"
    _cli_ok(table, "migrate-model", "--to", "tiny")
    assert table.store.column_exists("embedding_next")
    out = _cli_ok(table, "migrate-model", "--abort")
    assert "shadow column embedding_next dropped" in out
    assert not table.store.column_exists("embedding_next") and table.store.migration_target() == (None, None)
    assert _dropped_provenance(table) == 0 and table.store.dropped_provenance_columns() == []
    assert table.status()["missing"] == 0


# ------------------------------------------------------------------------------ 6. --until on transition days
@pytest.mark.parametrize(
    ("now", "until", "expected_utc"),
    [
        # 2026-03-29, spring forward at 02:00 CET -> 03:00 CEST (01:00 UTC)
        ((2026, 3, 29, 0, 30), "06:00", (2026, 3, 29, 4, 0)),  # 06:00 CEST, not 07:00 (today's offset kept)
        ((2026, 3, 29, 0, 30), "01:30", (2026, 3, 29, 0, 30)),  # before the gap: still CET
        ((2026, 3, 29, 0, 30), "02:30", (2026, 3, 29, 1, 0)),  # in the gap: the first instant after it, 03:00 CEST
        ((2026, 3, 29, 0, 30), "02:00", (2026, 3, 29, 1, 0)),  # the gap's first second too
        ((2026, 3, 29, 0, 30), "03:00", (2026, 3, 29, 1, 0)),  # 03:00 CEST exists: the same instant
        ((2026, 3, 28, 22, 0), "06:00", (2026, 3, 29, 4, 0)),  # started the evening before, across the change
        ((2026, 3, 29, 7, 0), "06:00", (2026, 3, 30, 4, 0)),  # after it: tomorrow, still summer time
        # 2026-10-25, fall back at 03:00 CEST -> 02:00 CET (01:00 UTC)
        ((2026, 10, 25, 0, 30), "06:00", (2026, 10, 25, 5, 0)),  # 06:00 CET, not 05:00 (today's offset kept)
        ((2026, 10, 25, 0, 30), "02:30", (2026, 10, 25, 0, 30)),  # occurs twice: the first time (CEST, fold=0)
        ((2026, 10, 25, 0, 30), "02:00", (2026, 10, 25, 0, 0)),
        ((2026, 10, 25, 0, 30), "03:00", (2026, 10, 25, 2, 0)),  # after the fold: CET
        ((2026, 10, 24, 23, 0), "06:00", (2026, 10, 25, 5, 0)),
    ],
)
def test_until_is_local_wall_time_on_both_2026_transition_days_in_berlin(now, until, expected_utc):
    started = _at(BERLIN, *now)
    end = next_occurrence(until, started, zone=BERLIN)
    assert end.astimezone(UTC) == datetime(*expected_utc, tzinfo=UTC)
    assert end > datetime.fromtimestamp(started, UTC)
    deadline, reason = run_deadline(until, None, started, zone=BERLIN)
    assert deadline == end.timestamp() and end.isoformat(timespec="minutes") in reason


def test_until_in_the_autumn_fold_after_its_first_occurrence_is_tomorrow():
    """02:45 CEST on 2026-10-25 with --until 02:30: today's 02:30 resolves to its first occurrence, already past, so
    the window ends tomorrow at 02:30 (the module's stated rule), never at the repeated 02:30 CET."""
    started = datetime(2026, 10, 25, 0, 45, tzinfo=UTC).timestamp()  # 02:45 CEST, the first pass
    end = next_occurrence("02:30", started, zone=BERLIN)
    assert end.astimezone(UTC) == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)  # 02:30 CET on the 26th


def test_dagster_until_and_the_cli_share_the_local_zone_rule(monkeypatch):
    """The range/maintenance config's `until` becomes Settings.until, whose deadline is window.run_deadline in the
    zone named by TZ (read through zoneinfo: the process's C-library zone is not changed)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    started = _at(BERLIN, 2026, 3, 29, 0, 30)
    settings = Settings().replace(**RangeRunConfig(until="06:00").engine_settings())
    deadline = settings.run_deadline(started)
    assert deadline is not None
    assert deadline[0] == datetime(2026, 3, 29, 4, 0, tzinfo=UTC).timestamp()
    assert "2026-03-29T06:00+02:00" in deadline[1]


# ------------------------------------------------------------------------------ 7. one readiness decision
def _check(table, env: dict[str, str] | None = None) -> tuple[int, str]:
    done = run_cli(table, "status", "--check", env=env)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("check: ")]
    assert len(lines) == 1, done.stdout  # --check prints its reason
    return done.returncode, lines[0]


def test_status_check_fails_on_a_standing_drift_verdict_says_why_and_a_later_match_clears_it(make_table, ollama):
    table = make_table()
    table.load([(i, f"chunk {i} about something") for i in range(1, 31)])
    assert table.backfill().state == "completed"
    assert _check(table) == (
        0,
        "check: ready: missing=0, coverage_pct=100.00, stale_model=0, no blocking drift verdict",
    )

    ollama.set_faults(model_salt="pulled")  # an `ollama pull` replaced the weights behind the name
    assert run_cli(table, "verify").returncode == 8  # model_changed: 8, as for a backfill
    code, line = _check(table)
    assert code == 1, "the runbook's operators decide readiness by this command"
    assert line.startswith("check: not ready: drift:") and "said model_changed" in line, line
    assert "the model answering as 'all-minilm' changed" in line

    ollama.set_faults(down=True)  # not_evaluated says nothing about the vectors: the verdict stands
    assert run_cli(table, "verify").returncode == 3
    assert _check(table)[0] == 1

    ollama.reset_faults()  # the original weights are back: a later match clears it
    assert run_cli(table, "verify").returncode == 0
    assert _check(table)[0] == 0


def test_a_mismatch_is_cleared_by_a_re_embed_and_model_changed_by_the_swap(make_table, ollama):
    table = make_table()
    name = table.settings.table
    table.load([(i, f"paragraph {i} of the page") for i in range(1, 21)])
    assert table.backfill().state == "completed"
    table.sql(f"UPDATE {name} SET embedding = array_fill(0, ARRAY[384])::vector WHERE id = 7")  # a garbled write
    assert run_cli(table, "verify", "--full").returncode == 1
    code, line = _check(table)
    assert code == 1 and "said mismatch" in line, line
    table.sql(f"UPDATE {name} SET embedding = NULL WHERE id = 7")  # the verdict's remedy: re-embed that chunk
    assert _check(table)[1].startswith("check: not ready: missing=1")
    assert table.backfill().state == "completed"
    assert _check(table)[0] == 0, "the re-embed cleared the mismatch"

    ollama.set_faults(model_salt="pulled")
    assert run_cli(table, "verify").returncode == 8
    assert _check(table)[0] == 1
    _cli_ok(table, "migrate-model", "--to", "all-minilm")  # allowed after model_changed: re-embeds with the new weights
    assert _check(table)[0] == 1, "the shadow does not count until the swap"
    _cli_ok(table, "migrate-model", "--swap", "--force")
    assert _check(table)[0] == 0, "the swap cleared model_changed"


def test_the_dagster_check_and_the_readiness_sensor_make_the_same_decision_as_status_check(make_table, ollama, request):
    import dagster as dg

    from wiki_embeddings.core.readiness import read_flag
    from wiki_embeddings.defs.assets import embedding_coverage
    from wiki_embeddings.defs.checks import missing_is_zero
    from wiki_embeddings.defs.resources import ReadinessResource, WikiDatabaseResource
    from wiki_embeddings_tests.integration.dagster_support import resources_for
    from wiki_embeddings_tests.integration.test_dagster_schedule_sensor import Sensor

    state = _state_schema()
    table = make_table(state_schema=state)
    table.load([(i, f"chunk {i}") for i in range(1, 21)])
    assert table.backfill().state == "completed"
    ollama.set_faults(model_salt="pulled")
    assert run_cli(table, "verify", env=cli_env(table, WIKI_EMBED_STATE_SCHEMA=state)).returncode == 8
    env_file = table.tmp / ".env.beta"
    resources = resources_for(table, ollama, env_file=env_file)
    s = table.settings
    resources["database"] = WikiDatabaseResource(
        database_url=s.database_url, table=s.table, stop_file=s.stop_file, state_schema=state
    )

    with dg.instance_for_test() as instance:
        sensor = Sensor(instance, ReadinessResource(env_file=str(env_file)))

        def refresh():
            result = dg.materialize([embedding_coverage, missing_is_zero], resources=resources, instance=instance)
            [evaluation] = result.get_asset_check_evaluations()
            return evaluation

        evaluation = refresh()  # no drift check in this run: the CLI's verdict is in the database
        assert not evaluation.passed and evaluation.metadata["drift_verdict"].value == "model_changed"
        assert evaluation.description.startswith("drift: ") and "said model_changed" in evaluation.description
        tick = sensor.tick()
        assert read_flag(env_file) is None and "said model_changed" in tick.skip_reason.skip_message

        # A read-only monitoring role gets the same answer from `status --check`.
        new_role = request.getfixturevalue("make_role")
        (embedder, _), (monitor, url) = new_role("fill"), new_role("mon")
        grant_as_documented(table, state, embedder, monitor)
        monitor_env = cli_env(table, DATABASE_URL=url, WIKI_EMBED_STATE_SCHEMA=state)
        code, line = _check(table, monitor_env)
        assert code == 1 and line == f"check: not ready: {evaluation.description}"

        ollama.reset_faults()
        assert run_cli(table, "verify", env=cli_env(table, WIKI_EMBED_STATE_SCHEMA=state)).returncode == 0
        assert refresh().passed
        sensor.tick()
        assert read_flag(env_file) is True
        assert _check(table, monitor_env)[0] == 0


# ------------------------------------------------------------------------------ 8. verify: another length, nothing
def test_verify_against_a_server_whose_vectors_have_another_length_names_both_lengths(make_table):
    table = make_table()
    table.load([(i, f"chunk {i} about something") for i in range(1, 21)])
    assert table.backfill().state == "completed"  # all-minilm, 384-d
    with OllamaServer(backend="hash", models=["all-minilm:16"]) as other:  # another model answers under the name
        done = run_cli(table, "verify", env=cli_env(table, OLLAMA_URL=other.url))
        as_json = run_cli(table, "verify", "--json", env=cli_env(table, OLLAMA_URL=other.url))
    assert done.returncode == 8, done.stdout + done.stderr  # model_changed: 8, as for a backfill
    assert "verify: model_changed" in done.stdout
    assert "vectors of length 16, the stored vectors have length 384" in done.stdout, done.stdout
    assert "min_cosine= " in done.stdout, "no cosine is invented across lengths"
    report = json.loads(as_json.stdout)
    assert (report["stored_length"], report["server_length"], report["other_length"]) == (384, 16, 20)
    assert report["min_cosine"] is None and report["compared"] == 0


@pytest.mark.parametrize("rows", [0, 12], ids=["empty-table", "no-vector-yet"])
def test_verify_with_no_vector_to_compare_exits_0_says_so_and_blocks_nothing(make_table, ollama, rows):
    table = make_table()
    table.load([(i, f"paragraph {i}") for i in range(1, rows + 1)])
    ollama.set_faults(down=True)  # nothing is asked of the server
    done = run_cli(table, "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify: nothing_to_verify (exit 0)" in done.stdout and "holds no vector yet" in done.stdout
    assert "server did not" not in done.stdout
    assert table.store.latest_trust("verify")["verdict"] == "nothing_to_verify"


def test_reliability_md_says_ollama_url_credentials_are_never_stored_as_the_runs_table_shows(make_table, ollama):
    """The doc claimed the runs table keeps OLLAMA_URL credentials for `resume`; it never did."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md").read_text()
    start = doc.index("- **Credentials in `OLLAMA_URL`**")
    bullet = doc[start : doc.index("\n- ", start + 1)]
    assert "stored as written" not in bullet and "never written to the bookkeeping" in bullet, bullet
    table = make_table()
    table.load([(1, "one"), (2, "two")])
    secret_url = ollama.url.replace("http://", "http://operator:s3cr3t-pw@")
    done = run_cli(table, "backfill", env=cli_env(table, OLLAMA_URL=secret_url))
    assert done.returncode == 0, done.stdout + done.stderr
    saved = table.sql(
        f"SELECT options->>'ollama_url', options::text FROM {table.settings.state_schema}.runs WHERE table_name = %s",
        (table.store.table.qualified,),
    )
    assert saved and all(url is None and "s3cr3t-pw" not in text for url, text in saved)
