"""Break round 5: the per-server check of the model's weights (core/fingerprint.py, core/backfill/servercheck.py)
and the silent cutter's unproven texts (core/backfill/silent.py), as production would meet them: a real PostgreSQL
and real HTTP stand-ins (test_break_api.py's) that answer as OpenAI-compatible servers do. Each test is named as the
promise it checks.

Promise (fingerprint.py): a run refuses a server that answers another model under the column's model name, and
only such a server: a good server under weather, noise or a sick neighbour is never refused as another model.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from wiki_embeddings.core import fingerprint
from wiki_embeddings.core.backfill import ModelChanged
from wiki_embeddings.core.embedders.pooled import PROBE_TEXT
from wiki_embeddings_tests.integration.conftest import TEST_MODEL
from wiki_embeddings_tests.integration.test_break_api import (
    Reply,
    StandIn,
    failures,
    openai_answer,
    seeded,
    silent_cutter,
    well,
)
from wiki_embeddings_tests.integration.test_faults_support import wrong_vectors

Embed = Callable[[int, list[str], dict[str, Any]], Reply]
OTHER = "other weights, same name"


@pytest.fixture
def stand_in() -> Iterator[Callable[..., StandIn]]:
    """OpenAI-compatible stand-ins over real HTTP (test_break_api.py's), shut at the test's end."""
    with contextlib.ExitStack() as stack:
        yield lambda embed, **kw: stack.enter_context(StandIn(embed, **kw))


def is_probe(texts: list[str]) -> bool:
    return texts == [PROBE_TEXT]


def error(status: int) -> Reply:
    headers = {"retry-after": "1"} if status == 429 else {}
    return status, headers, {"error": {"message": f"HTTP {status} under load"}}


def weather(rate: float, seed: int, inner: Embed) -> Embed:
    """`inner` behind a steady `rate` of 500/503/429 answers, the probe text's requests included."""
    fails = seeded(rate, seed)

    def embed(n: int, texts: list[str], body: dict[str, Any]) -> Reply:
        if fails(n):
            return error((500, 503, 429)[n % 3])
        return inner(n, texts, body)

    return embed


def filled_column(make_table: Any, url: str, rows: int = 8, **kw: Any) -> Any:
    table = make_table(ollama_url=url, api="openai", num_ctx=512, long_text="cut", **kw)
    table.load_wiki(rows)
    assert table.backfill().embedded == rows
    return table


def add_rows(table: Any, count: int) -> None:
    table.load([(10_000_000 + i, f"Chunk {i} added later, about something else entirely.") for i in range(count)])


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-column", "recorded-column"])
def test_a_steady_error_rate_on_the_probe_text_neither_refuses_a_good_server_nor_ends_the_run(
    make_table, stand_in, fresh
):
    """Two servers of the column's weights at a steady 20 % of 500/503/429, the probe text's requests (the window
    probe, the server check's own, the health probe) hit as often as any: no refusal, no failed chunk, all written."""
    a, b = stand_in(weather(0.2, 7, well())), stand_in(weather(0.2, 8, well()))
    clean = stand_in(well())
    if fresh:
        table = make_table(
            ollama_url=f"{a.url},{b.url}", api="openai", num_ctx=512, long_text="cut", server_wait_sec=30.0
        )
        table.load_wiki(30)
    else:
        table = filled_column(make_table, clean.url, server_wait_sec=30.0)
        add_rows(table, 30)
    report = table.backfill(ollama_url=f"{a.url},{b.url}", batch_size=4)
    assert report.state == "completed" and table.status()["missing"] == 0, report.message
    assert failures(table) == [] and wrong_vectors(table) == []


def test_two_runs_starting_at_once_on_a_fresh_column_with_disagreeing_servers_never_both_record(
    make_table, stand_in, monkeypatch
):
    """Two runs start together on a fresh column, each through its own server, the servers serving different
    weights under one name. Each reads 'no answers on record' before the other records: the second to record must
    find the first's answer and be refused, not add its own beside it (which would accept both models for good)."""
    a, b = stand_in(well()), stand_in(well(OTHER))
    table = make_table(ollama_url=a.url, api="openai", num_ctx=512, long_text="cut")
    table.load_wiki(12)
    real = fingerprint.claim
    other_run: dict[str, Any] = {}

    def racing(store: Any, *args: Any) -> list[np.ndarray]:
        if not other_run:  # the first run checked its servers; the second checks, records and writes meanwhile
            other_run["started"] = True
            other_run["report"] = table.backfill(ollama_url=b.url, max_chunks=4)
        return real(store, *args)

    monkeypatch.setattr(fingerprint, "claim", racing)
    with contextlib.suppress(ModelChanged):
        table.backfill(ollama_url=a.url)
    assert other_run["report"].embedded == 4
    assert len(wrong_vectors(table, model=OTHER)) == 0 or len(wrong_vectors(table)) == 0, "two models in one column"
    sql = f'SELECT fingerprint FROM "{table.settings.state_schema}".column_identity WHERE table_name = %s'
    (fp,) = table.sql(sql, (table.store.table.qualified,))[0]
    answers = [fingerprint._decode(v) for v in fp["vectors"]]
    assert len(answers) == 1, "both servers' answers recorded as the column's model"


def sick(kind: str) -> Embed:
    """A server whose answer to the probe text is broken in one way (every other text answered well)."""

    def embed(n: int, texts: list[str], body: dict[str, Any]) -> Reply:
        if not is_probe(texts):
            return well()(n, texts, body)
        if kind == "hung":
            time.sleep(3.0)
            return well()(n, texts, body)
        answer = openai_answer(TEST_MODEL, texts)
        if kind == "nan":
            answer["data"][0]["embedding"] = [float("nan")] * len(answer["data"][0]["embedding"])
        elif kind == "zeros":
            answer["data"][0]["embedding"] = [0.0] * len(answer["data"][0]["embedding"])
        elif kind == "short":
            answer["data"][0]["embedding"] = answer["data"][0]["embedding"][:-1]
        elif kind == "garbage":
            size = len(answer["data"][0]["embedding"])
            answer["data"][0]["embedding"] = list(np.random.default_rng(n).normal(size=size))
        return 200, {}, answer

    return embed


@pytest.mark.parametrize(
    "kind",
    [
        "hung",
        "nan",
        "zeros",
        "short",
        "garbage",
    ],
)
def test_one_sick_server_of_several_never_writes_and_never_hides_the_good_one(make_table, stand_in, kind):
    """One server of two answers the probe text badly (hung past the timeout, NaN, zeros, one number short, random
    numbers). Nothing it says about the probe text may end in the column; the run either goes on through the good
    server (a sick server leaves the rotation) or is refused naming the sick one - never blaming the good one."""
    good, bad = stand_in(well()), stand_in(sick(kind))
    table = filled_column(make_table, good.url, timeout_sec=2.0, server_wait_sec=10.0)
    add_rows(table, 20)
    try:
        report = table.backfill(ollama_url=f"{bad.url},{good.url}")
    except ModelChanged as refused:
        assert bad.url in str(refused) and good.url not in str(refused).split("answers a probe text")[0]
    else:
        assert report.state == "completed" and table.status()["missing"] == 0, report.message
    assert wrong_vectors(table) == [] and failures(table) == []


@pytest.mark.parametrize("noise", ["float-noise-1e-4", "fp16"])
def test_the_same_weights_with_another_gpus_rounding_are_the_same_model(make_table, stand_in, noise):
    """The same weights on other hardware answer the probe text a little differently each time: GPU float noise
    (1e-4 per component) or fp16 instead of fp32 (cosine ~0.99999). Decision: both are the same model (above
    verify's 0.995) and must embed."""
    rng = random.Random(3)

    def rounding(n: int, texts: list[str], body: dict[str, Any]) -> Reply:
        status, headers, answer = well()(n, texts, body)
        if is_probe(texts):
            vector = np.asarray(answer["data"][0]["embedding"], dtype=np.float32)
            if noise == "fp16":
                vector = vector.astype(np.float16).astype(np.float32)
            else:
                vector = vector + np.asarray([rng.gauss(0, 1e-4) for _ in vector], dtype=np.float32)
            answer["data"][0]["embedding"] = vector.tolist()
        return status, headers, answer

    first = stand_in(well())
    table = filled_column(make_table, first.url)
    add_rows(table, 6)
    other, again = stand_in(rounding), stand_in(rounding)
    report = table.backfill(ollama_url=f"{other.url},{again.url},{first.url}")
    assert report.state == "completed" and report.embedded == 6, report.message


@pytest.mark.parametrize(
    ("first_name", "second_name"),
    [
        (TEST_MODEL, f"{TEST_MODEL}:latest"),
        ("Org/Modèle 埋め込み-v1", "org/modèle 埋め込み-v1:latest"),
        ("hf.co/user/bge m3:Q8_0", "hf.co/user/bge m3:Q8_0"),
    ],
    ids=["tag", "unicode-slash-space", "hf-quant"],
)
def test_the_probes_answers_follow_the_model_under_any_spelling_of_its_name(
    make_table, stand_in, first_name, second_name
):
    """The column's answers are kept per model, in jsonb: a name with a tag, unicode, slashes or spaces must round-
    trip, the same model named another way (`name` vs `name:latest`) must find them, and a server of other weights
    under that name must still be refused."""
    first, other = stand_in(well()), stand_in(well(OTHER))
    table = make_table(ollama_url=first.url, api="openai", num_ctx=512, long_text="cut", ollama_model=first_name)
    table.load_wiki(6)
    assert table.backfill().embedded == 6
    sql = f'SELECT fingerprint FROM "{table.settings.state_schema}".column_identity WHERE table_name = %s'
    (fp,) = table.sql(sql, (table.store.table.qualified,))[0]
    assert fp["model"] == first_name
    add_rows(table, 2)
    with pytest.raises(ModelChanged, match="another vector"):
        table.backfill(ollama_url=other.url, ollama_model=second_name)
    report = table.backfill(ollama_model=second_name)
    assert report.state == "completed" and report.embedded == 2, report.message


def test_a_silent_cutter_failing_twins_at_a_steady_rate_writes_nothing_unproven_and_everything_eventually(
    make_table, stand_in
):
    """A silent cutter without counts (infinity-emb) at its right window, 20 % of its requests (twins included)
    answered 500. README: a text left unproven is written nowhere and recorded as failure `unproven_cut`, which a
    later run retries: nothing unproven is ever written, and a few runs write every chunk."""
    cutter = silent_cutter(256, chars_per_token=5)
    fails = seeded(0.2, 13)

    def embed(n: int, texts: list[str], body: dict[str, Any]) -> Reply:
        if n > 8 and fails(n):
            return 500, {}, {"detail": "Internal Server Error"}
        return cutter(n, texts, body)

    server = stand_in(embed)
    table = make_table(ollama_url=server.url, api="openai", num_ctx=256, long_text="cut", server_wait_sec=30.0)
    table.load_wiki(40)
    for _ in range(4):
        table.backfill()
        assert wrong_vectors(table) == [], "vectors of less text than their chars_sent records"
        if table.status()["missing"] == 0:
            break
    assert table.status()["missing"] == 0, failures(table)


def test_a_health_probe_failing_at_a_steady_rate_brings_a_good_server_back(make_table, stand_in):
    """A server of the column's weights that left the rotation (down for a while) comes back through its health
    probe, which fails 20 % of the time under load: it must come back and embed, not be judged another model."""
    state = {"down_until": 0.0}
    fails = seeded(0.2, 21)

    def flaky(n: int, texts: list[str], body: dict[str, Any]) -> Reply:
        if time.monotonic() < state["down_until"] or (is_probe(texts) and fails(n)):
            return error(503)
        return well()(n, texts, body)

    server = stand_in(flaky)
    table = filled_column(make_table, server.url, server_wait_sec=20.0)
    add_rows(table, 30)
    lock = threading.Lock()

    def outage() -> None:
        time.sleep(0.3)
        with lock:
            state["down_until"] = time.monotonic() + 1.5

    threading.Thread(target=outage, daemon=True).start()
    report = table.backfill(batch_size=2)
    assert report.state == "completed" and table.status()["missing"] == 0, report.message
    assert failures(table) == [] and wrong_vectors(table) == []
