"""Server shares (core/spread.py): concurrent runs lease distinct servers, wait while none is free, and a closed
session frees its servers."""

import threading
import time

from wiki_embeddings.core.spread import server_share, servers_per_run

URLS = ["http://a.invalid:11434", "http://b.invalid:11434"]


def test_the_share_is_the_servers_divided_by_the_runs_at_once():
    assert servers_per_run(2, None) == 2  # unknown: every server, as before
    assert servers_per_run(2, 1) == 2  # one run at a time: every server, as before
    assert servers_per_run(2, 2) == 1
    assert servers_per_run(4, 2) == 2
    assert servers_per_run(2, 5) == 1  # more runs than servers: one each, the others wait
    assert servers_per_run(1, 3) == 1


def test_runs_lease_distinct_servers_and_a_third_waits_for_one_to_be_freed(make_table):
    store = make_table().store
    logs: list[str] = []
    never = lambda: False  # noqa: E731
    with server_share(store, URLS, 1, log=logs.append, stop_requested=never) as first:
        with server_share(store, URLS, 1, log=logs.append, stop_requested=never) as second:
            assert sorted(first + second) == [0, 1]
            assert store.leased(URLS) == [True, True]
            got: list[list[int]] = []

            def third() -> None:
                with server_share(store, URLS, 1, log=logs.append, stop_requested=never, poll_sec=0.02) as held:
                    got.append(held)

            waiter = threading.Thread(target=third)
            waiter.start()
            time.sleep(0.3)
            assert got == [] and any("waiting for a free model server" in m for m in logs)
        waiter.join(5)
        assert got == [second]  # the server the second run gave back
    assert store.leased(URLS) == [False, False]


def test_a_stop_request_ends_the_wait_with_no_server(make_table):
    store = make_table().store
    keep = {"log": lambda _m: None, "stop_requested": lambda: False}
    with server_share(store, URLS, 1, **keep), server_share(store, URLS, 1, **keep):  # type: ignore[arg-type]
        stopping = server_share(store, URLS, 1, log=lambda _m: None, stop_requested=lambda: True, poll_sec=0.01)
        with stopping as held:
            assert held == []
    assert store.leased(URLS) == [False, False]


def test_one_run_with_every_server_leases_nothing(make_table):
    store = make_table().store
    with server_share(store, URLS, 2, log=lambda _m: None, stop_requested=lambda: False) as held:
        assert held == [0, 1] and store.leased(URLS) == [False, False]


def test_a_server_that_does_not_answer_is_leased_only_when_no_answering_one_is_free(make_table, ollama):
    """Answering servers first, whatever the run's own order; a silent one only when no answering one is free (said)."""
    store = make_table().store
    urls = ["http://127.0.0.1:9", ollama.url, "http://127.0.0.1:9/other"]
    logs: list[str] = []
    never = lambda: False  # noqa: E731
    with server_share(store, urls, 1, log=logs.append, stop_requested=never) as first:
        assert first == [1] and store.leased(urls) == [False, True, False]
        with server_share(store, urls, 1, log=logs.append, stop_requested=never) as second:
            assert second in ([0], [2]) and store.leased(urls).count(True) == 2
            assert any("do not answer, and no answering one is free" in m for m in logs), logs
    assert store.leased(urls) == [False, False, False]


def test_a_lease_another_run_took_while_the_session_was_away_ends_the_run_for_a_retry(make_table, ollama):
    """The lease session ended and another run leased the server before this one took it back: this run is told
    (`lease_lost`) and ends `server_unavailable` (Dagster retries it), rather than tuning against the other run."""
    from wiki_embeddings.core import spread
    from wiki_embeddings_tests.integration.test_faults_support import wait_until

    table = make_table(ollama_url=f"{ollama.url},{ollama.url.replace('127.0.0.1', 'localhost')}")
    table.load_wiki(40)
    urls = table.settings.ollama_urls
    store = table.store
    logs: list[str] = []
    other = store.connect(register=False)
    try:
        with server_share(store, urls, 1, log=logs.append, stop_requested=lambda: False, watch_sec=1.0) as held:
            table.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
                ("wiki-embeddings leases%",),
            )
            wait_until(lambda: store.try_lease(other, urls[held[0]]), 1, "the other run leasing the server")
            wait_until(spread.lease_lost, 5, "the run told that its server went to another run")
            ollama.set_faults(latency_ms=100)
            report = table.backfill(ollama_url=urls[held[0]], batch_size=2, concurrency=1)
            assert report.state == "server_unavailable" and "another run took" in report.message, report
            assert any("taking the lease(s) again" in m for m in logs), logs
        assert spread.lease_lost() is None
    finally:
        other.close()
