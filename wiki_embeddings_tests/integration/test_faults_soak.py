"""A bounded soak: 50,000 chunks, 5 % of requests overloaded, 20 poisoned chunks, three random kill -9 cycles.

At the end exactly the poisoned chunks are missing, the failure log and the failures table name exactly
them, and every other vector is the server's vector for its text. Set SOAK_SEED to replay a schedule.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from wiki_embeddings.core.failure_log import read_entries
from wiki_embeddings.core.status import collect_status
from wiki_embeddings_tests.integration.test_faults_support import (
    advisory_locks,
    cli_env,
    filled,
    kill9,
    run_cli,
    start_cli,
    wait_until,
    wrong_vectors,
)

CHUNKS = 50_000
POISONED = 20
KILLS = 3
BATCH = 256


@pytest.mark.slow
def test_soak_kills_overload_and_poison_end_with_exactly_the_poisoned_chunks_missing(make_table, ollama, tmp_path):
    seed = int(os.environ.get("SOAK_SEED") or time.time_ns() % 2**32)
    rng = random.Random(seed)
    why = f"(SOAK_SEED={seed})"
    poisoned = sorted(rng.sample(range(1, CHUNKS + 1), POISONED))
    table = make_table(dim=8, ollama_model="tiny", batch_size=BATCH)
    table.load([(i, f"soak chunk {i} POISON" if i in poisoned else f"soak chunk {i}") for i in range(1, CHUNKS + 1)])
    # every 20th request answers 503; 50 ms per request keeps the whole load longer than the three kill cycles
    # (the run's self-tuned depth would otherwise finish it before the last kill)
    ollama.set_faults(fail_every_n=20, error_marker="POISON", latency_ms=50)
    env = cli_env(table, OLLAMA_MODEL="tiny", WIKI_EMBED_CONCURRENCY="2", WIKI_EMBED_RETRIES="4")
    args = ("backfill", "--batch-size", str(BATCH), "--report-every", "20")

    for cycle in range(KILLS):
        start = filled(table)
        proc = start_cli(table, *args, env=env, log=tmp_path / f"run{cycle}.log")
        try:
            wait_until(lambda s=start: filled(table) >= s + BATCH, 60, f"cycle {cycle} to make progress {why}")
            time.sleep(rng.uniform(0.0, 1.5))
        finally:
            kill9(proc)
        assert proc.returncode == -9, f"cycle {cycle} ended before its kill: tune the soak {why}"
        wait_until(lambda: not advisory_locks(table), 15, f"cycle {cycle}'s claims to die with it {why}")

    final = run_cli(table, *args, env=env, timeout=240)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:] + why

    status = collect_status(table.store, table.settings)
    assert status["missing"] == POISONED and status["failed"] == POISONED, (status, why)
    missing = [r[0] for r in table.sql(f"SELECT id FROM {table.settings.table} WHERE embedding IS NULL ORDER BY id")]
    assert missing == poisoned, why
    assert sorted(r["chunk_id"] for r in table.store.list_failures()) == poisoned, why
    logged = {e["chunk_id"] for e in read_entries(table.settings.failure_log)}
    assert logged == set(poisoned), why
    assert wrong_vectors(table, model="tiny", dim=8) == [], why
    assert ollama.stats()["status_counts"].get(503, 0) > 0, "the overload really happened"
    assert not advisory_locks(table)
