"""The embedder and a runner reload (Ollama 0.31: a crash on a long input, then the model reloads, and every request
evaluated meanwhile waits for it): the reload is waited out with the load allowance by one request at a time, and a
request that was in flight across the crash and timed out waiting for the reload is sent again and counted against
nobody (issue 20 item 4). Real HTTP against the dev server: integration/test_break_round.py (a 3 s reload, a 2 s
--timeout-sec)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from wiki_embeddings.core import tuning as tune
from wiki_embeddings.core.embedders import OllamaClient, RunnerCrashed

pytestmark = pytest.mark.unit

RELOAD_SEC = 0.5
TIMEOUT_SEC = 0.2  # shorter than the reload
CRASH = 'do embedding request: Post "http://127.0.0.1:41234/embedding": EOF'


class Runner:
    """An Ollama whose runner crashes on the input "long" and then reloads for RELOAD_SEC; every request evaluated
    meanwhile waits for the reload. Records how many requests it held at once while reloading."""

    def __init__(self) -> None:
        self.ready_at = 0.0
        self.active = 0
        self.most_while_reloading = 0
        self.inputs: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        loop = asyncio.get_running_loop()
        text = orjson.loads(request.content)["input"][0]
        self.inputs.append(text)
        if text == "long":
            self.ready_at = loop.time() + RELOAD_SEC
            return httpx.Response(400, json={"error": CRASH})
        self.active += 1
        try:
            if loop.time() < self.ready_at:
                self.most_while_reloading = max(self.most_while_reloading, self.active)
            await asyncio.sleep(0.03)
            while loop.time() < self.ready_at:  # a crash meanwhile: evaluated once the model is back
                await asyncio.sleep(self.ready_at - loop.time())
        finally:
            self.active -= 1
        return httpx.Response(200, json={"embeddings": [[0.5] * 4], "prompt_eval_count": 3})


def client(runner: Runner, depth: int) -> OllamaClient:
    return OllamaClient(
        ["http://gpu-a:11434"],
        "all-minilm",
        transport=httpx.MockTransport(runner),
        retries=2,
        timeout_sec=TIMEOUT_SEC,
        load_timeout_sec=5.0,
        tuning=tune.Tuning(1, pinned_depth=depth, backoff_base_sec=0.001, backoff_max_sec=0.002),
    )


async def crash(c: OllamaClient) -> None:
    with pytest.raises(RunnerCrashed):
        await c.embed_texts(["long"])


def test_a_request_in_flight_across_a_crash_waits_for_the_reload_and_counts_against_nobody():
    runner = Runner()
    c = client(runner, depth=2)

    async def scenario() -> Any:
        try:
            short = asyncio.ensure_future(c.embed_texts(["short"]))
            await asyncio.sleep(0.01)  # "short" is at the server when "long" crashes its runner
            await crash(c)
            return await short
        finally:
            await c.aclose()

    answer = asyncio.run(scenario())
    health = c.tuning.controls[0].health
    assert len(answer.vectors) == 1 and runner.inputs.count("short") == 2, "timed out once, then sent again"
    assert health.failures == 0 and health.in_rotation, "a reload is no evidence against the server"


def test_after_a_crash_one_request_at_a_time_waits_out_the_reload_with_the_load_allowance():
    runner = Runner()
    c = client(runner, depth=3)

    async def scenario() -> list[Any]:
        try:
            await crash(c)
            return await asyncio.gather(*(c.embed_texts([f"text {k}"]) for k in range(3)))
        finally:
            await c.aclose()

    answers = asyncio.run(scenario())
    health = c.tuning.controls[0].health
    assert [len(a.vectors) for a in answers] == [1, 1, 1]
    assert runner.most_while_reloading == 1, "the others waited for the one that waits out the reload"
    assert len(runner.inputs) == 4, "none timed out into the reload and went again"
    assert health.failures == 0
