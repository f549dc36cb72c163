"""Ollama-protocol HTTP server for tests, the demo and benchmarks, as strict as current Ollama.

Real Ollama cannot be installed where this project is developed and tested, so this package speaks the
part of its HTTP API the pipeline and common clients (the ``ollama`` package, ``langchain-ollama``) use,
over a real socket: ``POST /api/embed``, legacy ``POST /api/embeddings``, ``POST /api/show``,
``GET /api/ps``, ``POST /api/pull``, ``GET|HEAD /api/tags``, ``GET|HEAD /api/version`` and ``GET|HEAD /``;
a known path asked with another method answers 405, an unknown one 404, as Ollama's gin router does.
Two backends: ``hash`` (deterministic vectors, tokens estimated by :func:`approx_tokens`) and ``minilm``
(the real all-MiniLM-L6-v2 and its tokenizer; context 256 tokens, so what it accepts is embedded whole).

Default mode, "current Ollama" (0.13.5 up to at least 0.20, see ollama/ollama#14186): context is counted
in *tokens* per model (``min(options.num_ctx or the model's default num_ctx, <arch>.context_length)``) and
an input over it is refused with 400 ``{"error":"the input length exceeds the context length"}``
whatever ``truncate`` says (legacy ``/api/embeddings``: 500, same text). Fault ``silent_truncate``
(CLI ``--silent-truncate``) gives the behaviour of Ollama before 0.13.5 (and again of the newest
releases): over-long inputs are cut to the context silently, the only trace being ``prompt_eval_count``
at the limit; ``truncate: false`` still answers 400. A NaN in a vector is a 500 ``failed to encode
response: json: unsupported value: NaN`` (fault ``nan_marker``), as real Ollama answers it.

Faults (latency, limited slots, periodic errors, hangs, slow, endless or oversized bodies, malformed
answers, model load time...) can be set at start or at runtime (``POST /_control/faults``) so client
resilience is tested against real HTTP; ``GET /_control/stats`` also shows the last request's
``keep_alive``, ``options``, ``truncate`` and ``dimensions``. Fault ``model_salt`` simulates an ``ollama pull``
that replaced a model's weights under the same name: other vectors, another ``/api/tags`` digest.

The modules, each deciding one thing (imports go down this list, never up):

* ``replies``: the reply type and Ollama's own texts; ``models``: Ollama's name rules, the table of known
  models, :class:`ModelSpec`; ``backends``: vectors and token counts (hash, MiniLM);
* ``faults``: :class:`Faults` and the live state they act on (request count, slots, hangs);
  ``binding``: request bodies bound as strictly as Go binds them; ``profiles``: one Ollama generation's
  rules (version, window, over-long input); ``state``: counters and model residency; ``vectors``:
  the cache and the vector faults;
* ``embed``: the pipeline of one embed request and the wire formats it is spoken in; ``routes``: every
  path; ``transport``: the HTTP server; ``server``: :class:`OllamaServer`; ``process``: the subprocess and
  the command line.

Where later behaviour plugs in: another Ollama generation is another :class:`Profile` (its version,
window and handling of an over-long input), chosen by ``OllamaServer(profile=...)``; an injected failure
rate is decided in ``FaultControl.failure_status``; a cost model (e.g. inputs embedded one after another)
in ``EmbedPipeline._evaluate``, the work done holding a slot; another wire format (e.g. the
OpenAI-compatible ``/v1/embeddings``) is a ``Wire`` of ``embed`` and a row of ``routes.ROUTES``.

Run ``python -m wiki_embeddings.devtools.ollama_server --help`` for the command line.
"""

from wiki_embeddings.devtools.ollama_dev.backends import approx_tokens, hash_vector
from wiki_embeddings.devtools.ollama_dev.faults import Faults
from wiki_embeddings.devtools.ollama_dev.models import (
    DEFAULT_HASH_MODELS,
    DEFAULT_MINILM_MODELS,
    DEFAULT_NUM_CTX,
    MINILM_CONTEXT_TOKENS,
    ModelSpec,
)
from wiki_embeddings.devtools.ollama_dev.process import main, start_subprocess, stop_subprocess
from wiki_embeddings.devtools.ollama_dev.profiles import OLLAMA_VERSION, Profile
from wiki_embeddings.devtools.ollama_dev.server import OllamaServer

__all__ = [
    "DEFAULT_HASH_MODELS",
    "DEFAULT_MINILM_MODELS",
    "DEFAULT_NUM_CTX",
    "MINILM_CONTEXT_TOKENS",
    "OLLAMA_VERSION",
    "Faults",
    "ModelSpec",
    "OllamaServer",
    "Profile",
    "approx_tokens",
    "hash_vector",
    "main",
    "start_subprocess",
    "stop_subprocess",
]
