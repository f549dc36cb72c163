"""Files on a full or refusing disk: the failure log keeps whole lines only, the readiness env file says why.

The short write is real: a child process under `RLIMIT_FSIZE` (SIGXFSZ ignored, so `write` returns a short
count, then EFBIG), and, where this process may mount one (root), a tiny tmpfs filled to the last byte
(ENOSPC). Nothing here is a mocked `write`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from wiki_embeddings.core.failure_log import FailureLog, FailureLogWriteError, read_entries, read_log
from wiki_embeddings.core.readiness import ReadinessError, read_flag, set_flag

RECORD = {"error": "invalid_vector", "message": "m", "http_status": None, "attempts": 1, "text_length": 5}


def record(log: FailureLog, chunk_id: int, message: str = "m") -> None:
    log.record(**{**RECORD, "chunk_id": chunk_id, "message": message})


# ------------------------------------------------------------------------------------------ a real short write
CHILD = textwrap.dedent(
    """
    import errno, json, os, resource, signal, sys
    from wiki_embeddings.core.failure_log import FailureLog, FailureLogWriteError

    path, room, cut_fails = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    log = FailureLog(path)
    log.record(chunk_id=1, error="e", message="first", http_status=None, attempts=1, text_length=1)
    size = os.path.getsize(path)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write returns short, then EFBIG, instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + room, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    writes = []
    real_write = os.write

    def watched(fd, data):  # observes each write's count; the real write does the work
        n = real_write(fd, data)
        writes.append([len(data), n])
        return n

    os.write = watched
    if cut_fails:
        def refused(fd, length):
            raise OSError(errno.EIO, "cut refused")
        os.ftruncate = refused
    result = {"writes": writes, "error": None}
    try:
        log.record(chunk_id=2, error="e", message="x" * 1000, http_status=None, attempts=1, text_length=1000)
    except FailureLogWriteError as exc:
        result.update(error=str(exc), errno=exc.errno)
    print(json.dumps(result))
    """
)


def run_limited(path: Path, room: int, cut_fails: bool = False) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(room), "1" if cut_fails else "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_short_write_at_the_file_size_limit_is_cut_back_to_whole_lines(tmp_path):
    path = tmp_path / "failures.jsonl"
    result = run_limited(path, room=100)
    asked, written = result["writes"][0]
    assert 0 < written < asked, f"the write was not short: {result['writes']}"
    assert result["error"] is not None, "a short write must not pass for a whole record"
    assert result["errno"] == 27 and "EFBIG" in result["error"] and str(path) in result["error"]
    assert "symbolic link" not in result["error"]
    data = path.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 1, f"half a record was left: {data[-120:]!r}"
    assert [e["chunk_id"] for e in read_entries(path)] == [1]
    record(FailureLog(path), 3)  # the next run appends onto whole lines
    contents = read_log(path)
    assert [e["chunk_id"] for e in contents.entries] == [1, 3] and contents.skipped == []


def test_when_even_the_cut_fails_the_next_record_starts_a_fresh_line_and_the_reader_skips_the_torn_one(tmp_path):
    path = tmp_path / "failures.jsonl"
    result = run_limited(path, room=100, cut_fails=True)
    assert result["error"] is not None and "EFBIG" in result["error"]
    assert not path.read_bytes().endswith(b"\n"), "the torn half line is there (the cut was refused)"
    record(FailureLog(path), 3)
    contents = read_log(path)
    assert [e["chunk_id"] for e in contents.entries] == [1, 3], "record 3 is not glued onto the torn line"
    assert contents.skipped == [2], "the torn line is skipped and counted"
    assert path.read_bytes().split(b"\n")[2].startswith(b'{"chunk_id":3')


def test_the_reader_skips_and_counts_garbage_lines_instead_of_raising(tmp_path):
    path = tmp_path / "failures.jsonl"
    record(FailureLog(path), 1)
    with open(path, "ab") as fh:
        fh.write(b'{"chunk_id": 2, "err\n[1, 2]\n\xff\xfe not json\n')
    record(FailureLog(path), 4)
    with open(path, "ab") as fh:
        fh.write(b'{"chunk_id": 5, "error": "inv')  # torn last line
    contents = read_log(path)
    assert [e["chunk_id"] for e in contents.entries] == [1, 4]
    assert contents.skipped == [2, 3, 4, 6]
    assert [e["chunk_id"] for e in read_entries(path)] == [1, 4]


# ------------------------------------------------------------------------------------------ a real full disk
@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs of our own (needs root and `mount`; skipped where it cannot be mounted)."""
    mount = shutil.which("mount")
    point = tmp_path / "disk"
    point.mkdir()
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(disk: Path) -> Path:
    """Write a filler file until the disk is full; returns it (remove it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == 28, exc
    return filler


def test_a_full_disk_leaves_whole_lines_only_and_says_ENOSPC_not_symbolic_link(tiny_disk):
    path = tiny_disk / "failures.jsonl"
    log = FailureLog(path)
    record(log, 1)
    first = path.read_bytes()
    filler = fill(tiny_disk)  # the log's last page still has room: the next append is a short write, then ENOSPC
    with pytest.raises(FailureLogWriteError) as raised:
        record(log, 2, message="x" * 6000)
    message = str(raised.value)
    assert message == f"no space left on device (ENOSPC) writing the failure log {path}"
    assert raised.value.errno == 28 and isinstance(raised.value, OSError)
    assert path.read_bytes() == first, "the half-written record was cut back"
    filler.unlink()
    record(log, 3)
    contents = read_log(path)
    assert [e["chunk_id"] for e in contents.entries] == [1, 3] and contents.skipped == []


def test_a_run_whose_failure_log_disk_is_full_stops_with_ENOSPC_in_its_message(make_table, ollama, tiny_disk):
    table = make_table(failure_log=str(tiny_disk / "failures.jsonl"))
    table.load([(1, "POISON"), (2, "fine")])
    ollama.set_faults(error_marker="POISON")
    fill(tiny_disk)
    report = table.backfill()
    assert report.state == "failure_log_error" and report.exit_code == 6, report.message
    assert "no space left on device (ENOSPC)" in report.message and str(tiny_disk) in report.message
    assert "symbolic link" not in report.message, report.message
    assert [r["chunk_id"] for r in table.store.list_failures()] == [1], "the database still has the record"
    assert read_log(tiny_disk / "failures.jsonl").skipped == []


# ------------------------------------------------------------------------------------------ the readiness env file
def test_an_unwritable_env_file_directory_is_one_clear_readiness_error(tmp_path):
    beta = tmp_path / "beta"
    beta.mkdir()
    env = beta / ".env.beta"
    env.write_bytes(b"A=1\nWIKI_EMBEDDINGS_READY=false\n")
    if os.geteuid() == 0:  # root writes anywhere: make the directory a read-only mount instead
        done = subprocess.run(["mount", "--bind", str(beta), str(beta)], capture_output=True)
        if done.returncode != 0:
            pytest.skip("root, and no read-only bind mount possible")
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(beta)], check=True, capture_output=True)
            with pytest.raises(ReadinessError) as raised:
                set_flag(env, True)
        finally:
            subprocess.run(["umount", "-l", str(beta)], check=False)
    else:
        beta.chmod(0o555)
        try:
            with pytest.raises(ReadinessError) as raised:
                set_flag(env, True)
        finally:
            beta.chmod(0o755)
    message = str(raised.value)
    assert message.startswith(f"cannot write the readiness env file {env}: directory {beta} is not writable (")
    assert "\n" not in message
    assert env.read_bytes() == b"A=1\nWIKI_EMBEDDINGS_READY=false\n" and read_flag(env) is False
    assert sorted(p.name for p in beta.iterdir()) == [".env.beta"], "no temp file left behind"


# ------------------------------------------------------------------------------------------ the operators' files
def test_every_default_path_points_into_the_sessions_temp_dir():
    """The suite's guard (conftest) covers every default a run, a stop, the sensor or the embedded server uses."""
    from wiki_embeddings.core.readiness import ReadinessSettings
    from wiki_embeddings.defs.config import BOOTSTRAP_FAILURE_LOG, MAINTENANCE_FAILURE_LOG, default_failure_log
    from wiki_embeddings.devtools import embedded_postgres
    from wiki_embeddings.settings import DEFAULT_STOP_FILE, from_env
    from wiki_embeddings_tests import conftest

    session = conftest.SESSION_DEFAULTS
    settings = from_env()
    assert Path(settings.stop_file).parent == session and Path(settings.failure_log or "").parent == session
    assert ReadinessSettings.from_env().env_path.parent == session
    assert embedded_postgres.resolve_data_dir().parent == session
    guarded = {str(p) for p in conftest.OPERATORS_FILES}
    assert {DEFAULT_STOP_FILE, str(conftest.REPO_ROOT / ".pgdata")} <= guarded
    assert str(Path.cwd() / ReadinessSettings().env_file) in guarded
    for log in (BOOTSTRAP_FAILURE_LOG, MAINTENANCE_FAILURE_LOG):  # WIKI_EMBED_FAILURE_LOG_DIR points them here
        assert Path(log).parent == session, log
    for kind in ("bootstrap", "maintenance"):  # without it, the runbook's paths, which the guard watches
        assert fnmatch.fnmatch(default_failure_log(kind, {}), conftest.OPERATORS_FAILURE_LOGS)
        assert default_failure_log(kind, {"WIKI_EMBED_FAILURE_LOG_DIR": "/srv/logs"}) == (
            f"/srv/logs/wiki-embed-failures-{kind}.jsonl"
        )


def test_the_guard_sees_a_file_created_changed_or_removed(tmp_path, monkeypatch):
    from wiki_embeddings_tests import conftest

    watched = tmp_path / "wiki-embed.stop"
    monkeypatch.setattr(conftest, "OPERATORS_FILES", [watched])
    monkeypatch.setattr(conftest, "OPERATORS_FAILURE_LOGS", str(tmp_path / "wiki-embed-failures-*.jsonl"))
    states = [conftest._operators_files_state()]
    watched.write_text("stop requested\n")
    states.append(conftest._operators_files_state())
    (tmp_path / "wiki-embed-failures-bootstrap.jsonl").write_text("{}\n")
    states.append(conftest._operators_files_state())
    watched.unlink()
    states.append(conftest._operators_files_state())
    assert all(a != b for a, b in zip(states, states[1:], strict=False)), states
