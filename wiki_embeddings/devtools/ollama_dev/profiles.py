"""Profiles: how one Ollama generation treats an embed request, consulted by the embedding pipeline.

A profile answers the questions on which Ollama releases differ: which version ``/api/version`` reports,
how many tokens a request may use (its window), and what happens to an input over that window. Only
today's default exists, :data:`CURRENT` ("current Ollama", 0.13.5 up to at least 0.20, ollama#14186):
the window is ``min(options.num_ctx or the model's default num_ctx, <arch>.context_length)`` tokens and
an input over it is refused (400 on ``/api/embed``, 500 on the legacy endpoint) whatever ``truncate``
says. Fault ``silent_truncate`` gives, request by request, the behaviour of Ollama before 0.13.5 (cut
silently to the window, ``prompt_eval_count`` at the limit; ``truncate: false`` still refused).

Other generations are further instances (or subclasses overriding :meth:`Profile.window` and
:meth:`Profile.fit`): 0.30+ cuts at ``options.num_batch`` (2048 by default) rather than ``num_ctx``, or
crashes its runner on such an input.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, NamedTuple

from wiki_embeddings.devtools.ollama_dev.backends import Backend
from wiki_embeddings.devtools.ollama_dev.faults import Faults
from wiki_embeddings.devtools.ollama_dev.models import DEFAULT_NUM_CTX, ModelSpec
from wiki_embeddings.devtools.ollama_dev.replies import Reply, error

# A version whose /api/embed refuses over-context input whatever `truncate` says (ollama#14186, 0.13.5 up to
# at least 0.20) and answers a NaN in a vector with a 500 (ollama#15582 on 0.20.2): the default mode.
OLLAMA_VERSION = "0.20.2"


class Fitted(NamedTuple):
    """The inputs as the model evaluates them (cut where the profile cuts) and the tokens they take."""

    inputs: list[str]
    tokens: int


@dataclasses.dataclass(frozen=True)
class Profile:
    """One Ollama generation's rules for an embed request (see the module docstring)."""

    version: str

    def window(self, spec: ModelSpec, options: dict[str, Any] | None, faults: Faults) -> int | Reply:
        """Tokens a request may use: min(options.num_ctx or the default num_ctx, the trained context)."""
        trained = faults.max_input_tokens or typing.cast(int, spec.context_length)
        default = trained if faults.max_input_tokens else (spec.num_ctx or DEFAULT_NUM_CTX)
        num_ctx = (options or {}).get("num_ctx")
        if num_ctx is not None:
            if isinstance(num_ctx, bool) or not isinstance(num_ctx, int | float):
                return error(500, 'option "num_ctx" must be of type integer')  # a scheduling error: 500
            if int(num_ctx) > 0:
                default = int(num_ctx)
        return min(default, trained)

    def fit(
        self,
        texts: list[str],
        window: int,
        truncate: bool,
        faults: Faults,
        backend: Backend,
        char_limit: int | None,
    ) -> Fitted | None:
        """The inputs as the model evaluates them, or None when one is over the window (the request is refused).

        ``char_limit``: an extra context in characters (the server's ``--context-chars``, fault
        ``max_input_chars``), checked before tokens.
        """
        silent = faults.silent_truncate and (truncate or faults.ignore_truncate)
        inputs: list[str] = []
        total = 0
        for text in texts:
            if char_limit is not None and len(text) > char_limit:
                if not silent:
                    return None
                text = text[:char_limit]
            tokens = backend.count(text)
            if tokens > window:
                if not silent:
                    return None
                text, tokens = backend.cut(text, window), window  # Ollama reports the window
            inputs.append(text)
            total += tokens
        return Fitted(inputs, total)


CURRENT = Profile(version=OLLAMA_VERSION)
