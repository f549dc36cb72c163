"""The window probe at a run's start: does each model server take the whole window it describes, and what does it
do past it? One known text repeated to 95 % of the window: a server that counts fewer tokens than it was sent cuts
silently (Ollama before 0.13.5 past num_ctx; 0.30+ past its physical batch, 2,048 tokens, whatever num_ctx says).
Then 115 %: a refusal (current Ollama) means nothing can be cut silently at all; a count at the window means a
silent cut there. A server that reports no counts is probed by its vectors instead (silent.py). Each server is
asked itself (pinned): one server of a fleet may run another Ollama than the rest."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from wiki_embeddings.core.backfill import cuts, silent
from wiki_embeddings.core.context import TokenEstimator
from wiki_embeddings.core.embedders import Answer, ContextExceeded, EmbedFailure

CANARY_TEXT = "The quick brown fox jumps over the lazy dog."
PinnedCall = Callable[[list[str], int | None], Awaitable[Answer]]


@dataclass
class ProbeResult:
    twin_check: bool = False  # a silent cutter without token counts: texts near the window are checked by twins
    refuses_over_window: bool = False  # every server refused past its window: nothing can be cut silently
    silent_at: tuple[int, int] | None = None  # (tokens sent, tokens counted) of the server that cut the most


async def probe_window(
    call: PinnedCall, servers: int, believed: int | None, estimator: TokenEstimator, longest: int, where: str
) -> ProbeResult:
    result = ProbeResult(refuses_over_window=believed is not None)
    for server in range(servers):

        async def pinned(texts: list[str], server: int = server) -> Answer:
            return await call(texts, server)

        try:
            one = (await pinned([CANARY_TEXT])).tokens
            if one is None:
                result.refuses_over_window = False
                result.twin_check = result.twin_check or await silent.probe(pinned, estimator, longest, believed, where)
                continue
            two = (await pinned([CANARY_TEXT + " " + CANARY_TEXT])).tokens
            if not believed or two is None or two <= one:
                result.refuses_over_window = False  # no usable counts: truncation is judged batch by batch
                continue
            found = await cuts.probe_counts(pinned, CANARY_TEXT, one, two, believed)
            if found is None:  # the window is taken whole: past it, a refusal (loud) or a silent cut?
                over = await cuts.probe_over(pinned, CANARY_TEXT, one, two, believed)
                if over is not None:
                    result.refuses_over_window = False
                    if over <= believed + cuts.PROBE_SLACK:
                        found = (believed, over)
        except ContextExceeded:
            continue  # refused rather than cut: the prefix search learns the real window when it matters
        except EmbedFailure:
            result.refuses_over_window = False  # unknown for this server: batches are checked
            continue
        if found is not None and (result.silent_at is None or found[1] < result.silent_at[1]):
            result.refuses_over_window = False
            result.silent_at = found
    return result
