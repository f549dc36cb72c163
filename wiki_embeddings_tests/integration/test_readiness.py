"""The runbook's last step in plain Python: when to flip WIKI_EMBEDDINGS_READY, and how the env file is edited."""

import os
import stat

import pytest

from wiki_embeddings.core.readiness import (
    Evaluation,
    Materialization,
    ReadinessError,
    ReadinessSettings,
    decide,
    read_flag,
    run_restart,
    set_flag,
)

ENV_TEXT = (
    "# beta stack settings\n"
    "DATABASE_URL=postgresql://app:secret@db/wiki\n"
    "\n"
    "export WIKI_EMBEDDINGS_READY=false  # set by the readiness sensor\n"
    "OLLAMA_URL='http://ollama:11434'\n"
)

LATEST = Materialization(storage_id=10, timestamp=100.0)


def passing(eid: int = 11, target: int | None = 10, ts: float = 101.0) -> Evaluation:
    return Evaluation(id=eid, passed=True, timestamp=ts, target_storage_id=target, missing=0)


def failing(eid: int = 11, missing: int = 3) -> Evaluation:
    return Evaluation(id=eid, passed=False, timestamp=101.0, target_storage_id=10, missing=missing)


def test_the_flag_flips_only_on_a_fresh_pass():
    assert decide(passing(), LATEST, None, False).action == "set_true"
    assert decide(passing(), LATEST, None, None).action == "set_true"
    assert decide(None, LATEST, None, False).action == "none"
    assert decide(failing(), LATEST, None, False).action == "none"
    stale_target = decide(passing(target=9), LATEST, None, False)
    assert stale_target.action == "none" and "stale" in stale_target.reason
    assert decide(passing(target=None), LATEST, None, False).action == "none"
    assert decide(passing(ts=99.0), LATEST, None, False).action == "none"
    assert decide(passing(), None, None, False).action == "none"
    assert decide(Evaluation(11, True, 101.0, 10, missing=2), LATEST, None, False).action == "none"


def test_each_evaluation_is_acted_on_once():
    decision = decide(passing(eid=11), LATEST, None, False)
    assert decision.handled == 11
    assert decide(passing(eid=11), LATEST, 11, False).action == "none"
    assert decide(passing(eid=11), LATEST, None, True).action == "none", "already true: nothing to write"


def test_a_regression_keeps_or_unsets_the_flag_by_policy():
    keep = decide(failing(), LATEST, None, True, "keep")
    assert keep.action == "keep_on_regression" and "missing=3" in keep.reason
    assert decide(failing(), LATEST, None, True, "unset").action == "set_false"
    assert decide(failing(), LATEST, None, False, "unset").action == "none"


def test_settings_come_from_the_environment_and_refuse_an_unknown_policy():
    s = ReadinessSettings.from_env(
        {"WIKI_EMBEDDINGS_ENV_FILE": "/srv/beta/.env.beta", "WIKI_EMBEDDINGS_READY_ON_REGRESSION": "unset"}
    )
    assert s.env_file == "/srv/beta/.env.beta" and s.on_regression == "unset" and s.restart_cmd == ""
    assert ReadinessSettings.from_env({}).env_file == ".env.beta"
    with pytest.raises(ValueError, match="keep, unset"):
        ReadinessSettings.from_env({"WIKI_EMBEDDINGS_READY_ON_REGRESSION": "flip"})


def test_set_flag_rewrites_only_its_line_and_keeps_the_mode(tmp_path):
    env = tmp_path / ".env.beta"
    env.write_text(ENV_TEXT)
    env.chmod(0o640)
    assert read_flag(env) is False

    change = set_flag(env, True)

    assert change.changed and change.previous is False and not change.created
    assert env.read_text() == ENV_TEXT.replace("READY=false  # set by", "READY=true  # set by"), "comment kept"
    assert stat.S_IMODE(env.stat().st_mode) == 0o640
    assert read_flag(env) is True
    assert not set_flag(env, True).changed, "already true: the file is not rewritten"
    assert [p.name for p in tmp_path.iterdir()] == [".env.beta"], "no temp file left behind"


def test_set_flag_appends_when_absent_and_keeps_crlf_endings(tmp_path):
    env = tmp_path / ".env.beta"
    env.write_bytes(b"A=1\r\nB=2")
    set_flag(env, True)
    assert env.read_bytes() == b"A=1\r\nB=2\r\nWIKI_EMBEDDINGS_READY=true\r\n"
    set_flag(env, False)
    assert env.read_bytes() == b"A=1\r\nB=2\r\nWIKI_EMBEDDINGS_READY=false\r\n"


def test_non_utf8_bytes_anywhere_are_kept_and_the_flag_still_flips(tmp_path):
    env = tmp_path / ".env.beta"
    before = b"# caf\xe9 (latin-1)\nGREETING=\xff\xfe\x80\nWIKI_EMBEDDINGS_READY=false\nTAIL=\xc3\n"
    env.write_bytes(before)
    assert read_flag(env) is False
    assert set_flag(env, True).changed
    assert env.read_bytes() == before.replace(b"READY=false", b"READY=true")
    assert read_flag(env) is True


SEPARATORS = [b"\x0c", b"\x0b", b"\x1c", "\x85".encode(), "\u2028".encode(), "\u2029".encode()]  # str.splitlines's


@pytest.mark.parametrize("separator", SEPARATORS)
def test_only_a_newline_ends_a_line_so_nothing_merges_into_the_flags_value(tmp_path, separator):
    env = tmp_path / ".env.beta"
    before = b"WIKI_EMBEDDINGS_READY=false # note" + separator + b"OTHER=1\nB=2" + separator + b"\n"
    env.write_bytes(before)
    set_flag(env, True)
    assert env.read_bytes() == before.replace(b"READY=false", b"READY=true")
    assert read_flag(env) is True


def test_a_bom_before_the_key_is_read_as_bash_does_and_dropped_when_the_key_is_set(tmp_path):
    """Bash does not strip a byte order mark: `<BOM>KEY=false` is a command to it, so the key is unset (None),
    and the writer drops the mark when it sets the key (changed on purpose, break round 3)."""
    env = tmp_path / ".env.beta"
    env.write_bytes(b"\xef\xbb\xbfWIKI_EMBEDDINGS_READY=false\r\nA=1\r\n")
    assert read_flag(env) is None
    set_flag(env, True)
    assert env.read_bytes() == b"WIKI_EMBEDDINGS_READY=true\r\nA=1\r\n"
    assert env.read_bytes().count(b"WIKI_EMBEDDINGS_READY") == 1


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (
            b"WIKI_EMBEDDINGS_READY=false # flipped by the sensor\n",
            b"WIKI_EMBEDDINGS_READY=true # flipped by the sensor\n",
        ),
        (b'WIKI_EMBEDDINGS_READY="false"\t# quoted\r\n', b'WIKI_EMBEDDINGS_READY="true"\t# quoted\r\n'),
        (b"export WIKI_EMBEDDINGS_READY='false' #c\n", b"export WIKI_EMBEDDINGS_READY='true' #c\n"),
        (b"WIKI_EMBEDDINGS_READY= # unset yet\n", b"WIKI_EMBEDDINGS_READY=true # unset yet\n"),
        (b"WIKI_EMBEDDINGS_READY=false#not-a-comment\n", b"WIKI_EMBEDDINGS_READY=true\n"),
    ],
)
def test_an_inline_comment_after_the_value_is_kept(tmp_path, before, after):
    env = tmp_path / ".env.beta"
    env.write_bytes(before)
    set_flag(env, True)
    assert env.read_bytes() == after
    assert read_flag(env) is True


def test_a_missing_env_file_is_created_private(tmp_path):
    env = tmp_path / "new.env"
    change = set_flag(env, True)
    assert change.created and env.read_text() == "WIKI_EMBEDDINGS_READY=true\n"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600


def test_a_symlink_at_the_env_path_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("SECRET=1\n")
    link = tmp_path / ".env.beta"
    os.symlink(target, link)
    with pytest.raises(ReadinessError, match="symbolic link"):
        set_flag(link, True)
    with pytest.raises(ReadinessError):
        read_flag(link)
    assert target.read_text() == "SECRET=1\n" and link.is_symlink()


def test_the_restart_command_runs_with_a_timeout(tmp_path):
    ok = run_restart(f"echo restarted > {tmp_path / 'out'}")
    assert ok.ok and (tmp_path / "out").read_text() == "restarted\n"
    bad = run_restart("echo nope; exit 3")
    assert bad.returncode == 3 and "nope" in bad.output_tail
    slow = run_restart("sleep 5; echo never", timeout_sec=0.3)
    assert slow.returncode is None and not slow.ok and slow.seconds < 3
