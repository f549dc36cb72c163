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
