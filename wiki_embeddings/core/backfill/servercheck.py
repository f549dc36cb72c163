"""Every server's model checked against the column's before it embeds for the run (core/fingerprint.py).

Another server under the same model name is another model until shown otherwise (issue 22): other weights, a
quantisation, another pooling answer the same name with other vectors, and the OpenAI-compatible API names no
digest. At the run's start each server's vector of the probe text (the window probe's first request, else one request
of its own) is compared with the column's recorded answers; below `verify.MIN_COSINE` the run is refused like a model
change (`ModelChanged`: exit 8, nothing written), naming the server and the ways out. A column with no answers on
record is checked by a few stored vectors re-embedded through each server (`verify` on a sample, per server); a
fresh column takes the servers' answers, which must agree among themselves
(and with those of a run that started at once and recorded first). A server that could not be asked leaves
the rotation until its health probe answers (the same text): each server coming back is judged by that answer, and
one that answers another model ends the run `model_changed` before it embeds anything.
"""

from __future__ import annotations

import asyncio

import numpy as np

from wiki_embeddings.core import fingerprint, identity
from wiki_embeddings.core.backfill.errors import Fatal, ModelChanged
from wiki_embeddings.core.backfill.halt import Halt
from wiki_embeddings.core.db import Store
from wiki_embeddings.core.embedders import Embedder, ModelNotFound
from wiki_embeddings.core.verify import MIN_COSINE, verify
from wiki_embeddings.settings import Settings

SAMPLE = 8  # stored vectors re-embedded through each server when the column has no answers on record


class ServerCheck:
    """The run's servers against the column's model, at the start and whenever one comes back into the rotation."""

    def __init__(self, store: Store, client: Embedder, settings: Settings, halt: Halt):
        self.store, self.client, self.s, self.halt = store, client, settings, halt
        self.known: list[np.ndarray] = []  # the column's answers to the probe text (recorded, or this run's)
        self.new: dict[int, np.ndarray] = {}  # server -> its answer, to record with a fresh column's identity

    @property
    def _prefix(self) -> str:
        return self.client.text_prefix or ""

    @property
    def column(self) -> str:
        return f"{self.store.table.qualified}.{self.store.table.embedding_column}"

    def _where(self, server: int) -> str:
        return str(self.client.server_states()[server].get("url") or f"server {server}")

    async def at_start(self, probed: dict[int, np.ndarray | None]) -> None:
        """Each server's answer (`probed`: what the window probe got; None where that request timed out, so it is not
        asked again: a hung server costs one timeout) judged against the column's; ModelChanged when one answers
        another model. Servers that did not answer leave the rotation until they do (their health probe)."""
        servers = len(self.client.server_states())
        got = {k: v for k, v in probed.items() if v is not None}
        unasked = [k for k in range(servers) if k not in probed]
        failed = {k: "no answer to the window probe in time" for k, v in probed.items() if v is None}
        if unasked:
            answers = await fingerprint.answers(self.client, servers, unasked)
            for k, answer in answers.items():
                if isinstance(answer, np.ndarray):
                    got[k] = answer
                elif not isinstance(answer, ModelNotFound):  # without the model it is out already (`no_model`)
                    failed[k] = answer.message
        self.known = await asyncio.to_thread(fingerprint.recorded, self.store, self.client.model, self._prefix)
        fresh = not self.known
        if fresh:
            await asyncio.to_thread(self._sample, sorted(got), servers)
            self.known = [got[min(got)]] if got else []  # the first server's answer: the others must agree
        for k in sorted(got):
            score = fingerprint.best(got[k], self.known)
            if score < MIN_COSINE:
                raise ModelChanged(self._refusal(k, score, min(got) if fresh else None))
        if fresh:
            self.new = {k: got[k] for k in sorted(got)}
        for k, why in failed.items():  # judged when its health probe brings it back
            self.client.take_out(k, f"not checked against the column's model yet (the probe text failed: {why})")
        self.client.check_returns(self.admit)

    def record(self, dimensions: int) -> None:
        """The column's identity as this run makes its vectors, with the servers' answers when it had none."""
        identity.record(self.store, self.client.model, dimensions, self.s)
        if self.new:  # recorded unless another run starting at once recorded its servers' first: then theirs judge
            known = fingerprint.claim(self.store, list(self.new.values()), self.client.model, self._prefix, MIN_COSINE)
            for k, answer in self.new.items():
                score = fingerprint.best(answer, known)
                if known and score < MIN_COSINE:
                    raise ModelChanged(self._refusal(k, score, None))
            self.known, self.new = known or self.known, {}

    def admit(self, server: int, vector: np.ndarray) -> str | None:
        """A server coming back into the rotation, by its answer to the probe text: None, or why it stays out (the
        run then ends `model_changed`: nothing of another model is written)."""
        if not self.known:  # a fresh column none of whose servers answered at the start: the first back sets it
            self.known = [vector]  # (recorded by the next run, from a sample of the vectors written)
            return None
        score = fingerprint.best(vector, self.known)
        if score >= MIN_COSINE:
            return None
        self.halt.fail(Fatal("model_changed", self._refusal(server, score, None)))
        self.halt.request_stop("another model answers under the column's model name")  # waits for a server end
        return f"answers another model than {self.column}'s under the same name (cosine {score:.4f})"

    def _sample(self, servers: list[int], count: int) -> None:
        """No answers on record (a column filled before they were): a few stored vectors re-embedded through each
        server; `model_changed` refuses the run. A column with no vector yet has nothing to compare."""
        urls = self.s.ollama_urls
        for k in servers if len(urls) == count else [None]:
            settings = self.s if k is None else self.s.replace(ollama_url=urls[k])
            report = verify(self.store, settings, self.client.model, sample=SAMPLE, record=False)
            if report.verdict == "nothing_to_verify":
                return
            if report.verdict == "model_changed":
                where = self.client.where if k is None else self._where(k)
                raise ModelChanged(
                    f"{self.column}: a sample of its stored vectors re-embedded through the server at {where} "
                    f"(OLLAMA_URL) does not match: {report.message} The run is refused like another model; nothing "
                    "was written"
                )

    def _refusal(self, server: int, score: float, first: int | None) -> str:
        model, where = self.client.model, self._where(server)
        if first is not None and first != server:  # a fresh column: its servers disagree among themselves
            return (
                f"the servers at {self._where(first)} and {where} (OLLAMA_URL) answer a probe text differently under "
                f"model {model!r} (cosine {score:.4f} < {MIN_COSINE}): they serve different weights under one name, "
                f"and {self.column} must not mix them, so the run is refused like another model; nothing was written. "
                "Point OLLAMA_URL at servers of one model"
            )
        return (
            f"{self.column} holds vectors of model {model!r}; the server at {where} (OLLAMA_URL) answers a probe text "
            f"under that name with another vector than the column's servers did (cosine {score:.4f} < {MIN_COSINE}): "
            "another model answers there (other weights, a quantisation, another pooling), so the run is refused "
            "like another model and nothing was written. If it serves the same weights, run `wiki-embeddings verify` "
            f"with OLLAMA_URL={where}: when the stored vectors match, its answers are accepted for this column; "
            f"otherwise change the model with `wiki-embeddings migrate-model --to {model}` through the new server "
            "(then --swap)"
        )
