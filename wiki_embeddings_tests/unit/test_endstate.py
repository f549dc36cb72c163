"""The end state of a run (core/backfill/endstate.py), a pure function of its counts. Each state is also reached by
a real run: integration/test_backfill_runbook.py (completed, max_chunks, stopped, server_unavailable),
test_faults_round_two.py (locked), test_faults_database.py (database_unavailable)."""

from __future__ import annotations

from wiki_embeddings.core.backfill.endstate import RunCounts, end_state


def counts(**changes: object) -> RunCounts:
    base: dict[str, object] = {
        "remaining": 0,
        "failed": 0,
        "claimed": 10,
        "busy": 0,
        "max_chunks": None,
        "busy_wait_sec": 30.0,
    }
    return RunCounts(**{**base, **changes})  # type: ignore[arg-type]


EVERYTHING = {
    "fatal_state": "server_unavailable",
    "fatal_message": "the server fails even on a known-good text",
    "stopped": True,
    "stop_reason": "stop file /tmp/x.stop",
    "busy": 2,
    "max_chunks": 10,
    "remaining": 5,
}


def test_a_fatal_error_beats_a_stop_locked_chunks_and_the_cap():
    end = end_state(counts(**EVERYTHING))
    assert (end.state, end.message) == ("server_unavailable", "the server fails even on a known-good text")


def test_a_stop_beats_locked_chunks_and_the_cap_and_names_its_reason():
    end = end_state(counts(**{**EVERYTHING, "fatal_state": None}))
    assert end.state == "stopped" and end.stop_reason == "stop file /tmp/x.stop"
    assert end.message == "stopped on request (stop file /tmp/x.stop); 5 chunks remain"


def test_locked_chunks_beat_the_cap_and_the_message_names_the_counts():
    end = end_state(counts(**{**EVERYTHING, "fatal_state": None, "stopped": False}))
    assert end.state == "locked" and end.locked == 2
    assert end.message.startswith("2 chunks locked by another session")
    assert "for over 30 s" in end.message and end.message.endswith("5 chunks remain")


def test_the_cap_reached_with_chunks_left_is_max_chunks():
    end = end_state(counts(max_chunks=10, claimed=10, remaining=5))
    assert (end.state, end.message) == ("max_chunks", "--max-chunks 10 reached; 5 chunks remain")


def test_the_cap_reached_with_nothing_left_is_completed():
    assert end_state(counts(max_chunks=10, claimed=10, remaining=0)).state == "completed"


def test_a_cap_not_reached_is_completed():
    assert end_state(counts(max_chunks=50, claimed=10, remaining=3)).state == "completed"


def test_completed_names_what_remains_and_what_failed():
    end = end_state(counts(remaining=2, failed=2))
    assert (end.state, end.message) == ("completed", "done; 2 chunks remain missing (2 failed this run)")
    assert end.locked == 0 and end.stop_reason == ""
