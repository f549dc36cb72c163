"""The writer (core/backfill/writer.py): one statement per batch, a refused row isolated, locked rows handed back.
On real PostgreSQL: integration/test_faults_round_two.py (trigger refusals, row locks, a swap mid-run),
test_model_change.py (a batch after a swap refused whole), test_long_chunks.py (provenance of cut chunks)."""

from __future__ import annotations

import numpy as np
import pytest

from wiki_embeddings.core.backfill.outcomes import Embedded
from wiki_embeddings.core.backfill.writer import Writer
from wiki_embeddings.core.db import ModelMismatch, Provenance, VectorNotes
from wiki_embeddings_tests.unit.fakes import FakeWriteStore, InlineDb, hash_vector, md5_of, run

PROVENANCE = Provenance("fake-minilm", 8, 2000, "search_document: ")


def batch(ids: list[int], cut: list[bool] | None = None, truncated: list[bool] | None = None) -> Embedded:
    return Embedded(
        ids,
        [hash_vector(str(i), 8) for i in ids],
        [100 + i for i in ids],
        cut or [False] * len(ids),
        truncated or [False] * len(ids),
    )


def writer() -> tuple[Writer, FakeWriteStore, InlineDb]:
    store, db = FakeWriteStore(), InlineDb()
    return Writer(store, db.call, PROVENANCE), store, db


def test_a_batch_is_written_in_one_statement_with_its_provenance_and_notes():
    w, store, db = writer()
    item = batch([1, 2, 3], cut=[False, True, False], truncated=[False, False, True])
    md5s = [md5_of(f"text {i}") for i in (1, 2, 3)]
    written = run(w.write(item, md5s, False))
    assert (written.written, written.cut, written.locked, written.refused) == (3, 1, set(), [])
    [write] = store.writes
    assert write.ids == [1, 2, 3] and write.md5s == md5s and write.provenance == PROVENANCE and not write.replace
    assert write.notes == VectorNotes([101, 102, 103], [False, True, False], [False, False, True])
    assert all(np.array_equal(store.written[i], hash_vector(str(i), 8)) for i in (1, 2, 3))
    assert db.roles == ["write"] and w.batches == 1


def test_a_refresh_write_replaces_vectors():
    w, store, _ = writer()
    run(w.write(batch([7]), [md5_of("x")], True))
    assert store.writes[0].replace


def test_a_row_the_database_refuses_is_isolated_as_write_error_and_the_rest_written():
    w, store, _ = writer()
    store.refused = {6}
    written = run(w.write(batch(list(range(1, 9))), None, False))
    assert written.written == 7 and sorted(store.written) == [1, 2, 3, 4, 5, 7, 8]
    [bad] = written.refused
    assert (bad.chunk_id, bad.error, bad.http_status, bad.text_length) == (6, "write_error", None, 106)
    assert bad.message == "the database refused the write: refused by trigger for id 6"  # its first line only
    assert [len(wr.ids) for wr in store.writes] == [8, 4, 4, 2, 1, 1, 2]  # halved until it stood alone
    assert w.batches == 1  # one batch, however many statements its isolation took


def test_md5s_are_split_with_the_halves():
    w, store, _ = writer()
    store.refused = {3}
    md5s = [f"md5-{i}" for i in (1, 2, 3, 4)]
    run(w.write(batch([1, 2, 3, 4]), md5s, True))
    for wr in store.writes:
        assert wr.md5s == [f"md5-{i}" for i in wr.ids]  # each part keeps the md5 of each of its own chunks


def test_locked_rows_are_handed_back_and_not_counted_as_cut():
    w, store, _ = writer()
    store.row_locked = {2}  # another transaction holds its row: not waited for
    written = run(w.write(batch([1, 2, 3], cut=[True, True, False]), None, False))
    assert written.written == 2 and written.locked == {2}
    assert written.cut == 1  # only chunk 1: chunk 2 was not written
    assert 2 not in store.written and written.refused == []


def test_a_column_swapped_to_another_model_ends_the_write_with_model_mismatch():
    w, store, _ = writer()
    store.swapped = True
    with pytest.raises(ModelMismatch):
        run(w.write(batch([1, 2]), None, False))
    assert store.written == {} and len(store.writes) == 1  # refused whole, never split like a bad row
