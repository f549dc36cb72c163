"""The failure recorder (core/backfill/failures.py): an isolated chunk becomes a database record and a JSONL line
(never its text), its claim is released, and a log that cannot be written ends the run. On real PostgreSQL:
integration/test_faults_bad_input.py, test_faults_files.py, test_faults_security.py (a symlinked log mid-run)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from wiki_embeddings.core.backfill.errors import Fatal
from wiki_embeddings.core.backfill.failures import FailureRecorder
from wiki_embeddings.core.backfill.outcomes import Isolated
from wiki_embeddings.core.failure_log import FailureLog
from wiki_embeddings_tests.unit.fakes import FakeFailureStore, InlineDb, run

SECRET_TEXT = "the chunk's own words, which may be large or sensitive"


class Recorder:
    def __init__(self, log_path: Path, max_attempts: int = 3):
        self.store = FakeFailureStore()
        self.db = InlineDb()
        self.released: list[list[int]] = []
        self.lines: list[str] = []
        self.log_path = log_path
        self.recorder = FailureRecorder(
            self.store,
            self.db.call,
            FailureLog(log_path),
            self.release,
            model="fake-minilm",
            max_attempts=max_attempts,
            clean=lambda m: m.replace("hunter2", "***"),
            log=self.lines.append,
        )

    async def release(self, ids: list[int]) -> None:
        self.released.append(ids)

    def record(self, chunk: Isolated, run_id: int | None = 7) -> int:
        return run(self.recorder.record(chunk, run_id))

    def log_entries(self) -> list[dict]:
        return [orjson.loads(line) for line in self.log_path.read_bytes().splitlines()]


def poisoned(chunk_id: int = 42) -> Isolated:
    return Isolated(chunk_id, "http_400", "HTTP 400: bad input (password hunter2)", 400, len(SECRET_TEXT))


def test_an_isolated_chunk_gets_a_database_record_a_log_line_without_its_text_and_its_claim_released(tmp_path):
    r = Recorder(tmp_path / "failures.jsonl")
    assert r.record(poisoned()) == 1
    [rec] = r.store.records
    assert (rec.chunk_id, rec.error, rec.http_status, rec.run_id) == (42, "http_400", 400, 7)
    assert rec.message == "HTTP 400: bad input (password ***)"  # cleaned before it is stored anywhere
    [entry] = r.log_entries()
    assert entry["chunk_id"] == 42 and entry["error"] == "http_400" and entry["attempts"] == 1
    assert entry["text_length"] == len(SECRET_TEXT) and entry["model"] == "fake-minilm"
    assert entry["table"] == "public.wiki_chunks" and entry["run_id"] == 7
    raw = r.log_path.read_text()
    assert SECRET_TEXT not in raw and "hunter2" not in raw
    assert r.released == [[42]] and r.db.roles == ["store"]
    assert r.recorder.failed == 1 and r.recorder.failed_ids == [42]
    assert r.lines == ["chunk 42 failed: http_400: HTTP 400: bad input (password ***)"]


def test_the_log_line_says_quarantined_at_max_attempts(tmp_path):
    r = Recorder(tmp_path / "failures.jsonl", max_attempts=3)
    for _ in range(3):
        r.record(poisoned())
    assert [e["attempts"] for e in r.log_entries()] == [1, 2, 3]
    assert ["(quarantined)" in line for line in r.lines] == [False, False, True]


def test_an_unwritable_failure_log_ends_the_run_failure_log_error_while_the_database_record_stays(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log's directory should be")
    r = Recorder(blocker / "failures.jsonl")
    with pytest.raises(Fatal) as ended:
        r.record(poisoned())
    assert ended.value.state == "failure_log_error"
    assert "recorded in the database" in str(ended.value)
    assert [rec.chunk_id for rec in r.store.records] == [42]  # nothing lost: `wiki-embeddings failures` lists it
    assert r.recorder.failed == 0


def test_a_run_without_a_failure_log_still_records_in_the_database(tmp_path):
    r = Recorder(tmp_path / "unused.jsonl")
    r.recorder.failure_log = FailureLog(None)
    r.record(poisoned(5))
    assert [rec.chunk_id for rec in r.store.records] == [5] and r.released == [[5]]
    assert not (tmp_path / "unused.jsonl").exists()
