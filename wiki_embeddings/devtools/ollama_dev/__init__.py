"""Ollama-protocol HTTP server for tests, the demo and benchmarks, as strict as current Ollama.

Real Ollama cannot be installed where this project is developed and tested, so this package speaks the
part of its HTTP API the pipeline and common clients (the ``ollama`` package, ``langchain-ollama``, OpenAI
clients) use, over a real socket: ``POST /api/embed``, legacy ``POST /api/embeddings``, the
OpenAI-compatible ``POST /v1/embeddings`` and ``GET /v1/models[/{model}]`` as Ollama serves them (module
``openai``: no ``truncate``, ``options`` or ``keep_alive``; ``encoding_format`` ``float`` or ``base64``;
OpenAI's error shape), ``POST /api/show``, ``GET /api/ps``, ``POST /api/pull``, ``GET|HEAD /api/tags``,
``GET|HEAD /api/version`` and ``GET|HEAD /``; a known path asked with another method answers 405, an
unknown one 404, as Ollama's gin router does. Two backends: ``hash`` (deterministic vectors, tokens
estimated by :func:`approx_tokens`) and ``minilm`` (the real all-MiniLM-L6-v2 and its tokenizer; context
256 tokens, so what it accepts is embedded whole).

Ollama's generations (``--ollama-version``, ``OllamaServer(ollama_version=...)``; module ``profiles``
has the details and the sources): ``0.20`` is the default, "current Ollama" (0.13.5 up to at least 0.2x,
ollama#14186): context is counted in *tokens* per model (``min(options.num_ctx or the model's num_ctx or
the server's --num-ctx, <arch>.context_length)``) and an input over it is refused with 400
``{"error":"the input length exceeds the context length"}`` whatever ``truncate`` says (legacy
``/api/embeddings``: 500, same text). ``0.12`` (before 0.13.5) cuts an over-long input silently, the only
trace ``prompt_eval_count`` (``truncate: false``: 400 ``input exceeds maximum context length``). ``0.30``
(llama-server) cuts silently at ``num_batch`` (``options.num_batch`` or ``--num-batch``, 2048) even when
``num_ctx`` is larger; ``0.31-crash`` answers such an input with the runner's crash (``do embedding
request: Post "http://127.0.0.1:PORT/v1/embeddings": EOF``, status ``--crash-status``, 400 by default as
0.31's handler answers) and a model reload of ``--reload-ms`` that every request waits out. ``/api/version``
reports the generation's version. Fault ``silent_truncate`` cuts at the window in any generation. A NaN in
a vector is a 500 ``failed to encode response: json: unsupported value: NaN`` (fault ``nan_marker``), as
real Ollama answers it.

Cost model: a request holds one of ``slots`` (1, as Ollama loads an embedding model with one parallel
slot) for ``latency_ms + per_text_ms`` (``--per-input-ms``) × its inputs, so N inputs cost N times one
(Ollama embeds a request's inputs one after another); the ``minilm`` backend encodes a request's texts as
one batch and the vector cache makes repeated texts free, which is kinder than Ollama: fault
``serial_inputs`` (``--serial-inputs``) evaluates them one after another, uncached.

Faults (latency, limited slots, periodic or seeded random errors, hangs, slow, endless or oversized bodies,
malformed answers, model load time...) can be set at start or at runtime (``POST /_control/faults``) so
client resilience is tested against real HTTP; each :class:`OllamaServer` has its own, so several in one
process are several servers (one always 503 with ``down``, one failing ``fail_rate`` of requests, one
stopped: connection refused, ``start()`` again to bring it back). ``GET /_control/stats`` also shows the
last request's ``keep_alive``, ``options``, ``truncate`` and ``dimensions``, the profile and the runner
crashes. Fault ``model_salt`` simulates an ``ollama pull`` that replaced a model's weights under the same
name: other vectors, another ``/api/tags`` digest.

The modules, each deciding one thing (imports go down this list, never up):

* ``replies``: the reply type and Ollama's own texts; ``models``: Ollama's name rules, the table of known
  models, :class:`ModelSpec`; ``backends``: vectors and token counts (hash, MiniLM);
* ``faults``: :class:`Faults` and the live state they act on (request count, slots, hangs, the failure
  draw); ``binding``: request bodies bound as strictly as Go binds them; ``profiles``: one Ollama
  generation's rules (version, window and batch, over-long input, crash); ``state``: counters and model
  residency (reloads included); ``vectors``: the cache and the vector faults;
* ``embed``: the pipeline of one embed request and the wire formats it is spoken in; ``openai``: the
  OpenAI-compatible wire and model list; ``routes``: every path; ``transport``: the HTTP server;
  ``server``: :class:`OllamaServer`; ``process``: the subprocess and the command line.

Where later behaviour plugs in: another Ollama generation is another row of ``profiles.GENERATIONS`` (or
a rule of :meth:`Profile.fit`); another injected failure is decided in ``FaultControl.failure_status``;
another cost model in ``EmbedPipeline._evaluate``, the work done holding a slot; another wire format is a
``Wire`` of ``embed`` and a row of ``routes.ROUTES``.

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
from wiki_embeddings.devtools.ollama_dev.profiles import GENERATIONS, OLLAMA_VERSION, Profile
from wiki_embeddings.devtools.ollama_dev.server import OllamaServer

__all__ = [
    "DEFAULT_HASH_MODELS",
    "DEFAULT_MINILM_MODELS",
    "DEFAULT_NUM_CTX",
    "GENERATIONS",
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
