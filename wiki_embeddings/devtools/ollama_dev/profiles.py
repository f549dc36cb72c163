"""Profiles: how one Ollama generation treats an embed request, consulted by the embedding pipeline.

A profile answers the questions on which Ollama releases differ: which version ``/api/version`` reports,
how many tokens an input may take (the window, ``num_ctx``, and the physical batch, ``num_batch``), and
what happens to an input over them. The generations (``OllamaServer(ollama_version=...)``, CLI
``--ollama-version``; a full version such as ``0.13.4`` picks the generation it belongs to):

* ``0.12`` (before 0.13.5; ``server/routes.go`` of 0.12.11): ``/api/embed`` cuts an input over the window
  silently, ``prompt_eval_count`` counting the tokens kept; with ``truncate: false`` it answers 400
  ``input exceeds maximum context length`` (that generation's own text). ``/v1/embeddings`` sends no
  ``truncate``, so it cuts; legacy ``/api/embeddings`` does not cut (500, the runner's text).
* ``0.20`` (0.13.5 to 0.2x, the default, ollama#14186): an input over the window is refused, 400
  ``the input length exceeds the context length`` on ``/api/embed`` and ``/v1/embeddings`` whatever
  ``truncate`` says, 500 on the legacy endpoint. Fault ``silent_truncate`` cuts it instead, request by request.
* ``0.30`` (0.30 and later, llama-server; ollama#14259): an input over ``num_batch`` (``options.num_batch``,
  else the server's ``--num-batch``, 2048 by default) is cut silently at ``num_batch`` even when the window
  is larger and whatever ``truncate`` says, ``prompt_eval_count`` counting the tokens evaluated; an input
  over the window is refused with ``truncate: false`` (400, as 0.20) and cut otherwise (``/v1/embeddings``).
  The legacy endpoint never cuts: 500 over either limit.
* ``0.31-crash`` (0.31.x with some models, ollama#16582, PR #16687): an input over ``num_batch`` that fits
  the window aborts the runner: the answer is ``do embedding request: Post
  "http://127.0.0.1:PORT/v1/embeddings": EOF`` with status ``crash_status`` (400 by default: 0.30/0.31's
  ``EmbedHandler`` answers an error without a status as 400, as the report on 0.30.6 shows; the legacy
  endpoint 500; older runners answered 500, ollama#6094), then the model reloads for ``reload_ms``, and every
  request evaluated meanwhile waits for it. An input over the window: as 0.30.

The window is ``min(options.num_ctx or the model's num_ctx or the server's default num_ctx,
<arch>.context_length)`` in every generation. Other rules are further generations in :data:`GENERATIONS`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, NamedTuple

from wiki_embeddings.devtools.ollama_dev.backends import Backend
from wiki_embeddings.devtools.ollama_dev.faults import Faults
from wiki_embeddings.devtools.ollama_dev.models import DEFAULT_NUM_CTX, ModelSpec
from wiki_embeddings.devtools.ollama_dev.replies import OLD_TOO_LONG, TOO_LONG, Reply, error

# A version whose /api/embed refuses over-context input whatever `truncate` says (ollama#14186, 0.13.5 up to at
# least 0.20) and answers a NaN in a vector with a 500 (ollama#15582 on 0.20.2): the default mode.
OLLAMA_VERSION = "0.20.2"
DEFAULT_NUM_BATCH = 2048  # llama-server's physical batch for embeddings when nothing sets num_batch (0.30+)
DEFAULT_RELOAD_MS = 500.0  # the model reload after a runner crash


class Rules(NamedTuple):
    """What sets one generation apart (see the module docstring)."""

    version: str  # what /api/version reports
    handler_cuts: bool  # /api/embed cuts an input over the window unless `truncate` is false
    batch: str  # what an input over num_batch meets: "none" (num_batch not consulted), "cut" or "crash"
    too_long: str  # the refusal's text on /api/embed


GENERATIONS: dict[str, Rules] = {
    "0.12": Rules("0.12.11", True, "none", OLD_TOO_LONG),
    "0.20": Rules(OLLAMA_VERSION, False, "none", TOO_LONG),
    "0.30": Rules("0.32.15", True, "cut", TOO_LONG),
    "0.31-crash": Rules("0.31.2", True, "crash", TOO_LONG),
}
_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?(-crash)?")


def generation_of(version: str) -> tuple[str, str]:
    """``(generation, reported version)`` for a generation name or a full version (``0.13.4`` -> ``0.12``).

    A full version reports itself; ``-crash`` after a version of 0.30 or later picks the crash mode.
    """
    if version in GENERATIONS:
        return version, GENERATIONS[version].version
    match = _VERSION.fullmatch(version)
    if match is None:
        raise ValueError(f"unknown Ollama version {version!r} (one of {', '.join(GENERATIONS)}, or like 0.13.4)")
    number = (int(match[1]), int(match[2]), int(match[3] or 0))
    crash = match[4] is not None
    if crash and number < (0, 30, 0):
        raise ValueError(f"{version!r}: the crash mode exists from 0.30 on")
    generation = "0.12" if number < (0, 13, 5) else "0.20" if number < (0, 30, 0) else "0.30"
    return ("0.31-crash" if crash else generation), version.removesuffix("-crash").lstrip("v")


class Limits(NamedTuple):
    """One request's limits in tokens: its window (``num_ctx`` as applied) and physical batch (``num_batch``)."""

    window: int
    batch: int


class Fitted(NamedTuple):
    """The inputs as the model evaluates them (cut where the profile cuts), the tokens they take, and whether
    the runner aborts on one of them (the crash mode)."""

    inputs: list[str]
    tokens: int
    crash: bool = False


@dataclasses.dataclass(frozen=True)
class Profile:
    """One Ollama generation's rules for an embed request, with one server's defaults (module docstring).

    ``num_ctx``: the server's default num_ctx (``OLLAMA_CONTEXT_LENGTH``) for a model whose Modelfile sets
    none; ``num_batch``: its default physical batch (0.30+); ``reload_ms`` and ``crash_status``: the crash mode's
    reload pause and status.
    """

    version: str = OLLAMA_VERSION
    generation: str = "0.20"
    num_ctx: int = DEFAULT_NUM_CTX
    num_batch: int = DEFAULT_NUM_BATCH
    reload_ms: float = DEFAULT_RELOAD_MS
    crash_status: int = 400

    def __post_init__(self) -> None:
        if self.generation not in GENERATIONS:
            raise ValueError(f"unknown generation {self.generation!r} (one of {', '.join(GENERATIONS)})")
        if self.num_ctx < 3 or self.num_batch < 3:
            raise ValueError("num_ctx and num_batch must be >= 3 (two special tokens and one of text)")
        if self.reload_ms < 0:
            raise ValueError("reload_ms must be >= 0")
        if not 100 <= self.crash_status <= 599:
            raise ValueError("crash_status must be an HTTP status (100-599)")

    @classmethod
    def of(cls, version: str = "0.20", **defaults: Any) -> Profile:
        """The profile of a generation name or a full version (see :func:`generation_of`)."""
        generation, reported = generation_of(version)
        return cls(version=reported, generation=generation, **defaults)

    @property
    def rules(self) -> Rules:
        return GENERATIONS[self.generation]

    def describe(self) -> dict[str, Any]:
        """The profile for the stats."""
        return {**dataclasses.asdict(self), "batch_rule": self.rules.batch}

    def limits(self, spec: ModelSpec, options: dict[str, Any] | None, faults: Faults) -> Limits | Reply:
        """The window, min(options.num_ctx or the default num_ctx, the trained context), and the batch."""
        trained = faults.max_input_tokens or typing.cast(int, spec.context_length)
        default = trained if faults.max_input_tokens else (spec.num_ctx or self.num_ctx)
        num_ctx = _int_option(options, "num_ctx")
        if isinstance(num_ctx, Reply):
            return num_ctx
        num_batch = _int_option(options, "num_batch")
        if isinstance(num_batch, Reply):
            return num_batch
        return Limits(min(num_ctx or default, trained), num_batch or self.num_batch)

    def fit(
        self,
        texts: list[str],
        limits: Limits,
        truncate: bool,
        handler: bool,
        faults: Faults,
        backend: Backend,
        char_limit: int | None,
    ) -> Fitted | None:
        """The inputs as the model evaluates them, or None when one is refused as too long.

        ``handler``: the request went through ``/api/embed``'s handler (also ``/v1/embeddings``), which cuts
        where the generation cuts; the legacy endpoint goes to the runner directly. ``char_limit``: an extra
        context in characters (the server's ``--context-chars``, fault ``max_input_chars``), checked first.
        """
        rules = self.rules
        allowed = truncate or faults.ignore_truncate
        window_cut = (faults.silent_truncate or (handler and rules.handler_cuts)) and allowed
        inputs: list[str] = []
        total = 0
        crash = False
        for text in texts:
            if char_limit is not None and len(text) > char_limit:
                if not window_cut:
                    return None
                text = text[:char_limit]
            tokens = backend.count(text)
            if tokens > limits.window:
                if not window_cut:
                    return None
                text, tokens = backend.cut(text, limits.window), limits.window  # Ollama reports the limit
            if rules.batch != "none" and tokens > limits.batch:
                if rules.batch == "crash":
                    crash = True
                elif not handler:
                    return None
                else:
                    text, tokens = backend.cut(text, limits.batch), limits.batch
            inputs.append(text)
            total += tokens
        return Fitted(inputs, total, crash)


def _int_option(options: dict[str, Any] | None, name: str) -> int | Reply | None:
    """``options[name]`` when set to a positive number, None when absent or not positive, the 500 when not a number."""
    value = (options or {}).get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return error(500, f'option "{name}" must be of type integer')  # a scheduling error: 500
    return int(value) if int(value) > 0 else None


CURRENT = Profile()
