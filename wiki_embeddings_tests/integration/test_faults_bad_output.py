"""Bad answers from the model server are never written; the chunk that causes one is isolated with the reason.

NaN, infinity, a wrong length and an empty vector are per-vector faults (the answer parses, one vector is
unusable): `test_backfill_runbook.py::test_bad_vectors_are_never_written`. Here: answers that are wrong as a
whole (one vector short, not JSON, an HTML error page) for a batch holding a marked chunk. The engine cannot
tell which input caused those, so it asks a known-good canary text (the server is well), splits the batch
until the marked chunk stands alone, writes every other vector and records that one chunk.
"""

from __future__ import annotations

import threading

import pytest

from wiki_embeddings.core.failure_log import read_entries
from wiki_embeddings_tests.integration.test_faults_support import filled, wait_until, wrong_vectors

CASES = {
    "nan_json_marker": ("invalid_vector", "NaN or infinity"),  # a NaN literal inside a 200 answer
    "nan_marker": ("http_500", "json: unsupported value: NaN"),  # what real Ollama answers: a 500
    "inf_marker": ("invalid_vector", "NaN or infinity"),
    "wrong_dim_marker": ("invalid_vector", "vector length 383 != column dimension 384"),
    "empty_vector_marker": ("invalid_vector", "empty vector"),
    "wrong_count_marker": ("wrong_count", "asked for 1 vectors, got 0"),
    "non_json_marker": ("bad_response", "is not JSON"),
    "html_marker": ("bad_response", "content-type text/html"),
}


@pytest.mark.parametrize("fault", list(CASES))
def test_a_bad_answer_is_never_written_and_its_chunk_ends_isolated_with_the_reason(make_table, ollama, fault):
    error, reason = CASES[fault]
    table = make_table(batch_size=32)
    rows = [(i, f"good paragraph {i}") for i in range(1, 65)]
    rows[20] = (21, "this paragraph triggers BADANSWER")
    table.load(rows)
    ollama.set_faults(**{fault: "BADANSWER"})
    report = table.backfill()
    assert report.state == "completed", report.message
    assert report.embedded == 63 and report.failed_ids == [21]
    assert table.store.read_vectors([21])[21] is None, "nothing from a bad answer is written"
    assert wrong_vectors(table) == [], "every vector written is the right one"
    entries = read_entries(table.settings.failure_log)
    assert [(e["chunk_id"], e["error"]) for e in entries] == [(21, error)]
    assert reason in entries[0]["message"]
    recorded = table.store.list_failures()
    assert [(r["chunk_id"], r["error"]) for r in recorded] == [(21, error)] and reason in recorded[0]["message"]
    assert table.status()["missing"] == 1 and table.status()["failed"] == 1


def test_a_server_that_garbles_every_answer_is_the_servers_fault_not_the_chunks(make_table, ollama):
    """When even the canary gets a garbled answer, nothing is isolated: the run stops as server trouble."""
    table = make_table(batch_size=8)
    table.load([(i, f"text {i}") for i in range(1, 201)])
    ollama.set_faults(latency_ms=30)

    def garble_soon() -> None:
        wait_until(lambda: filled(table) >= 8, 30, "a first batch")
        ollama.set_faults(html_marker=" ")  # every text holds a space, the canary too

    garbler = threading.Thread(target=garble_soon)
    garbler.start()
    report = table.backfill()
    garbler.join()
    assert report.state == "server_unavailable" and "known-good" in report.message
    assert report.failed == 0 and table.store.list_failures() == []
    assert 8 <= report.embedded < 200 and wrong_vectors(table) == []
