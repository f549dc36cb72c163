"""Issue 6: model and content changes. Provenance of every vector, stale detection, in-place refresh of edited
chunks, and a change of model through a shadow column and a swap, with search never down."""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest

from wiki_embeddings.core.factories import build_store
from wiki_embeddings.devtools.ollama_server import hash_vector
from wiki_embeddings_tests.integration.test_cli import run_cli, status_of

NOMIC = "nomic-embed-text"


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def vectors(table, column: str = "embedding") -> dict[int, np.ndarray | None]:
    with build_store(table.settings.replace(embedding_column=column), table.url) as store:
        ids = [r[0] for r in table.sql(f"SELECT id FROM {table.settings.table}")]
        return store.read_vectors(ids)


def texts(table) -> dict[int, str]:
    return dict(table.sql(f"SELECT id, content FROM {table.settings.table}"))


def assert_vectors_of(table, model: str, dim: int, column: str = "embedding") -> None:
    got, want = vectors(table, column), texts(table)
    assert set(got) == set(want)
    for cid, text in want.items():
        assert got[cid] is not None, f"chunk {cid} has no vector in {column}"
        np.testing.assert_allclose(got[cid], hash_vector(model, text, dim), rtol=1e-6, atol=1e-7)


def shadow_status(table) -> dict:
    with build_store(table.settings.replace(embedding_column="embedding_next"), table.url) as store:
        return store.status()


def test_provenance_is_written_with_the_vectors(make_table):
    table = make_table()
    table.load([(i, f"text {i}") for i in range(1, 21)])
    assert table.backfill(max_chars=4).state == "completed"
    prov = table.store.provenance(range(1, 21))
    assert set(prov) == set(range(1, 21))
    for cid, row in prov.items():
        assert row["model"] == "all-minilm" and row["dimensions"] == 384
        assert row["text_md5"] == md5(f"text {cid}"), "md5 of the whole stored text, as PostgreSQL computes it"
        assert row["max_chars"] == 4 and row["text_prefix"] == ""
    # PostgreSQL recomputes the same hash: nothing is stale.
    assert table.store.scan_changed() == 0


def test_an_edited_chunk_is_re_embedded_in_place_and_nothing_else_is(make_table):
    table = make_table()
    name = table.settings.table
    table.load([(i, f"text {i}") for i in range(1, 31)])
    assert table.backfill(max_chunks=20000).state == "completed"  # maintenance: it scans too
    before_vectors = vectors(table)
    before_prov = table.store.provenance(range(1, 31))
    # Test instrument only (the product uses no trigger): log every UPDATE, refuse any that blanks a vector.
    schema = name.split(".")[0]
    table.sql(f"CREATE TABLE {schema}.updates (id bigint)")
    table.sql(
        f"CREATE FUNCTION {schema}.watch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF OLD.embedding IS NOT NULL AND NEW.embedding IS NULL THEN RAISE EXCEPTION 'NULL gap'; END IF; "
        f"IF NEW.embedding IS DISTINCT FROM OLD.embedding THEN INSERT INTO {schema}.updates VALUES (NEW.id); END IF;"
        f" RETURN NEW; END $$"
    )
    table.sql(f"CREATE TRIGGER watch BEFORE UPDATE ON {name} FOR EACH ROW EXECUTE FUNCTION {schema}.watch()")
    table.sql(f"UPDATE {name} SET content = 'an edited paragraph' WHERE id = 7")
    table.sql(f"UPDATE {name} SET content = 'another edit' WHERE id = 12")

    # Status never scans: stale_text comes from the last scan (the backfill's, before the edits), with its time.
    status = status_of(table)
    assert status["stale_text"] == "0" and status["stale_text_scanned_at"]
    code, out = run_cli(table, "status", "--scan-changed")
    assert code == 0
    status = dict(line.split("=", 1) for line in out.strip().splitlines())
    assert status["stale_text"] == "2" and status["stale_text_scanned_at"]

    skipped = table.backfill(refresh_changed=False)
    assert skipped.refreshed == 0 and table.sql(f"SELECT count(*) FROM {schema}.updates") == [(0,)]

    report = table.backfill(max_chunks=20000)  # the runbook's maintenance run
    assert report.state == "completed" and report.refreshed == 2 and report.changed_found == 2
    assert sorted(r[0] for r in table.sql(f"SELECT id FROM {schema}.updates")) == [7, 12], "one UPDATE per edit"
    after_vectors = vectors(table)
    after_prov = table.store.provenance(range(1, 31))
    np.testing.assert_array_equal(after_vectors[7], hash_vector("all-minilm", "an edited paragraph", 384))
    assert after_prov[7]["text_md5"] == md5("an edited paragraph")
    assert after_prov[7]["embedded_at"] > before_prov[7]["embedded_at"]
    for cid in set(range(1, 31)) - {7, 12}:
        np.testing.assert_array_equal(after_vectors[cid], before_vectors[cid])
        assert after_prov[cid] == before_prov[cid], f"chunk {cid} was not touched"
    status = status_of(table)
    assert status["stale_text"] == "0" and status["stale_text_scanned_at"] and status["missing"] == "0"


def test_a_refresh_writes_only_if_the_text_is_still_the_one_claimed(make_table):
    table = make_table()
    name = table.settings.table
    table.load([(1, "first"), (2, "second")])
    assert table.backfill().state == "completed"
    table.sql(f"UPDATE {name} SET content = 'first, edited' WHERE id = 1")
    claim_conn = table.store.connect()
    try:
        claim = table.store.claim_changed(claim_conn, after_id=None, limit=10, max_chars=2000)
        assert [r[0] for r in claim.rows] == [1] and claim.text_md5[1] == md5("first, edited")
        table.sql(f"UPDATE {name} SET content = 'edited again' WHERE id = 1")  # between claim and write
        vec = hash_vector("all-minilm", "first, edited", 384)
        written = table.store.write_vectors(claim_conn, [1], [vec], [claim.text_md5[1]], None, True)
    finally:
        claim_conn.close()
    assert written == 0, "the vector of an outdated text is not written"
    np.testing.assert_array_equal(vectors(table)[1], hash_vector("all-minilm", "first", 384))


def test_a_change_of_model_goes_through_a_shadow_column_and_a_swap_without_downtime(make_table, ollama, capsys):
    table = make_table()
    name = table.settings.table
    rows = [(i, f"paragraph number {i}") for i in range(1, 41)]
    table.load(rows)
    assert run_cli(table, "backfill", "--model", "all-minilm")[0] == 0
    assert_vectors_of(table, "all-minilm", 384)

    # Another model on the live column is refused before anything is written, pointing at migrate-model.
    table.sql(f"INSERT INTO {name} (id, content) VALUES (41, 'a new chunk')")
    capsys.readouterr()
    code, _ = run_cli(table, "backfill", "--model", NOMIC)
    assert code == 2 and f"migrate-model --to {NOMIC}" in capsys.readouterr().err
    assert status_of(table)["missing"] == "1"

    # Fill the shadow; stop mid-way with the stop file.
    ollama.set_faults(latency_ms=30)
    stop_file = table.tmp / "wiki-embed.stop"

    def stop_soon() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if shadow_status(table)["embedded"] >= 10:
                    break
            except Exception:  # noqa: BLE001 - the shadow column does not exist yet
                pass
            time.sleep(0.02)
        stop_file.write_text("stop")

    stopper = threading.Thread(target=stop_soon)
    stopper.start()
    code, out = run_cli(table, "migrate-model", "--to", NOMIC, "--batch-size", "5")
    stopper.join()
    assert code == 0, out
    assert "migrate stopped" in out
    first = shadow_status(table)["embedded"]
    assert 10 <= first < 41
    # During the migration the live column keeps serving the old model, and the live model stays recorded.
    status = status_of(table)
    assert status["model"] == "all-minilm" and status["dimensions"] == "384" and status["stale_model"] == "0"
    code, out = run_cli(table, "migrate-model", "--status")
    info = dict(line.split("=", 1) for line in out.strip().splitlines())
    assert info["target_model"] == NOMIC and info["shadow_column"] == "embedding_next"
    assert info["missing"] == str(41 - first) and info["total"] == "41" and info["live_model"] == "all-minilm"
    code, _ = run_cli(table, "migrate-model", "--swap")
    assert code == 2 and "not complete" in capsys.readouterr().err

    # Resume: only the rest is embedded.
    stop_file.unlink()
    ollama.reset_faults()
    code, out = run_cli(table, "migrate-model", "--to", NOMIC, "--batch-size", "5")
    assert code == 0, out
    assert f"migrate completed: embedded={41 - first} " in out
    assert_vectors_of(table, NOMIC, 768, column="embedding_next")
    with build_store(table.settings.replace(embedding_column="embedding_next"), table.url) as shadow:
        assert {r["model"] for r in shadow.provenance(range(1, 42)).values()} == {NOMIC}
    assert run_cli(table, "backfill")[0] == 0, "maintenance of the live column goes on with the live model"
    assert_vectors_of(table, "all-minilm", 384)

    # Swap: one transaction; the live name now holds the new model's vectors.
    code, out = run_cli(table, "migrate-model", "--swap")
    assert code == 0, out
    assert_vectors_of(table, NOMIC, 768)
    assert_vectors_of(table, "all-minilm", 384, column="embedding_prev")
    status = status_of(table)
    assert status["model"] == NOMIC and status["dimensions"] == "768"
    assert status["stale_model"] == "0" and status["missing"] == "0" and status["coverage_pct"] == "100.00"
    assert {r["model"] for r in table.store.provenance(range(1, 42)).values()} == {NOMIC}
    code, _ = run_cli(table, "backfill", "--model", "all-minilm")
    assert code == 2, "the old model is now refused on the live column"
    table.sql(f"INSERT INTO {name} (id, content) VALUES (42, 'after the swap')")
    code, out = run_cli(table, "backfill")
    assert code == 0 and f"with model '{NOMIC}'" in out

    # Rollback needs the previous column complete; then swaps back the same way.
    code, _ = run_cli(table, "migrate-model", "--rollback")
    assert code == 2 and "lacks 1 vectors" in capsys.readouterr().err
    table.sql(f"DELETE FROM {name} WHERE id = 42")
    code, out = run_cli(table, "migrate-model", "--rollback")
    assert code == 0, out
    assert_vectors_of(table, "all-minilm", 384)
    assert_vectors_of(table, NOMIC, 768, column="embedding_next")
    status = status_of(table)
    assert status["model"] == "all-minilm" and status["stale_model"] == "0" and status["dimensions"] == "384"
    code, out = run_cli(table, "migrate-model", "--status")
    info = dict(line.split("=", 1) for line in out.strip().splitlines())
    assert info["target_model"] == NOMIC and info["missing"] == "0", "the rolled-back vectors can be swapped in again"


def test_stale_model_counts_vectors_of_another_model_than_the_live_one(make_table):
    table = make_table()
    table.load([(i, f"t {i}") for i in range(1, 6)])
    assert table.backfill().state == "completed"
    assert table.store.model_status()["stale_model"] == 0
    # e.g. recorded by hand: the vectors no longer match it
    table.store.record_model("some-other-model", 384, replace=True)
    assert table.store.model_status()["stale_model"] == 5


def test_failure_records_of_the_shadow_column_do_not_mix_with_the_live_ones(make_table, ollama):
    table = make_table()
    table.load([(1, "fine"), (2, "POISON chunk")])
    ollama.set_faults(error_marker="POISON")
    assert table.backfill().failed == 1
    table.store.start_migration(NOMIC, 768, "embedding_next")
    with build_store(table.settings.replace(embedding_column="embedding_next"), table.url) as shadow:
        assert shadow.failure_key.endswith("#embedding_next")
        assert shadow.list_failures() == []
    assert [f["chunk_id"] for f in table.store.list_failures()] == [2]


def hnsw_plan_and_nearest(table, probe_id: int, operator: str = "<=>") -> tuple[str, int]:
    """The plan of a nearest-neighbour query with sequential scans off, and its answer for chunk `probe_id`."""
    name = table.settings.table
    probe = f"(SELECT embedding FROM {name} WHERE id = {probe_id})"
    query = f"SELECT id FROM {name} ORDER BY embedding {operator} {probe} LIMIT 1"
    with build_store(table.settings, table.url) as store, store.conn.transaction():
        store.conn.execute("SET LOCAL enable_seqscan = off")
        plan = " ".join(r[0] for r in store.conn.execute(f"EXPLAIN {query}"))
        nearest = store.conn.execute(query).fetchone()[0]
    return plan, nearest


def test_the_swap_builds_the_live_vector_index_on_the_shadow_first(make_table, ollama):
    table = make_table()
    name = table.settings.table
    table.load([(i, f"section {i} of the article") for i in range(1, 61)])
    assert table.backfill().state == "completed"
    table.sql(
        f"CREATE INDEX {table.store.table.name}_search ON {name} USING hnsw (embedding vector_cosine_ops)"
        " WITH (m = 8, ef_construction = 32)"
    )
    assert run_cli(table, "migrate-model", "--to", NOMIC)[0] == 0
    assert table.store.vector_index_specs("embedding_next") == [], "the fill itself writes without an index"

    code, out = run_cli(table, "migrate-model", "--swap")
    assert code == 0, out
    assert "building a hnsw index on embedding_next" in out
    live = table.store.vector_index_specs()
    assert [(s["method"], s["opclass"], sorted(s["options"])) for s in live] == [
        ("hnsw", "vector_cosine_ops", ["ef_construction=32", "m=8"])
    ]
    assert live[0]["name"] == f"{table.store.table.name}_search", "the live column keeps the operator's index name"
    plan, nearest = hnsw_plan_and_nearest(table, 17)
    assert live[0]["name"] in plan and nearest == 17, "search uses the new index right after the swap"
    previous = table.store.vector_index_specs("embedding_prev")
    assert [(s["method"], s["name"]) for s in previous] == [
        ("hnsw", f"{table.store.table.name}_embedding_next_hnsw_idx")
    ]

    # A second migration finds the first one's index name taken (on embedding_prev) and still builds its own.
    assert run_cli(table, "migrate-model", "--to", "tiny")[0] == 0
    code, out = run_cli(table, "migrate-model", "--swap")
    assert code == 0, out
    assert [s["name"] for s in table.store.vector_index_specs()] == [f"{table.store.table.name}_search"]
    assert table.store.vector_index_specs("embedding_prev")[0]["name"].endswith("_2")
    assert table.store.recorded_model() == ("tiny", 8)
    plan, nearest = hnsw_plan_and_nearest(table, 41)
    assert f"{table.store.table.name}_search" in plan and nearest == 41

    # A rollback trades the names back the same way.
    assert run_cli(table, "migrate-model", "--rollback")[0] == 0
    assert [s["name"] for s in table.store.vector_index_specs()] == [f"{table.store.table.name}_search"]
    assert table.store.recorded_model() == (NOMIC, 768)


def test_a_bootstrap_may_drop_the_vector_index_and_rebuilds_it_after(make_table):
    table = make_table()
    name = table.settings.table
    table.load([(i, f"line {i}") for i in range(1, 41)])
    index = f"{table.store.table.name}_hnsw"
    table.sql(f"CREATE INDEX {index} ON {name} USING hnsw (embedding vector_l2_ops)")
    kept = table.backfill(id_max=20)
    assert kept.index_seconds == {}, "without --drop-vector-index the index stays"
    dropped = table.backfill(drop_vector_index=True)
    assert dropped.state == "completed" and dropped.index_seconds["dropped"] == [index]
    assert [s["name"] for s in table.store.vector_index_specs()] == [index], "rebuilt with its own name"
    plan, nearest = hnsw_plan_and_nearest(table, 33, "<->")
    assert index in plan and nearest == 33


def test_the_readiness_check_fails_while_vectors_of_another_model_are_live(make_table, ollama):
    import dagster as dg

    from wiki_embeddings.defs.assets import embedding_coverage
    from wiki_embeddings.defs.checks import missing_is_zero
    from wiki_embeddings_tests.integration.dagster_support import resources_for

    table = make_table()
    table.load([(i, f"t {i}") for i in range(1, 6)])
    assert table.backfill().state == "completed"
    table.store.record_model("some-other-model", 384, replace=True)
    instance = dg.DagsterInstance.ephemeral()
    try:
        result = dg.materialize(
            [embedding_coverage, missing_is_zero],
            resources=resources_for(table, ollama),
            instance=instance,
            raise_on_error=False,
        )
    finally:
        instance.dispose()
    evaluation = result.get_asset_check_evaluations()[0]
    assert not evaluation.passed and evaluation.metadata["stale_model"].value == 5
    assert "migrate-model" in (evaluation.description or "")
    coverage = result.asset_materializations_for_node("embedding_coverage")[0].metadata
    assert coverage["missing"].value == 0 and coverage["stale_model"].value == 5 and coverage["stale_text"].value == 0


def test_the_dagster_migration_job_fills_the_shadow_per_range_and_the_swap_job_swaps(make_table, ollama):
    import dagster as dg

    from wiki_embeddings.defs.config import RangeRunConfig
    from wiki_embeddings_tests.integration.dagster_support import FIRST, definitions_for, resources_for

    table = make_table()
    table.load([(i, f"chunk {i}") for i in range(1, 21)])
    assert table.backfill().state == "completed"
    defs = definitions_for(resources_for(table, ollama))
    instance = dg.DagsterInstance.ephemeral()
    try:
        early = defs.resolve_job_def("model_migration_job").execute_in_process(
            instance=instance, partition_key=FIRST, raise_on_error=False
        )
        assert not early.success, "no migration recorded yet"
        table.store.start_migration(NOMIC, 768, "embedding_next")
        refused = defs.resolve_job_def("model_swap_job").execute_in_process(instance=instance, raise_on_error=False)
        assert not refused.success, "the shadow is empty"
        config = dg.RunConfig(ops={"fill_shadow_range": RangeRunConfig(sleep_ms=0, batch_size=8)})
        filled = defs.resolve_job_def("model_migration_job").execute_in_process(
            instance=instance, partition_key=FIRST, run_config=config
        )
        assert filled.success
        assert_vectors_of(table, "all-minilm", 384), "the live column is untouched"
        assert defs.resolve_job_def("model_swap_job").execute_in_process(instance=instance).success
    finally:
        instance.dispose()
    assert_vectors_of(table, NOMIC, 768)
    assert table.store.recorded_model() == (NOMIC, 768)


def test_vectors_written_before_this_tool_are_counted_unverified_by_the_scan(make_table, ollama):
    from wiki_embeddings_tests.integration.test_cli import run_cli, status_of

    table = make_table()
    name = table.settings.table
    table.load([(i, f"chunk {i}") for i in range(1, 11)])
    assert table.backfill(id_max=6).state == "completed"
    # The shell-script era: vectors written straight into the column, with no provenance.
    vec = "[" + ",".join(["0.1"] * 384) + "]"
    table.sql(f"UPDATE {name} SET embedding = %s::vector WHERE id > 6", (vec,))
    assert status_of(table)["unverified"] == "", "status never scans; nothing was scanned yet"
    code, out = run_cli(table, "status", "--scan-changed")
    status = dict(line.split("=", 1) for line in out.strip().splitlines())
    assert code == 0 and status["unverified"] == "4" and status["stale_text"] == "0"
    assert status["stale_model"] == "0" and status["missing"] == "0"
    # A maintenance run's complete content scan records it too.
    table.sql(f"UPDATE {name} SET embedding = NULL WHERE id = 10")
    assert table.backfill(max_chunks=100).state == "completed"
    assert table.store.model_status()["unverified"] == 3


def test_a_dropped_and_recreated_table_inherits_no_provenance_failures_or_model(make_table, ollama):
    table = make_table()
    name = table.settings.table
    table.load([(1, "fine"), (2, "POISON chunk"), (3, "also fine")])
    ollama.set_faults(error_marker="POISON")
    assert table.backfill().failed == 1
    ollama.reset_faults()
    assert len(table.store.provenance([1, 3])) == 2 and table.store.list_failures()

    table.sql(f"DROP TABLE {name}")
    table.store.ensure_table(768)  # the same name, a new table, for another model
    table.load([(1, "another text"), (2, "POISON no longer")])
    table.store.migrate()
    assert table.store.provenance([1, 2, 3]) == {} and table.store.list_failures() == []
    assert table.store.recorded_model() == (None, None), "the empty new column holds no model's vectors"
    report = table.backfill(ollama_model=NOMIC)
    assert report.state == "completed" and report.embedded == 2
    assert_vectors_of(table, NOMIC, 768)


def test_a_failed_shadow_index_build_leaves_no_invalid_index_behind(make_table):
    from wiki_embeddings.core.db import DataRefused

    table = make_table()
    name = table.settings.table
    table.sql(f"ALTER TABLE {name} ADD COLUMN embedding_next vector(2001)")  # HNSW allows at most 2000 dimensions
    spec = {"name": "live", "method": "hnsw", "opclass": "vector_l2_ops", "options": []}
    with pytest.raises(DataRefused, match="2000 dimensions"):
        table.store.build_vector_index(spec, "embedding_next")
    left = table.sql("SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass AND NOT indisvalid", (name,))
    assert left == [(0,)]
    setting = table.store.conn.execute("SELECT current_setting('maintenance_work_mem')").fetchone()
    assert setting != ("512MB",), "the build's memory setting does not outlive it on the store's session"


def test_a_batch_written_after_a_swap_committed_is_refused_whole(make_table):
    from wiki_embeddings.core.db import Provenance, StoreError

    table = make_table()
    table.load([(i, f"t {i}") for i in range(1, 5)])
    old = Provenance("all-minilm", 384, 2000)
    writer = build_store(table.settings, table.url)
    conn = writer.connect()
    try:
        vec = np.full(384, 0.5, dtype=np.float32)
        assert writer.write_vectors(conn, [1, 2], [vec, vec], provenance=old) == 2
        # A swap commits while this writer is between batches (same dimensions: nothing else would stop it).
        table.sql(f"ALTER TABLE {table.settings.table} ADD COLUMN embedding_next vector(384)")
        table.store.swap_columns(
            to_live="embedding_next",
            from_live="embedding_prev",
            model="other-384",
            dimensions=384,
            previous_model="all-minilm",
            previous_dimensions=384,
            migration=(None, None, None),
        )
        with pytest.raises(StoreError, match="swapped during this run"):
            writer.write_vectors(conn, [3, 4], [vec, vec], provenance=old)
    finally:
        conn.close()
        writer.close()
    assert table.sql(f"SELECT count(*) FROM {table.settings.table} WHERE embedding IS NOT NULL") == [(0,)]
